"""unet.py: output shapes, MC dropout, backbone and head loading."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

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
