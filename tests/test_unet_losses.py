import numpy as np
import pytest
import torch

from losses import dice_ce_loss, dice_per_class
from unet import UNet, enable_mc_dropout, load_backbone

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
