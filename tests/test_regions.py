"""Tests for regions.py, the building blocks of region-level active learning: box scores, non-overlapping top
boxes, label centres, random boxes, partial labels, AUBC (the partial-label DiceCE is in test_losses.py)."""
import math

import numpy as np
import pytest
import torch

from losses import IGNORE, dice_ce_loss
from regions import (AREAS, aubc, box_scores, clamp_box, label_centres, overlapping, partial_label,
                     random_boxes, top_boxes)


# ----------------------------------------------------------------------------- box scores


def brute_force_starts(n, b, step):
    starts = list(range(0, n - b + 1, step))
    return starts if starts[-1] == n - b else starts + [n - b]


@pytest.mark.parametrize("shape, box, stride", [
    ((17, 19, 23), (6, 7, 5), None),          # odd sizes, boxes not dividing them
    ((16, 21, 31), (8, 9, 40), None),         # a box longer than an axis: clamped to it
    ((25, 17, 19), (25, 3, 4), (1, 5, 2)),    # a box filling an axis; an explicit stride
    ((19, 16, 17), 7, 3),                     # int box and stride
])
def test_box_scores_equal_a_brute_force_mean_over_every_candidate(shape, box, stride):
    m = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    starts, means = box_scores(m, box, stride)
    size = [min(b, n) for b, n in zip(np.broadcast_to(box, 3), shape)]
    steps = ([max(1, math.ceil(b / 4)) for b in size] if stride is None else np.broadcast_to(stride, 3))
    axes = [brute_force_starts(n, b, s) for n, b, s in zip(shape, size, steps)]
    expected = [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]
    assert starts.dtype == np.int64 and means.dtype == np.float64
    assert [tuple(s) for s in starts.tolist()] == expected
    brute = [m[x:x + size[0], y:y + size[1], z:z + size[2]].astype(np.float64).mean() for x, y, z in expected]
    np.testing.assert_allclose(means, brute, rtol=1e-10, atol=1e-12)
    assert ((starts + size) <= shape).all() and ((starts + size) == shape).any(0).all()   # last box at each edge


def test_box_scores_refuse_nan():
    m = np.zeros((16, 16, 16))
    m[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        box_scores(m, 4)


def paint(shape, boxes):
    """How many boxes cover each voxel: (X, Y, Z) int."""
    count = np.zeros(shape, int)
    for start, size in boxes:
        count[tuple(slice(a, a + b) for a, b in zip(start, size))] += 1
    return count


def test_top_boxes_never_overlap_each_other_nor_taken_and_are_greedy():
    shape, box = (23, 21, 19), (7, 6, 5)
    m = np.random.default_rng(1).random(shape)
    starts, means = box_scores(m, box)
    taken = [((0, 0, 0), (9, 9, 9)), ((10, 12, 3), (4, 4, 4))]
    chosen = top_boxes(starts, means, box, 8, taken)
    assert len(chosen) == 8
    assert paint(shape, taken + [(s, box) for s in chosen]).max() == 1
    free = ~np.any([overlapping(starts, box, s, z) for s, z in taken], 0)
    assert np.array_equal(chosen[0], starts[free][means[free].argmax()])         # the best box that fits
    chosen_means = [means[(starts == s).all(1)][0] for s in chosen]
    assert chosen_means == sorted(chosen_means, reverse=True)
    # Asked for more than fits: every candidate left overlaps something chosen or taken.
    everything = top_boxes(starts, means, box, 10_000, taken)
    held = taken + [(s, box) for s in everything]
    assert paint(shape, held).max() == 1
    assert np.any([overlapping(starts, box, s, z) for s, z in held], 0).all()


def test_top_boxes_ties_keep_the_order_and_a_box_longer_than_an_axis_fills_it():
    # Equal means: the first candidates in order that fit (stride ceil(5 / 4) = 2: z starts 0, 2, 4, 6, ...).
    starts, means = box_scores(np.ones((17, 16, 18)), (5, 5, 5))
    assert top_boxes(starts, means, (5, 5, 5), 2).tolist() == [[0, 0, 0], [0, 0, 6]]
    starts, means = box_scores(np.ones((17, 16, 18)), (40, 5, 5))
    assert top_boxes(starts, means, (40, 5, 5), 3).tolist() == [[0, 0, 0], [0, 0, 6], [0, 0, 12]]


# ----------------------------------------------------------------------------- random-label centres and boxes


def blob_label(shape=(21, 23, 25)):
    label = np.zeros(shape, np.uint8)
    label[0:9, 5:14, 6:17] = 1                        # touches the x = 0 face
    return label


def boundary_of(label, c):
    """Voxels of class c with a 6-neighbour of another class, by hand (edges of the volume excluded)."""
    v = label == c
    out = np.zeros_like(v)
    for axis in range(3):
        for shift in (1, -1):
            nb = np.roll(v, shift, axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            nb[tuple(edge)] = True                    # the volume's edge is no other class
            out |= v & ~nb
    return out


@pytest.mark.parametrize("areas", ["random-label", "random-label2"])
def test_label_centres_hit_foreground_and_boundary_at_the_stated_rates(areas):
    label, n = blob_label(), 4000
    p_any, p_fg, p_edge = AREAS[areas]
    fg, edge = label == 1, boundary_of(label, 1)
    centres = label_centres(label, n, np.random.default_rng(0), areas)
    on = tuple(centres.T)
    expected_fg = p_any * fg.mean() + p_fg + p_edge
    expected_edge = p_any * edge.mean() + p_fg * edge.sum() / fg.sum() + p_edge
    tol = 4 * math.sqrt(0.25 / n)                                            # 4 sigma at worst
    assert abs(fg[on].mean() - expected_fg) < tol
    assert abs(edge[on].mean() - expected_edge) < tol


def test_label_centres_draw_the_class_first_so_a_tiny_class_is_found():
    label = blob_label()
    label[17:20, 18:21, 20:23] = 2                                           # 27 voxels
    centres = label_centres(label, 3000, np.random.default_rng(1), "random-label")
    on_tiny = (label[tuple(centres.T)] == 2).mean()
    assert abs(on_tiny - 1 / 3) < 0.04                                       # (1/3 + 1/3) / 2 classes


def test_label_centres_stay_in_the_body_mask_and_fall_back_without_foreground():
    label, mask = blob_label(), np.zeros((21, 23, 25), bool)
    mask[5:, :, :] = True                                                    # cuts the blob in two
    centres = label_centres(label, 500, np.random.default_rng(2), "random-label", mask=mask)
    assert mask[tuple(centres.T)].all()
    assert (label[tuple(centres.T)] == 1).mean() > 0.5
    empty = label_centres(np.zeros((17, 16, 19), np.uint8), 500, np.random.default_rng(3))
    assert ((empty >= 0) & (empty < (17, 16, 19))).all()
    assert len(np.unique(empty, axis=0)) > 400                               # uniform, not stuck
    with pytest.raises(ValueError, match="body mask is empty"):
        label_centres(label, 1, np.random.default_rng(0), mask=np.zeros_like(mask))


def test_random_boxes_are_deterministic_disjoint_and_avoid_taken():
    label, box = blob_label(), (6, 7, 5)
    taken = [((1, 5, 6), (8, 8, 8))]
    a = random_boxes(label, box, 6, np.random.default_rng(7), "random-label2", taken=taken)
    b = random_boxes(label, box, 6, np.random.default_rng(7), "random-label2", taken=taken)
    c = random_boxes(label, box, 6, np.random.default_rng(8), "random-label2", taken=taken)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 6 and ((a >= 0) & (a + box <= label.shape)).all()
    assert paint(label.shape, taken + [(s, box) for s in a]).max() == 1
    # More boxes than fit: what fits, and a box longer than the volume fills that axis.
    big = random_boxes(label, (30, 23, 25), 3, np.random.default_rng(0), tries=20)
    assert big.tolist() == [[0, 0, 0]] and clamp_box((30, 23, 25), label.shape).tolist() == [21, 23, 25]


# ----------------------------------------------------------------------------- partial labels and AUBC


def test_partial_label_is_known_only_inside_the_boxes_and_trains():
    label = blob_label((17, 19, 16))
    boxes = [((0, 0, 0), (5, 6, 7)), ((8, 10, 9), (9, 9, 9))]              # the second runs past the edge
    part = partial_label(label, boxes, IGNORE)
    inside = paint(label.shape, boxes) > 0
    assert part.dtype == np.uint8 and np.array_equal(part[inside], label[inside]) and (part[~inside] == IGNORE).all()
    target = torch.from_numpy(part.astype(np.int64))[None, None]
    assert torch.isfinite(dice_ce_loss(torch.randn(1, 2, 17, 19, 16), target))
    with pytest.raises(ValueError, match="already holds the ignore value"):
        partial_label(part, boxes, IGNORE)
    with pytest.raises(ValueError, match="outside"):
        partial_label(label, [((-1, 0, 0), (4, 4, 4))], IGNORE)


def test_aubc_of_a_constant_and_of_a_linear_rise():
    assert aubc([100, 250, 900, 4000], [0.73] * 4) == pytest.approx(0.73)
    voxels = [0, 300, 1000, 2500, 4000]
    assert aubc(voxels, [v / 4000 for v in voxels]) == pytest.approx(0.5)
    assert aubc(voxels[::-1], [v / 4000 for v in voxels[::-1]], lo=2000) == pytest.approx(0.75)  # unsorted input
    with pytest.raises(ValueError, match="budget range"):
        aubc(voxels, [0.5] * 5, hi=5000)
