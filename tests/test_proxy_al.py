"""Tests for proxy_al.py: pseudo labels, sliding windows, MC-dropout scores, noisy labels, patch streams and
the training steps. Tiny synthetic volumes of odd sizes, tiny U-Nets or test doubles, CPU, seconds in all
(tests/conftest.py runs the session on one thread)."""
import collections
import functools
import hashlib
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import proxy_al
from losses import dice_ce_loss
from proxy_al import (
    auto_hu_band, enable_mc_dropout, evaluate, n_windows, noisy_label, pseudo_label, semi_loss, sliding_window,
    sliding_window_predict, window_starts)
from train import make_optimizer, supervised_loss, train_steps
from tiny import CPU, ROI, fixed_batch, same_weights, tiny_unet, weights

# The variance here sums every class, as direct_scores does; the foreground variance is in test_paper_settings.py.
mc_scores = functools.partial(proxy_al.mc_scores, variance_classes="all")


def set_dropout(model, p):
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops, "the UNet should have dropout layers"
    for m in drops:
        m.p = p


def rand_image(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def windows(shape, roi, overlap):
    """The padded shape and the boxes (tuples of slices) of the sliding windows, by hand from window_starts."""
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    boxes = [tuple(slice(a, a + r) for a, r in zip(corner, roi))
             for corner in itertools.product(*(window_starts(s, r, overlap) for s, r in zip(padded, roi)))]
    return padded, boxes


def pad_to(image, padded):
    """(1, 1, *padded) float32 tensor: the image with zeros at the far end of every axis."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    return F.pad(x, tuple(itertools.chain(*((0, p - s) for s, p in reversed(list(zip(image.shape, padded)))))))


def stitch_by_hand(window_probs, image, roi, overlap, classes):
    """Average of window_probs(crop (1, *roi)) -> (C, *roi) over the windows covering each voxel, float64."""
    padded, boxes = windows(image.shape, roi, overlap)
    x = pad_to(image, padded)
    total = torch.zeros((classes,) + padded, dtype=torch.float64)
    count = torch.zeros(padded, dtype=torch.float64)
    for box in boxes:
        total[(slice(None),) + box] += window_probs(x[(0, slice(None)) + box]).double()
        count[box] += 1
    assert count.min() >= 1
    X, Y, Z = image.shape
    return (total / count)[:, :X, :Y, :Z].numpy()


class NoisyDouble(nn.Module):
    """A stand-in for an MC-dropout network whose 'dropout noise' does not depend on the batch layout.

    Logits of a crop: a fixed function of its voxels, plus (while self.drop is in training mode, as
    enable_mc_dropout leaves it) Gaussian noise drawn from a generator seeded by (a hash of the crop's bytes,
    how many times this instance has seen that crop before). The j-th pass over a window thus gets the same
    noise whether the passes come one per forward or many. self.log holds, per forward, the (key, count) of
    each crop; self.outputs the softmax of each crop (with store=True).
    """

    def __init__(self, classes=2, noise=1.5, store=False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))      # a parameter, so the device can be read from it
        self.drop = nn.Dropout(0.5)                        # never applied: its mode is the MC switch
        self.classes, self.noise, self.store = classes, noise, store
        self.seen, self.log, self.outputs = collections.Counter(), [], []
        self.fail = False

    @staticmethod
    def key(crop):
        return hashlib.blake2b(crop.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()

    def logits(self, crop, count, noisy=True):
        """crop (1, *roi) -> logits (C, *roi)."""
        c = torch.arange(1, self.classes + 1, dtype=torch.float32).view(-1, 1, 1, 1)
        out = self.scale * torch.sin(2.5 * c * crop + c)
        if noisy and self.noise:
            seed = int(hashlib.blake2b(f"{self.key(crop)}/{count}".encode(), digest_size=7).hexdigest(), 16)
            out = out + self.noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        return out

    def forward(self, x):
        if self.fail:
            raise RuntimeError("the forward failed")
        out, calls = [], []
        for crop in x:
            key = self.key(crop)
            calls.append((key, self.seen[key]))
            out.append(self.logits(crop, self.seen[key], self.drop.training))
            self.seen[key] += 1
        self.log.append(calls)
        out = torch.stack(out)
        if self.store:
            self.outputs.extend(out.float().softmax(1).clone())
        return out


def double_passes(double, image, roi, overlap, m, first=0):
    """Passes first..first+m-1 of the double over `image`, stitched by hand: (m, C, X, Y, Z) float64."""
    def probs(j):
        def f(crop):
            with torch.no_grad():
                return double.logits(crop, j).double().softmax(0)
        return f
    return np.stack([stitch_by_hand(probs(j), image, roi, overlap, double.classes)
                     for j in range(first, first + m)])


def direct_scores(passes):
    """variance map, variance, entropy and bald from stored passes (m, C, X, Y, Z), float64."""
    passes = np.asarray(passes, np.float64)

    def entropy(p):                                                           # (C, ...) -> (...)
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(0)

    var_map = passes.var(0, ddof=0).sum(0)                                    # (X, Y, Z)
    mean_entropy = entropy(passes.mean(0))
    bald = mean_entropy - np.mean([entropy(p) for p in passes], 0)
    return {"variance_map": var_map, "variance": var_map.mean(), "entropy": mean_entropy.mean(),
            "bald": bald.mean()}


def check_scores(scores, passes, image, rtol=1e-5):
    want = direct_scores(passes)
    assert set(scores) == {"variance", "entropy", "bald", "variance_map"}
    assert all(isinstance(scores[k], float) for k in ("variance", "entropy", "bald"))
    assert scores["variance"] == pytest.approx(want["variance"], rel=max(rtol, 1e-4))
    assert scores["entropy"] == pytest.approx(want["entropy"], rel=rtol)
    assert scores["bald"] == pytest.approx(want["bald"], rel=max(rtol, 1e-4), abs=1e-7)
    assert 0 < scores["bald"] <= scores["entropy"], "mutual information lies between 0 and the entropy"
    assert scores["variance_map"].shape == image.shape and scores["variance_map"].dtype == np.float32
    np.testing.assert_allclose(scores["variance_map"], want["variance_map"], rtol=1e-3, atol=1e-6)
    assert float(scores["variance_map"].mean(dtype=np.float64)) == pytest.approx(scores["variance"], rel=1e-5)

# ----------------------------------------------------------------------------- pseudo labels


def test_pseudo_label_keeps_largest_blob_in_band():
    image_hu = np.full((17, 23, 19), -50.0, np.float32)
    image_hu[1:4, 1:4, 1:4] = 120                  # 27 voxels in band
    image_hu[8:13, 10:15, 8:13] = 130              # 125 voxels in band: the largest
    image_hu[8:10, 10:12, 8:10] = 100              # band edges are inclusive: still part of the big blob
    image_hu[12, 14, 12] = 150
    image_hu[0:17, 20:23, 0:19] = 300              # much bigger, but above the band
    label = pseudo_label(image_hu, (100, 150))
    assert label.dtype == np.uint8 and label.shape == image_hu.shape
    expected = np.zeros(image_hu.shape, np.uint8)
    expected[8:13, 10:15, 8:13] = 1
    np.testing.assert_array_equal(label, expected)


def test_pseudo_label_uses_26_connectivity():
    image_hu = np.full((19, 17, 23), -50.0, np.float32)
    image_hu[2:6, 2:6, 2:6] = 120                  # 64 voxels ...
    image_hu[6:9, 6:9, 6:9] = 120                  # ... + 27 touching only at the corner (5,5,5)-(6,6,6): 91
    image_hu[12:17, 2:16, 12:13] = 120             # 70 voxels, separate: would win under 6- or 18-connectivity
    label = pseudo_label(image_hu)
    assert label[2:6, 2:6, 2:6].all() and label[6:9, 6:9, 6:9].all(), "corner-touching blobs are one component"
    assert label.sum() == 64 + 27
    assert not label[12:17, 2:16, 12:13].any()


def test_pseudo_label_empty_band_warns_with_case_id():
    image_hu = np.full((16, 17, 18), -200.0, np.float32)
    with pytest.warns(UserWarning, match="liver_042"):
        label = pseudo_label(image_hu, (100, 150), case_id="liver_042")
    assert label.dtype == np.uint8 and label.shape == image_hu.shape and not label.any()


def test_pseudo_label_auto_band_finds_the_big_soft_tissue_region():
    rng = np.random.default_rng(0)
    shape = (33, 35, 37)
    image_hu = (-100 + 10 * rng.standard_normal(shape)).astype(np.float32)  # fat: outside [20, 200]
    big = np.zeros(shape, bool)
    big[4:26, 5:27, 6:30] = True                                            # unenhanced liver, ~60 HU
    image_hu[big] = 60 + 3 * rng.standard_normal(int(big.sum()))
    small = np.zeros(shape, bool)
    small[28:32, 29:34, 30:35] = True                                       # a small enhancing vessel
    image_hu[small] = 125
    image_hu[0:2, 0:2, :] = 700                                             # bone
    lo_hu, hi_hu = auto_hu_band(image_hu)
    assert lo_hu < 60 < hi_hu and hi_hu - lo_hu == pytest.approx(50.0)
    label = pseudo_label(image_hu, "auto")
    assert label[big].mean() > 0.99 and not label[small].any() and not label[~big].any()
    # the paper's fixed band finds only the vessel here: the reason for "auto"
    assert pseudo_label(image_hu, (100, 150))[small].all()

# ----------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("size, roi, overlap", [
    (100, 32, 0.25), (33, 32, 0.5), (35, 32, 0.5), (97, 96, 0.25), (250, 96, 0.5), (64, 32, 0.0),
    (20, 16, 0.99), (37, 16, 0.25)])
def test_window_starts_cover_flush_and_even(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    assert all(isinstance(s, int) for s in starts)
    assert starts[0] == 0 and starts[-1] + roi == size, "first window at 0, last flush with the far edge"
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + roi] = True
    assert covered.all()
    gaps = np.diff(starts)
    step = max(1, int(roi * (1 - overlap)))
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1, "evenly spaced (up to rounding)"
    assert gaps.max() <= step, "windows overlap at least as much as asked"
    assert len(starts) == math.ceil((size - roi) / step) + 1, "no more windows than needed"


@pytest.mark.parametrize("size", [1, 17, 31, 32])
def test_window_starts_single_when_volume_fits(size):
    assert window_starts(size, 32, 0.25) == [0]


@pytest.mark.parametrize("shape, roi, overlap, expected", [
    ((33, 20, 27), (16, 16, 32), 0.5, 4 * 2 * 1), ((17, 23, 19), (32, 32, 32), 0.25, 1),
    ((100, 32, 9), (32, 32, 16), 0.25, 4 * 1 * 1), ((45, 20, 17), (16, 16, 16), 0.8, 11 * 3 * 2)])
def test_n_windows_counts_the_forwards_of_a_sweep(shape, roi, overlap, expected):
    assert n_windows(shape, roi, overlap) == expected
    double = NoisyDouble()
    sliding_window_predict(double.eval(), rand_image(shape), roi=roi, overlap=overlap, batch_size=1)
    assert len(double.log) == expected and all(len(calls) == 1 for calls in double.log)
    assert len({key for calls in double.log for key, _ in calls}) == expected, "every window once"


@pytest.mark.parametrize("shape, roi", [((32, 16, 48), (32, 16, 48)),     # the ROI is the volume
                                        ((17, 23, 19), (32, 32, 32)),     # smaller on every side: padded
                                        ((32, 9, 48), (32, 16, 48)),      # padded along y only
                                        ((5, 16, 31), (16, 16, 32))])
def test_sliding_window_equals_forward_when_roi_covers_the_volume(shape, roi):
    """One window: the result is the softmax of one forward of the zero-padded volume, cropped back."""
    net = tiny_unet(dropout=0.3, out_channels=3).eval()
    image = rand_image(shape, seed=1)
    probs = sliding_window_predict(net, image, roi=roi)
    assert probs.shape == (3,) + shape and probs.dtype == np.float32
    padded = pad_to(image, roi)
    assert padded.shape[2:] == roi and torch.equal(padded[0, 0, :shape[0], :shape[1], :shape[2]],
                                                   torch.from_numpy(image))
    with torch.no_grad():
        direct = net(padded).softmax(1)[0, :, :shape[0], :shape[1], :shape[2]].numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_sliding_window_larger_than_roi_odd_sizes_and_batches_agree():
    net = tiny_unet(out_channels=3).eval()
    image = rand_image((33, 35, 37), seed=2)
    one = sliding_window_predict(net, image, roi=(32, 32, 32), overlap=0.5, batch_size=1)
    assert one.shape == (3, 33, 35, 37) and one.dtype == np.float32
    assert np.isfinite(one).all() and one.min() >= 0
    np.testing.assert_allclose(one.sum(0), 1.0, atol=1e-5)
    eight = sliding_window_predict(net, image, roi=(32, 32, 32), overlap=0.5, batch_size=8)
    np.testing.assert_allclose(eight, one, atol=1e-6)


class Pointwise(nn.Module):
    """A 1x1x1 convolution, plus (window_dependent=True) a term in the mean of the whole crop, so that a voxel's
    logits differ from window to window."""

    def __init__(self, window_dependent):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.window_dependent = nn.Conv3d(1, 3, 1), window_dependent

    def forward(self, x):
        out = self.conv(x)
        if self.window_dependent:
            out = out + 8 * x.mean((2, 3, 4), keepdim=True) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1, 1)
        return out


STITCH_CASES = [((33, 35, 37), (16, 16, 16), 0.25), ((33, 35, 37), (16, 32, 16), 0.5),
                ((17, 40, 9), (16, 16, 16), 0.0), ((45, 20, 17), (16, 16, 16), 0.8)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
@pytest.mark.parametrize("shape, roi, overlap", STITCH_CASES)
def test_sliding_window_stitches_each_voxel_in_place(shape, roi, overlap, batch_size):
    """A voxel-wise model gives the same answer in every window, so the stitched result must equal its
    direct output: catches misplaced windows, wrong averaging and wrong cropping of the padding."""
    pointwise = Pointwise(window_dependent=False)
    image = rand_image(shape, seed=3)
    probs = sliding_window_predict(pointwise, image, roi=roi, overlap=overlap, batch_size=batch_size)
    with torch.no_grad():
        direct = pointwise(torch.from_numpy(image)[None, None]).softmax(1)[0].numpy()
    assert probs.shape == (3,) + shape
    np.testing.assert_allclose(probs, direct, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
@pytest.mark.parametrize("shape, roi, overlap", STITCH_CASES)
def test_sliding_window_averages_the_windows_covering_each_voxel(shape, roi, overlap, batch_size):
    """With logits that depend on the window, each voxel must get the mean of the softmax of every window
    that covers it (uniform weights), computed here window by window."""
    model = Pointwise(window_dependent=True)
    image = rand_image(shape, seed=4)
    probs = sliding_window_predict(model, image, roi=roi, overlap=overlap, batch_size=batch_size)

    def window_probs(crop):
        with torch.no_grad():
            return model(crop[None])[0].softmax(0)

    want = stitch_by_hand(window_probs, image, roi, overlap, 3)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    single = Pointwise(window_dependent=False)
    with torch.no_grad():
        assert not np.allclose(want, single(torch.from_numpy(image)[None, None]).softmax(1)[0].numpy(),
                               atol=1e-3), "sanity: the windows do disagree"


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("classes", [2, 4])
def test_sliding_window_puts_pass_j_of_every_window_into_map_j(batch_size, classes):
    """passes=3 over 2 x 1 x 3 windows: batches of (window, pass) pairs, the passes of a window next to each other
    (so a batch may split them); map j must hold pass j of every window, stitched."""
    double = NoisyDouble(classes=classes).train()
    image = rand_image((21, 13, 25), seed=5)
    roi, overlap = (16, 16, 16), 0.5
    out = sliding_window(double, image, roi, overlap, mc_passes=3, batch_size=batch_size)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (3, classes, 21, 13, 25)
    np.testing.assert_allclose(out.numpy(), double_passes(double, image, roi, overlap, 3), rtol=1e-5, atol=1e-6)
    calls = [c for batch in double.log for c in batch]
    assert [len(batch) for batch in double.log][:-1] == [batch_size] * (len(double.log) - 1)
    assert n_windows(image.shape, roi, overlap) == 6
    assert len(calls) == 6 * 3 and [count for _, count in calls] == [0, 1, 2] * 6
    keys = [key for key, _ in calls]
    assert all(len(set(keys[i:i + 3])) == 1 for i in range(0, 18, 3)) and len(set(keys)) == 6


def test_sliding_window_eval_passes_are_identical():
    net = tiny_unet(dropout=0.3).eval()
    image = rand_image((20, 17, 33), seed=6)
    out = sliding_window(net, image, ROI, 0.5, mc_passes=3, batch_size=4)
    assert out.shape == (3, 2, 20, 17, 33)
    np.testing.assert_allclose(out[0].numpy(), sliding_window_predict(net, image, ROI, 0.5), atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), out[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out[2].numpy(), out[0].numpy(), atol=1e-6)

# ----------------------------------------------------------------------------- MC-dropout scores


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("classes", [2, 3])
def test_mc_scores_zero_variance_and_bald_without_dropout(classes, batch_size):
    net = tiny_unet(dropout=0.0, out_channels=classes)
    image = rand_image((16, 15, 30))                  # one padded window: batch_size 3 -> sweeps of 3 and 2
    scores = mc_scores(net, image, mc_passes=5, roi=ROI, batch_size=batch_size, return_map=True)
    assert set(scores) == {"variance", "entropy", "bald", "variance_map"}
    if batch_size == 1:                               # every forward alike: identical passes, exact zeros
        assert scores["variance"] == 0.0 and not scores["variance_map"].any()
    else:                                             # a batch of 1 and a batch of 2 round differently (1e-6)
        assert 0.0 <= scores["variance"] < 1e-10 and scores["variance_map"].max() < 1e-9
    assert abs(scores["bald"]) < 1e-6
    assert 0.0 < scores["entropy"] <= math.log(classes) + 1e-6
    with torch.no_grad():
        probs = sliding_window_predict(net.eval(), image, ROI)
    want = direct_scores(probs[None])
    assert scores["entropy"] == pytest.approx(want["entropy"], rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 7])
def test_mc_scores_zero_variance_and_bald_without_noise(batch_size):
    """The test double without its noise, overlapping windows, several passes per sweep."""
    double = NoisyDouble(classes=3, noise=0.0)
    image = rand_image((21, 13, 11), seed=7)            # 2 windows of 16^3
    scores = mc_scores(double, image, mc_passes=5, roi=(16, 16, 16), overlap=0.5, batch_size=batch_size,
                       return_map=True)
    assert scores["variance"] == 0.0 and not scores["variance_map"].any()
    assert abs(scores["bald"]) < 1e-6 and scores["entropy"] > 0.1


def test_mc_variance_grows_with_dropout_rate():
    net = tiny_unet(dropout=0.2)
    image = rand_image((16, 16, 32), seed=1)

    def mean_variance(p):
        set_dropout(net, p)
        out = []
        for seed in range(2):
            torch.manual_seed(seed)
            out.append(mc_scores(net, image, mc_passes=3, roi=ROI)["variance"])
        return float(np.mean(out))

    low, high = mean_variance(0.05), mean_variance(0.5)
    assert 0 < low and high > 3 * low


@pytest.mark.parametrize("classes", [2, 4])
def test_mc_scores_match_stored_passes(classes):
    """With batch_size 1 every sweep is one pass, one window per forward, windows in order: redo the m
    sliding-window predictions by hand from the same torch seed with dropout on and compute the scores
    directly from every pass."""
    net = tiny_unet(dropout=0.3, out_channels=classes)
    image = rand_image((33, 20, 27), seed=2)           # 4 x 2 overlapping windows, z padded
    m, kw = 4, dict(roi=ROI, overlap=0.5, batch_size=1)
    torch.manual_seed(7)
    scores = mc_scores(net, image, mc_passes=m, return_map=True, **kw)
    torch.manual_seed(7)
    enable_mc_dropout(net)
    passes = np.stack([sliding_window_predict(net, image, **kw) for _ in range(m)])
    assert passes.shape == (m, classes, 33, 20, 27)
    assert not np.allclose(passes[0], passes[1]), "dropout must make the passes differ"
    check_scores(scores, passes, image)


@pytest.mark.parametrize("batch_size, m, sweeps", [(4, 5, [4, 1]), (3, 7, [3, 3, 1]), (2, 3, [2, 1])])
def test_mc_scores_sweeps_of_several_passes_match_stored_passes(batch_size, m, sweeps):
    """One window (the ROI covers the padded volume): sweeps of batch_size passes, the last one shorter. Redo
    the same sweeps from the same seed and compute the scores directly from every pass."""
    net = tiny_unet(dropout=0.3, out_channels=3)
    image = rand_image((15, 16, 29), seed=3)
    assert n_windows(image.shape, ROI, 0.25) == 1
    torch.manual_seed(11)
    scores = mc_scores(net, image, mc_passes=m, roi=ROI, batch_size=batch_size, return_map=True)
    torch.manual_seed(11)
    enable_mc_dropout(net)
    passes = torch.cat([sliding_window(net, image, ROI, 0.25, mc_passes=n, batch_size=batch_size) for n in sweeps])
    assert passes.shape == (m, 3, 15, 16, 29)
    check_scores(scores, passes.numpy(), image)


def mc_of_double(image, batch_size, m=7, classes=2, roi=(16, 16, 16), overlap=0.5, store=False):
    double = NoisyDouble(classes=classes, store=store)
    return double, mc_scores(double, image, mc_passes=m, roi=roi, overlap=overlap, batch_size=batch_size,
                             return_map=True)


@pytest.mark.parametrize("shape, roi, batch_sizes", [
    ((21, 13, 11), (16, 16, 16), [1, 2, 3, 4, 7]),            # 2 windows: 1, 1, 1, 2, 3 passes per sweep
    ((33, 20, 27), (16, 16, 32), [1, 2, 3, 4, 7, 16, 24])])   # 8 windows: 1, ..., 1, 2, 3 passes per sweep
@pytest.mark.parametrize("classes", [2, 4])
def test_mc_scores_batched_windows_equal_one_window_per_forward(shape, roi, batch_sizes, classes):
    image = rand_image(shape, seed=8)
    windows_ = n_windows(shape, roi, 0.5)
    results = {}
    for b in batch_sizes:
        double, results[b] = mc_of_double(image, b, classes=classes, roi=roi)
        per_sweep = max(1, b // windows_)
        sizes = [len(batch) for batch in double.log]
        assert sum(sizes) == 7 * windows_, "every (window, pass) pair once"
        expected = []
        for first in range(0, 7, per_sweep):                  # sweeps of per_sweep passes, the last shorter
            pairs = min(per_sweep, 7 - first) * windows_
            expected += [b] * (pairs // b) + [pairs % b] * (pairs % b > 0)
        assert sizes == expected
        calls = [c for batch in double.log for c in batch]
        assert sorted(count for _, count in calls) == sorted(list(range(7)) * windows_)
    base = results[batch_sizes[0]]
    assert base["variance"] > 0 and base["bald"] > 0
    for b in batch_sizes[1:]:
        for k in ("variance", "entropy", "bald"):
            assert results[b][k] == pytest.approx(base[k], rel=1e-5), (b, k)
        np.testing.assert_allclose(results[b]["variance_map"], base["variance_map"], rtol=1e-5, atol=1e-9)
    double = NoisyDouble(classes=classes)
    check_scores(base, double_passes(double, image, roi, 0.5, 7), image)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("classes", [2, 4])
def test_mc_scores_of_the_double_match_its_stored_passes(classes, batch_size):
    """ROI covering the (padded) volume: each forward crop is the whole volume, so the double's own stored
    outputs, cropped, are the passes."""
    image = rand_image((13, 16, 9), seed=9)
    double, scores = mc_of_double(image, batch_size, m=5, classes=classes, store=True)
    assert len(double.outputs) == 5
    passes = torch.stack(double.outputs)[:, :, :13, :16, :9].numpy()
    assert not np.allclose(passes[0], passes[1])
    check_scores(scores, passes, image)
    check_scores(scores, double_passes(NoisyDouble(classes=classes), image, (16, 16, 16), 0.5, 5), image)


@pytest.mark.parametrize("training", [True, False])
def test_mc_scores_restores_model_mode_and_drops_out_only_during_the_call(training):
    net = tiny_unet(dropout=0.2)
    net.train(training)
    seen = []

    def record(module, args):
        seen.append([(type(m).__name__, m.training) for m in net.modules()])

    handle = net.register_forward_pre_hook(record)
    image = rand_image((16, 16, 32))
    mc_scores(net, image, mc_passes=2, roi=ROI)
    handle.remove()
    assert len(seen) == 2
    for modes in seen:
        assert all(mode == (name == "Dropout") for name, mode in modes), "dropout on, everything else in eval"
    assert all(mod.training == training for mod in net.modules())
    if not training:
        x = torch.from_numpy(image)[None, None]
        with torch.no_grad():
            assert torch.equal(net(x), net(x)), "dropout is off again after the call"


def test_mc_scores_restores_mode_when_a_forward_fails():
    double = NoisyDouble().eval()
    double.fail = True
    with pytest.raises(RuntimeError, match="forward failed"):
        mc_scores(double, rand_image((16, 16, 16)), mc_passes=2, roi=(16, 16, 16))
    assert not double.training and not double.drop.training
    double.train()
    with pytest.raises(RuntimeError, match="forward failed"):
        mc_scores(double, rand_image((16, 16, 16)), mc_passes=2, roi=(16, 16, 16))
    assert double.training and double.drop.training


def test_inference_leaves_weights_trainable():
    """mc_scores and the sliding window run under inference mode: the weights must come out as ordinary
    trainable parameters, and a training step must work and change them."""
    net = tiny_unet(dropout=0.2)
    image = rand_image((16, 16, 32))
    mc_scores(net, image, mc_passes=2, roi=ROI)
    sliding_window_predict(net.eval(), image, roi=ROI)
    assert all(p.requires_grad and not p.is_inference() for p in net.parameters())
    before = weights(net)
    optimizer, scaler = make_optimizer(net, 1e-2, CPU)
    result = train_steps(net, optimizer, scaler, supervised_loss, itertools.repeat(fixed_batch(batch_size=1)), 1, CPU)
    assert math.isfinite(result["loss"])
    assert all(p.grad is not None for p in net.parameters())
    assert not same_weights(weights(net), before)

# ----------------------------------------------------------------------------- noisy labels


def test_noisy_label_thresholds_max_probability():
    probs = np.zeros((3, 2, 2, 2), np.float32)
    probs[:, 0, 0, 0] = (0.02, 0.03, 0.95)    # class 2, confident
    probs[:, 0, 0, 1] = (0.05, 0.91, 0.04)    # class 1, confident
    probs[:, 0, 1, 0] = (0.10, 0.60, 0.30)    # class 1, not confident -> background
    probs[:, 0, 1, 1] = (0.96, 0.02, 0.02)    # background, confident
    probs[:, 1, 0, 0] = (0.15, 0.75, 0.10)    # exactly tau = 0.75 -> background (strictly greater needed)
    probs[:, 1, 0, 1] = (0.00, 0.00, 1.00)
    probs[:, 1, 1, 0] = (0.20, 0.05, 0.75)    # exactly tau again, class 2
    probs[:, 1, 1, 1] = (0.10, 0.76, 0.14)
    label = noisy_label(probs, tau=0.75)
    assert label.dtype == np.uint8 and label.shape == (2, 2, 2)
    np.testing.assert_array_equal(label, [[[2, 1], [0, 0]], [[0, 2], [0, 1]]])
    assert not noisy_label(probs, tau=1.0).any()


def test_noisy_label_default_tau_edge_float64():
    probs = np.array([0.1, 0.9, 0.0])[:, None, None, None] * np.ones((3, 3, 1, 2))
    assert not noisy_label(probs).any()                         # 0.9 is not > tau = 0.9
    probs[:, 1, 0, 1] = (0.05, 0.9000001, 0.0499999)
    assert noisy_label(probs).sum() == 1 and noisy_label(probs)[1, 0, 1] == 1


def test_semi_loss_value_matches_hand_computation():
    net = tiny_unet(dropout=0.0).eval()
    sup = fixed_batch(0, batch_size=1)
    g = torch.Generator().manual_seed(0)
    view1 = torch.rand((1, 1, 16, 16, 32), generator=g)
    view2 = view1 + 0.1 * torch.randn(view1.shape, generator=g)
    alpha, beta = 0.7, 0.3
    with torch.no_grad():
        got = semi_loss(net, (sup, (view1, view2)), alpha=alpha, beta=beta).item()
        want = (alpha * dice_ce_loss(net(sup[0]), sup[1])
                + beta * dice_ce_loss(net(view2), net(view1).softmax(1))).item()
    assert got == pytest.approx(want, rel=1e-6)
    with torch.no_grad():                             # default weights: the paper's alpha 1, beta 1e-3
        default = semi_loss(net, (sup, (view1, view2))).item()
        assert default == pytest.approx(dice_ce_loss(net(sup[0]), sup[1]).item()
                                        + 1e-3 * dice_ce_loss(net(view2), net(view1).softmax(1)).item(), rel=1e-6)


def test_semi_loss_target_is_detached():
    """With alpha = 0 the gradient must be that of DiceCE(view 2, detached softmax(view 1))."""
    net = tiny_unet(dropout=0.0).eval()
    sup = fixed_batch(0, batch_size=1)
    g = torch.Generator().manual_seed(1)
    view1 = torch.rand((1, 1, 16, 16, 32), generator=g)
    view2 = torch.rand((1, 1, 16, 16, 32), generator=g)

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    got = grads(semi_loss(net, (sup, (view1, view2)), alpha=0.0, beta=1.0))
    detached = grads(dice_ce_loss(net(view2), net(view1).softmax(1).detach()))
    attached = grads(dice_ce_loss(net(view2), net(view1).softmax(1)))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, detached))
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, attached)), \
        "sanity: the check can tell a detached target from an attached one"


def test_evaluate_shape_and_perfect_model():
    perfect = nn.Conv3d(1, 2, 1)                  # logit(fg) - logit(bg) = 100 (x - 0.5): predicts x > 0.5
    with torch.no_grad():
        perfect.weight.zero_()
        perfect.bias.zero_()
        perfect.weight[1] = 100.0
        perfect.bias[1] = -50.0
    rng = np.random.default_rng(0)
    cases = [(img, (img > 0.5).astype(np.uint8)) for img in
             (rng.random((17, 23, 19), dtype=np.float32), rng.random((33, 20, 9), dtype=np.float32))]
    dice = evaluate(perfect, cases, 2, roi=(16, 16, 16))
    assert dice.shape == (2, 1)
    np.testing.assert_allclose(dice, 1.0)
    wrong = [(img, 1 - lab) for img, lab in cases]
    assert evaluate(perfect, wrong, 2, roi=(16, 16, 16)).max() < 0.1
    three = evaluate(tiny_unet(out_channels=3), iter(cases[:1]), 3, roi=(32, 32, 32))   # a generator works
    assert three.shape == (1, 2) and 0 <= three[0, 0] <= 1
    assert np.isnan(three[0, 1]), "class 2 is absent from the label: NaN, left out of its mean"
