"""The pool ranking of Algorithm 1: MC-dropout scores of pool cases under a model (lines 3, 9, 12 and 15) and
the order they give (lines 4, 9, 13 and 16). Functions of a model, the cases' images and the scoring settings,
with no run folder, queue or progress bar inside: the loop (al_loop.py) and other tools (the MONAI Label app
in monailabel_app/) rank alike.

    scores = dict(ranking.mc_pool(model, ids, image_of, Scoring.of(cfg), key=Key(0).scoring()))
    ranking.rank(scores, "variance")          # [(case, score)], the most uncertain first
"""
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from keys import mc_seed
from proxy_al import mc_scores


@dataclass(frozen=True)
class Scoring:
    """What MC scoring takes of the settings (al_loop.Config's fields of the same names)."""
    mc_passes: int = 10                     # m (paper sec. 4.2: 10)
    roi_vox: tuple = (96, 96, 96)           # the sliding window
    overlap: float = 0.25                   # of neighbouring windows
    variance_classes: str = "foreground"    # the first author's tutorial: the background channel dropped

    @classmethod
    def of(cls, cfg) -> "Scoring":
        return cls(cfg.mc_passes, tuple(cfg.roi_vox), cfg.overlap, cfg.variance_classes)


def mc_pool(model: nn.Module, ids: Iterable[str], image_of: Callable[[str], np.ndarray], scoring: Scoring, key: str,
            maps: bool = False) -> Iterator[tuple[str, dict]]:
    """(case, proxy_al.mc_scores) for each case of `ids` in turn, of image_of(case) ((X, Y, Z) float32 in
    [0, 1]) under `model`. Each case is seeded by (key, case) alone (keys.mc_seed; key: the scoring's name,
    keys.Key.scoring), so its scores do not depend on the cases scored before it, on the rank, or on the tool.
    maps: with the per-voxel maps (region queries); one case's at a time, as the caller keeps what it needs."""
    for cid in ids:
        torch.manual_seed(mc_seed(key, cid))
        yield cid, mc_scores(model, image_of(cid), scoring.mc_passes, scoring.roi_vox, scoring.overlap,
                             variance_classes=scoring.variance_classes, return_maps=maps)


def rank(scores: dict, measure: str = "variance") -> list[tuple[str, float]]:
    """[(case, score)] from {case: mc_scores}, the highest `measure` first (ties keep the order of `scores`)."""
    return sorted(((cid, float(s[measure])) for cid, s in scores.items()), key=lambda cs: -cs[1])


def rank_pool(model: nn.Module, ids: Iterable[str], image_of: Callable[[str], np.ndarray], scoring: Scoring,
              key: str, measure: str = "variance") -> list[tuple[str, float]]:
    """Lines 3-4 under the proxy, lines 12-16 under Ms or Msemi: the cases of `ids` ranked by `measure`."""
    return rank(dict(mc_pool(model, ids, image_of, scoring, key)), measure)
