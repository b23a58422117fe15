"""nnU-Net in and out, end to end: a study on an nnU-Net raw folder gives the results of the MSD folder,
--export-nnunet writes a run's selection (a run of boxes as partial labels with nnU-Net's ignore label), and
nnU-Net's own checker and MSD converter accept our folders (when nnunetv2 is installed). CPU, tiny phantoms."""
import csv
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import al_loop
import data
import tiny
import folders
import run_folder
import nnunet
from cases import Cases
from tiny import unit_case, unit_start
from tiny import NNUNET_ENV, WITH_FULL, rows

VOX = (8, 8, 8)
PATCH = ("--query", "patch", "--query-vox", ",".join(map(str, VOX)))


def nnunet_copy(msd_root, dest, labeled=None):
    """The MSD folder as nnU-Net v2 raw data: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (only the
    `labeled` ids, default all), dataset.json with channel_names, labels name -> int, file_ending, numTraining."""
    info = json.loads((msd_root / "dataset.json").read_text())
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    cases = folders.read_msd(msd_root)
    for case in cases:
        shutil.copy(case["image"], dest / "imagesTr" / f"{case['id']}_0000.nii.gz")
        if labeled is None or case["id"] in labeled:
            shutil.copy(case["label"], dest / "labelsTr" / f"{case['id']}.nii.gz")
    (dest / "dataset.json").write_text(json.dumps({
        "name": info["name"], "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": len(cases),
        "labels": {name: int(k) for k, name in info["labels"].items()}}))
    return dest

# ------------------------------------------------------------------------------------ nnU-Net raw data in


def test_nnunet_raw_copy_gives_the_results_of_the_msd_folder(phantom, msd_run, tmp_path):
    root = nnunet_copy(phantom, tmp_path / "Dataset009_Phantom")
    assert [c["id"] for c in folders.read_msd(root)] == [c["id"] for c in folders.read_msd(phantom)]
    assert all(c["image"].endswith("_0000.nii.gz") for c in folders.read_msd(root))      # read as nnU-Net's
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(root, out, *WITH_FULL)) == 0          # as the msd_run fixture
    assert json.loads((out / "split.json").read_text()) == json.loads((msd_run / "split.json").read_text())
    mine, theirs = tiny.read_states(out)["0"], tiny.read_states(msd_run)["0"]
    assert sorted(mine) == sorted(theirs) == ["full", "proxyrank_var_semi", "rand"]
    for name in theirs:
        assert mine[name]["labeled"] == theirs[name]["labeled"], name
        for a, b in zip(mine[name]["iterations"], theirs[name]["iterations"], strict=True):
            assert a["dice"] == pytest.approx(b["dice"], nan_ok=True), name
            assert sorted(a["per_case"]) == sorted(b["per_case"])
            for case in b["per_case"]:
                assert a["per_case"][case] == pytest.approx(b["per_case"][case], nan_ok=True), (name, case)
    for name in ("results.csv", "per_case_dice.csv"):
        assert (out / name).read_text() == (msd_run / name).read_text(), name


def test_partly_labeled_nnunet_folder_asks_for_labelstr_files(phantom, tmp_path, capsys):
    ids = [c["id"] for c in folders.read_msd(phantom)]
    root = nnunet_copy(phantom, tmp_path / "Dataset009_Phantom", labeled=set(ids[:4]))
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(root, out)) == 0                              # stops for labels: exit 0
    printed = capsys.readouterr().out
    assert "annotation mode (6 unlabeled cases): strategy proxyrank_var_semi" in printed
    todo = rows(out / "to_annotate.csv")
    assert len(todo) == tiny.K and {r["case"] for r in todo} <= set(ids[4:])
    assert all(not (root / "labelsTr" / f"{r['case']}.nii.gz").exists() for r in todo)
    assert all(r["image"] == str(root / "imagesTr" / f"{r['case']}_0000.nii.gz") for r in todo)
    assert f"{tiny.K} case(s) need labels: see {out / 'to_annotate.csv'}" in printed
    assert f"save it as labelsTr/<case>.nii.gz in {root}, and rerun the same command" in printed

# ------------------------------------------------------------------------------------ a run's selection out


def test_export_nnunet_writes_the_selection_with_the_runs_split(phantom, msd_run, tmp_path, capsys):
    to = tmp_path / "raw"
    assert al_loop.main(["--out", str(msd_run), "--export-nnunet", "501", "--export-to", str(to),
                         "--strategy", "rand"]) == 0
    st = tiny.read_states(msd_run)["0"]["rand"]
    split = json.loads((msd_run / "split.json").read_text())
    train = st["labeled"][:st["iterations"][-1]["n_labeled"]]                  # what the last Ms trained on
    folder = to / "Dataset501_Phantom"
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": train, "val": split["val"]}]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        f"{c}_0000.nii.gz" for c in train + split["val"])
    info = json.loads((folder / "dataset.json").read_text())
    assert info["numTraining"] == len(train) + len(split["val"]) == 6 and info["channel_names"] == {"0": "CT"}
    assert info["proxy_al"]["strategy"] == "rand" and info["proxy_al"]["iteration"] == 2
    assert "nnUNetv2_plan_and_preprocess -d 501" in capsys.readouterr().out


def test_export_nnunet_names_the_choices_when_the_run_has_several(msd_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--export-nnunet: the run has 3 strategies \['full', 'proxyrank_var_semi', "
                                         r"'rand'\]; choose one with --strategy"):
        al_loop.main(["--out", str(msd_run), "--export-nnunet", "501", "--export-to", str(tmp_path / "raw")])
    assert not (tmp_path / "raw").exists()


def test_seed_without_export_nnunet_points_to_seeds(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        al_loop.main(["--out", str(tmp_path / "run"), "--seed", "1"])
    assert err.value.code == 2                                                 # argparse's usage error
    assert "--seed and --iteration choose what --export-nnunet exports; the study's seeds are --seeds" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_export_after_an_annotation_run_includes_the_last_rounds_labels(phantom, tmp_path, capsys):
    """After an annotation run has ended and the user has labeled what its last round asked for, the default
    export holds every labeled case (those cases too) and says which cases and from where; --iteration N
    still gives the training set of iteration N."""
    root, out = tmp_path / "mine", tmp_path / "run"
    shutil.copytree(phantom, root)
    answers = tmp_path / "answers"                          # what the annotator will draw
    shutil.copytree(root / "labelsTr", answers)
    info = json.loads((root / "dataset.json").read_text())
    for entry in info["training"]:                          # labels for 4 of the 10 scans; the rest unlabeled
        if not entry["label"].endswith(("_0.nii.gz", "_1.nii.gz", "_2.nii.gz", "_3.nii.gz")):
            (root / entry.pop("label")).unlink()
    (root / "dataset.json").write_text(json.dumps(info))
    args = tiny.args(root, out, "--strategy", "rand", "--k", "1")
    for _ in range(5):                                      # rounds: run, label what it asks for, rerun
        assert al_loop.main(args) == 0
        if "need labels" not in capsys.readouterr().out:
            break
        with open(out / "to_annotate.csv") as f:
            for row in csv.DictReader(f):
                shutil.copy(answers / Path(row["save_label_as"]).name, row["save_label_as"])
    st = json.loads((out / "state" / "seed0_rand.json").read_text())
    last = st["iterations"][-1]
    assert len(st["iterations"]) == 2 and last["acquired"] and last["n_labeled"] == len(st["labeled"]) - 1
    assert all(Path(root / "labelsTr" / f"{c}.nii.gz").is_file() for c in st["labeled"])   # all labeled now
    export = ["--out", str(out), "--export-to", str(tmp_path / "raw"), "--export-nnunet"]
    assert al_loop.main(export + ["501"]) == 0
    printed = capsys.readouterr().out
    splits = json.loads((tmp_path / "raw" / "Dataset501_Phantom" / "splits_final.json").read_text())
    assert splits[0]["train"] == st["labeled"]              # the last round's case included
    assert f"{last['acquired'][0]} (acquired after iteration 2, labels from {root / 'labelsTr'})" in printed
    assert "training cases: " + ", ".join(st["labeled"][:-1]) + " (trained on at iteration 2" in printed
    assert al_loop.main(export + ["502", "--iteration", "2"]) == 0
    splits = json.loads((tmp_path / "raw" / "Dataset502_Phantom" / "splits_final.json").read_text())
    assert splits[0]["train"] == st["labeled"][:last["n_labeled"]]


# ---------------------------------------------------------------------------------------------- nnU-Net itself


def run_nnunet(code, tmp_path):
    """Run `code` in a fresh Python with nnU-Net's folders under tmp_path: nnunetv2.paths reads them when
    first imported, so a process of its own sees exactly these."""
    env = {**os.environ, **{name: str(tmp_path / name) for name in NNUNET_ENV}}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_export_passes_nnunet_verify_dataset_integrity(msd, tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install torch==2.13.0 nnunetv2)")
    cases, labels = folders.read_msd(msd), folders.read_task_info(msd)["labels"]
    folder = nnunet.export_dataset(cases, ["phantom_0", "phantom_2", "phantom_4"], ["phantom_1"], labels, 501,
                                   "Phantom", tmp_path / "nnUNet_raw")
    out = run_nnunet("from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
                     f"verify_dataset_integrity({str(folder)!r}, num_processes=1)", tmp_path)
    assert "verify_dataset_integrity Done" in out


def test_nnunet_msd_conversion_reads_as_the_msd_folder(msd, tmp_path):
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install torch==2.13.0 nnunetv2)")
    source = tmp_path / msd.name
    shutil.copytree(msd, source)
    (source / "imagesTs").mkdir()     # the converter requires it
    run_nnunet("from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset; "
               f"convert_msd_dataset({str(source)!r}, overwrite_target_id=509, num_processes=1)", tmp_path)
    converted = tmp_path / "nnUNet_raw" / "Dataset509_Phantom"
    cases, reference = folders.read_msd(converted), folders.read_msd(msd)
    assert [c["id"] for c in cases] == [c["id"] for c in reference]
    assert all(c["image"].endswith("_0000.nii.gz") and c["label"] for c in cases)
    assert folders.read_task_info(converted) == folders.read_task_info(msd)


def box_mask_by_hand(cases, units, cid, spacing_mm):
    """(file's axes) bool: the voxels of cid's label file that the boxes of `units` cover, each box (start, size
    clamped to the training grid) drawn on the training grid, put back in the body box and mapped to the file."""
    grid = np.zeros(cases.image_hu(cid).shape, np.uint8)
    size = np.minimum(VOX, grid.shape)
    for u in units:
        if unit_case(u) == cid:
            grid[tuple(slice(a, a + b) for a, b in zip(unit_start(u), size))] = 1
    return data.to_native_grid(cases.uncrop(cid, grid), cases.files[cid]["label"], spacing_mm, nearest=True) > 0


def test_export_of_a_patch_run_is_an_nnunet_dataset_with_an_ignore_label(phantom, tmp_path):
    """A patch run's boxes become partial labels (the label file inside the boxes, nnU-Net's ignore label outside,
    on the file's own grid); whole cases (validation, the all-data reference's) stay linked; nnU-Net accepts both."""
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install torch==2.13.0 nnunetv2)")
    out, raw = tmp_path / "run", tmp_path / "nnUNet_raw"
    argv = tiny.args(phantom, out, *PATCH, "--strategy", "rand,full")
    assert al_loop.main(argv) == 0
    for number, strategy in ((501, "rand"), (502, "full")):
        assert al_loop.main(["--out", str(out), "--export-nnunet", str(number), "--export-to", str(raw),
                             "--strategy", strategy]) == 0
    cfg = al_loop.parse_args(argv)[0]
    cases, states = Cases(cfg, run_folder.RunFolder(out)), tiny.read_states(out)["0"]
    units, split = states["rand"]["labeled"], json.loads((out / "split.json").read_text())
    boxed = list(dict.fromkeys(map(unit_case, units)))
    assert all(unit_start(u) is not None for u in units) and boxed
    folder = raw / "Dataset501_Phantom"
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": boxed, "val": split["val"]}]
    for cid in boxed:
        source, exported = nib.load(cases.files[cid]["label"]), nib.load(folder / "labelsTr" / f"{cid}.nii.gz")
        label, got = np.asarray(source.dataobj), np.asarray(exported.dataobj)
        inside = box_mask_by_hand(cases, units, cid, cfg.spacing_mm)
        assert got.dtype == np.uint8 and got.shape == label.shape and np.array_equal(exported.affine, source.affine)
        assert 0 < inside.sum() < inside.size, cid
        np.testing.assert_array_equal(got[inside], label[inside])
        assert (got[~inside] == 3).all(), cid
        assert os.path.samefile(folder / "imagesTr" / f"{cid}_0000.nii.gz", cases.files[cid]["image"])
    for cid in split["val"]:
        assert os.path.samefile(folder / "labelsTr" / f"{cid}.nii.gz", cases.files[cid]["label"])
    whole = raw / "Dataset502_Phantom"
    assert "ignore" not in json.loads((whole / "dataset.json").read_text())["labels"]
    assert all(os.path.samefile(whole / "labelsTr" / f"{c}.nii.gz", cases.files[c]["label"])
               for c in split["pool"] + split["val"])
    printed = run_nnunet("from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
                         f"for f in {[str(folder), str(whole)]!r}: verify_dataset_integrity(f, num_processes=1)",
                         tmp_path)
    assert printed.count("verify_dataset_integrity Done") == 2
