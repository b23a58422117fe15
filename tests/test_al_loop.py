"""al_loop.py: Algorithm 1's functions end to end on tiny phantom studies. CPU, seconds."""
import warnings

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
