"""ranking.py: the pool ranking as a function of a model, the images and the settings (the loop and the MONAI Label
app call it): each case seeded on its own, ranked highest first."""
import numpy as np

import ranking
from keys import Key
from tiny import tiny_unet

SCORING = ranking.Scoring(mc_passes=2, roi_vox=(16, 16, 32), overlap=0.25)


def images(n=3, shape=(17, 19, 33)):
    rng = np.random.default_rng(0)
    return {f"c{i}": rng.random(shape, dtype=np.float32) * (i + 1) / n for i in range(n)}


def test_a_case_scores_the_same_alone_or_after_others():
    model, pool = tiny_unet(dropout=0.3), images()
    key = Key(0).scoring()
    together = dict(ranking.mc_pool(model, list(pool), pool.get, SCORING, key))
    alone = dict(ranking.mc_pool(model, ["c2"], pool.get, SCORING, key))
    assert alone["c2"] == together["c2"]
    assert dict(ranking.mc_pool(model, ["c2"], pool.get, SCORING, Key(1).scoring()))["c2"] != together["c2"]


def test_rank_pool_orders_by_the_measure_highest_first():
    model, pool = tiny_unet(dropout=0.3), images()
    ranked = ranking.rank_pool(model, list(pool), pool.get, SCORING, Key(0).scoring(), "entropy")
    assert sorted(c for c, _ in ranked) == sorted(pool) and [s for _, s in ranked] == sorted((s for _, s in ranked),
                                                                                        reverse=True)
    assert ranking.rank({"a": {"variance": 1.0}, "b": {"variance": 2.0}, "c": {"variance": 2.0}}) == \
        [("b", 2.0), ("c", 2.0), ("a", 1.0)]                    # ties keep their order
