"""Tests for proxy_al.py: pseudo labels, sliding windows, MC-dropout scores, noisy labels, patch streams and
the training steps. Tiny synthetic volumes of odd sizes, tiny U-Nets, CPU, a few seconds in all."""
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import proxy_al  # noqa: E402
from data import foreground_index, window  # noqa: E402
from losses import dice_ce_loss  # noqa: E402
from proxy_al import (  # noqa: E402
    PatchStream, auto_hu_band, autocast, batches, evaluate, fmt_s, make_optimizer, mc_scores, needs_scaler,
    noisy_label, pick_device, pseudo_label, semi_loss, sliding_window_predict, supervised_loss, train_proxy,
    train_steps, window_starts)
from unet import UNet, enable_mc_dropout  # noqa: E402

SMALL = (4, 8, 8, 8, 8)       # five levels, tiny widths: fast on the CPU
ROI = (16, 16, 32)            # the cheapest window the 5-level UNet accepts (not 16 on every side)
WINDOW_HU = (-21, 189)        # Task03 window
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy machine the thread pool's
    barriers make them up to 100x slower: run this module single-threaded, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed=0, dropout=0.0, out_channels=2):
    torch.manual_seed(seed)
    return UNet(channels=SMALL, out_channels=out_channels, dropout=dropout)


def set_dropout(model, p):
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops, "the UNet should have dropout layers"
    for m in drops:
        m.p = p


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def blob_volume(shape=(40, 36, 30), seed=0):
    """HU volume (background -100) with a ~110 HU cube and its label; windowed it is a clear bright cube."""
    rng = np.random.default_rng(seed)
    image_hu = (-100 + 5 * rng.standard_normal(shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[8:24, 10:26, 6:22] = 1
    image_hu[label == 1] = 110 + 5 * rng.standard_normal(int(label.sum()))
    return image_hu, label

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


def test_sliding_window_equals_forward_when_roi_is_the_volume():
    net = tiny_unet(dropout=0.3).eval()
    image = np.random.default_rng(0).random((32, 16, 48), dtype=np.float32)
    probs = sliding_window_predict(net, image, roi=(32, 16, 48))
    with torch.no_grad():
        direct = net(torch.from_numpy(image)[None, None]).softmax(1)[0].numpy()
    assert probs.shape == (2, 32, 16, 48) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, direct, atol=1e-6)


def test_sliding_window_pads_small_volume():
    net = tiny_unet(out_channels=3).eval()
    image = np.random.default_rng(1).random((17, 23, 19), dtype=np.float32)
    probs = sliding_window_predict(net, image, roi=(32, 32, 32))
    assert probs.shape == (3, 17, 23, 19) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    padded = F.pad(torch.from_numpy(image)[None, None], (0, 13, 0, 9, 0, 15))   # zeros at the far end
    with torch.no_grad():
        direct = net(padded).softmax(1)[0, :, :17, :23, :19].numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-6)


def test_sliding_window_larger_than_roi_odd_sizes():
    net = tiny_unet(out_channels=3).eval()
    image = np.random.default_rng(2).random((33, 35, 37), dtype=np.float32)
    probs = sliding_window_predict(net, image, roi=(32, 32, 32), overlap=0.5, batch_size=8)
    assert probs.shape == (3, 33, 35, 37) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and probs.min() >= 0
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape, roi, overlap, batch_size", [
    ((33, 35, 37), (16, 16, 16), 0.25, 4), ((33, 35, 37), (16, 32, 16), 0.5, 3), ((17, 40, 9), (16, 16, 16), 0.0, 1),
    ((45, 20, 17), (16, 16, 16), 0.8, 2)])     # x step 3 or 4: the carried band moves in several pieces
def test_sliding_window_stitches_each_voxel_in_place(shape, roi, overlap, batch_size):
    """A voxel-wise model gives the same answer in every window, so the stitched result must equal
    its direct output: catches misplaced windows, wrong averaging and wrong cropping of the padding."""
    torch.manual_seed(0)
    pointwise = nn.Conv3d(1, 3, 1)
    image = np.random.default_rng(3).random(shape, dtype=np.float32)
    probs = sliding_window_predict(pointwise, image, roi=roi, overlap=overlap, batch_size=batch_size)
    with torch.no_grad():
        direct = pointwise(torch.from_numpy(image)[None, None]).softmax(1)[0].numpy()
    assert probs.shape == (3,) + shape
    np.testing.assert_allclose(probs, direct, atol=1e-6)

# ----------------------------------------------------------------------------- MC-dropout scores


@pytest.mark.parametrize("classes", [2, 3])
def test_mc_scores_zero_variance_without_dropout(classes):
    net = tiny_unet(dropout=0.0, out_channels=classes)
    image = np.random.default_rng(0).random((17, 15, 30), dtype=np.float32)
    scores = mc_scores(net, image, m=5, roi=ROI, maps_mb=0.1)     # 2 sweeps: the running mean carries over
    assert set(scores) == {"variance", "entropy"}
    assert scores["variance"] == 0.0                              # identical passes: Welford gives exact zeros
    assert 0.0 < scores["entropy"] <= math.log(classes) + 1e-6


def test_mc_variance_grows_with_dropout_rate():
    net = tiny_unet(dropout=0.2)
    image = np.random.default_rng(1).random((16, 16, 32), dtype=np.float32)

    def mean_variance(p):
        set_dropout(net, p)
        out = []
        for seed in range(2):
            torch.manual_seed(seed)
            out.append(mc_scores(net, image, m=3, roi=ROI)["variance"])
        return float(np.mean(out))

    low, high = mean_variance(0.05), mean_variance(0.5)
    assert 0 < low and high > 3 * low


def direct_scores(passes):
    """Both scores and the variance map from stored passes (m, C, X, Y, Z), float64, population variance."""
    passes = np.asarray(passes, np.float64)
    var_map = passes.var(0).sum(0)                                            # (X, Y, Z)
    mean = passes.mean(0)
    entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(0).mean()
    return var_map, entropy


def check_scores(scores, passes, image):
    var_map, entropy = direct_scores(passes)
    assert scores["variance"] == pytest.approx(var_map.mean(), rel=1e-4)
    assert scores["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert scores["variance_map"].shape == image.shape and scores["variance_map"].dtype == np.float32
    np.testing.assert_allclose(scores["variance_map"], var_map, rtol=1e-3, atol=1e-6)
    assert float(scores["variance_map"].mean()) == pytest.approx(scores["variance"], rel=1e-5)


@pytest.mark.parametrize("classes", [2, 4])
def test_mc_scores_match_stored_passes(classes):
    """With room for one pass map (maps_mb=0) mc_scores makes m sequential padded sliding-window
    predictions with dropout on: redo them by hand from the same torch seed and compute both scores directly
    from every class (mc_scores stores all but the last)."""
    net = tiny_unet(dropout=0.3, out_channels=classes)
    image = np.random.default_rng(2).random((20, 13, 30), dtype=np.float32)   # 2 windows along x, padded y, z
    m, kw = 5, dict(roi=ROI, overlap=0.5, batch_size=1)
    torch.manual_seed(7)
    scores = mc_scores(net, image, m=m, return_map=True, maps_mb=0, **kw)
    torch.manual_seed(7)
    enable_mc_dropout(net)
    passes = np.stack([sliding_window_predict(net, image, **kw) for _ in range(m)])
    assert passes.shape == (m, classes, 20, 13, 30)
    assert not np.allclose(passes[0], passes[1]), "dropout must make the passes differ"
    check_scores(scores, passes, image)


@pytest.mark.parametrize("batch_size, maps_mb, sweeps", [(1, 512, [4]), (2, 512, [4]), (3, 512, [3]),
                                                         (1, 0.085, [2, 2]), (2, 0.125, [3, 1])])
def test_mc_scores_sweep_stitches_pass_j_of_every_window_into_map_j(batch_size, maps_mb, sweeps):
    """Each sweep over the windows runs as many passes per window as pass maps fit in maps_mb (a pass map is
    one window-deep band of all classes but the last: 1 x 16 x 20 x 32 float32 = 0.039 MB here), a window's
    passes in a row with one shared stem; windows go by x start, a forward batching those of one x start.
    Rebuild the pass maps by hand in that random order (pass j of each window into map j) and compare."""
    net = tiny_unet(dropout=0.3)
    image = np.random.default_rng(3).random((20, 20, 30), dtype=np.float32)
    m = sum(sweeps)
    starts = window_starts(20, ROI[0], 0.5)
    assert starts == [0, 4] and window_starts(20, ROI[1], 0.5) == [0, 4]
    torch.manual_seed(11)
    scores = mc_scores(net, image, m=m, roi=ROI, overlap=0.5, batch_size=batch_size, return_map=True,
                       maps_mb=maps_mb)
    torch.manual_seed(11)
    enable_mc_dropout(net)
    x = F.pad(torch.from_numpy(image)[None, None], (0, 2))                     # (1, 1, 20, 20, 32)
    count = torch.zeros(20, 20)
    for a, b in itertools.product(starts, starts):
        count[a:a + ROI[0], b:b + ROI[1]] += 1
    maps = []
    # the same weight layout as mc_scores: the CPU dropout draws its mask in storage order
    with torch.no_grad(), proxy_al.cpu_channels_last(net, torch.device("cpu")):
        for n in sweeps:
            passes = torch.zeros((n, 2, 20, 20, 32))
            for a in starts:                                                   # one row of windows
                for i in range(0, len(starts), batch_size):
                    chunk = starts[i:i + batch_size]
                    crops = torch.cat([x[:, :, a:a + ROI[0], b:b + ROI[1]] for b in chunk])
                    for j, logits in enumerate(net.repeated_forward(crops, n)):
                        for p, b in zip(logits.softmax(1), chunk):
                            passes[j, :, a:a + ROI[0], b:b + ROI[1]] += p
            maps.append((passes / count[:, :, None])[..., :30])
    check_scores(scores, torch.cat(maps).numpy(), image)


def test_passes_per_sweep_follows_the_memory_budget():
    net = tiny_unet(out_channels=3)                          # a pass map of 64^3: 2 classes (of 3) x 1 MB
    assert proxy_al.passes_per_sweep(net, (64, 64, 64), 10, maps_mb=7) == 3
    assert proxy_al.passes_per_sweep(net, (64, 64, 64), 10, maps_mb=1) == 1
    assert proxy_al.passes_per_sweep(net, (64, 64, 64), 10, maps_mb=1e6) == 10
    assert proxy_al.passes_per_sweep(net, (64, 64, 64), 10) == 10    # CPU default: 128 MB
    # a pass map is one window-deep band along x (2 x 32 x 64 x 64 floats = 1 MB), not the volume (6.25 MB)
    assert proxy_al.passes_per_sweep(net, (200, 64, 64), 10, maps_mb=7, roi=(32, 32, 32)) == 7
    assert proxy_al.passes_per_sweep(nn.Conv3d(1, 2, 1), (64, 64, 64), 10, maps_mb=1e6) == 1   # no stem to share


def test_inference_leaves_weights_contiguous_and_trainable():
    """On the CPU the sweeps run with channels-last weights; afterwards the weights are as before and can be
    trained (weights converted under inference mode could not), and the layout does not change the result."""
    net = tiny_unet(dropout=0.2)
    image = np.random.default_rng(0).random((16, 16, 32), dtype=np.float32)
    mc_scores(net, image, m=2, roi=ROI)
    probs = sliding_window_predict(net.eval(), image, roi=ROI)
    assert all(p.is_contiguous() and not p.is_inference() for p in net.parameters())
    with torch.no_grad():
        direct = net(torch.from_numpy(image)[None, None]).softmax(1)[0].numpy()      # one window, plain layout
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    net.train()
    net(torch.from_numpy(image)[None, None]).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.to(memory_format=torch.channels_last_3d)          # a model the user keeps channels-last stays so
    mc_scores(net, image, m=2, roi=ROI)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in net.parameters() if p.dim() == 5)


@pytest.mark.parametrize("training", [True, False])
def test_mc_scores_restores_model_mode(training):
    net = tiny_unet(dropout=0.2)
    net.train(training)
    mc_scores(net, np.random.default_rng(0).random((16, 16, 32), dtype=np.float32), m=2, roi=ROI)
    assert all(mod.training == training for mod in net.modules())

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

# ----------------------------------------------------------------------------- patch streams


def coded_volume(shape=(21, 19, 35)):
    """HU volume whose windowed value encodes the voxel's flat index: v = (i + 1) / (N + 1) > 0."""
    n = int(np.prod(shape))
    v = (np.arange(n, dtype=np.float64) + 1) / (n + 1)
    image_hu = (WINDOW_HU[0] + v * (WINDOW_HU[1] - WINDOW_HU[0])).reshape(shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[5:9, 4:8, 10:20] = 1
    return image_hu, label, n


def test_patch_stream_two_views_clean_crop_and_augmented_twin():
    image_hu, label, n = coded_volume()
    patch_vox = (16, 16, 32)
    stream = PatchStream([(image_hu, label, foreground_index(label))], patch_vox, 0.5, WINDOW_HU, seed=1,
                         two_views=True)
    differs = 0
    for view1, view2 in itertools.islice(iter(stream), 8):
        assert view1.shape == view2.shape == (1,) + patch_vox
        assert view1.dtype == view2.dtype == torch.float32
        v1 = view1[0].numpy()
        assert v1.min() >= 0 and v1.max() <= 1
        # view 1 is a clean crop: its non-padded voxels decode to one rigid translation of the volume
        inside = v1 > 0
        flat = np.rint(v1[inside].astype(np.float64) * (n + 1) - 1).astype(np.int64)
        src = np.stack(np.unravel_index(flat, image_hu.shape), 1)             # (k, 3) source voxel
        dst = np.argwhere(inside)                                              # (k, 3) patch voxel
        offset = src - dst
        assert inside.sum() > 0 and (offset == offset[0]).all()
        v2 = view2[0].numpy()
        differs += not np.array_equal(v1, v2)
        assert np.corrcoef(v1.ravel(), v2.ravel())[0, 1] > 0.5, "view 2 is the same patch"
    assert differs >= 1, "view 2 should be augmented at least sometimes"


def test_patch_stream_labels_and_batches():
    image_hu, label = blob_volume(shape=(33, 27, 29))
    patch_vox = (16, 16, 32)
    stream = PatchStream([(image_hu, label, foreground_index(label))], patch_vox, 1.0, WINDOW_HU, seed=0)
    for image, lab in itertools.islice(iter(stream), 4):
        assert image.shape == lab.shape == (1,) + patch_vox
        assert image.dtype == torch.float32 and lab.dtype == torch.int64
        assert lab[0, 8, 8, 16] == 1, "fg_fraction 1: the patch centre lies on foreground"
        assert set(lab.unique().tolist()) <= {0, 1}
        fg, bg = image[lab == 1], image[lab == 0]
        assert fg.mean() > bg.mean() + 0.3, "image and label patches are aligned"
    image, lab = next(batches(stream, batch_size=3, workers=0, device=CPU))
    assert image.shape == lab.shape == (3, 1) + patch_vox
    assert image.dtype == torch.float32 and lab.dtype == torch.int64 and image.device.type == "cpu"


@pytest.mark.parametrize("two_views", [False, True])
def test_patch_stream_deterministic_for_a_seed(two_views):
    image_hu, label = blob_volume(shape=(33, 27, 29))
    vols = [(image_hu, label, foreground_index(label)), (image_hu[::-1].copy(), label[::-1].copy(), None)]

    def first(seed, k=3):
        stream = PatchStream(vols, (16, 16, 32), 0.5, WINDOW_HU, seed=seed, two_views=two_views)
        return list(itertools.islice(batches(stream, 2, 0, CPU), k))

    a, b, c = first(5), first(5), first(6)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for ba, bc in zip(a, c) for x, y in zip(ba, bc))

# ----------------------------------------------------------------------------- training steps


def fixed_batch(seed=0, batch_size=2, shape=(16, 16, 32)):
    rng = np.random.default_rng(seed)
    label = np.zeros((batch_size, 1) + shape, np.int64)
    label[:, :, 4:12, 3:11, 8:24] = 1
    image = (0.2 + 0.6 * label + 0.1 * rng.standard_normal(label.shape)).astype(np.float32)
    return torch.from_numpy(image), torch.from_numpy(label)


def test_train_steps_overfits_one_batch():
    net = tiny_unet(dropout=0.0)
    batch = fixed_batch(batch_size=1)

    slept = []

    def slow_repeat():                            # data that takes a while: data_wait must see it
        while True:
            t = time.perf_counter()
            time.sleep(0.01)
            slept.append(time.perf_counter() - t)
            yield batch

    with torch.no_grad():
        before = supervised_loss(net, batch).item()
    optimizer, scaler = make_optimizer(net, 1e-2, CPU)
    result = train_steps(net, optimizer, scaler, supervised_loss, slow_repeat(), 6, CPU)
    with torch.no_grad():
        after = supervised_loss(net, batch).item()
    assert set(result) == {"loss", "step_s", "data_wait"}
    assert after < 0.9 * before
    assert 0 < result["loss"] < before
    assert result["step_s"] > 0.01 and 0 < result["data_wait"] <= 1
    wait_s = result["data_wait"] * result["step_s"] * 6      # data_wait is a share of the run's time
    assert 0.99 * sum(slept) <= wait_s <= result["step_s"] * 6
    assert net.training


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
    assert three.shape == (1, 2) and ((three >= 0) & (three <= 1)).all()


def proxy_setup():
    image_hu, label = blob_volume(shape=(26, 21, 35))
    volumes = [(image_hu, label, foreground_index(label))]
    val = [(window(image_hu, *WINDOW_HU), label)]
    kw = dict(patch_vox=(16, 16, 32), batch_size=1, window_hu=WINDOW_HU, lr=1e-2, workers=0, roi=ROI)
    return volumes, val, kw


def record_train_steps(monkeypatch):
    """Wrap proxy_al.train_steps to capture the weights after every training chunk."""
    snapshots, real = [], proxy_al.train_steps

    def wrapped(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        snapshots.append(weights(model))
        return out

    monkeypatch.setattr(proxy_al, "train_steps", wrapped)
    return snapshots


def test_train_proxy_without_validation_keeps_last_weights(monkeypatch):
    net = tiny_unet()
    start = weights(net)
    snapshots = record_train_steps(monkeypatch)
    volumes, _, kw = proxy_setup()
    history = train_proxy(net, volumes, None, epochs=3, val_every=2, steps_per_epoch=1, device=CPU, seed=0, **kw)
    assert history == [] and len(snapshots) == 2
    assert same_weights(weights(net), snapshots[-1]) and not same_weights(weights(net), start)


def test_train_proxy_keeps_best_epoch_weights(monkeypatch):
    net = tiny_unet()
    snapshots = record_train_steps(monkeypatch)
    dices = iter([0.1, 0.9, 0.3])
    evaluated = []

    def fake_evaluate(model, cases, num_classes, roi, *args, **kwargs):
        evaluated.append(list(cases))
        return np.array([[next(dices)]])

    monkeypatch.setattr(proxy_al, "evaluate", fake_evaluate)
    volumes, val, kw = proxy_setup()
    history = train_proxy(net, volumes, lambda: iter(val), epochs=5, val_every=2, steps_per_epoch=1, device=CPU,
                          seed=0, **kw)
    assert len(history) == math.ceil(5 / 2) == len(snapshots)
    assert [e for e, _ in history] == [2, 4, 5]
    assert [d for _, d in history] == pytest.approx([0.1, 0.9, 0.3])
    assert all(len(cases) == 1 for cases in evaluated), "val_cases() is called afresh for every validation"
    assert not same_weights(snapshots[1], snapshots[2]), "sanity: the last chunk changed the weights"
    assert same_weights(weights(net), snapshots[1]), "the model ends with the best epoch's weights"


def test_train_proxy_real_validation_history():
    net = tiny_unet()
    volumes, val, kw = proxy_setup()
    history = train_proxy(net, volumes, lambda: iter(val), epochs=1, val_every=1, steps_per_epoch=1, device=CPU,
                          seed=0, **kw)
    assert len(history) == 1 and history[0][0] == 1 and 0.0 <= history[0][1] <= 1.0

# ----------------------------------------------------------------------------- the C heap


class FakeLibc:
    """Records mallopt and malloc_trim calls and keeps the thresholds they set."""

    def __init__(self):
        self.calls, self.thresholds = [], {}

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        self.thresholds[param] = value
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1

    def now(self):
        return self.thresholds.get(proxy_al._M_MMAP_THRESHOLD), self.thresholds.get(proxy_al._M_TRIM_THRESHOLD)


def test_c_heap_sets_its_policy_and_restores_the_one_it_found(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(proxy_al, "_glibc", lambda: libc)
    train, reuse = proxy_al.HEAP_POLICIES["train"], proxy_al.HEAP_POLICIES["reuse"]
    assert train[0] <= 8 << 20 < 32 << 20 < reuse[0]        # small heap in training, everything kept in inference
    with proxy_al.c_heap(CPU, "train"):
        assert libc.now() == train
        with pytest.raises(RuntimeError):
            with proxy_al.c_heap("cpu", "reuse"):
                assert libc.now() == reuse
                raise RuntimeError("a failing sweep still restores the heap")
        assert libc.now() == train and libc.calls[-1] == ("trim", 0)
    assert libc.now() == proxy_al.GLIBC_STEADY == (32 << 20, 64 << 20)
    assert libc.calls[-1] == ("trim", 0) and proxy_al._heap_policies == []


def test_c_heap_leaves_cuda_and_other_c_libraries_alone(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(proxy_al, "_glibc", lambda: libc)
    with proxy_al.c_heap(torch.device("cuda"), "reuse"):
        assert proxy_al._heap_policies == []
    monkeypatch.setattr(proxy_al, "_glibc", lambda: None)
    with proxy_al.c_heap(CPU, "train"):
        assert proxy_al._heap_policies == []
    assert libc.calls == []


def test_training_and_inference_run_under_their_heap_policies(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(proxy_al, "_glibc", lambda: libc)
    net = tiny_unet(dropout=0.2)
    seen = []
    # on the decoder, which every pass calls (MC passes go through UNet.repeated_forward, not UNet.forward)
    net.decoder.register_forward_pre_hook(lambda module, args: seen.append(libc.now()))
    optimizer, scaler = make_optimizer(net, 1e-3, CPU)
    train_steps(net, optimizer, scaler, supervised_loss, itertools.repeat(fixed_batch(batch_size=1)), 2, CPU)
    assert seen == [proxy_al.HEAP_POLICIES["train"]] * 2
    image = np.random.default_rng(0).random((20, 17, 33), dtype=np.float32)
    seen.clear()
    mc_scores(net, image, m=3, roi=ROI)
    assert len(seen) > 3 and set(seen) == {proxy_al.HEAP_POLICIES["reuse"]}
    seen.clear()
    sliding_window_predict(net.eval(), image, ROI)
    assert len(seen) > 1 and set(seen) == {proxy_al.HEAP_POLICIES["reuse"]}
    assert libc.now() == proxy_al.GLIBC_STEADY and proxy_al._heap_policies == []


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(proxy_al._glibc() is None or not Path("/proc/self/status").exists(),
                    reason="needs glibc and /proc")
def test_c_heap_reuse_keeps_freed_buffers_resident_until_it_ends():
    """With the real C library: a freed 96 MB buffer stays resident under "reuse" (glibc would otherwise map
    and unmap it), and leaving the block hands it back."""
    with proxy_al.c_heap(CPU, "reuse"):
        proxy_al._glibc().malloc_trim(0)                # earlier tests may have left free, resident heap pages
        base = _rss_mb()
        buffer = torch.ones(24 << 20)                   # 96 MB, touched
        held = _rss_mb()
        del buffer
        kept = _rss_mb()
    after = _rss_mb()
    assert held - base > 80
    assert kept > held - 10                             # still resident after the free
    assert kept - after > 80                            # malloc_trim handed it back


# ----------------------------------------------------------------------------- devices and progress


def test_cpu_autocast_is_a_no_op_and_needs_no_scaler():
    x = torch.randn(4, 4)
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
        y = x @ x
    assert y.dtype == torch.float32
    assert needs_scaler(CPU) is False
    optimizer, scaler = make_optimizer(nn.Linear(2, 2), 1e-4, CPU)
    assert not scaler.is_enabled() and optimizer.param_groups[0]["lr"] == 1e-4
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == CPU


def test_fmt_s():
    assert fmt_s(0) == "0:00" and fmt_s(65.4) == "1:05" and fmt_s(3725) == "1:02:05"


def test_bad_overlap_and_empty_validation_are_clear_errors():
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, -0.5)
    net = tiny_unet()
    vol = (np.zeros((20, 20, 20), np.int16), np.ones((20, 20, 20), np.uint8), None)
    with pytest.raises(ValueError, match="no validation case"):
        train_proxy(net, [vol], lambda: iter(()), 1, 1, 1, torch.device("cpu"), 0, patch_vox=(16, 16, 32),
                    batch_size=1, window_hu=(-21, 189), lr=1e-4, workers=0, roi=ROI)
