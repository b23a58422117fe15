"""study.py: SIGTERM inside a file read stops the run as SIGTERM; dice_curve.png is drawn at the end, not after
every iteration; the stage-time table."""
import json
import time

import nibabel as nib
import pytest

import al_loop
import data
import report
import study
import folders
import tiny


def test_sigterm_during_a_file_read_is_not_taken_for_a_damaged_file(phantom, monkeypatch):
    """SIGTERM lands where it lands: inside a NIfTI read (whose handler turns a damaged file's errors into a
    message), its exception still stops the run as SIGTERM, not as 'not a readable NIfTI file'."""
    def terminated(*args, **kwargs):
        study._terminated(15, None)
    monkeypatch.setattr(nib, "load", terminated)
    with pytest.raises(study.Terminated):
        data._open_nifti(folders.read_msd(phantom)[0]["image"])


@pytest.mark.parametrize("every_s, plots", [(3600, [4]), (0, [1, 2, 3, 4, 4])])
def test_dice_curve_is_drawn_at_the_end_and_between_iterations_at_most_every_plot_every_s(
        phantom, tmp_path, monkeypatch, every_s, plots):
    """rand and proxyrank_var_semi, 2 iterations each: with PLOT_EVERY_S not yet passed, the curve is drawn
    once, at the end, with all 4 rows; with 0 s, after each iteration and at the end. The CSV files are
    written after every iteration either way (the tests of report.py and resume cover them)."""
    drawn = []
    monkeypatch.setattr(report, "plot_curves", lambda out, rows, axis="pct": drawn.append(len(rows)))
    monkeypatch.setattr(study, "PLOT_EVERY_S", every_s)
    assert al_loop.main(tiny.tiny_args(phantom, tmp_path / "run")) == 0
    assert drawn == plots


def test_sigterm_names_the_progress_bar_the_run_was_in(capsys):
    """The last thing a run started is a progress bar as often as a log line: a SIGTERM message names it."""
    fake = type("Fake", (), {"_bar": staticmethod(lambda *a, **k: None)})()
    study.Study.bar(fake, "seed 0: pool scored under the proxy", 24)
    assert study.LAST_LOG[0] == "seed 0: pool scored under the proxy"


def test_the_stage_time_table_is_written_and_sums_to_the_wall_time(phantom, tmp_path):
    """summary.md says where the run's time went: the stages and 'other' sum to the wall time of the process,
    which is the time the run took (within a few percent), and the main stages are named."""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert al_loop.main(tiny.args(phantom, out, *tiny.STRATEGIES)) == 0
    took = time.perf_counter() - t0
    (times,) = [json.loads(p.read_text()) for p in (out / "times").glob("*.json")]
    assert sum(times["stages"].values()) == pytest.approx(times["wall"], rel=1e-6)
    assert times["wall"] == pytest.approx(took, rel=0.05, abs=0.3)
    assert {"proxy training", "MC scoring", "training (supervised)", "validation", "reports"} <= times["stages"].keys()
    summary = (out / "summary.md").read_text()
    assert "## Where the time went" in summary and "| proxy training |" in summary and "| total |" in summary


def test_the_study_eta_weights_each_iteration_by_its_strategys_cost():
    """rand, var and var_semi to do (costs 1, 2, 5): when var_semi ends after 50 s, 3 of 8 parts of the work
    are left, so 30 s (a count of iterations said 2 x 50 s). A world of one, no process group."""
    import strategies
    from world import World
    lines = []
    fake = type("FakeStudy", (), {"progress": study.Study.progress, "count_iterations": study.Study.count_iterations})()
    fake.world, fake.log, fake.shown, fake.t0 = World(), lines.append, 0, time.time() - 50
    chosen = [strategies.parse(name) for name in ("rand", "var", "var_semi")]
    assert [s.cost for s in chosen] == [1, 2, 5]
    fake.count_iterations(3, sum(s.cost for s in chosen))
    fake.progress(chosen[2])
    assert lines == ["study: 1/3 active iterations done, ETA 0:30"]
    fake.progress()                                                             # nothing new: no line
    assert len(lines) == 1
