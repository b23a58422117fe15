"""al_loop.py: Algorithm 1's functions end to end on tiny phantom studies. CPU, seconds."""
import warnings

import torch

import al_loop
import tiny
from tiny import states_of


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
