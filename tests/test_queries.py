"""Tests for queries.py, the unit of Tl (units.py: a case, or a box "<case>@x,y,z" with --query patch): candidate
boxes and
their scores, the k best that overlap nothing taken, random boxes (uniform in the body or foreground-favouring),
partial labels as training volumes (and the patches train.sample_patch draws from them), the annotated budget;
and the per-voxel maps of proxy_al.mc_scores. A small stand-in for Cases, no study run; CPU, a few seconds."""
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import proxy_al
import train
from losses import IGNORE
from queries import Queries
import units
from strategies import MC_MEASURES
from tiny import ROI, tiny_unet

WINDOW = (-100.0, 200.0)
OFFSET = (1, 2, 3)          # where the training grid (the body box) lies in the stand-in's cached grid
OUTSIDE = 1                 # the cached label outside the body box: foreground, so that reading it uncropped shows


class FakeCases:
    """What Queries reads of Cases: `pool`, `window_hu`, image_hu (on the training grid), label (on a larger
    cached grid, the training grid at OFFSET), box (that crop) and labeled_volume (recorded)."""

    def __init__(self, images, labels=None):
        self.images, self.window_hu, self.pool = images, WINDOW, list(images)
        self.cached = {}
        for cid, image in images.items():
            full = np.full(np.add(image.shape, 6), OUTSIDE, np.uint8)
            full[self.box(cid)] = np.zeros(image.shape, np.uint8) if labels is None else labels[cid]
            self.cached[cid] = full
        self.whole = []

    def box(self, cid, labeled=False):
        return tuple(slice(o, o + n) for o, n in zip(OFFSET, self.images[cid].shape))

    def image_hu(self, cid, labeled=False):
        return self.images[cid]

    def label(self, cid):
        return self.cached[cid]

    def labeled_volume(self, cid, label=None):
        self.whole.append(cid)
        label = self.cached[cid][self.box(cid)] if label is None else label
        return ("whole", cid), label, data.foreground_index(label)


def config(query="patch", vox=(4, 4, 4)):
    return SimpleNamespace(query=query, query_vox=tuple(vox))


def body_images(shapes, lo=None):
    """HU volumes: -1000 (air, below the window) outside [lo, shape - lo) per axis, 50 HU inside."""
    out = {}
    for cid, shape in shapes.items():
        image = np.full(shape, -1000, np.int16)
        if lo is None:
            image[...] = 50
        else:
            image[tuple(slice(lo, n - lo) for n in shape)] = 50
        out[cid] = image
    return out


def class_labels(shapes, seed=0):
    """Labels 0, 1, 2 of random blocks, on the training grid."""
    rng = np.random.default_rng(seed)
    out = {}
    for cid, shape in shapes.items():
        coarse = rng.choice(3, size=tuple(-(-n // 3) for n in shape), p=(0.5, 0.3, 0.2)).astype(np.uint8)
        out[cid] = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)[tuple(slice(0, n) for n in shape)]
    return out


SHAPES = {"a": (12, 10, 9), "b": (9, 12, 11)}


def fake_mc(shape, seed):
    """mc_scores(return_maps=True) of a made-up model: per-voxel maps and their means."""
    rng = np.random.default_rng(seed)
    maps = {m: rng.random(shape, dtype=np.float32) * (i + 1) for i, m in enumerate(MC_MEASURES)}
    return {**{m: float(v.mean(dtype=np.float64)) for m, v in maps.items()}, "maps": maps}


def patch_queries(shapes=SHAPES, vox=(4, 4, 4), labels=None, lo=None):
    cases = FakeCases(body_images(shapes, lo), labels)
    return Queries(config("patch", vox), cases), cases


def U(*texts):
    """Units from their text: "a" a whole case, "a@x,y,z" a box."""
    return [units.parse(t) for t in texts]


def keyed(scores):
    """{unit: score} from {text: score}."""
    return {units.parse(t): s for t, s in scores.items()}


def text(us):
    return [str(u) for u in us]


def box_mask(q, unit):
    """(case, (X, Y, Z) bool) of a unit on its case's training grid: a box, or the whole grid."""
    cid, start = unit.case, None if unit.whole else unit.start
    mask = np.zeros(q.shape(cid), bool)
    if start is None:
        mask[...] = True
    else:
        mask[tuple(slice(a, a + b) for a, b in zip(start, q.size(cid)))] = True
    return cid, mask


def overlaps(q, u, v):
    (cu, mu), (cv, mv) = box_mask(q, u), box_mask(q, v)
    return cu == cv and bool((mu & mv).any())


def brute_starts(shape, size):
    """Every candidate start of regions.box_scores' default grid: a quarter box apart, the last at the edge."""
    axes = []
    for n, b in zip(shape, size):
        step = max(1, math.ceil(b / 4))
        starts = list(range(0, n - b + 1, step))
        axes.append(starts if starts[-1] == n - b else starts + [n - b])
    return [tuple(s) for s in itertools.product(*axes)]

# ----------------------------------------------------------------------------- scores of a case


def test_case_scores_box_means_equal_a_brute_force_mean_of_the_maps():
    q, _ = patch_queries(vox=(4, 5, 20))                       # z longer than either case: clamped
    for seed, cid in enumerate(SHAPES):
        mc = fake_mc(SHAPES[cid], seed)
        out = q.case_scores(cid, mc)
        json.dumps(out)                                         # kept in the state: JSON-ready
        assert {m: out[m] for m in MC_MEASURES} == {m: mc[m] for m in MC_MEASURES}
        size = q.size(cid)
        assert size.tolist() == [4, 5, SHAPES[cid][2]]
        starts = [tuple(s) for s in out["boxes"]["starts"]]
        assert starts == brute_starts(SHAPES[cid], size)
        for m in MC_MEASURES:
            brute = [mc["maps"][m][x:x + size[0], y:y + size[1], z:z + size[2]].mean(dtype=np.float64)
                     for x, y, z in starts]
            np.testing.assert_allclose(out["boxes"][m], brute, rtol=1e-9)


def test_case_scores_in_volume_mode_keep_only_the_floats():
    q = Queries(config("volume"), FakeCases(body_images(SHAPES)))
    mc = fake_mc(SHAPES["a"], 0)
    assert q.case_scores("a", mc) == {m: mc[m] for m in MC_MEASURES}     # no maps, no boxes


@pytest.fixture(scope="module")
def mc_of_a_tiny_unet():
    net = tiny_unet(dropout=0.3)
    image = np.random.default_rng(4).random((17, 16, 30), dtype=np.float32)
    torch.manual_seed(11)
    with_maps = proxy_al.mc_scores(net, image, mc_passes=3, roi=ROI, return_maps=True, return_map=True)
    torch.manual_seed(11)
    plain = proxy_al.mc_scores(net, image, mc_passes=3, roi=ROI)
    return image, with_maps, plain


def test_mc_scores_maps_means_equal_its_floats(mc_of_a_tiny_unet):
    image, mc, plain = mc_of_a_tiny_unet
    assert set(mc["maps"]) == set(MC_MEASURES)
    for m in MC_MEASURES:
        assert mc["maps"][m].shape == image.shape and mc["maps"][m].dtype == np.float32
        assert mc["maps"][m].mean(dtype=np.float64) == pytest.approx(mc[m], rel=1e-6, abs=1e-12), m
        assert mc[m] == plain[m], m                           # asking for the maps changes no score
    assert mc["maps"]["variance"].max() > 0                   # dropout on: the passes differ
    assert not np.allclose(mc["maps"]["entropy"], mc["maps"]["bald"])   # BALD's subtraction left entropy alone
    np.testing.assert_array_equal(mc["variance_map"], mc["maps"]["variance"])


def test_case_scores_of_real_mc_maps_equal_brute_force_box_means(mc_of_a_tiny_unet):
    image, mc, _ = mc_of_a_tiny_unet
    q, _ = patch_queries({"u": image.shape}, vox=(8, 8, 8))
    out = q.case_scores("u", mc)
    for m in MC_MEASURES:
        for (x, y, z), mean in zip(out["boxes"]["starts"], out["boxes"][m]):
            assert mean == pytest.approx(mc["maps"][m][x:x + 8, y:y + 8, z:z + 8].mean(dtype=np.float64), rel=1e-6)

# ----------------------------------------------------------------------------- ranked and top


def pool_scores(q):
    return {cid: q.case_scores(cid, fake_mc(shape, seed)) for seed, (cid, shape) in enumerate(SHAPES.items())}


def test_ranked_in_patch_mode_drops_exactly_the_candidates_overlapping_taken_boxes():
    q, _ = patch_queries()
    scores = pool_scores(q)
    taken = U("a@2,3,1", "b@5,0,7")
    every = q.ranked(scores, "entropy")
    ranked = q.ranked(scores, "entropy", taken)
    assert len(every) == sum(len(s["boxes"]["starts"]) for s in scores.values())
    expected = {u: s for u, s in every.items() if not any(overlaps(q, u, t) for t in taken)}
    assert ranked == expected and 0 < len(ranked) < len(every)
    for cid, s in scores.items():                               # each box keeps its own mean
        for start, mean in zip(s["boxes"]["starts"], s["boxes"]["entropy"]):
            assert every[units.box(cid, start)] == mean


def test_ranked_lowest_negates_in_both_modes():
    q, _ = patch_queries()
    scores = pool_scores(q)
    high, low = q.ranked(scores, "bald", U("a@0,0,0")), q.ranked(scores, "bald", U("a@0,0,0"), lowest=True)
    assert low == {u: -s for u, s in high.items()} and high
    v = Queries(config("volume"), None)
    floats = {c: {m: float(i + j) for j, m in enumerate(MC_MEASURES)} for i, c in enumerate("pqrs")}
    assert v.ranked(floats, "entropy", U("q")) == keyed({"p": 1.0, "r": 3.0, "s": 4.0})
    assert v.ranked(floats, "entropy", U("q"), lowest=True) == keyed({"p": -1.0, "r": -3.0, "s": -4.0})


def test_ranked_counts_a_whole_case_unit_as_a_box_over_its_grid():
    q, _ = patch_queries()
    ranked = q.ranked(pool_scores(q), "variance", U("a"))
    assert ranked and {u.case for u in ranked} == {"b"}


def greedy(q, scores, k, taken):
    """The brute-force greedy choice: by score (stable on ties), skipping what overlaps a box taken or chosen."""
    chosen = []
    for u in sorted(scores, key=lambda u: -scores[u]):
        if len(chosen) < k and u not in taken and not any(overlaps(q, u, v) for v in [*taken, *chosen]):
            chosen.append(u)
    return chosen


@pytest.mark.parametrize("k", [1, 5, 12])
def test_top_in_patch_mode_is_greedy_across_the_pool_and_never_overlaps(k):
    q, _ = patch_queries()
    taken = U("a@2,3,1", "b@5,0,7", "b@0,8,0")
    candidates = q.ranked(pool_scores(q), "variance")          # unfiltered: top must skip what overlaps taken
    chosen = q.top(candidates, k, taken)
    assert chosen == greedy(q, candidates, k, taken)
    assert len(chosen) == k
    for u, v in itertools.combinations(chosen, 2):
        assert not overlaps(q, u, v), (u, v)
    assert not any(overlaps(q, u, t) for u in chosen for t in taken)
    best = max((u for u in candidates if not any(overlaps(q, u, t) for t in taken)), key=candidates.get)
    assert chosen[0] == best
    assert [candidates[u] for u in chosen] == sorted((candidates[u] for u in chosen), reverse=True)


def test_top_takes_the_highest_box_of_any_case_first():
    q, _ = patch_queries()
    scores = keyed({"a@0,0,0": 1.0, "b@0,0,0": 3.0, "a@4,0,0": 2.0, "b@1,0,0": 2.5, "a@8,0,0": 0.5})
    # b@1,0,0 overlaps b@0,0,0, chosen before it; the next best are a's
    assert text(q.top(scores, 3)) == ["b@0,0,0", "a@4,0,0", "a@0,0,0"]
    assert text(q.top(scores, 3, taken=U("a@3,0,0"))) == ["b@0,0,0", "a@8,0,0"]    # fewer when no more fit


def test_top_counts_a_whole_case_unit_as_a_box_over_its_grid():
    q, _ = patch_queries()
    scores = keyed({"a": 5.0, "a@0,0,0": 4.0, "b@0,0,0": 3.0, "a@8,6,5": 2.0})
    assert text(q.top(scores, 4)) == ["a", "b@0,0,0"]                 # a's boxes lie inside the whole of a
    assert text(q.top(scores, 4, taken=U("a"))) == ["b@0,0,0"]
    assert text(q.top(keyed({"a": 5.0, "b": 1.0}), 2, taken=U("a@3,3,3"))) == ["b"]    # the whole of a overlaps


@pytest.mark.parametrize("k", [0, 1, 3, 6, 20])
def test_top_in_volume_mode_is_the_old_sorted_formula(k):
    q = Queries(config("volume"), None)
    rng = np.random.default_rng(k)
    scores = keyed({f"case_{i}": float(rng.integers(0, 4)) for i in range(15)})     # many ties
    taken = U("case_3", "case_7", "case_0")
    old = sorted((c for c in scores if c not in taken), key=lambda c: -scores[c])[:k]
    assert q.top(scores, k, taken) == old
    assert len(set(scores.values())) < len(scores)

# ----------------------------------------------------------------------------- random boxes


def draw_pool(vox=(4, 4, 4)):
    """Three cases of 24^3 voxels whose body (above the window's low end) is the middle 12^3."""
    return patch_queries({c: (24, 24, 24) for c in "abc"}, vox, lo=6)


def test_draw_is_seeded_and_its_boxes_lie_in_the_body_disjoint_from_each_other_and_taken():
    q, cases = draw_pool()
    taken = U("a@6,6,6", "b@10,10,10", "c")                      # c is labeled whole: no box of it
    drawn = q.draw(10, np.random.default_rng(3), taken)
    assert drawn == q.draw(10, np.random.default_rng(3), taken)
    assert list(drawn) != list(q.draw(10, np.random.default_rng(4), taken))
    assert list(drawn.values()) == [float(10 - i) for i in range(10)]      # the first drawn scores highest
    for u in drawn:
        cid, start, size = u.case, np.array(u.start), q.size(u.case)
        assert cid in ("a", "b") and not u.whole
        assert (start >= 0).all() and (start + size <= q.shape(cid)).all()
        centre = tuple(start + size // 2)           # the body lies 6 voxels from each edge: no box is shifted
        assert cases.image_hu(cid)[centre] > WINDOW[0], u
    for u, v in itertools.combinations([*drawn, *taken], 2):
        assert not overlaps(q, u, v), (u, v)


def test_draw_passes_over_a_full_case_and_returns_fewer():
    q, _ = patch_queries({"a": (4, 4, 4), "b": (6, 4, 4)}, vox=(4, 4, 4))
    drawn = q.draw(5, np.random.default_rng(0), taken=U("b@1,0,0"))
    assert text(drawn) == ["a@0,0,0"]


def touches(q, unit, foreground):
    return bool((box_mask(q, unit)[1] & foreground).any())


def test_draw_random_label_favours_foreground_over_uniform_boxes():
    shape = (32, 32, 32)
    label = np.zeros(shape, np.uint8)
    label[20:23, 5:8, 10:13] = 1                                # 27 voxels, 0.08 % of the volume
    q, _ = patch_queries({"a": shape}, vox=(4, 4, 4), labels={"a": label})
    read = []

    def labels(cid):
        read.append(cid)
        return label

    def share(areas):
        rng = np.random.default_rng(0)
        boxes = [next(iter(q.draw(1, rng, (), areas, labels if areas else None))) for _ in range(150)]
        return np.mean([touches(q, u, label > 0) for u in boxes])

    uniform, favoured = share(None), share("random-label")
    assert set(read) == {"a"}
    assert favoured > 0.5 and uniform < 0.1, (favoured, uniform)      # 2/3 of centres on foreground, vs ~1 %


def test_draw_reads_no_label_for_uniform_boxes():
    q, _ = draw_pool()
    assert len(q.draw(3, np.random.default_rng(0), (), None, lambda cid: pytest.fail("read a label"))) == 3

# ----------------------------------------------------------------------------- partial labels


def test_volumes_give_partial_labels_inside_the_boxes_and_ignore_elsewhere():
    shapes = {"a": (12, 10, 9), "b": (9, 12, 11), "c": (8, 8, 8)}
    labels = class_labels(shapes)
    q, cases = patch_queries(shapes, labels=labels)
    labeled = U("b@2,2,2", "a@0,0,0", "c", "a@5,4,3")
    out = q.volumes(labeled)
    assert len(out) == 3 and out[2][0] == ("whole", "c") and cases.whole == ["c"]   # case order; c whole
    for (image, partial, index), cid in zip(out[:2], ["a", "b"]):
        assert image is cases.image_hu(cid)
        inside = np.zeros(shapes[cid], bool)
        for u in labeled:
            if u.case == cid:
                inside |= box_mask(q, u)[1]
        np.testing.assert_array_equal(partial[inside], labels[cid][inside])
        assert (partial[~inside] == IGNORE).all() and (~inside).any()
        assert IGNORE not in index
        assert sorted(index) == sorted(set(np.unique(labels[cid][inside]).tolist()) | {0})
        for c in index:                                          # key 0: exactly the annotated background
            np.testing.assert_array_equal(index[c], np.flatnonzero(partial == c))


def test_volumes_of_noisy_labels_use_them_inside_the_boxes():
    shapes = {"a": (12, 10, 9)}
    q, _ = patch_queries(shapes, labels=class_labels(shapes))
    noisy = np.full(shapes["a"], 2, np.uint8)
    (_, partial, index), = q.volumes(U("a@4,4,4"), {"a": noisy})
    assert (partial[4:8, 4:8, 4:8] == 2).all() and (partial == 2).sum() == 64
    assert (partial[partial != 2] == IGNORE).all()
    assert sorted(index) == [0, 2] and len(index[0]) == 0


def test_volumes_in_volume_mode_are_the_whole_annotations_in_case_order():
    cases = FakeCases(body_images(SHAPES), class_labels(SHAPES))
    out = Queries(config("volume"), cases).volumes(U("b", "a"))
    assert [v[0] for v in out] == [("whole", "a"), ("whole", "b")] and cases.whole == ["a", "b"]


def centre_labels(image, label, index, n=400, fg_fraction=0.5, patch=(5, 5, 5), seed=0):
    """The label at the centre voxel of n patches of train.sample_patch (odd sides: the centre is p // 2)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        _, lab = train.sample_patch(image, label, patch, fg_fraction, rng, WINDOW, fg_index=index)
        out.append(int(lab[tuple(p // 2 for p in patch)]))
    return np.array(out)


def test_sample_patch_centres_partial_labels_on_annotated_voxels_one_to_one():
    shape = (20, 18, 16)
    label = np.zeros(shape, np.uint8)
    label[2:12, 3:13, 2:10] = 1                                  # a liver ...
    label[6:9, 6:9, 5:7] = 2                                     # ... with a tumour
    q, _ = patch_queries({"a": shape}, labels={"a": label})
    (image, partial, index), = q.volumes(U("a@4,4,4", "a@10,10,8"))    # the first holds liver and tumour
    assert (partial == IGNORE).mean() > 0.95 and (partial == 0).any() and (partial == 2).any()
    centres = centre_labels(np.asarray(image, np.float32), partial, index)
    assert not (centres == IGNORE).any()                         # only annotated voxels
    assert 0.4 < (centres > 0).mean() < 0.6                       # foreground 1:1 among them


def test_sample_patch_centres_on_annotated_voxels_when_the_boxes_hold_no_background():
    """A box inside a large organ is all foreground: a background draw must still centre on an annotated
    voxel (there is no annotated background to draw from)."""
    shape = (20, 18, 16)
    label = np.zeros(shape, np.uint8)
    label[2:14, 2:14, 2:14] = 1
    q, _ = patch_queries({"a": shape}, labels={"a": label})
    (image, partial, index), = q.volumes(U("a@4,4,4"))
    assert set(np.unique(partial).tolist()) == {1, IGNORE}
    centres = centre_labels(np.asarray(image, np.float32), partial, index, n=100)
    assert not (centres == IGNORE).any(), f"{(centres == IGNORE).sum()} of 100 patches centred on unannotated voxels"

# ----------------------------------------------------------------------------- budget


def test_budget_counts_voxels_and_foreground_inside_the_boxes():
    shapes = {"a": (12, 10, 9), "b": (9, 12, 3), "c": (8, 8, 8)}
    labels = class_labels(shapes, seed=2)
    q, _ = patch_queries(shapes, vox=(4, 5, 6), labels=labels)
    labeled = U("a@0,0,0", "a@6,5,3", "b@2,2,0", "c")               # b's box clamped to its 3 slices; c whole
    voxels, foreground = q.budget(labeled)
    masks = [box_mask(q, u) for u in labeled]
    assert voxels == 4 * 5 * 6 * 2 + 4 * 5 * 3 + 8 ** 3 == sum(int(m.sum()) for _, m in masks)
    assert foreground == sum(int((labels[cid][m] > 0).sum()) for cid, m in masks) > 0
    assert q.budget([]) == (0, 0)


def test_budget_in_volume_mode_counts_whole_training_grids():
    labels = class_labels(SHAPES, seed=1)
    q = Queries(config("volume"), FakeCases(body_images(SHAPES), labels))
    voxels, foreground = q.budget(U("a", "b"))
    assert voxels == sum(int(np.prod(s)) for s in SHAPES.values())
    assert foreground == sum(int((lab > 0).sum()) for lab in labels.values())
