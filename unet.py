"""Residual 3D U-Net with Monte-Carlo dropout (paper sec. 3.1, DESIGN.md "network").

Five levels, channels 16-32-64-128-256. Each level is one residual block
(conv-norm-act-conv-norm, add the skip, act) followed by element-wise dropout,
in the encoder and in the decoder, so that MC dropout perturbs every level.
The forward pass is `skips = encoder(x); return decoder(skips)`. The first residual block comes before
any dropout, so MC-dropout passes over the same input can share it (UNet.repeated_forward).
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
        y += self.skip(x)               # in place: one full-size tensor fewer at the peak (norm backward needs no output)
        return self.act(y)


class Encoder(nn.Module):
    def __init__(self, in_channels, channels, dropout):
        super().__init__()
        widths = (in_channels,) + tuple(channels)
        self.stages = nn.ModuleList(
            nn.Sequential(ResBlock(widths[i], widths[i + 1], stride=1 if i == 0 else 2),
                          nn.Dropout(dropout))
            for i in range(len(channels)))

    def forward(self, x, after_stem=False):
        """after_stem: x is already the output of the first residual block (UNet.repeated_forward)."""
        skips = []
        for i, (block, dropout) in enumerate(self.stages):
            x = dropout(x if after_stem and i == 0 else block(x))
            skips.append(x)
        return skips  # full resolution first, bottleneck last


class Decoder(nn.Module):
    def __init__(self, channels, out_channels, dropout):
        super().__init__()
        n = len(channels)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(channels[i + 1], channels[i], 2, stride=2)
                                 for i in reversed(range(n - 1)))
        self.stages = nn.ModuleList(nn.Sequential(ResBlock(2 * channels[i], channels[i]), nn.Dropout(dropout))
                                    for i in reversed(range(n - 1)))
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, skips):
        """skips: the encoder's list, full resolution first. It is emptied as the skips are used, so that in
        inference each is freed as soon as it has been joined (the full-resolution one is 16 x 96^3 floats)."""
        x = skips.pop()
        for up, stage in zip(self.ups, self.stages):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class UNet(nn.Module):
    """(B, in_channels, X, Y, Z) float -> logits (B, out_channels, X, Y, Z).

    Every side must be a multiple of 2**(len(channels) - 1) (16 for five levels);
    sliding-window inference pads to that.
    """

    def __init__(self, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), dropout=0.2):
        super().__init__()
        self.divisor = 2 ** (len(channels) - 1)
        self.out_channels = out_channels
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(channels, out_channels, dropout)

    def check_input(self, x):
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"UNet input sides {tuple(x.shape[2:])} must be multiples of {self.divisor}; pad first")
        if all(s == self.divisor for s in x.shape[2:]):
            # the bottleneck would be 1 voxel, where InstanceNorm has no statistics
            raise ValueError(f"UNet input {tuple(x.shape[2:])} is too small: at least one side must exceed {self.divisor}")

    def forward(self, x):
        self.check_input(x)
        return self.decoder(self.encoder(x))

    def repeated_forward(self, x, n):
        """Yields the logits of n forward passes of the same input x, one pass at a time.

        The same as calling self(x) n times, random stream included: the first residual block holds no
        dropout and its norms are per-sample, so its output is the same in every pass; it runs once.
        With MC dropout (paper channels, 96^3 window) that block is about a fifth of a pass on the CPU.
        """
        if n == 1:                      # nothing to share; holding the stem would only cost memory
            yield self(x)
            return
        self.check_input(x)
        stem = self.encoder.stages[0][0](x)
        for _ in range(n):
            yield self.decoder(self.encoder(stem, after_stem=True))


def enable_mc_dropout(model):
    """Eval mode everywhere (norms use their eval behaviour) except dropout, which stays stochastic."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    return model


def load_backbone(model, state_dict):
    """Load every weight whose name and shape match; keep the model's own head otherwise.

    A 2-class proxy checkpoint loaded into a model with more classes keeps every layer
    but the 1x1x1 head (paper sec. 3.2: new head when the task has more classes).
    Returns the names of the weights that were not loaded.
    """
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    if any(not k.startswith("decoder.head.") for k in skipped + missing):
        raise ValueError(f"checkpoint does not fit this UNet beyond its head: {sorted(skipped + missing)[:5]}")
    own.update({k: v for k, v in state_dict.items() if k not in skipped})
    model.load_state_dict(own)
    return skipped
