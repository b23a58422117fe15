"""Residual 3D U-Net with Monte-Carlo dropout (paper sec. 3.1).

Five levels, channels 16-32-64-128-256. Each level is one residual block (conv-norm-act-conv-norm, add the
skip, act) followed by element-wise dropout, in the encoder and in the decoder, so that MC dropout perturbs
every level. The forward pass is `skips = encoder(x); return decoder(skips)`. Stock PyTorch modules only.
"""
import torch
import torch.nn as nn


class ResBlock(nn.Module):
    """Two 3x3x3 convolutions with InstanceNorm and LeakyReLU, plus a skip.

    The first convolution carries the stride (2 when the block goes down a level);
    the skip becomes a 1x1x1 convolution whenever the width or the stride changes.
    """

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = nn.Identity()
        if in_ch != out_ch or stride != 1:
            self.skip = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                                      nn.InstanceNorm3d(out_ch, affine=True))

    def forward(self, x):
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class Encoder(nn.Module):
    """One residual block and one dropout per level; the first level keeps full resolution."""

    def __init__(self, in_channels, channels, dropout):
        super().__init__()
        widths = (in_channels,) + tuple(channels)
        self.stages = nn.ModuleList(
            nn.Sequential(ResBlock(widths[i], widths[i + 1], stride=1 if i == 0 else 2), nn.Dropout(dropout))
            for i in range(len(channels)))

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips                    # full resolution first, bottleneck last


class Decoder(nn.Module):
    """Per level: transposed convolution up, concatenate the skip, residual block, dropout. Then a 1x1x1 head."""

    def __init__(self, channels, out_channels, dropout):
        super().__init__()
        levels = list(reversed(range(len(channels) - 1)))
        self.ups = nn.ModuleList(nn.ConvTranspose3d(channels[i + 1], channels[i], 2, stride=2) for i in levels)
        self.stages = nn.ModuleList(nn.Sequential(ResBlock(2 * channels[i], channels[i]), nn.Dropout(dropout))
                                    for i in levels)
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, skips):
        x = skips[-1]
        for up, stage, skip in zip(self.ups, self.stages, reversed(skips[:-1])):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class UNet(nn.Module):
    """(B, in_channels, X, Y, Z) float -> logits (B, out_channels, X, Y, Z).

    Every side must be a multiple of 2**(len(channels) - 1) (16 for five levels);
    sliding-window inference pads to that.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple = (16, 32, 64, 128, 256),
                 dropout: float = 0.2):
        super().__init__()
        self.divisor = 2 ** (len(channels) - 1)
        self.out_channels = out_channels
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(channels, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"UNet input sides {tuple(x.shape[2:])} must be multiples of {self.divisor}; pad first")
        if all(s == self.divisor for s in x.shape[2:]):
            # the bottleneck would be 1 voxel, where InstanceNorm has no statistics
            raise ValueError(f"UNet input {tuple(x.shape[2:])} is too small: at least one side must exceed "
                             f"{self.divisor}")
        return self.decoder(self.encoder(x))


def load_backbone(model: nn.Module, state_dict: dict, head_from_proxy: bool = False) -> list:
    """Load every weight whose name and shape match; keep the model's own head otherwise.

    A 2-class proxy checkpoint loaded into a model with more classes keeps every layer but the 1x1x1 head
    (paper sec. 3.2: new head when the task has more classes). head_from_proxy: start that head from the
    proxy's instead, background from its background and every foreground class from its foreground, so
    a short fine-tuning starts from the proxy's segmentation rather than from random logits.
    Returns the names of the weights that were not loaded.
    """
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    if any(not k.startswith("decoder.head.") for k in skipped + missing):
        raise ValueError(f"checkpoint does not fit this UNet beyond its head: {sorted(skipped + missing)[:5]}")
    own.update({k: v for k, v in state_dict.items() if k not in skipped})
    if head_from_proxy and skipped and len(state_dict["decoder.head.bias"]) == 2:
        rows = [0] + [1] * (model.out_channels - 1)                  # background, then foreground for each class
        own.update({k: state_dict[k][rows] for k in ("decoder.head.weight", "decoder.head.bias")})
    model.load_state_dict(own)
    return skipped
