"""Tests for unet.py (shapes, MC dropout, backbone loading) and losses.py (DiceCE, hard Dice)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from losses import dice_ce_loss, dice_per_class
from proxy_al import enable_mc_dropout
from unet import UNet, load_backbone

SMALL = (4, 8, 8, 8, 8)  # five levels, tiny widths: fast on the CPU


@pytest.mark.parametrize("shape", [(16, 32, 48), (48, 16, 16), (16, 48, 32)])
def test_unet_output_shape_odd_multiple_of_16(shape):
    net = UNet(channels=SMALL, out_channels=3)
    x = torch.randn((2, 1) + shape)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3) + shape and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_unet_divisor_follows_the_number_of_levels():
    assert UNet(channels=SMALL).divisor == 16
    three = UNet(channels=(4, 8, 8), out_channels=2)
    assert three.divisor == 4
    with torch.no_grad():
        assert three(torch.randn(1, 1, 4, 8, 12)).shape == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError, match="multiples of 4"):
        three(torch.randn(1, 1, 6, 8, 8))


@pytest.mark.parametrize("shape", [(17, 16, 32), (16, 24, 32), (32, 32, 33)])
def test_unet_rejects_sides_not_multiple_of_16(shape):
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(channels=SMALL)(torch.randn((1, 1) + shape))


def test_unet_rejects_the_too_small_input():
    net = UNet(channels=SMALL)
    with pytest.raises(ValueError, match="too small"):
        net(torch.randn(1, 1, 16, 16, 16))
    with torch.no_grad():                               # one side above 16 is enough
        assert net(torch.randn(1, 1, 16, 16, 32)).shape == (1, 2, 16, 16, 32)


def test_mc_dropout_varies_eval_does_not():
    torch.manual_seed(0)
    net = UNet(channels=SMALL, dropout=0.2)
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        net.eval()
        a, b = net(x), net(x)
        assert torch.equal(a, b)
        assert enable_mc_dropout(net) is net
        c, d = net(x), net(x)
    assert not torch.allclose(c, d)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 9  # end of every level: 5 encoder + 4 decoder
    assert all(m.p == 0.2 for m in drops)
    assert len(norms) > 0 and all(m.affine for m in norms)
    assert all(not m.training for m in norms) and all(m.training for m in drops)
    assert not net.training
    assert all(not m.training for m in net.modules() if not isinstance(m, nn.Dropout))
    net.eval()                                          # eval again: deterministic again
    with torch.no_grad():
        assert torch.equal(net(x), a)


def test_mc_dropout_seeded_passes_repeat():
    torch.manual_seed(0)
    net = enable_mc_dropout(UNet(channels=SMALL, dropout=0.3))
    x = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        torch.manual_seed(5)
        a = net(x)
        torch.manual_seed(5)
        b = net(x)
    assert torch.equal(a, b), "torch's seed fixes the dropout masks"


def test_dropout_zero_mc_mode_is_deterministic():
    torch.manual_seed(0)
    net = UNet(channels=SMALL, dropout=0.0)
    x = torch.randn(1, 1, 32, 16, 16)
    with torch.no_grad():
        a = net.eval()(x)
        b = enable_mc_dropout(net)(x)
    assert torch.equal(a, b)


def test_unet_trains_and_state_dict_names_are_stable():
    torch.manual_seed(0)
    net = UNet(channels=SMALL, dropout=0.1)
    keys = set(net.state_dict())
    for k in ("encoder.stages.0.0.conv1.weight", "encoder.stages.0.0.norm1.weight", "encoder.stages.1.0.skip.0.weight",
              "decoder.ups.0.weight", "decoder.stages.3.0.conv2.weight", "decoder.head.weight", "decoder.head.bias"):
        assert k in keys, k
    assert not any("running_mean" in k for k in keys), "instance norms keep no running statistics"
    x = torch.randn(2, 1, 16, 16, 32)
    net(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_unet_imports_no_numpy():
    source = (Path(__file__).resolve().parents[1] / "unet.py").read_text()
    assert "import numpy" not in source and "from numpy" not in source


def test_head_replacement_keeps_backbone():
    torch.manual_seed(0)
    proxy = UNet(channels=SMALL, out_channels=2)
    torch.manual_seed(1)
    target = UNet(channels=SMALL, out_channels=3)
    head_before = target.decoder.head.weight.detach().clone()
    skipped = load_backbone(target, proxy.state_dict())
    assert sorted(skipped) == ["decoder.head.bias", "decoder.head.weight"]
    for k, v in proxy.state_dict().items():
        if not k.startswith("decoder.head."):
            assert torch.equal(target.state_dict()[k], v), k
    assert target.decoder.head.weight.shape[0] == 3
    assert torch.equal(target.decoder.head.weight, head_before), "the new head keeps its own weights"


def test_head_from_proxy_starts_every_foreground_class_as_the_proxy_foreground():
    torch.manual_seed(0)
    proxy = UNet(channels=SMALL, out_channels=2).eval()
    target = UNet(channels=SMALL, out_channels=3).eval()
    load_backbone(target, proxy.state_dict(), head_from_proxy=True)
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        p, t = proxy(x), target(x)
    assert torch.allclose(t[:, 0], p[:, 0]) and torch.allclose(t[:, 1], p[:, 1]) and torch.allclose(t[:, 2], p[:, 1])
    same = UNet(channels=SMALL, out_channels=2)
    assert load_backbone(same, proxy.state_dict(), head_from_proxy=True) == []      # nothing to replace
    assert torch.equal(same.decoder.head.weight, proxy.decoder.head.weight)


def test_load_backbone_same_classes_loads_everything():
    torch.manual_seed(0)
    a = UNet(channels=SMALL, out_channels=2)
    torch.manual_seed(1)
    b = UNet(channels=SMALL, out_channels=2)
    assert load_backbone(b, a.state_dict()) == []
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())


def test_load_backbone_refuses_other_architecture():
    with pytest.raises(ValueError, match="beyond its head"):
        load_backbone(UNet(channels=SMALL), UNet(channels=(4, 8, 8, 8, 16)).state_dict())
    with pytest.raises(ValueError, match="beyond its head"):            # a level fewer: missing keys
        load_backbone(UNet(channels=SMALL), UNet(channels=(4, 8, 8, 8)).state_dict())


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
    assert np.array_equal(dice_per_class(t, t, 3), [1.0, np.nan], equal_nan=True)   # class 2 absent: NaN
    assert np.array_equal(dice_per_class(np.zeros_like(t), t, 3), [0.0, np.nan], equal_nan=True)
    assert np.isnan(dice_per_class(t * 2, t, 3)[1])                  # absent from the label, predicted: still NaN
    assert dice_per_class(t, t * 2, 3)[1] == 0.0                     # present in the label, not predicted: 0
    p = t.copy()
    p[0, 0] = 0                                                       # 5 of 10 voxels found
    assert np.allclose(dice_per_class(p, t, 2), [2 * 5 / 15])
    with pytest.raises(ValueError, match="differs"):
        dice_per_class(t, t[:2], 2)
