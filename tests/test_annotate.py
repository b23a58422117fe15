"""annotate.py: annotation mode's files and when an answer counts. Volume mode: to_annotate.csv, pre-segmentations and
uncertainty maps on each scan's own grid, labels saved from them accepted on the rerun until the run ends. With boxes
(--query patch): to_annotate.csv lists boxes on each scan's own grid (an LPS-stored phantom), a mask per case marks
them, a label file is read only inside the boxes asked for, and a box counts as labeled once its voxels changed since
it was asked, or the user says so (--boxes-done); never because a file was touched, copied or restored, and a lost or
damaged to_annotate/ asks again only for the boxes not trained on. CPU, tiny phantoms."""
import csv
import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest

import al_loop
import data
import folders
import tiny
from tiny import deliver_labels, ijk_ranges, label_boxes, own_scans, states_of, to_annotate


PATCH = ("--query", "patch", "--query-vox", "4,4,4")
STRATEGY = "proxyrank_var"


def run(root, out, *extra, strategy=STRATEGY):
    """One rerun of the box annotation study; returns the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert al_loop.main(tiny.args(root, out, *PATCH, "--strategy", strategy, *extra)) == 0
    return [str(w.message) for w in caught]


def boxes(out):
    return [(r["case"], r["voxels_ijk"]) for r in to_annotate(out)]


def trained(out, strategy=STRATEGY):
    return len(states_of(out)[strategy]["iterations"])


def done_flag(background):
    return ("--boxes-done", ",".join(background)) if background else ()


@pytest.fixture
def second_round(phantom, tmp_path):
    """A box annotation run whose first round was labeled and trained on (iteration 1), now asking round 2:
    (data folder, run folder, round 1's rows, round 2's rows). One pool case is unlabeled, so every box of
    both rounds lies in it, and round 2's boxes lie in a case whose label file exists (round 1's)."""
    root, out = own_scans(phantom, tmp_path, labeled=9), tmp_path / "run"
    run(root, out)
    first = to_annotate(out)
    run(root, out, *done_flag(label_boxes(phantom, root, first)))
    assert trained(out) == 1
    return root, out, first, to_annotate(out)


def test_a_touched_or_copied_label_file_does_not_label_the_boxes_asked_in_it(phantom, second_round, tmp_path):
    root, out, _, asked = second_round
    assert all((root / "labelsTr" / f"{r['case']}.nii.gz").exists() for r in asked)    # the fault's setting
    for path in (root / "labelsTr").iterdir():                  # touched, as an editor that saves unchanged does
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**10,) * 2)
    run(root, out)
    assert boxes(out) == [(r["case"], r["voxels_ijk"]) for r in asked] and trained(out) == 1
    restored = tmp_path / "restored"                            # a copy of the folder (new times, same files)
    shutil.copytree(root, restored)
    run(restored, out)
    assert boxes(out) == [(r["case"], r["voxels_ijk"]) for r in asked] and trained(out) == 1
    run(restored, out, *done_flag(label_boxes(phantom, restored, to_annotate(out))))
    assert trained(out) == 2                                    # labeled: round 2 trained on


def test_an_all_background_box_counts_when_the_user_says_so(phantom, second_round):
    root, out, _, asked = second_round
    case = asked[0]["case"]
    run(root, out, "--boxes-done", case)
    assert case not in [c for c, _ in boxes(out)] or trained(out) == 2
    with pytest.raises(SystemExit, match="--boxes-done nobody: not pool cases of this run"):
        al_loop.main(tiny.args(root, out, *PATCH, "--strategy", STRATEGY, "--boxes-done", "nobody"))


def test_a_damaged_asked_json_asks_again_and_never_trains_on_the_boxes(phantom, tmp_path):
    root, out = own_scans(phantom, tmp_path, labeled=9), tmp_path / "run"
    run(root, out)
    asked = boxes(out)
    (out / "to_annotate" / "asked.json").write_text("{ cut off")
    seen = run(root, out)
    assert any("asked.json: damaged" in m for m in seen)
    assert boxes(out) == asked and trained(out) == 0


def test_deleting_to_annotate_asks_again_only_the_boxes_not_trained_on(phantom, second_round):
    root, out, first, asked = second_round
    assert all((root / "labelsTr" / f"{r['case']}.nii.gz").exists() for r in first + asked)   # every case a file
    shutil.rmtree(out / "to_annotate")
    (out / "to_annotate.csv").unlink()
    run(root, out)                       # still an annotation run: split.json says which cases it began with
    assert boxes(out) == [(r["case"], r["voxels_ijk"]) for r in asked] and trained(out) == 1


def test_a_deleted_label_of_boxes_trained_on_is_named_and_asked_again(phantom, second_round, tmp_path):
    root, out, first, asked = second_round
    case = first[0]["case"]
    path = root / "labelsTr" / f"{case}.nii.gz"
    kept = tmp_path / "kept.nii.gz"
    shutil.move(path, kept)
    seen = run(root, out)
    assert any(str(path) in m and "missing, but the run trained on boxes" in m for m in seen)
    assert {(r["case"], r["voxels_ijk"]) for r in first if r["case"] == case} <= set(boxes(out))
    shutil.move(kept, path)                                        # restored from the backup
    run(root, out)
    assert set(boxes(out)) <= {(r["case"], r["voxels_ijk"]) for r in asked}


def test_a_strategy_added_mid_run_starts_from_the_cases_labeled_when_the_run_began(phantom, second_round):
    root, out, _, asked = second_round
    seen = run(root, out, strategy="rand")
    split = json.loads((out / "split.json").read_text())
    st = states_of(out)
    assert st["rand"]["given"] == st[STRATEGY]["given"] == split["given"]
    assert not any("boxes fit" in m for m in seen), seen
    rows = to_annotate(out)
    assert {r["strategy"] for r in rows} == {"rand", STRATEGY}          # the first strategy's boxes stay listed
    assert {(r["case"], r["voxels_ijk"]) for r in asked} <= {(r["case"], r["voxels_ijk"]) for r in rows}


def test_a_label_saved_for_a_case_not_asked_is_named(phantom, tmp_path, capsys):
    root, out = own_scans(phantom, tmp_path, labeled=7), tmp_path / "run"
    run(root, out)
    unasked = [c for c in ("phantom_7", "phantom_8", "phantom_9") if c not in {r["case"] for r in to_annotate(out)}]
    assert unasked                                     # k = 2 boxes lie in at most 2 of the 3 unlabeled cases
    shutil.copy(phantom / "labelsTr" / f"{unasked[0]}.nii.gz", root / "labelsTr")
    capsys.readouterr()
    run(root, out)
    assert f"not asked for ({unasked[0]})" in capsys.readouterr().out


# ----------------------------------------------------------------------------- whole cases


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


# ----------------------------------------------------------------------------- boxes on an LPS-stored scan


ROUND_TRIP = ("--query", "patch", "--query-vox", "8,8,8", "--strategy", "proxyrank_var_semi")   # all of Algorithm 1


def annotate_until_done(phantom, root, out, deliver, rounds=6):
    """Run, deliver what to_annotate.csv asks for, rerun, until nothing is asked. Returns the warnings seen."""
    seen = []
    for _ in range(rounds):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert al_loop.main(tiny.args(root, out, *ROUND_TRIP)) == 0
        seen += [str(w.message) for w in caught]
        if not (out / "to_annotate.csv").exists():
            return seen
        rows = to_annotate(out)
        for row in rows:
            mask = nib.load(row["boxes_mask"])
            where = np.asarray(mask.dataobj) == int(row["box"])
            box = ijk_ranges(row["voxels_ijk"])
            assert where[box].all() and where.sum() == where[box].size       # the mask marks exactly that box
            first = [s.start for s in box]
            assert mask.affine[0, 0] < 0 and mask.affine[1, 1] < 0           # stored LPS, as the scan
            world = (mask.affine @ [*first, 1])[:3]
            assert np.allclose(world, [float(v) for v in row["first_voxel_mm"].split(",")], atol=0.06)
            truth = nib.load(phantom / "labelsTr" / f"{row['case']}.nii.gz")
            assert np.allclose(truth.affine, mask.affine)                   # on the scan's own grid
        for case in dict.fromkeys(row["case"] for row in rows):
            deliver(case, [ijk_ranges(r["voxels_ijk"]) for r in rows if r["case"] == case], root)
        (out / "to_annotate.csv").unlink()
    raise AssertionError(f"still asking after {rounds} rounds")


def test_box_labels_round_trip_on_an_lps_scan_and_only_the_boxes_are_read(phantom, tmp_path):
    def whole(case, boxes, root):            # the annotator saves the whole true label
        truth = nib.load(phantom / "labelsTr" / f"{case}.nii.gz")
        nib.save(truth, root / "labelsTr" / f"{case}.nii.gz")

    def boxes_only(case, boxes, root):       # only inside the boxes asked for, and a stray stroke far outside
        truth = nib.load(phantom / "labelsTr" / f"{case}.nii.gz")
        path = root / "labelsTr" / f"{case}.nii.gz"
        label = np.asarray(nib.load(path).dataobj).copy() if path.exists() else np.zeros(truth.shape, np.uint8)
        inside = np.zeros(truth.shape, bool)
        for box in boxes:
            label[box] = np.asarray(truth.dataobj)[box]
            inside[box] = True
        stray = np.argwhere(~inside)[0]
        label[tuple(stray)] = 1
        nib.save(nib.Nifti1Image(label.astype(np.uint8), truth.affine, truth.header), path)

    runs = []
    for name, deliver in (("whole", whole), ("boxes", boxes_only)):
        root = own_scans(phantom, tmp_path / name, labeled=4)
        out = tmp_path / name / "run"
        seen = annotate_until_done(phantom, root, out, deliver)
        assert any("outside the" in m and "box(es) asked for" in m and "ignored" in m for m in seen)
        runs.append(out)
    states = [tiny.states_of(out) for out in runs]
    assert states[0] == states[1]             # same boxes, same Dice: labels outside the boxes were never read
    units = states[0]["proxyrank_var_semi"]["labeled"]
    assert sum("@" in u for u in units) == 6  # 3 rounds of k = 2 boxes
    for name in ("results.csv", "per_case_dice.csv", "budget.csv"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()
