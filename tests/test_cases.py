"""cases.py: the pool / validation split (deterministic, saved, reloaded, drawn from labeled candidates), the
default number of validation cases, and the data files a rerun must find as they were."""
import json
import shutil

import pytest

import al_loop
import folders
import tiny
from cases import default_n_val, split_cases


# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_saved_and_reloaded(tmp_path):
    ids = [f"liver_{i}" for i in range(20)]
    a = split_cases(ids, 5, seed=1, path=tmp_path / "a.json")
    b = split_cases(list(reversed(ids)), 5, seed=1, path=tmp_path / "b.json")
    assert a == b and len(a["val"]) == 5 and sorted(a["pool"] + a["val"], key=folders.natural_key) == ids
    assert split_cases(ids, 5, seed=2, path=None) != a
    assert split_cases(ids, 7, seed=9, path=tmp_path / "a.json") == a  # the saved split wins
    assert json.loads((tmp_path / "a.json").read_text())["val"] == a["val"]
    assert len(split_cases(ids, 0.25, seed=1, path=None)["val"]) == 5
    with pytest.raises(ValueError, match="a.json"):
        split_cases(ids[:10], 5, seed=1, path=tmp_path / "a.json")
    for bad in (20, 1.5, "3", True):
        with pytest.raises(ValueError):
            split_cases(ids, bad, seed=1, path=None)


def test_default_n_val():
    assert default_n_val("Task03_Liver", 131) == 26
    assert default_n_val("HepaticVessel", 303) == 61
    assert default_n_val("Phantom", 12) == 2
    assert default_n_val("Liver", 10) == 2   # too few cases for the paper's 26
    assert default_n_val("x", 2) == 1


def test_split_draws_validation_from_candidates_only(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    split = split_cases(ids, 2, seed=0, path=tmp_path / "s.json", candidates=["c3", "c5", "c7"])
    assert set(split["val"]) <= {"c3", "c5", "c7"} and len(split["val"]) == 2
    assert sorted(split["pool"] + split["val"], key=folders.natural_key) == ids
    assert split_cases(ids, 0, seed=0, path=None, candidates=[])["val"] == []    # nothing labeled yet


def test_a_rerun_on_another_data_folder_is_taken_only_with_the_same_files(phantom, tmp_path):
    """A moved or copied data folder with the same files continues the run; one whose files differ (two pool
    cases' images and labels swapped) is refused, naming the cases, before any work."""
    out, extra = tmp_path / "run", ("--query", "patch", "--query-vox", "4,4,4", "--strategy", "rand")
    assert al_loop.main(tiny.args(phantom, out, *extra)) == 0
    split = json.loads((out / "split.json").read_text())
    swapped = shutil.copytree(phantom, tmp_path / "swapped")
    a, b = split["pool"][:2]
    for kind in ("imagesTr", "labelsTr"):
        pa, pb = swapped / kind / f"{a}.nii.gz", swapped / kind / f"{b}.nii.gz"
        pa.rename(tmp_path / "x"), pb.rename(pa), (tmp_path / "x").rename(pb)
    before = [f for f in tiny.snapshot(out) if not f[0].startswith(".")]
    with pytest.raises(SystemExit, match=rf"the files of {a} \(image\), {a} \(label\), {b} \(image\), {b} \(label\) "
                                         "differ from those this run began with"):
        al_loop.main(tiny.args(swapped, out, *extra, "--iterations", "3"))
    assert [f for f in tiny.snapshot(out) if not f[0].startswith(".")] == before      # refused untouched
    moved = shutil.copytree(phantom, tmp_path / "moved")     # a copy: new times, the same files
    assert al_loop.main(tiny.args(moved, out, *extra, "--iterations", "3")) == 0
    assert len(tiny.states_of(out)["rand"]["iterations"]) == 3


def test_test_cases_are_drawn_after_validation_and_leave_the_pool(tmp_path):
    ids = [f"liver_{i}" for i in range(20)]
    plain = split_cases(ids, 4, seed=0, path=None)
    split = split_cases(ids, 4, seed=0, path=tmp_path / "split.json", n_test=5)
    assert split["val"] == plain["val"] and len(split["test"]) == 5       # validation as without a test set
    assert not set(split["test"]) & set(split["val"] + split["pool"]) and len(split["pool"]) == 11
    assert json.loads((tmp_path / "split.json").read_text())["test"] == split["test"]
    assert "test" not in plain                                            # split.json unchanged without one


def test_a_run_with_test_cases_reports_them_beside_validation(phantom, tmp_path):
    """--n-test: results.csv gets test_ columns, per_case_dice.csv a set column, summary.md's tables the test
    Dice (weights were kept on validation)."""
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(phantom, out, "--n-test", "2", "--strategy", "rand")) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 2 and len(split["pool"]) == 6
    rows = tiny.rows(out / "results.csv")
    assert rows and all(r["test_mean_dice"] not in ("", None) for r in rows)
    sets = {(r["set"], r["case"]) for r in tiny.rows(out / "per_case_dice.csv")}
    assert {c for s, c in sets if s == "test"} == set(split["test"])
    assert {c for s, c in sets if s == "validation"} == set(split["val"])
    assert "test Dice at the last iteration" in (out / "summary.md").read_text()
