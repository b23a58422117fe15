"""annotate.py: what annotation mode asks for and when an answer counts. With boxes (--query patch) a box
counts as labeled once its case's label file holds a labeled voxel inside it, or its voxels changed since it
was asked, or the user says so (--boxes-done); never because a file was touched, copied or restored, and a
lost or damaged to_annotate/ asks again only for the boxes not trained on. CPU, tiny phantoms."""
import json
import os
import shutil
import warnings

import pytest

import al_loop
import tiny
from tiny import label_boxes, own_scans, states_of, to_annotate

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
