"""al_loop.py end to end on tiny phantom studies (seconds on the CPU): every strategy for two iterations, the oracle,
the BALD strategies, the default cache folder; the all-data reference full (trained once on the whole pool, reported
apart, run only when named); lines 9-11 skipped with no free box; warm starts; a stage another strategy finished taken,
not trained again."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch

import al_loop
import cases
import strategies
import study
import tiny
from tiny import K, rows, run, states_of


def test_semi_fine_tuning_with_no_free_box_skips_with_a_warning(phantom, tmp_path):
    """Boxes as large as a case (clamped to it): line 5 takes every pool case whole, so line 9 finds no unlabeled
    box, and lines 10-11 are skipped with a warning, as in volume mode when every pool case is labeled."""
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert al_loop.main(tiny.args(phantom, out, "--query", "patch", "--query-vox", "32,32,32", "--k", "8",
                                      "--iterations", "1", "--strategy", "proxyrank_var_semi")) == 0
    st = states_of(out)["proxyrank_var_semi"]
    assert len(st["labeled"]) == 8 and st["iterations"][0]["certain"] == []
    assert any("every box of the pool overlaps a labeled box, so lines 9-11" in str(w.message) for w in caught)


def test_warm_start_trains_later_iterations_on_from_the_last_model(phantom, tmp_path, monkeypatch):
    """--warm-start previous: iteration 2's Ms starts from iteration 1's final model (its weights, not Mp's or
    random ones) and trains --warm-steps steps; iteration 1 is the paper's."""
    starts, real = [], al_loop.supervised

    def spy(study, labeled, init_state, key, steps, origin=None):
        starts.append((key, None if init_state is None else {k: v.clone() for k, v in init_state.items()}, steps))
        return real(study, labeled, init_state, key, steps, origin)

    monkeypatch.setattr(al_loop, "supervised", spy)
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(phantom, out, "--strategy", "rand", "--warm-start", "previous",
                                  "--warm-steps", "3")) == 0
    (k1, w1, s1), (k2, w2, s2) = starts
    assert w1 is None and s1 == 2 and s2 == 3                      # rand: iteration 1 from random weights
    first = torch.load(out / "checkpoints" / "seed0" / "rand" / "iter0_sup.pt", weights_only=False)["model"]
    assert all(torch.equal(first[k], w2[k]) for k in first)       # iteration 2 from iteration 1's model


def test_a_stage_another_strategy_finished_is_taken_not_trained_again(phantom, tmp_path, monkeypatch):
    """rand and var share line 5's cases and Ms's start (paired seeds): iteration 1's Ms is trained once and
    taken by the other, with the same weights; iteration 2's differ (other acquisitions) and are trained."""
    trained, real = [], al_loop.run_stage
    monkeypatch.setattr(al_loop, "run_stage", lambda study, *a: trained.append(a[-1]) or real(study, *a))
    out = tmp_path / "run"
    assert al_loop.main(tiny.args(phantom, out, "--strategy", "rand,var")) == 0
    assert trained.count("supervised") == 3
    load = lambda name: torch.load(out / "checkpoints" / "seed0" / f"{name}.pt", weights_only=False)["model"]
    a, b = load("rand/iter0_sup"), load("var/iter0_sup")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- every strategy, the oracle, BALD


def test_all_strategies_two_iterations(phantom, tmp_path, monkeypatch):
    started_from_proxy = {}
    real_supervised = al_loop.supervised

    def spy_supervised(study, labeled, init_state, tag, steps, origin=None):
        started_from_proxy[str(tag)] = init_state is not None
        return real_supervised(study, labeled, init_state, tag, steps, origin)

    certain_scores = {}
    real_score = al_loop.score_cases

    def spy_score(study, model, ids, tag):
        scores = real_score(study, model, ids, tag)
        certain_scores[tag] = scores
        return scores

    monkeypatch.setattr(al_loop, "supervised", spy_supervised)
    monkeypatch.setattr(al_loop, "score_cases", spy_score)
    state = run(phantom, tmp_path / "run", "--strategy", "all")["0"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(state) == set(strategies.PAPER)
    for name, st in state.items():
        proxy, semi = strategies.parse(name).proxy, strategies.parse(name).semi
        assert len(st["labeled"]) == len(set(st["labeled"])) == 2 * K, name          # k per iteration, distinct
        assert not set(st["labeled"]) & set(split["val"]), name                      # never a validation case
        assert [it["n_labeled"] for it in st["iterations"]] == [K, 2 * K]
        assert all(started_from_proxy[f"seed0/{name}/iter{j}"] == proxy for j in range(2)), name
        if semi:  # line 8: the len(Tl) most certain unlabeled cases under Ms
            for j, it in enumerate(st["iterations"]):
                scores = certain_scores[f"seed0/{name}/iter{j}/certain"]
                key = "entropy" if "ent" in name else "variance"
                ranked = sorted(scores, key=lambda c: scores[c][key])
                assert it["certain"] == ranked[:it["n_labeled"]], name
                assert not set(it["certain"]) & set(st["labeled"][:it["n_labeled"]])
    firsts = {n: tuple(st["labeled"][:K]) for n, st in state.items()}
    # one proxy ranking per seed: by entropy for proxyrank_ent*, by variance for the other proxyrank strategies
    assert len({firsts[n] for n in state if n.startswith("proxyrank_ent")}) == 1
    assert len({firsts[n] for n in state if n.startswith("proxyrank") and "_ent" not in n}) == 1
    assert len({firsts[n] for n in state if not n.startswith("proxyrank")}) == 1  # one shared random draw
    assert state["proxyrank"]["labeled"] == state["proxyrank_semi"]["labeled"]   # the ranking itself, in order
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {"dice_liver", "dice_tumour", "mean_dice", "pct_labeled"} <= set(rows[0])
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "proxyrank_ent_semi" in summary and "Wilcoxon" in summary
    assert (tmp_path / "run" / "per_case_dice.csv").read_text().count("\n") == 1 + 24 * 2


def test_oracle_uses_only_selected_labels(phantom, tmp_path, monkeypatch):
    """Every label file is checked before training; after the checks, the method uses only the labels of
    validation cases and of the cases it selected."""
    used, checked = [], []
    real_label, real_check = cases.Cases.label, cases.Cases.check_labels
    monkeypatch.setattr(cases.Cases, "label", lambda self, cid: used.append(cid) or real_label(self, cid))
    monkeypatch.setattr(cases.Cases, "check_labels",
                        lambda self: real_check(self) or checked.extend(used) or used.clear())
    state = run(phantom, tmp_path / "run", "--strategy", "proxyrank_var_semi,var")["0"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    allowed = set(split["val"]) | {c for st in state.values() for c in st["labeled"]}
    assert set(checked) == set(split["pool"]) | set(split["val"])  # the checks read every label up front
    assert used and set(used) <= allowed                           # the method: validation and selected only
    assert set(split["pool"]) - allowed                            # some pool labels were never used


def test_bald_strategies_run_apart_from_the_paper(phantom, tmp_path):
    chosen = lambda *flags: study.open_study(al_loop.parse_args(tiny.args(phantom, tmp_path / "s", *flags))[0])[1]
    assert [x.name for x in chosen("--strategy", "extended")] == list(strategies.EXTENDED)
    assert len(strategies.EXTENDED) == 16
    assert len(chosen("--strategy", "all")) == 12
    bald = strategies.parse("proxyrank_bald_semi")
    assert (bald.proxy, bald.acquisition, bald.semi) == (True, "bald", True)
    out = tmp_path / "run"
    names = ["bald", "bald_semi", "proxyrank_bald", "proxyrank_bald_semi"]
    assert al_loop.main(tiny.args(phantom, out, "--strategy", ",".join(names))) == 0
    state = tiny.read_states(out)["0"]
    assert sorted(state) == sorted(names) and all(len(st["iterations"]) == 2 for st in state.values())
    proxy = {c: json.loads((out / "scores" / "seed0" / f"{c}.json").read_text()) for c in json.loads(
        (out / "split.json").read_text())["pool"]}
    by_bald = sorted(proxy, key=lambda c: -proxy[c]["bald"])[:tiny.K]
    assert state["proxyrank_bald"]["labeled"][:tiny.K] == by_bald             # line 4 ranks by the proxy's BALD
    acquired = state["bald"]["iterations"][0]["acquired"]
    scores = state["bald"]["iterations"][0]["scores"]
    assert acquired == sorted(scores, key=lambda c: -scores[c])[:tiny.K]     # the most uncertain by BALD

# ------------------------------------------------------------------------------------ 12. the default cache


def without_cache_dir(args):
    i = args.index("--cache-dir")
    return args[:i] + args[i + 2:]


def test_default_cache_is_the_user_cache_folder_and_logged(phantom, tmp_path, monkeypatch, capsys):
    xdg, cwd = tmp_path / "xdg", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.chdir(cwd)
    assert al_loop.main(without_cache_dir(tiny.args(phantom, tmp_path / "run", "--strategy", "rand"))) == 0
    cache = xdg / "proxy-al"
    assert len(list(cache.rglob("*.npy"))) >= 10                       # every image's entry
    assert f"; cache {cache}" in capsys.readouterr().out
    assert os.listdir(cwd) == []


# ------------------------------------------------------------------------------------ the all-data reference


def test_full_trains_once_on_the_whole_pool_and_is_reported_apart(msd_run):
    split = json.loads((msd_run / "split.json").read_text())
    st = tiny.read_states(msd_run)["0"]["full"]
    assert len(st["iterations"]) == 1                                          # one iteration, no selection
    assert st["iterations"][0]["n_labeled"] == len(split["pool"]) == 8
    assert sorted(st["labeled"]) == sorted(split["pool"]) and "acquired" not in st["iterations"][0]
    assert np.isfinite(st["iterations"][0]["mean_dice"])
    full = [r for r in rows(msd_run / "results.csv") if r["strategy"] == "full"]
    assert [(r["iteration"], r["n_labeled"], r["pct_labeled"]) for r in full] == [("1", "8", "100.0")]
    summary = (msd_run / "summary.md").read_text()
    main, reference = summary.split("Reference (all pool cases labeled")
    assert "| full |" in reference and "| full |" not in main and "| rand |" in main
    assert "full (reference)" in summary                                       # in the Wilcoxon table
    pytest.importorskip("matplotlib")
    assert (msd_run / "dice_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_runs_only_when_named():
    assert "full" not in [s.name for s in strategies.choose("all")]
    assert "full" not in [s.name for s in strategies.choose("extended")]
    assert [s.name for s in strategies.choose("all,full")][-1] == "full"
    assert al_loop.PAPER.strategy == "all"
