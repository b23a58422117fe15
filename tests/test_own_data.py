"""A study on the user's own data: labels already in hand, labels named by case, scans without labels, label
files with foreign classes or no foreground, unreadable or NaN cases, images added or removed between reruns, a
pseudo-label band that misses the organ. Each test makes the situation happen, then checks what the run does and
says. CPU, tiny phantoms, seconds each."""
import json
from pathlib import Path
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

import al_loop
import study
import data
import tiny
import folders
import run_folder
from report import nanmean
from cases import split_cases
from tiny import copy_data, deliver_labels, messages, own_scans, run, tiny_args, to_annotate


def test_unreadable_case_is_left_out_with_a_warning(phantom, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(phantom, root)
    (root / "imagesTr" / "phantom_4.nii.gz").write_bytes(b"not a nifti file")
    cfg = al_loop.parse_args(tiny.args(root, tmp_path / "run"))[0]
    with pytest.warns(UserWarning, match="phantom_4"):
        s = study.open_study(cfg)[0]
        study.preprocess(s)
    assert "phantom_4" not in s.cases.pool + s.cases.val
    assert len(s.cases.pool) + len(s.cases.val) == 9


def test_own_scans_without_any_label_get_no_validation_set(phantom, tmp_path):
    root = tmp_path / "unlabeled"
    shutil.copytree(phantom, root)
    shutil.rmtree(root / "labelsTr")
    (root / "dataset.json").unlink()
    s = study.open_study(al_loop.parse_args(tiny.args(root, tmp_path / "run"))[0])[0]
    assert s.cases.annotation and s.cases.val == [] and len(s.cases.pool) == 10


def rewrite_label(path, change):
    """Replace the label file `path` by change(label array), same affine; returns the new array."""
    img = nib.load(path)
    label = change(np.asarray(img.dataobj).astype(np.uint8))
    nib.save(nib.Nifti1Image(label, img.affine), path)
    return label


# ----------------------------------------------------------------------------------- 1. _semi with the pool all labeled


def test_semi_strategy_with_every_pool_case_labeled_skips_lines_9_to_11(phantom12, tmp_path):
    """12 cases, 8 for validation: a pool of 4 that k 2 x 2 iterations labels completely."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record:
        assert al_loop.main(tiny_args(phantom12, out, "--n-val", "8")) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["pool"]) == 4
    said = messages(record)
    assert any("labels all 4 pool cases" in m and "no unlabeled case left" in m for m in said), said   # up front
    assert any("proxyrank_var_semi seed 0 iteration 2: every pool case is labeled, so lines 9-11" in m
               and "are skipped" in m for m in said), said
    st = tiny.read_states(out)["0"]["proxyrank_var_semi"]
    assert [r["n_labeled"] for r in st["iterations"]] == [2, 4]
    assert sorted(st["labeled"]) == sorted(split["pool"])                     # the fault: nothing left unlabeled
    assert len(st["iterations"][0]["certain"]) == 2                           # iteration 1 fine-tuned as usual
    assert st["iterations"][1]["certain"] == []                               # iteration 2 had nothing to use
    assert np.isfinite(st["iterations"][1]["mean_dice"])                      # Ms stands in for Msemi
    assert not (out / "checkpoints" / "seed0" / "proxyrank_var_semi" / "iter1_semi.pt").exists()
    assert (out / "checkpoints" / "seed0" / "proxyrank_var_semi" / "iter0_semi.pt").exists()

# ----------------------------------------------------------------------------------- 4. labels in hand, annotation mode


def test_labels_in_hand_join_tl_and_only_unlabeled_cases_are_selected(phantom12, tmp_path):
    root, out = own_scans(phantom12, tmp_path, labeled=6), tmp_path / "run"
    labeled = {c["id"] for c in folders.read_msd(root) if c["label"]}
    assert len(labeled) == 6 and len(folders.read_msd(root)) == 12
    args = tiny.args(root, out)                                   # the preset's strategy: annotation mode picks one
    have = set(labeled)
    for _ in range(2):                                            # line 5's selection, then iteration 1's
        assert al_loop.main(args) == 0
        rows = to_annotate(out)
        assert len(rows) == tiny.K and not {r["case"] for r in rows} & have, rows
        for r in rows:                                            # the annotator delivers
            shutil.copy(phantom12 / "labelsTr" / f"{r['case']}.nii.gz", root / "labelsTr")
            have.add(r["case"])
    split = json.loads((out / "split.json").read_text())
    st = tiny.read_states(out)["0"]["proxyrank_var_semi"]
    given = [c for c in split["pool"] if c in labeled]
    assert len(split["val"]) == 2 and set(split["val"]) <= labeled and len(given) == 4
    assert st["given"] == given and st["labeled"][:4] == given
    record = st["iterations"][0]
    assert record["n_labeled"] == 4 + tiny.K                              # Tl: the labels in hand + line 5's k
    assert record["certain"] and not set(record["certain"]) & set(given)
    assert len(record["acquired"]) == tiny.K and not set(record["acquired"]) & set(given)
    assert not set(st["labeled"][4:]) & labeled and not set(st["scores"]) & set(given)

# ------------------------------------------------------------------------------------ 5. label files named as nnU-Net's


def nnunet_named_folder(phantom, dest):
    """imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (0/1: no dataset.json names more classes), no
    dataset.json."""
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in folders.read_msd(phantom):
        shutil.copy(case["image"], dest / "imagesTr" / f"{case['id']}_0000.nii.gz")
        shutil.copy(case["label"], dest / "labelsTr" / f"{case['id']}.nii.gz")
        rewrite_label(dest / "labelsTr" / f"{case['id']}.nii.gz", lambda x: (x > 0).astype(np.uint8))
    return dest


def test_labels_named_by_case_are_used_and_an_orphan_is_named(phantom, tmp_path):
    root = nnunet_named_folder(phantom, tmp_path / "scans")
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "labelsTr" / "ghost_9.nii.gz")
    assert not (root / "dataset.json").exists() and not (root / "labelsTr" / "phantom_0_0000.nii.gz").exists()
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"labelsTr: 1 label file pairs with no image and are not used "
                                         r"\(ghost_9.nii.gz\)"):
        s = study.open_study(al_loop.parse_args(tiny_args(root, out))[0])[0].cases
    assert not s.annotation and len(s.files) == 10 and all(c["label"] for c in s.files.values())
    assert len(s.val) == 2
    with pytest.warns(UserWarning, match="ghost_9.nii.gz"):
        states = run(root, out)
    assert not (out / "to_annotate.csv").exists()
    assert all(len(st["iterations"]) == 2 for st in states["0"].values())

# ------------------------------------------------------------------------------------ 8. labels checked before training


def test_pool_label_with_a_foreign_class_stops_before_training(phantom, tmp_path, monkeypatch):
    root = copy_data(phantom, tmp_path)
    ids = [c["id"] for c in folders.read_msd(root)]
    pool = split_cases(ids, 2, 0, None)["pool"]
    case = {c["id"]: c for c in folders.read_msd(root)}[pool[-1]]
    assert (rewrite_label(case["label"], lambda x: np.where(x > 0, 7, 0).astype(np.uint8)) == 7).any()
    trained = []
    monkeypatch.setattr(al_loop, "train_proxy", lambda *a, **kw: trained.append(a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(f"case {case['id']}: {case['label']}: label value 7 but the task "
                                                   "has 3 classes")):
        al_loop.main(tiny_args(root, out))
    assert trained == [] and not list(out.rglob("*.pt")) and not (out / "split.json").exists()

# ------------------------------------------------------------------------------------ 9. an all-zero validation label


def test_validation_label_without_foreground_is_named_and_left_out_of_the_means(phantom, tmp_path):
    root = copy_data(phantom, tmp_path)
    ids = [c["id"] for c in folders.read_msd(root)]
    val = split_cases(ids, 3, 0, None)["val"]
    case = {c["id"]: c for c in folders.read_msd(root)}[val[0]]
    assert not rewrite_label(case["label"], np.zeros_like).any()
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=re.escape(case["label"]) + ": validation label without foreground"):
        assert al_loop.main(tiny.args(root, out, "--strategy", "rand", "--n-val", "3")) == 0
    assert json.loads((out / "split.json").read_text())["val"] == val
    lines = (out / "per_case_dice.csv").read_text().splitlines()
    assert lines[0] == "strategy,seed,iteration,case,dice_liver,dice_tumour,mean_dice"
    empty = [line for line in lines if f",{case['id']}," in line]
    assert len(empty) == 2 and all(line.endswith(",nan,nan,nan") for line in empty), empty
    for rec in tiny.read_states(out)["0"]["rand"]["iterations"]:
        assert all(np.isnan(rec["per_case"][case["id"]]))
        others = np.array([rec["per_case"][c] for c in val[1:]], float)
        assert rec["dice"] == pytest.approx(list(nanmean(others, 0)), nan_ok=True)
        assert np.isfinite(rec["dice"][0])                               # the other cases' liver mean
    assert "liver: 1 of 3 validation cases have no liver" in (out / "summary.md").read_text()

# ---------------------------------------------------------------------------------- 10. a pseudo-label band that misses


class StopAtProxy(Exception):
    """Raised in place of the proxy's training: the pseudo labels are made and reported by then."""


@pytest.mark.parametrize("band, says", [
    ("2000,2100", "10 case(s) have no voxel in the pseudo-label band; try --hu-band auto"),
    ("-300,-50", "the pseudo-label band -300,-50 HU misses the labeled organ: its Dice against the validation "
                 "labels is 0.00")])
def test_pseudo_label_band_that_misses_the_organ_points_to_hu_band_auto(phantom, tmp_path, monkeypatch, band, says):
    """2000-2100 HU finds nothing; -300 to -50 HU (fat) finds something in every case, but not the organ."""
    def stop(*a, **kw):
        raise StopAtProxy()

    monkeypatch.setattr(al_loop, "train_proxy", stop)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as record, pytest.raises(StopAtProxy):
        al_loop.main(tiny.args(phantom, out, "--strategy", "proxyrank", "--hu-band", band))
    rows = [line.split(",") for line in (out / "pseudo_labels.csv").read_text().splitlines()[1:]]
    dice = [float(r[3]) for r in rows if r[3]]
    assert len(dice) == 2 and max(dice) < 0.1                           # the fault: the band misses the organ
    voxels = [int(r[1]) for r in rows]
    assert max(voxels) == 0 if band == "2000,2100" else min(voxels) > 0
    said = [m for m in messages(record) if "--hu-band auto" in m]
    assert any(says in m for m in said), messages(record)

# ------------------------------------------------------------------------------- 13. the demo preset on a user's folder


def test_demo_preset_on_a_users_folder_keeps_the_papers_validation_rule(tmp_path):
    folder = str(tmp_path / "mine")
    cfg = al_loop.parse_args(["--data", folder, "--preset", "demo"])[0]
    assert cfg.n_val == al_loop.PAPER.n_val == 0 and al_loop.DEMO.n_val == 8
    assert cfg.steps == al_loop.DEMO.steps and cfg.proxy_patches == "balanced"   # the rest of the demo stays
    assert al_loop.parse_args(["--data", folder, "--preset", "demo", "--n-val", "3"])[0].n_val == 3
    assert al_loop.parse_args(["--preset", "demo"])[0].n_val == 8
    assert al_loop.parse_args([])[0].n_val == 8


def test_unreadable_and_nan_cases_are_left_out_and_listed(phantom, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(phantom, root)
    cases = {c["id"]: c for c in folders.read_msd(root)}
    Path(cases["phantom_4"]["image"]).write_bytes(b"not a nifti file")
    img = nib.load(cases["phantom_7"]["image"])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    volume[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(volume, img.affine), cases["phantom_7"]["image"])
    with pytest.warns(UserWarning, match="phantom_7.nii.gz: the image has NaN or infinite voxels"):
        run(root, tmp_path / "run", "--n-val", "1")
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "2 case(s) left out" in summary and "- phantom_4:" in summary and "- phantom_7:" in summary


def test_nan_voxels_are_an_error_naming_the_file(tmp_path):
    volume = np.zeros((9, 10, 11), np.float32)
    volume[1, 2, 3] = np.inf
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    with pytest.raises(ValueError, match="x.nii.gz: the image has NaN or infinite voxels"):
        data.preprocess_case(path, None, (2.0, 2.0, 2.0))


# ------------------------------------------------------------------------------------ labels before training


def break_label(root, which, how):
    """Rewrite one case's label: 'grid' (another affine), 'value' (a class the task lacks)."""
    case = folders.read_msd(root)[which]
    img = nib.load(case["label"])
    label, affine = np.asarray(img.dataobj).astype(np.uint8), img.affine.copy()
    if how == "grid":
        affine[0, 3] += 10.0
    else:
        label[label > 0] = 7
    nib.save(nib.Nifti1Image(label, affine), case["label"])
    return case


@pytest.mark.parametrize("part, how, message", [
    ("pool", "grid", "(?s)1 label file.*{name}.*do not share one voxel grid"),
    ("val", "grid", "(?s)1 label file.*{name}.*do not share one voxel grid"),
    ("val", "value", "{name}: label value 7 but the task has 3 classes")])
def test_label_problems_stop_before_training(phantom, tmp_path, part, how, message):
    """Every label header, and every validation label's values, are checked before the first training step."""
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    ids = [c["id"] for c in folders.read_msd(root)]
    case = break_label(root, ids.index(split_cases(ids, 2, 0, None)[part][0]), how)
    with pytest.raises(SystemExit, match=message.format(name=Path(case["label"]).name)):
        al_loop.main(tiny_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_multiclass_labels_without_dataset_json_are_a_clear_error(phantom, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    (root / "dataset.json").unlink()                 # the phantom labels hold classes 0, 1, 2
    with pytest.raises(SystemExit, match="label value 2 but the task has 2 classes.*without a dataset.json"):
        al_loop.main(tiny_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pool_label_values_checked_before_training(phantom, tmp_path, monkeypatch):
    """Every pool label's values are checked before any training (none is used for selection before its case
    is selected): a bad one stops the run at once with a message naming the file, and nothing is trained."""
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    split = split_cases([c["id"] for c in folders.read_msd(root)], 2, 0, None)
    ids = [c["id"] for c in folders.read_msd(root)]
    for cid in split["pool"]:
        break_label(root, ids.index(cid), "value")
    with pytest.raises(SystemExit, match="case phantom_.*labelsTr/phantom_.*label value 7"):
        al_loop.main(tiny_args(root, tmp_path / "run", "--strategy", "rand"))
    assert not list((tmp_path / "run").glob("**/*.pt"))
    assert not run_folder.state_file(tmp_path / "run", 0, "rand").exists()


def test_validation_label_deleted_between_rounds_is_named_before_training(phantom, tmp_path):
    root, out = own_scans(phantom, tmp_path, labeled=6), tmp_path / "run"
    args = tiny.args(root, out, "--strategy", "rand")
    assert al_loop.main(args) == 0
    deliver_labels(phantom, root, out)
    val = json.loads((out / "split.json").read_text())["val"][0]
    (root / "labelsTr" / f"{val}.nii.gz").unlink()                         # the user deletes a validation label
    with pytest.raises(SystemExit, match=rf"labelsTr/{val}.nii.gz: missing, but {val} is a validation case of "
                                         r"this run \(split.json\); put its label back"):
        al_loop.main(args)
    assert not (out / "checkpoints").exists()                             # before any training

# ----------------------------------------------------------------------------------------- the data changed


def binary_folder(phantom, dest):
    """The phantoms without dataset.json (imagesTr/ + labelsTr/ paired by name), labels 0/1."""
    shutil.copytree(phantom, dest)
    (dest / "dataset.json").unlink()
    for path in (dest / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), path)
    return dest


def test_images_added_after_the_run_began_are_named_in_one_message_and_not_used(phantom, tmp_path):
    """A new scan and a label saved among the images by mistake: one message names both, says they are not
    used and what the run does; no competing split-size warning; no annotation mode for the unlabeled two."""
    root, out = binary_folder(phantom, tmp_path / "scans"), tmp_path / "run"
    args = tiny_args(root, out, "--strategy", "rand", "--n-val", "0")        # the 20 % rule: 2 of 10
    assert al_loop.main(args + ["--iterations", "1"]) == 0
    for name in ("phantom_10", "phantom_11", "phantom_12"):
        shutil.copy(root / "imagesTr" / "phantom_1.nii.gz", root / "imagesTr" / f"{name}.nii.gz")
    shutil.copy(root / "labelsTr" / "phantom_0.nii.gz", root / "imagesTr" / "phantom_0_seg.nii.gz")
    with pytest.warns(UserWarning) as record:
        assert al_loop.main(args + ["--iterations", "2"]) == 0
    said = [m for m in messages(record) if "phantom_1" in m or "split" in m]
    assert len(said) == 1, said
    assert "changed since this run began" in said[0] and "4 image(s) added (phantom_0_seg, phantom_10, phantom_11, " \
        "phantom_12) are not used (phantom_0_seg: a label saved among the images?" in said[0]
    assert "the run goes on with 8 pool and 2 validation cases" in said[0]
    assert not (out / "to_annotate.csv").exists()
    assert [r["n_labeled"] for r in tiny.read_states(out)["0"]["rand"]["iterations"]] == [2, 4]


def test_removed_scan_never_selected_is_left_out_and_a_selected_one_is_named(phantom, tmp_path):
    root, out = binary_folder(phantom, tmp_path / "scans"), tmp_path / "run"
    args = tiny_args(root, out, "--strategy", "rand")
    assert al_loop.main(args + ["--iterations", "1"]) == 0
    st = tiny.read_states(out)["0"]["rand"]
    split = json.loads((out / "split.json").read_text())
    unused = next(c for c in split["pool"] if c not in st["labeled"])
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / f"{unused}.nii.gz").unlink()
    with pytest.warns(UserWarning, match=rf"1 pool image\(s\) removed \({unused}\), never selected, are left out"):
        assert al_loop.main(args + ["--iterations", "2"]) == 0
    st = tiny.read_states(out)["0"]["rand"]
    assert len(st["iterations"]) == 2 and unused not in st["labeled"]
    assert unused in (out / "summary.md").read_text()
    picked = st["labeled"][0]
    (root / "imagesTr" / f"{picked}.nii.gz").unlink()
    with pytest.raises(SystemExit, match=rf"the image\(s\) of {picked} are gone since this run began, but the run "
                                         r"validates on them or has selected them .* put the files back"):
        al_loop.main(args + ["--iterations", "3"])
