import multiprocessing
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import dice_ce_loss, dice_per_class
from unet import InstanceNorm, MCDropout, UNet, dropout_cpu_, enable_mc_dropout, load_backbone

SMALL = (4, 8, 8, 8, 8)  # five levels, tiny widths: fast on the CPU


def test_unet_output_shape_odd_multiple_of_16():
    net = UNet(channels=SMALL, out_channels=3)
    x = torch.randn(2, 1, 16, 32, 48)
    assert net(x).shape == (2, 3, 16, 32, 48)


def test_unet_rejects_sides_not_multiple_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(channels=SMALL)(torch.randn(1, 1, 17, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        UNet(channels=SMALL)(torch.randn(1, 1, 16, 16, 16))


def test_mc_dropout_varies_eval_does_not():
    torch.manual_seed(0)
    net = UNet(channels=SMALL, dropout=0.2)
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        net.eval()
        a, b = net(x), net(x)
        assert torch.equal(a, b)
        enable_mc_dropout(net)
        c, d = net(x), net(x)
    assert not torch.allclose(c, d)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 9  # end of every level: 5 encoder + 4 decoder
    assert all(not m.training for m in norms) and all(m.training for m in drops)


def test_repeated_forward_equals_repeated_calls_random_stream_included():
    """MC passes share the first block: same logits as n plain calls from the same seed, pass by pass."""
    torch.manual_seed(0)
    net = enable_mc_dropout(UNet(channels=SMALL, dropout=0.3))
    x = torch.randn(2, 1, 16, 16, 32)
    with torch.no_grad():
        torch.manual_seed(5)
        shared = list(net.repeated_forward(x, 3))
        torch.manual_seed(5)
        plain = [net(x) for _ in range(3)]
    assert len(shared) == 3 and not torch.allclose(shared[0], shared[1])
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 16"):
        next(net.repeated_forward(torch.randn(1, 1, 17, 16, 16), 2))


# ----------------------------------------------------------------------------- CPU inference paths


@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 11), (1, 16, 17, 16, 18)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_instance_norm_inference_path_matches_torch(shape, layout):
    """With autograd off, InstanceNorm normalises in place; the result must be torch's instance norm."""
    torch.manual_seed(0)
    norm = InstanceNorm(shape[1], affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=layout)     # a mean far from 0
    ref = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    y = x.clone()
    with torch.inference_mode():
        out = norm(y)
    assert out.data_ptr() == y.data_ptr(), "inference path works in place"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    x.requires_grad_(True)                  # training: torch's op, differentiable, input untouched
    out = norm(x)
    out.square().sum().backward()
    assert out.data_ptr() != x.data_ptr() and x.grad is not None
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=2e-5)


def test_cpu_dropout_law_seed_and_threads():
    p, x = 0.3, torch.ones(3, 16, 33, 47, 21)          # 1.56 M elements: six random blocks, the last one short
    torch.manual_seed(5)
    a = dropout_cpu_(x.clone(), p)
    torch.manual_seed(5)
    b = dropout_cpu_(x.clone(), p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(5)
        c = dropout_cpu_(x.clone(), p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(a, c), "torch's seed fixes the mask, whatever the thread count"
    kept = a != 0
    assert torch.all(a[kept] == torch.tensor(1 / (1 - p)))
    assert abs((~kept).float().mean().item() - p) < 0.002               # 5 standard deviations
    flat = kept.view(-1)
    assert not torch.equal(flat[:1000], flat[1 << 18:(1 << 18) + 1000]), "every block has its own stream"
    torch.manual_seed(6)
    assert not torch.equal(dropout_cpu_(x.clone(), p), a)


def _drop_in_child(queue):
    # numpy in and out: torch's own parallel ops can hang in a forked child once the parent used its threads
    x = torch.from_numpy(np.ones((4, 1 << 18), np.float32))
    queue.put(float((dropout_cpu_(x, 0.5).numpy() == 0).mean()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_cpu_dropout_works_in_a_forked_child():
    """The thread pool made in the parent has no threads in a forked child: the child must make its own
    instead of waiting forever."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dropout_cpu_(torch.ones(4, 1 << 18), 0.5)                       # the parent's pool exists now
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_drop_in_child, args=(queue,))
        child.start()
        child.join(30)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        torch.set_num_threads(threads)
    assert not alive and child.exitcode == 0
    assert abs(queue.get(timeout=5) - 0.5) < 0.01


def test_mc_dropout_copies_or_works_in_place_only_without_autograd():
    drop = MCDropout(0.5)                               # a new module is in training mode: dropout on
    x = torch.ones(2, 4, 8, 8, 8)
    with torch.no_grad():
        y = drop(x, inplace=False)
        assert torch.equal(x, torch.ones_like(x)) and (y == 0).any() and (y == 2).any()
        z = drop(x)
        assert z.data_ptr() == x.data_ptr() and (x == 0).any()
    w = torch.ones(2, 4, 8, 8, 8, requires_grad=True)    # autograd on: torch's dropout, input untouched
    y = drop(w)
    y.sum().backward()
    assert torch.equal(w.detach(), torch.ones_like(w)) and torch.equal(w.grad, (y != 0).float() * 2)
    drop.eval()
    with torch.no_grad():
        assert torch.equal(drop(torch.ones(3, 3)), torch.ones(3, 3))


def test_head_replacement_keeps_backbone():
    proxy = UNet(channels=SMALL, out_channels=2)
    target = UNet(channels=SMALL, out_channels=3)
    skipped = load_backbone(target, proxy.state_dict())
    assert sorted(skipped) == ["decoder.head.bias", "decoder.head.weight"]
    for k, v in proxy.state_dict().items():
        if not k.startswith("decoder.head."):
            assert torch.equal(target.state_dict()[k], v), k
    assert target.decoder.head.weight.shape[0] == 3


def test_load_backbone_refuses_other_architecture():
    with pytest.raises(ValueError, match="beyond its head"):
        load_backbone(UNet(channels=SMALL), UNet(channels=(4, 8, 8, 8, 16)).state_dict())


def test_dice_ce_by_hand():
    # two voxels, two classes; logits chosen so softmax is exact enough to follow by hand
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, np.log(3.0)]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[0, 1]]]])                              # (1, 1, 1, 2)
    p1 = torch.tensor([0.5, 0.75])                                   # P(class 1) per voxel
    p0 = 1 - p1
    d0 = 1 - (2 * p0[0] + 1e-5) / (p0.sum() + 1 + 1e-5)
    d1 = 1 - (2 * p1[1] + 1e-5) / (p1.sum() + 1 + 1e-5)
    ce = -(torch.log(p0[0]) + torch.log(p1[1])) / 2
    expected = (d0 + d1) / 2 + ce
    assert torch.allclose(dice_ce_loss(logits, target), expected, atol=1e-6)


def test_dice_ce_perfect_near_zero_and_wrong_positive():
    labels = torch.randint(0, 3, (2, 1, 5, 6, 7))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    perfect = dice_ce_loss(onehot * 40 - 20, labels)
    assert perfect.item() < 1e-3
    wrong = dice_ce_loss(torch.roll(onehot, 1, dims=1) * 40 - 20, labels)
    assert wrong.item() > 1.0


def test_dice_ce_probability_target_matches_onehot_labels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5, 5)
    labels = torch.randint(0, 3, (2, 1, 5, 5, 5))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    assert torch.allclose(dice_ce_loss(logits, labels), dice_ce_loss(logits, onehot), atol=1e-6)
    soft = torch.softmax(torch.randn(2, 3, 5, 5, 5), 1)
    assert dice_ce_loss(logits, soft).item() > 0


def test_dice_ce_rejects_bad_target_shape():
    with pytest.raises(ValueError, match="fits neither"):
        dice_ce_loss(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_dice_per_class_edge_cases():
    t = np.zeros((3, 4, 5), int)
    t[0, :2] = 1
    assert np.allclose(dice_per_class(t, t, 3), [1.0, 1.0])          # class 2 absent from both -> 1
    assert np.allclose(dice_per_class(np.zeros_like(t), t, 3), [0.0, 1.0])
    p = t.copy()
    p[0, 0] = 0                                                       # 5 of 10 voxels found
    assert np.allclose(dice_per_class(p, t, 2), [2 * 5 / 15])
    with pytest.raises(ValueError, match="differs"):
        dice_per_class(t, t[:2], 2)
