"""The results files, made from a hand-written state; --report on a run folder."""
import csv
import json
import sys
import warnings

import numpy as np
import pytest

import al_loop
import report
import tiny
from report import wilcoxon_matrix, wilcoxon_table, write_reports
from state import RunState

TASK = {"name": "Phantom", "labels": {0: "background", 1: "liver", 2: "tumour"}, "num_classes": 3}
NAN = float("nan")


def record(n_labeled, per_case):
    """A record as the loop writes it: class means over the cases where the class is present (nanmean)."""
    dice = np.nanmean(np.array(list(per_case.values()), float), axis=0).tolist()
    return {"n_labeled": n_labeled, "dice": dice, "mean_dice": float(np.nanmean(dice)), "per_case": per_case}


def typed(state):
    """Hand-written states in their file form, as run_folder.read_states gives them (state.RunState)."""
    return {seed: {s: RunState.from_json({"labeled": [], "scores": {}, **st}) for s, st in by_s.items()}
            for seed, by_s in state.items()}


def state_with(n_cases, gap):
    """Two strategies, one seed; strategy b is `gap` better on every one of n_cases validation cases."""
    cases = [f"c{i}" for i in range(n_cases)]
    a = {c: [0.5 + 0.01 * i, 0.2] for i, c in enumerate(cases)}
    b = {c: [d[0] + gap, 0.2] for c, d in a.items()}
    return {"0": {"a": {"iterations": [record(2, a), record(4, a)]},
                  "b": {"iterations": [record(2, a), record(4, b)]}}}


def row(table, name):
    """The cells of a markdown table row that starts with `| name |`."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.split("|")[2:-1]]


def test_wilcoxon_says_when_too_few_cases_can_reach_p_below_005():
    few = wilcoxon_table(wilcoxon_matrix(typed(state_with(5, 0.1))))
    assert row(few, "b")[1:] == ["-", "n/a"] and row(few, "a")[1:] == ["n/a", "-"]     # b, the best, first
    assert "p < 0.05 needs n >= 6" in few
    many = wilcoxon_table(wilcoxon_matrix(typed(state_with(8, 0.1))))
    assert row(many, "b")[0] == f"{(0.535 + 0.1 + 0.2) / 2:.4f}"     # per case: the mean of liver and tumour
    assert float(row(many, "a")[1]) < 0.05               # 8 cases all better: exact two-sided p = 2 / 2^8


def test_reports_hold_every_iteration_and_the_last_mean(tmp_path):
    summary = write_reports(tmp_path, typed(state_with(8, 0.1)), TASK, n_pool=16)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["iteration"], r["pct_labeled"]) for r in rows] == [
        ("a", "1", "12.5"), ("a", "2", "25.0"), ("b", "1", "12.5"), ("b", "2", "25.0")]
    assert float(rows[3]["dice_liver"]) == round(0.535 + 0.1, 4)
    assert "| b | 1 | 4 | 0.6350 +- - |" in summary and "one seed (n=1)" in summary
    assert "ddof 1" in summary
    with open(tmp_path / "per_case_dice.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 8


def test_std_over_seeds_is_the_sample_std(tmp_path):
    per_seed = {}
    for seed, liver in enumerate([0.6, 0.7, 0.8]):
        per_seed[str(seed)] = {"a": {"iterations": [record(4, {"c0": [liver, 0.5], "c1": [liver, 0.5]})]}}
    summary = write_reports(tmp_path, typed(per_seed), TASK, n_pool=8)
    assert "| a | 3 | 4 | 0.7000 +- 0.1000 | 0.5000 +- 0.0000 |" in summary      # ddof 1: 0.1, not 0.0816


def test_a_class_absent_from_a_case_is_nan_left_out_and_counted(tmp_path):
    """MONAI's ignore_empty: a case without tumour in its label has no tumour Dice; the tumour mean uses the others."""
    per_case = {"c0": [0.8, 0.6], "c1": [0.9, NAN], "c2": [0.7, NAN], "c3": [NAN, NAN]}
    state = json.loads(json.dumps({"0": {"a": {"iterations": [record(4, per_case)]}}}))    # NaN survives the state file
    assert np.isnan(state["0"]["a"]["iterations"][0]["per_case"]["c1"][1])
    summary = write_reports(tmp_path, typed(state), TASK, n_pool=8)
    with open(tmp_path / "per_case_dice.csv") as f:
        cases = {r["case"]: r for r in csv.DictReader(f)}
    assert cases["c1"]["dice_tumour"] == "nan" and cases["c1"]["dice_liver"] == "0.9"
    assert float(cases["c0"]["mean_dice"]) == 0.7 and float(cases["c1"]["mean_dice"]) == 0.9   # present classes only
    assert cases["c3"]["mean_dice"] == "nan"
    with open(tmp_path / "results.csv") as f:
        result = next(csv.DictReader(f))
    assert float(result["dice_liver"]) == 0.8 and float(result["dice_tumour"]) == 0.6
    assert "| a | 1 | 4 | 0.8000 +- - | 0.6000 +- - |" in summary
    assert "tumour: 3 of 4 validation cases have no tumour in their label and are left out of its mean" in summary
    assert "liver: 1 of 4 validation cases" in summary


def test_wilcoxon_matrix_covers_all_pairs_and_is_symmetric(tmp_path):
    cases = [f"c{i}" for i in range(10)]
    base = {c: [0.5 + 0.02 * i, NAN if i % 3 else 0.4] for i, c in enumerate(cases)}
    state = {"0": {}, "1": {}}
    for seed in state:
        for name, gap in (("rand", 0.0), ("proxyrank", 0.1), ("proxyrank_var_semi", 0.2), ("old_name", 0.05)):
            state[seed][name] = {"iterations": [record(4, {c: [d[0] + gap, d[1]] for c, d in base.items()})]}
    write_reports(tmp_path, typed(state), TASK, n_pool=20)
    with open(tmp_path / "wilcoxon.csv") as f:
        table = list(csv.reader(f))
    names = table[0][1:]
    assert sorted(names) == sorted(["rand", "proxyrank", "proxyrank_var_semi", "old_name"])
    assert names[0] == "proxyrank_var_semi"                           # the best first
    p = {(a[0], b): a[1 + j] for a in table[1:] for j, b in enumerate(names)}
    assert [a[0] for a in table[1:]] == names
    for a in names:
        assert p[a, a] == ""
        for b in names:
            assert p[a, b] == p[b, a]
            if a != b:
                assert float(p[a, b]) < 0.05                         # 10 cases, all better: p = 2 / 2^10
    assert float(p["rand", "proxyrank"]) == pytest.approx(2 / 2 ** 10, rel=1e-5)


def test_the_all_data_reference_is_a_row_of_its_own(tmp_path):
    state = state_with(8, 0.1)
    per_case = {f"c{i}": [0.9, 0.7] for i in range(8)}
    state["0"]["full"] = {"iterations": [record(16, per_case)]}
    summary = write_reports(tmp_path, typed(state), TASK, n_pool=16)
    table, reference = summary.split("Reference (all pool cases labeled")
    assert "| full |" not in table and "| a |" in table
    assert "| full | 1 | 16 | 0.9000 +- - | 0.7000 +- - |" in reference.split("##")[0]
    assert "| full (reference) |" in summary                          # in the Wilcoxon matrix, marked
    with open(tmp_path / "wilcoxon.csv") as f:
        header = next(csv.reader(f))
    assert header[-1] == "full (reference)"                           # the reference last
    with open(tmp_path / "results.csv") as f:
        assert [r["pct_labeled"] for r in csv.DictReader(f) if r["strategy"] == "full"] == ["100.0"]


def test_band_that_misses_the_organ_suggests_a_band_from_the_labels_own_hu(tmp_path):
    """With --hu-band auto already given, the warning does not suggest it again: it suggests the band the
    validation labels' own foreground lies in, computed from their HU (and only when the band misses)."""
    from report import pseudo_label_report
    rows = [("a", 10, 0.01), ("b", 12, 0.02), ("c", 0, None)]
    asked = []
    labeled_hu = lambda: asked.append(1) or np.arange(50, 151, dtype=np.int16)     # 25th-75th: 75 to 125
    with pytest.warns(UserWarning) as record:
        pseudo_label_report(tmp_path, rows, "auto", (1, 1, 1), labeled_hu)
    said = [str(w.message) for w in record]
    assert len(said) == 2 and all("--hu-band 75,125 (the 25th-75th percentile of HU inside the validation labels' "
                                  "foreground)" in m for m in said), said
    assert not any("--hu-band auto" in m for m in said) and asked == [1]
    with pytest.warns(UserWarning, match=r"Try --hu-band auto or --hu-band 75,125"):
        pseudo_label_report(tmp_path, rows, "100,150", (1, 1, 1), labeled_hu)
    pseudo_label_report(tmp_path, [("a", 10, 0.9)], "auto", (1, 1, 1), labeled_hu)        # a good band: no HU read
    assert asked == [1, 1]


def test_report_before_any_finished_iteration_says_so(phantom, tmp_path, monkeypatch, capsys):
    """--report on a run stopped (Ctrl-C) during its first training says that no iteration has finished yet,
    instead of printing an empty table; it writes no plot and raises no warning (matplotlib's empty legend)."""
    out = tmp_path / "run"

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(al_loop, "supervised", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        al_loop.main(tiny.args(phantom, out, "--strategy", "rand"))
    state = json.loads((out / "state" / "seed0_rand.json").read_text())
    assert len(state["labeled"]) == tiny.K and state["iterations"] == []       # selected, not yet trained
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert al_loop.main(["--out", str(out), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "no iteration has finished yet" in printed and "| strategy |" not in printed
    assert not (out / "dice_curve.png").exists() and not (out / "summary.md").exists()
    with warnings.catch_warnings():                     # the writer itself, given no finished iteration
        warnings.simplefilter("error")
        write_reports(tmp_path, typed({"0": {"rand": state}}), TASK, n_pool=8)
    assert not (tmp_path / "dice_curve.png").exists()


def test_without_matplotlib_the_missing_curve_is_said_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib: ImportError
    monkeypatch.setattr(report, "NO_PLOT_SAID", [])
    rows = [("a", "0", "1", 3, 12.5, 0.5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.plot_curves(tmp_path, rows)
        report.plot_curves(tmp_path, rows)
    texts = [str(w.message) for w in caught]
    assert len(texts) == 1 and "dice_curve.png: not drawn, matplotlib is not installed" in texts[0]
    assert not (tmp_path / "dice_curve.png").exists()
