"""Residual 3D U-Net with Monte-Carlo dropout (paper sec. 3.1, DESIGN.md "network").

Five levels, channels 16-32-64-128-256. Each level is one residual block
(conv-norm-act-conv-norm, add the skip, act) followed by element-wise dropout,
in the encoder and in the decoder, so that MC dropout perturbs every level.
The forward pass is `skips = encoder(x); return decoder(skips)`. The first residual block comes before
any dropout, so MC-dropout passes over the same input can share it (UNet.repeated_forward).
With autograd off on the CPU, the norms and the dropout take faster in-place paths (see below).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------- CPU inference paths
# MC-dropout scoring runs the network m times per window with autograd off. On the CPU, two of its ops cost far
# more than their arithmetic: the dropout mask (torch draws it at 7-11 ns per element on a 2-core EPYC, a sixth
# of a pass) and the norms (each allocates a fresh full-size output, which the OS then faults in page by page).
# With autograd off and float32 CPU tensors, InstanceNorm and MCDropout below work in place and the mask comes
# from numpy: same formulas and law, a different random stream. Training and CUDA use the stock torch ops.
# Both accept channels-last tensors (proxy_al.cpu_channels_last runs the sweeps in that layout).


def _dense(x):
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)


def _storage_order(x):
    """x itself if contiguous, else its channels-last storage as a contiguous (B, D, H, W, C) view."""
    return x if x.is_contiguous() else x.permute(0, *range(2, x.dim()), 1)


def _cpu_inference(x):
    return (not torch.is_grad_enabled() and not x.requires_grad and x.device.type == "cpu"
            and x.dtype == torch.float32 and _dense(x))


class InstanceNorm(nn.InstanceNorm3d):
    """nn.InstanceNorm3d(affine=True). CPU inference normalises x in place (every input here is a fresh conv
    output): mean, subtract, sum of squares, scale and shift; two-pass variance, biased as in torch."""

    def forward(self, x):
        if not _cpu_inference(x) or self.track_running_stats or not self.affine:
            return super().forward(x)
        (B, C), ones = x.shape[:2], (1,) * (x.dim() - 2)
        if x.is_contiguous():
            v = x.view(B, C, -1)                                                      # (B, C, S)
        else:                                                                         # channels-last storage
            v = _storage_order(x).reshape(B, -1, C).transpose(1, 2)                   # (B, C, S) view
        v -= v.mean(2, keepdim=True)
        # sums of squares as the diagonal of a batched matrix product: BLAS sums accurately in either layout,
        # where torch's float32 norm over a channels-last 16 x 96^3 tensor was off by 1e-3 (relative)
        var = torch.bmm(v, v.transpose(1, 2)).diagonal(dim1=1, dim2=2) / v.shape[2]  # (B, C)
        scale = (var + self.eps).rsqrt_() * self.weight
        return x.mul_(scale.view(B, C, *ones)).add_(self.bias.view(1, C, *ones))


_BLOCK = 1 << 18                # elements per random block: its own numpy stream, so threads do not change results
_pools, _buffers = {}, threading.local()
if hasattr(os, "register_at_fork"):             # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_pools.clear)


def _drop_block(flat, seed, i, p):
    """Zero the elements of block i of flat (a float32 numpy view) with probability p, scale the rest."""
    part = flat[i * _BLOCK:(i + 1) * _BLOCK]
    if getattr(_buffers, "u", None) is None:
        _buffers.u = np.empty(_BLOCK, np.float32)
    u = _buffers.u[:part.size]
    np.random.Generator(np.random.SFC64([seed, i])).random(out=u, dtype=np.float32)    # uniform [0, 1)
    np.greater_equal(u, p, out=u, casting="unsafe")           # 1 keeps (probability 1 - p), 0 drops
    u *= 1.0 / (1.0 - p)
    part *= u


def dropout_cpu_(x, p):
    """In-place dropout of a float32 CPU tensor (contiguous or channels-last): zero each element with
    probability p, scale the rest by 1 / (1 - p), as F.dropout does.

    The seed comes from torch's generator, so torch.manual_seed fixes the mask (drawn in storage order: it
    depends on the layout). Blocks run on torch's thread count (numpy releases the GIL): 1.6 ns per element
    on 2 cores against 11 for F.dropout.
    """
    flat, seed = _storage_order(x).view(-1).numpy(), int(torch.randint(2 ** 62, (1,)))
    blocks, threads = -(-flat.size // _BLOCK), torch.get_num_threads()
    if threads > 1 and blocks > 1:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads)
        list(_pools[threads].map(lambda i: _drop_block(flat, seed, i, p), range(blocks)))
    else:
        for i in range(blocks):
            _drop_block(flat, seed, i, p)
    return x


class MCDropout(nn.Dropout):
    """nn.Dropout. In CPU inference with dropout on (MC dropout) it drops in place, or on a copy when the
    caller still needs x (inplace=False)."""

    def forward(self, x, inplace=True):
        if not (self.training and 0 < self.p < 1 and _cpu_inference(x)):
            return super().forward(x)
        return dropout_cpu_(x if inplace else x.clone(), self.p)

# ----------------------------------------------------------------------------- network


class ResBlock(nn.Module):
    """Two 3x3x3 convolutions with InstanceNorm and LeakyReLU, plus a skip.

    The first convolution carries the stride (2 when the block goes down a level);
    the skip becomes a 1x1x1 convolution whenever the width or the stride changes.
    """

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = InstanceNorm(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = InstanceNorm(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = nn.Identity()
        if in_ch != out_ch or stride != 1:
            self.skip = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                                      InstanceNorm(out_ch, affine=True))

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
                          MCDropout(dropout))
            for i in range(len(channels)))

    def forward(self, x, after_stem=False):
        """after_stem: x is already the output of the first residual block (UNet.repeated_forward)."""
        skips = []
        for i, (block, dropout) in enumerate(self.stages):
            shared = after_stem and i == 0            # the stem is reused by the next pass: drop on a copy
            x = dropout(x, inplace=False) if shared else dropout(block(x))
            skips.append(x)
        return skips  # full resolution first, bottleneck last


class Decoder(nn.Module):
    def __init__(self, channels, out_channels, dropout):
        super().__init__()
        n = len(channels)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(channels[i + 1], channels[i], 2, stride=2)
                                 for i in reversed(range(n - 1)))
        self.stages = nn.ModuleList(nn.Sequential(ResBlock(2 * channels[i], channels[i]), MCDropout(dropout))
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
