"""The all-data reference `full` end to end: trained once on the whole pool, reported apart, run only when named.
CPU, tiny phantoms."""
import json

import numpy as np
import pytest

import al_loop
import strategies
import tiny
from tiny import rows


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
