"""train.py: patch sampling (foreground index, patch centres, intensity augmentation), patch streams, training
steps, train_proxy's validation and kept weights, the learning-rate schedule. CPU, seconds."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from data import window
from proxy_al import autocast, window_starts
from data import foreground_index
from train import (
    Patches, PatchStream, ProxyTraining, batches, fmt_s, make_optimizer, needs_scaler, pick_device, supervised_loss,
    train_proxy, train_steps)
from tiny import CPU, ROI, WINDOW_HU, blob_volume, fixed_batch, same_weights, tiny_unet, weights


# ---------------------------------------------------------------------------------------------- patches


def test_foreground_index_lists_present_classes():
    label = np.zeros((5, 6, 7), np.uint8)
    label[1, 2, 3], label[4, 5, 6] = 1, 3
    index = foreground_index(label)
    assert sorted(index) == [1, 3]
    assert np.unravel_index(int(index[3][0]), label.shape) == (4, 5, 6)


def test_sample_patch_foreground_ratio_and_class_balance():
    rng = np.random.default_rng(0)
    image = rng.normal(50, 100, (21, 19, 17)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:7, 5:8, 6:9] = 1            # 27 voxels = 0.4 % of the volume
    label[15, 15, 15] = 2               # one voxel: by class, still half of the foreground-centred draws
    fg_index = foreground_index(label)
    centres = []
    for _ in range(800):
        patch, lab = train.sample_patch(image, label, (9, 8, 7), 0.3, rng, (-21, 189), fg_index, by_class=True)
        centres.append(lab[4, 4, 3])    # the centre voxel sits at patch_vox // 2
    centres = np.array(centres)
    assert patch.shape == (9, 8, 7) and patch.dtype == np.float32 and lab.dtype == np.uint8
    assert abs((centres > 0).mean() - 0.3) < 0.06     # background centres land on background only
    assert abs((centres == 2).sum() / (centres > 0).sum() - 0.5) < 0.12


def test_sample_patch_rejects_fg_fraction_outside_0_1():
    with pytest.raises(ValueError, match="fg_fraction 1.5"):
        train.sample_patch(np.zeros((4, 4, 4)), None, (2, 2, 2), 1.5, np.random.default_rng(0), (-21, 189))


def test_sample_patch_pads_small_odd_volume_after_windowing(tmp_path):
    image = np.full((5, 7, 3), 500, np.int16)            # above the window: 1 after windowing
    np.save(tmp_path / "img.npy", image)
    memmap = np.load(tmp_path / "img.npy", mmap_mode="r")
    label = np.ones((5, 7, 3), np.uint8)
    rng = np.random.default_rng(3)
    patch, lab = train.sample_patch(memmap, label, (11, 15, 7), 0.5, rng, (-21, 189))  # > 2x the volume
    assert patch.shape == lab.shape == (11, 15, 7) and patch.dtype == np.float32
    assert patch.sum() == 5 * 7 * 3 and lab.sum() == 5 * 7 * 3  # whole volume inside, the rest padded with 0
    assert set(np.unique(patch)) == {0.0, 1.0}
    for _ in range(20):  # partly outside: image and label padding line up
        patch, lab = train.sample_patch(memmap, label, (8, 9, 6), 0.5, rng, (-21, 189))
        assert np.array_equal(patch, lab.astype(np.float32)) and 0 < lab.sum() < 8 * 9 * 6
    patch, lab = train.sample_patch(memmap, None, (4, 4, 4), 1.0, np.random.default_rng(3), (-21, 189))
    assert lab is None and patch.shape == (4, 4, 4)


def test_augment_intensity_keeps_shape_and_sometimes_changes():
    rng = np.random.default_rng(0)
    patch = np.linspace(0, 1, 7 * 6 * 5, dtype=np.float32).reshape(7, 6, 5)
    copy = patch.copy()
    outs = [train.augment_intensity(patch, rng) for _ in range(40)]
    assert all(o.shape == patch.shape and o.dtype == np.float32 for o in outs)
    changed = [not np.array_equal(o, patch) for o in outs]
    assert any(changed) and not all(changed)  # each transform has p = 0.5: all three skipped 1 time in 8
    assert np.array_equal(patch, copy)

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


def test_train_steps_overfits_one_batch():
    net = tiny_unet(dropout=0.0)
    batch = fixed_batch(batch_size=1)
    served = []

    def repeat():
        while True:
            served.append(1)
            yield batch

    with torch.no_grad():
        before = supervised_loss(net, batch).item()
    start = weights(net)
    optimizer, scaler = make_optimizer(net, 1e-2, CPU)
    net.eval()                                    # train_steps must switch the model to training mode
    result = train_steps(net, optimizer, scaler, supervised_loss, repeat(), 6, CPU)
    with torch.no_grad():
        after = supervised_loss(net, batch).item()
    assert set(result) == {"loss", "step_s", "data_wait"}
    assert len(served) == 6, "one batch per step"
    assert after < 0.9 * before
    assert 0 < result["loss"] < before
    assert result["step_s"] >= 0 and 0 <= result["data_wait"] <= 1
    assert net.training and not same_weights(weights(net), start)


def proxy_setup():
    image_hu, label = blob_volume(shape=(26, 21, 35))
    volumes = [(image_hu, label, foreground_index(label))]
    val = [(window(image_hu, *WINDOW_HU), label)]
    settings = lambda epochs, val_every: ProxyTraining(epochs, val_every, 1, 1, 1e-2, Patches((16, 16, 32), WINDOW_HU,
                                                                                         None), ROI)
    return volumes, val, settings


def record_train_steps(monkeypatch):
    """Wrap train.train_steps to capture the weights after every training chunk."""
    snapshots, real = [], train.train_steps

    def wrapped(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        snapshots.append(weights(model))
        return out

    monkeypatch.setattr(train, "train_steps", wrapped)
    return snapshots


def test_train_proxy_without_validation_keeps_last_weights(monkeypatch):
    net = tiny_unet()
    start = weights(net)
    snapshots = record_train_steps(monkeypatch)
    volumes, _, settings = proxy_setup()
    history = train_proxy(net, volumes, None, settings(3, 2), CPU, seed=0)
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

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    volumes, val, settings = proxy_setup()
    history = train_proxy(net, volumes, lambda: iter(val), settings(5, 2), CPU, seed=0)
    assert len(history) == math.ceil(5 / 2) == len(snapshots)
    assert [e for e, _ in history] == [2, 4, 5]
    assert [d for _, d in history] == pytest.approx([0.1, 0.9, 0.3])
    assert all(len(cases) == 1 for cases in evaluated), "val_cases() is called afresh for every validation"
    assert not same_weights(snapshots[1], snapshots[2]), "sanity: the last chunk changed the weights"
    assert same_weights(weights(net), snapshots[1]), "the model ends with the best epoch's weights"


def test_train_proxy_real_validation_history():
    net = tiny_unet()
    volumes, val, settings = proxy_setup()
    history = train_proxy(net, volumes, lambda: iter(val), settings(1, 1), CPU, seed=0)
    assert len(history) == 1 and history[0][0] == 1 and 0.0 <= history[0][1] <= 1.0

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
        settings = ProxyTraining(1, 1, 1, 1, 1e-4, Patches((16, 16, 32), (-21, 189), None), ROI)
        train_proxy(net, [vol], lambda: iter(()), settings, torch.device("cpu"), 0)


def test_lr_schedule_warm_up_then_constant_or_cosine_to_zero():
    def lrs(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = train.lr_schedule(opt, 10, **kw)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return out
    assert lrs() == [1.0] * 10                                    # the paper: constant
    warm = lrs(warmup_steps=4)
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and warm[4:] == [1.0] * 6
    cos = lrs(warmup_steps=2, decay="cosine")
    assert cos[:2] == pytest.approx([0.5, 1.0])
    assert all(a > b for a, b in zip(cos[2:], cos[3:])) and cos[-1] < 0.05   # decays to about 0 at the end
