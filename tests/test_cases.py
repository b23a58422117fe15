"""cases.py: the pool / validation split (deterministic, saved, reloaded, drawn from labeled candidates) and the
default number of validation cases."""
import json

import pytest

import folders
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
