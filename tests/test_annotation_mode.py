"""Annotation mode end to end: to_annotate.csv, pre-segmentations and uncertainty maps on each scan's own grid,
labels saved from them accepted on the rerun until the run ends, another --k keeping every annotated case. CPU,
tiny phantoms."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import al_loop
import data
import tiny
import folders
from tiny import deliver_labels, own_scans, states_of, to_annotate


def test_annotation_mode_writes_to_annotate_and_continues(phantom, tmp_path):
    root = tmp_path / "mine"
    shutil.copytree(phantom, root)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    cases = folders.read_msd(root)
    for case in cases[3:]:  # the user has labels for three cases only
        shutil.move(case["label"], hidden)
    out = tmp_path / "run"
    for attempt in range(10):
        with pytest.warns(UserWarning):
            assert al_loop.main(tiny.args(root, out, "--k", "1")) == 0
        todo = out / "to_annotate.csv"
        if not todo.exists():
            break
        if attempt:     # a stop after a trained iteration: the curve so far beside to_annotate.csv
            assert (out / "dice_curve.png").read_bytes()[:4] == b"\x89PNG"
        with open(todo) as f:
            rows = list(csv.DictReader(f))
        assert rows and set(rows[0]) == {"case", "image", "score", "rank", "prediction", "uncertainty", "save_label_as"}
        for row in rows:  # the "annotator" delivers the requested labels
            shutil.move(hidden / f"{row['case']}.nii.gz", root / "labelsTr")
        todo.unlink()
    state = tiny.read_states(out)
    st = state["0"]["proxyrank_var_semi"]
    assert len(st["iterations"]) == 2 and attempt >= 2
    assert not set(st["labeled"]) & set(json.loads((out / "split.json").read_text())["val"])


def test_k_changed_in_annotation_mode_keeps_every_annotated_case(phantom, tmp_path):
    """Two rounds of --k 2, then --k 1: Tl keeps all four selected cases (no 'disagrees' warning), and the
    new --k sizes only the next acquisition."""
    import warnings
    root, out = own_scans(phantom, tmp_path, labeled=4), tmp_path / "run"
    for k in ("2", "2", "1"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*disagrees with the iteration records")
            assert al_loop.main(tiny.args(root, out, "--strategy", "rand", "--k", k)) == 0
        for r in to_annotate(out):
            shutil.copy(phantom / "labelsTr" / f"{r['case']}.nii.gz", r["save_label_as"])
    st = states_of(out)["rand"]
    assert [r["n_labeled"] for r in st["iterations"]] == [4, 6]          # 2 in hand + 2, then + 2
    assert len(st["iterations"][1]["acquired"]) == 1 and len(st["labeled"]) == len(set(st["labeled"])) == 7


def same_grid(path, image_path):
    """The map's shape and affine are those of the image file (its own grid, not the resampled one)."""
    img, ref = nib.load(str(path)), nib.load(str(image_path))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-4)
    return np.asarray(img.dataobj)


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
    st = tiny.read_states(out)["0"]["proxyrank_var_semi"]
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

# ----------------------------------------------------------------------------------------- annotation mode


@pytest.mark.parametrize("labeled", [4, 6])
def test_annotation_mode_runs_to_its_end_when_the_user_labels_what_it_asks(phantom, tmp_path, capsys, labeled):
    """10 cases, labels for 4 (6 unlabeled pool cases) or 6 (exactly k x iterations = 4), --k 2 --iterations 2:
    every round the user saves the labels asked for, and the run goes on to its end (no 'lower --k')."""
    root, out = own_scans(phantom, tmp_path, labeled=labeled), tmp_path / "run"
    args = tiny.args(root, out, "--strategy", "proxyrank_var_semi")
    asked = []
    for _ in range(2):                                    # line 5's selection, then iteration 1's
        assert al_loop.main(args) == 0
        asked += deliver_labels(phantom, root, out)
    assert al_loop.main(args) == 0                        # iteration 2 trains on all of them
    st = tiny.read_states(out)["0"]["proxyrank_var_semi"]
    given = 2 if labeled == 4 else 4
    assert [r["n_labeled"] for r in st["iterations"]] == [given + 2, given + 4] and len(set(asked)) == 4
    said = capsys.readouterr().out
    if labeled == 6:                                      # the pool is spent: the run is done
        assert not st["iterations"][1].get("acquired") and "done: results.csv" in said
        assert not [r for r in to_annotate(out) if r["case"] not in asked]
    else:                                                 # two more asked for; labeled, the run is done
        assert len(st["iterations"][1]["acquired"]) == 2
        deliver_labels(phantom, root, out)
        assert al_loop.main(args) == 0
        said = capsys.readouterr().out
        assert "the 2 case(s) acquired after iteration 2 are labeled but not trained on; rerun with " \
               "--iterations 3 to train on them" in said and "done: results.csv" in said
