"""The annotator's side: pre-segmentations and uncertainty maps on each scan's own grid, labels saved from
them accepted on the rerun, a user's dataset.json without label entries, and the BALD strategies."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import al_loop
import study
import strategies
import data
import tiny
import folders
import run_folder


def own_scans(phantom, tmp_path, labeled=3):
    """The user's folder: all scans, labels for the first `labeled` cases, a dataset.json whose other
    entries have no "label" (as a user writes it for unlabeled scans)."""
    root = tmp_path / "mine"
    shutil.copytree(phantom, root)
    info = json.loads((root / "dataset.json").read_text())
    for i, entry in enumerate(sorted(info["training"], key=lambda e: folders.natural_key(e["image"]))):
        if i >= labeled:
            (root / entry.pop("label")).unlink()
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def same_grid(path, image_path):
    """The map's shape and affine are those of the image file (its own grid, not the resampled one)."""
    img, ref = nib.load(str(path)), nib.load(str(image_path))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-4)
    return np.asarray(img.dataobj)


def to_annotate(out):
    with open(out / "to_annotate.csv") as f:
        return list(csv.DictReader(f))


def test_presegmentations_on_the_native_grid_and_labels_saved_from_them_continue(phantom, tmp_path, capsys):
    root, out = own_scans(phantom, tmp_path), tmp_path / "run"
    args = tiny.args(root, out, "--k", "1")
    assert al_loop.main(args) == 0
    assert "pre-segmentation and uncertainty map" in capsys.readouterr().out
    rows = to_annotate(out)
    assert len(rows) == 1
    row = rows[0]
    pred = same_grid(row["prediction"], row["image"])
    assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}        # the proxy: class 1, foreground
    assert pred.any()
    uncertainty = same_grid(row["uncertainty"], row["image"])
    assert uncertainty.dtype == np.float32 and uncertainty.min() >= 0 and uncertainty.max() > 0
    # the annotator accepts the pre-segmentation as it is and saves it where the rerun looks for it
    assert row["save_label_as"] == str(root / "labelsTr" / f"{row['case']}.nii.gz")   # where the rerun looks
    shutil.copy(row["prediction"], row["save_label_as"])
    assert al_loop.main(args) == 0
    st = run_folder.read_states(out)["0"]["proxyrank_var_semi"]
    given = st["given"]                                                      # labels in hand count from the start
    in_hand = {c["id"] for c in folders.read_msd(root) if c["label"]} - {row["case"]}
    assert given and set(given) <= in_hand and st["labeled"][:len(given)] == given
    assert st["labeled"][len(given)] == row["case"] and len(st["iterations"]) >= 1   # it went on: iterations trained
    case = {c["id"]: c for c in folders.read_msd(root)}[row["case"]]
    assert case["label"]                                                     # found without a json entry
    label = data.cached_case(case, tmp_path / "cache", (6.0, 6.0, 6.0), num_classes=3)[1]
    assert set(np.unique(label)) <= {0, 1} and label.any()
    later = to_annotate(out)[0]                                              # the next one comes from Msemi
    assert later["case"] != row["case"] and set(np.unique(same_grid(later["prediction"], later["image"]))) <= {0, 1, 2}


def test_save_maps_writes_on_the_native_grid(phantom, tmp_path):
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(phantom, out, "--strategy", "proxyrank", "--save-maps", "2")) == 0
    maps = sorted((out / "maps" / "seed0_proxy").glob("*_uncertainty.nii.gz"))
    assert len(maps) == 2
    cases = {c["id"]: c for c in folders.read_msd(phantom)}
    for path in maps:
        assert same_grid(path, cases[path.name.removesuffix("_uncertainty.nii.gz")]["image"]).max() > 0


def test_bald_strategies_run_apart_from_the_paper(phantom, tmp_path):
    chosen = lambda *flags: study.open_study(al_loop.parse_args(tiny.args(phantom, tmp_path / "s", *flags))[0])[1]
    assert [x.name for x in chosen("--strategy", "extended")] == list(strategies.EXTENDED) and len(strategies.EXTENDED) == 16
    assert len(chosen("--strategy", "all")) == 12
    bald = strategies.parse("proxyrank_bald_semi")
    assert (bald.proxy, bald.acquisition, bald.semi) == (True, "bald", True)
    out = tmp_path / "run"
    names = ["bald", "bald_semi", "proxyrank_bald", "proxyrank_bald_semi"]
    assert al_loop.main(tiny.args(phantom, out, "--strategy", ",".join(names))) == 0
    state = run_folder.read_states(out)["0"]
    assert sorted(state) == sorted(names) and all(len(st["iterations"]) == 2 for st in state.values())
    proxy = {c: json.loads((out / "scores" / "seed0" / f"{c}.json").read_text()) for c in json.loads(
        (out / "split.json").read_text())["pool"]}
    by_bald = sorted(proxy, key=lambda c: -proxy[c]["bald"])[:tiny.K]
    assert state["proxyrank_bald"]["labeled"][:tiny.K] == by_bald             # line 4 ranks by the proxy's BALD
    acquired = state["bald"]["iterations"][0]["acquired"]
    scores = state["bald"]["iterations"][0]["scores"]
    assert acquired == sorted(scores, key=lambda c: -scores[c])[:tiny.K]     # the most uncertain by BALD
