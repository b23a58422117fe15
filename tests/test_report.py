"""The results files, made from a hand-written state."""
import csv

import numpy as np

from report import wilcoxon_table, write_reports

TASK = {"name": "Phantom", "labels": {0: "background", 1: "liver", 2: "tumour"}, "num_classes": 3}


def record(n_labeled, per_case):
    dice = np.mean(list(per_case.values()), axis=0).tolist()
    return {"n_labeled": n_labeled, "dice": dice, "mean_dice": float(np.mean(dice)), "per_case": per_case}


def state_with(n_cases, gap):
    """Two strategies, one seed; strategy b is `gap` better on every one of n_cases validation cases."""
    cases = [f"c{i}" for i in range(n_cases)]
    a = {c: [0.5 + 0.01 * i, 0.2] for i, c in enumerate(cases)}
    b = {c: [d[0] + gap, 0.2] for c, d in a.items()}
    return {"0": {"a": {"iterations": [record(2, a), record(4, a)]},
                  "b": {"iterations": [record(2, a), record(4, b)]}}}


def test_wilcoxon_says_when_too_few_cases_can_reach_p_below_005():
    few = wilcoxon_table(state_with(5, 0.1))
    assert "not testable: 5 differing cases" in few and "| b |" in few
    many = wilcoxon_table(state_with(8, 0.1))
    p = float(many.split("| a |")[1].split("|")[1])
    assert p < 0.05                      # 8 cases all better: exact two-sided p = 2 / 2^8


def test_reports_hold_every_iteration_and_the_last_mean(tmp_path):
    summary = write_reports(tmp_path, state_with(8, 0.1), TASK, n_pool=16)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["iteration"], r["pct_labeled"]) for r in rows] == [
        ("a", "1", "12.5"), ("a", "2", "25.0"), ("b", "1", "12.5"), ("b", "2", "25.0")]
    assert float(rows[3]["dice_liver"]) == round(0.535 + 0.1, 4)
    assert "| b | 1 | 4 | 0.6350 +- 0.0000" in summary
    with open(tmp_path / "per_case_dice.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 8
