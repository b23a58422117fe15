"""state.py: a (seed, strategy)'s RunState and its Records, and their file form (JSON, units as text): read and
written back as they were, older files too; what is wrong is said."""
import json

import pytest

import units
from state import Record, RunState

OLD = {"given": ["c0"], "initial": ["c1@0,0,0"], "labeled": ["c0", "c1@0,0,0", "c2@4,0,0"],
       "iterations": [{"n_labeled": 2, "voxels": 70, "fg_voxels": 3, "pool_voxels": 900, "certain": ["c3@0,4,0"],
                       "dice": [0.5], "mean_dice": 0.5, "per_case": {"v": [0.5]}, "best_step": 40,
                       "acquired": ["c2@4,0,0"], "scores": {"c2@4,0,0": 0.1}}],
       "scores": {"c1@0,0,0": 0.3, "c2@4,0,0": 0.1}}


def test_a_state_file_reads_into_units_and_records_and_writes_back_as_it_was():
    st = RunState.from_json(json.loads(json.dumps(OLD)))
    rec = st.iterations[0]
    assert st.labeled[1] == units.Box("c1", (0, 0, 0)) and st.given == [units.Volume("c0")]
    assert rec.acquired == [units.Box("c2", (4, 0, 0))] and rec.final_stage == "semi" and rec.extra == {"best_step": 40}
    assert st.trained == st.labeled[:2]
    assert st.to_json() == OLD                                          # unknown keys kept (last)
    plain = {**OLD, "iterations": [{k: v for k, v in OLD["iterations"][0].items() if k != "best_step"}]}
    assert json.dumps(RunState.from_json(plain).to_json()) == json.dumps(plain)      # in the same key order


def test_a_state_of_an_older_proxy_al_has_no_initial():
    st = RunState.from_json({"labeled": ["a", "b"], "scores": {}, "iterations": []})
    assert st.initial is None and st.given == [] and st.trained == []


@pytest.mark.parametrize("change, match", [
    ({"labeled": "a"}, "'labeled' must be a list of case ids"),
    ({"scores": []}, "'scores' must be an object"),
    ({"iterations": [{"n_labeled": 1}]}, "iteration 1 is not a record with n_labeled, dice, mean_dice, per_case")])
def test_what_is_wrong_is_said(change, match):
    with pytest.raises(ValueError, match=match):
        RunState.from_json({**OLD, **change})


def test_a_record_with_test_dice_reports_them_in_place_of_validation():
    rec = Record(4, [0.5], 0.5, {"v": [0.5]}, test={"dice": [0.7], "mean_dice": 0.7, "per_case": {"t": [0.7]}})
    shown = rec.with_test_dice()
    assert (shown.dice, shown.mean_dice, shown.per_case, shown.n_labeled) == ([0.7], 0.7, {"t": [0.7]}, 4)
    assert rec.dice == [0.5]
