"""The method's building blocks: pseudo labels, sliding-window and MC-dropout inference,
noisy labels, and the training steps (proxy, supervised, semi-supervised).

Arrays called `image` are windowed to [0, 1] (data.window); `image_hu` are Hounsfield units.
"""
import ctypes
import functools
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from data import augment_intensity, sample_patch
from losses import dice_ce_loss, dice_per_class
from unet import enable_mc_dropout

# ----------------------------------------------------------------------------- progress


class Progress:
    """Prints `tag i/n  elapsed  ETA` at most every `every_s` seconds (and at the end)."""

    def __init__(self, tag, total, every_s=10.0):
        self.tag, self.total, self.every_s = tag, total, every_s
        self.t0 = self.last = time.time()

    def update(self, done, extra=""):
        now = time.time()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"  {self.tag} {done}/{self.total}  {extra}  elapsed {fmt_s(elapsed)}  ETA {fmt_s(eta)}", flush=True)


def fmt_s(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"

# ----------------------------------------------------------------------------- devices


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu. Turns on cudnn.benchmark on CUDA (fixed patch sizes)."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def autocast(device):
    """bf16 autocast on CUDA where supported, else fp16 (needs a grad scaler); plain float32 on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_scaler(device):
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()

# ----------------------------------------------------------------------------- pseudo labels


def auto_hu_band(image_hu, width_hu=50.0):
    """A band `width_hu` wide centred on the upper soft-tissue level of the case itself.

    Rule: the centre is the 75th percentile of the voxels in [0, 200] HU (soft tissue and contrast-
    enhanced organs; fat, air and most bone excluded). The liver is the largest solid organ and among the
    brightest soft tissues in every phase, so it sits in the upper part of that distribution, while the
    plain histogram peak is usually muscle and bowel (on the unenhanced real case in shared/data the peak
    is near 20 HU and the liver near 46). Measured Dice of the resulting pseudo label against the liver:
    0.38 and 0.75 on the two real cases (paper band: 0.00 and 0.48), 0.80-0.88 on phantoms.
    """
    values = np.asarray(image_hu)[::2, ::2, ::2]
    values = values[(values >= 0) & (values <= 200)]
    if values.size == 0:
        return (100.0, 150.0)
    centre = float(np.percentile(values, 75))
    return (centre - width_hu / 2, centre + width_hu / 2)


def pseudo_label(image_hu, hu_band=(100, 150), case_id="case"):
    """Binary proxy label: voxels in the HU band, largest 26-connected component (paper sec. 3.1).

    image_hu: (X, Y, Z) HU. hu_band: (lo_hu, hi_hu), inclusive, or "auto" (see auto_hu_band).
    Returns uint8 (X, Y, Z). An empty band gives an empty mask and a warning naming the case.
    """
    image_hu = np.asarray(image_hu)
    lo_hu, hi_hu = auto_hu_band(image_hu) if isinstance(hu_band, str) and hu_band == "auto" else hu_band
    band = (image_hu >= lo_hu) & (image_hu <= hi_hu)
    components, n = ndi.label(band, structure=np.ones((3, 3, 3), bool))  # 26-connectivity
    if n == 0:
        warnings.warn(f"{case_id}: no voxel in the HU band [{lo_hu:g}, {hi_hu:g}]; its pseudo label is empty "
                      f"(try --hu-band auto)", stacklevel=2)
        return np.zeros(image_hu.shape, np.uint8)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return (components == sizes.argmax()).astype(np.uint8)

# ----------------------------------------------------------------------------- the C heap (CPU, glibc)
# On the CPU torch takes its buffers from the C library's malloc. glibc maps fresh pages from the OS for a
# request above its mmap threshold (which climbs by itself to 32 MB) and returns them on free, so the next such
# request faults them in again; smaller requests come from a heap that keeps what it is given, holes and all.
# Left alone, a CPU training step (gigabytes of activations) grows the heap to about 1 GB that is free but
# fragmented afterwards, and later inference wanders through its holes: MC scoring of the full-size bench case
# peaked at 1.2 GB of extra memory after training against 0.75 GB in a fresh process. So, for the duration of a
# call, with mallopt (Linux with glibc; a no-op elsewhere and on CUDA):
#   "train": threshold 4 MB, so a step's large activations (a 96^3 batch of 2 has them down to 7 MB) are mapped
#            and handed back and the heap stays small. Not lower: at 1 MB the small-patch demo trained 20-60 %
#            slower, faulting in its 2 MB activations afresh at every step;
#   "reuse": threshold 256 MB, trim threshold 2 GB, so an inference sweep's buffers, the 56 MB activations of a
#            96^3 window included, stay resident and the next window reuses them without page faults.
# Each call ends by restoring the policy it found (glibc's own 32 MB / 64 MB values at the outermost level,
# which also ends glibc's automatic threshold) and handing free heap pages back (malloc_trim).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # mallopt parameters, <malloc.h>
HEAP_POLICIES = {"train": (4 << 20, 64 << 20), "reuse": (256 << 20, 2 << 30)}   # (mmap, trim threshold), bytes
GLIBC_STEADY = (32 << 20, 64 << 20)                    # glibc's thresholds once the automatic one has climbed
_heap_policies = []                                    # the policies in force, innermost last


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):   # no confstr (Windows), unknown name, no libc.so.6
        return None


@contextmanager
def c_heap(device, policy):
    """Run a block under one of HEAP_POLICIES on the CPU with glibc (see above); nestable, single-threaded."""
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield
        return
    before = _heap_policies[-1] if _heap_policies else GLIBC_STEADY
    _heap_policies.append(HEAP_POLICIES[policy])
    _set_heap(libc, HEAP_POLICIES[policy])
    try:
        yield
    finally:
        _heap_policies.pop()
        _set_heap(libc, before)
        libc.malloc_trim(0)


def _set_heap(libc, thresholds):
    mmap, trim = thresholds
    libc.mallopt(_M_MMAP_THRESHOLD, mmap)
    libc.mallopt(_M_TRIM_THRESHOLD, trim)

# ----------------------------------------------------------------------------- inference


def window_starts(size, roi, overlap):
    """Evenly spaced window starts along one axis; the last window ends flush with the edge."""
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    if size <= roi:
        return [0]
    n = math.ceil((size - roi) / max(1, int(roi * (1 - overlap)))) + 1
    return sorted(set(np.linspace(0, size - roi, n).round().astype(int).tolist()))


def _padded_input(image, roi, device):
    """(X, Y, Z) float32 -> (1, 1, X', Y', Z') tensor padded at the far end to at least `roi`."""
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=device)
    pad = [max(0, r - s) for s, r in zip(x.shape, roi)]
    return F.pad(x[None, None], (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else x[None, None]


def _passes(model, crops, n):
    """n forward passes of the same crops: UNet.repeated_forward shares the first block; any other model
    is simply called n times."""
    repeated = getattr(model, "repeated_forward", None)
    return repeated(crops, n) if repeated is not None else (model(crops) for _ in range(n))


@contextmanager
def cpu_channels_last(model, device):
    """Channels-last weights (stored N, D, H, W, C) for CPU inference, restored afterwards.

    oneDNN's 3D convolutions run faster on that layout and the activations follow the weights' layout: one
    MC pass of a 96^3 window went from 1.06 to 0.87 s (2-core EPYC, torch 2.13). Results are the same up to
    float rounding. CUDA and CPU builds without oneDNN keep the model as it is.
    """
    convs = [p for p in model.parameters() if p.dim() == 5]
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or not convs \
            or all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs):
        yield
        return
    with torch.inference_mode(False):       # weights made under inference mode could not be trained later
        model.to(memory_format=torch.channels_last_3d)
    try:
        yield
    finally:
        with torch.inference_mode(False):
            model.to(memory_format=torch.contiguous_format)


@torch.inference_mode()
def _window_slabs(model, x, shape, roi, overlap, batch_size, passes=1, drop_last_class=False):
    """Sliding-window softmax of x (1, 1, X', Y', Z'), the image of `shape` (X, Y, Z) padded, `passes` times,
    yielded as final slabs along x.

    Yields (x0, slab): slab (passes, C, w, Y, Z) holds voxels x0 .. x0 + w - 1 of the image (the padding cut
    off), overlaps averaged (uniform weights). drop_last_class: keep classes 0 .. C - 2 only (the last is one
    minus their sum, and averaging keeps that true). Windows run in order of their x start; once every window
    starting at one x is done, no later window reaches below the next start, so that part is final. Only a
    band one window deep (C, or C - 1, x roi x Y' x Z' per pass) is ever held, whatever X' is. Pass j of a
    window goes into map j; a window's passes follow each other (one stem); a forward batches up to
    batch_size windows of the same x start. The slab is a view into the band: use it before asking for the
    next one. On the CPU the sweep runs with channels-last weights (cpu_channels_last).
    """
    size = x.shape[2:]
    starts = [window_starts(s, r, overlap) for s, r in zip(size, roi)]
    # the windows form a grid, so a voxel's window count is the product of its counts along each axis
    counts = []
    for axis_starts, n, r in zip(starts, size, roi):
        count = torch.zeros(n, device=x.device)
        for a in axis_starts:
            count[a:a + r] += 1
        counts.append(count)
    yz_count = counts[1][:, None] * counts[2][None, :]
    depth = roi[0]                                     # _padded_input makes X' >= roi
    corners = [(b, c) for b in starts[1] for c in starts[2]]          # one row of windows, any x start
    band = None
    x_starts = starts[0] + [size[0]]
    with cpu_channels_last(model, x.device):          # for the whole sweep; restored when it ends
        for a, a_next in zip(x_starts, x_starts[1:]):
            for i in range(0, len(corners), batch_size):
                band = _add_windows(model, x, a, corners[i:i + batch_size], roi, passes, band, drop_last_class)
            final = a_next - a                         # voxels a .. a_next - 1 see no later window
            band[:, :, :final].div_(counts[0][a:a + final, None, None] * yz_count)
            yield a, band[:, :, :min(final, shape[0] - a), :shape[1], :shape[2]]
            keep = depth - final                       # carry the overlap with the next row of windows,
            for i in range(0, keep, final):            # in pieces that do not overlap (no band-sized copy)
                j = min(i + final, keep)
                band[:, :, i:j] = band[:, :, i + final:j + final]
            band[:, :, keep:] = 0


def _add_windows(model, x, a, corners, roi, passes, band, drop_last_class=False):
    """Add the softmax of `passes` forward passes of the windows at x start a and (y, z) `corners`, batched,
    into band (passes, C, roi[0], Y', Z'), pass j into map j (C - 1 classes with drop_last_class). Creates the
    band on the first call; returns it."""
    crops = torch.cat([x[..., a:a + roi[0], b:b + roi[1], c:c + roi[2]] for b, c in corners])  # (n, 1, *roi)
    with autocast(x.device):
        for j, logits in enumerate(_passes(model, crops, passes)):
            probs = logits.float().softmax(1)                                                  # (n, C, *roi)
            if drop_last_class:
                probs = probs[:, :-1]
            if band is None:
                band = torch.zeros((passes, probs.shape[1], roi[0]) + tuple(x.shape[3:]), device=x.device)
            for p, (b, c) in zip(probs, corners):
                band[j, :, :, b:b + roi[1], c:c + roi[2]] += p
    return band


def default_batch(device):
    """Windows per forward pass: 4 on CUDA; 1 on the CPU, where batching gains nothing and costs memory
    (bench machine, one row of the full-size case's windows, m = 5: 36 / 35 / 35 s and 611 / 932 / 1496 MB
    extra at batch 1 / 2 / 4)."""
    return 4 if device.type == "cuda" else 1


def default_maps_mb(device):
    """Memory for the pass maps of one MC sweep: 2 GB on CUDA; 128 MB on the CPU, which lets the full-size
    bench case (273 x 273 x 120, 3 classes, 2 of them kept: a 25 MB band per pass) run 5 passes per sweep:
    751 MB of extra memory for m = 10 in a fresh process on the bench machine (2-core CPU). Earlier, one row
    of its windows (96 x 273 x 120, m = 5, all 3 classes kept): 37 s and 607 MB with 5 passes per sweep,
    against 53 s and 497 MB with one (no shared stem)."""
    return 2048 if device.type == "cuda" else 128


def passes_per_sweep(model, padded_shape, m, maps_mb=None, roi=(96, 96, 96)):
    """MC passes each window runs in a row: as many pass maps as fit in maps_mb (None -> default_maps_mb),
    at least 1, at most m; 1 for a model without repeated_forward. A pass map is one band of the sliding
    window (_window_slabs): C - 1 classes (mc_scores derives the last) x min(roi, X') x Y' x Z' float32 for
    the padded volume (X', Y', Z')."""
    if not hasattr(model, "repeated_forward"):
        return 1
    maps_mb = default_maps_mb(next(model.parameters()).device) if maps_mb is None else maps_mb
    band = (min(roi[0], padded_shape[0]),) + tuple(padded_shape[1:])
    kept = max(getattr(model, "out_channels", 2) - 1, 1)
    map_mb = kept * math.prod(band) * 4 / 2**20
    return max(1, min(m, int(maps_mb // map_mb)))


def sliding_window_predict(model, image, roi=(96, 96, 96), overlap=0.25, batch_size=None):
    """Softmax probabilities (C, X, Y, Z) float32 numpy of `image` (X, Y, Z) in [0, 1].

    Uses the model in whatever mode it is in (call model.eval() for a deterministic result).
    """
    device = next(model.parameters()).device
    out = None
    with c_heap(device, "reuse"):
        x = _padded_input(image, roi, device)
        for a, slab in _window_slabs(model, x, image.shape, roi, overlap, batch_size or default_batch(device)):
            if out is None:
                out = np.empty((slab.shape[1],) + image.shape, np.float32)
            out[:, a:a + slab.shape[2]] = slab[0].cpu().numpy()
    return out


@torch.inference_mode()
def mc_scores(model, image, m=10, roi=(96, 96, 96), overlap=0.25, batch_size=None, return_map=False, maps_mb=None):
    """MC-dropout uncertainty of one volume under `model` (DESIGN.md "scores").

    m stochastic passes (dropout on, norms in eval mode), each a full sliding-window prediction.
    variance: per-voxel variance over the passes of the softmax (population variance, ddof 0),
              summed over classes, mean over voxels.
    entropy:  entropy (nats) of the mean softmax, summed over classes, mean over voxels.
    The passes run in sweeps over the windows; in one sweep each window runs as many passes in a row as
    pass maps fit in `maps_mb` megabytes (passes_per_sweep), all sharing its first block
    (UNet.repeated_forward). Each sweep hands over its passes slab by slab along x (_window_slabs), and a
    running mean and sum of squared deviations per voxel (Welford) take them in pass order. The softmax sums
    to one, so the last class is never stored: its deviations are minus the sum of the others'. Memory is
    one window-deep band of C - 1 classes per pass, plus the mean (C - 1 volumes) and one volume of squared
    deviations, whatever m is.
    Returns {"variance": float, "entropy": float} (+ "variance_map" (X, Y, Z) float32 with return_map).
    """
    device = next(model.parameters()).device
    with c_heap(device, "reuse"):               # the sweep's buffers stay resident between windows
        return _mc_scores(model, image, m, roi, overlap, batch_size, return_map, maps_mb, device)


def _mc_scores(model, image, m, roi, overlap, batch_size, return_map, maps_mb, device):
    was_training = model.training
    enable_mc_dropout(model)
    x = _padded_input(image, roi, device)
    X, Y, Z = image.shape
    batch_size = batch_size or default_batch(device)
    per_sweep = passes_per_sweep(model, x.shape[2:], m, maps_mb, roi)
    mean = m2 = None
    try:
        for k0 in range(0, m, per_sweep):
            for a, slab in _window_slabs(model, x, image.shape, roi, overlap, batch_size, min(per_sweep, m - k0),
                                         drop_last_class=True):
                w = slab.shape[2]
                if mean is None:
                    mean = torch.zeros((slab.shape[1], X, Y, Z), device=device)    # classes 0 .. C - 2
                    m2 = torch.zeros((X, Y, Z), device=device)                      # summed over all classes
                for k, p in enumerate(slab, start=k0 + 1):
                    # Welford's update: sum(p^2)/m - mean^2 in float32 leaves ~1e-8 of cancellation noise even
                    # when every pass is identical; this form gives exactly 0 then and stays accurate. Only the
                    # class sum of the squared deviations is needed. Slabs of 8 keep the temporaries small.
                    for s in _slabs(w):
                        mu = mean[:, a:a + w][:, s]
                        delta = p[:, s] - mu                                        # p - old mean
                        mu.add_(delta, alpha=1.0 / k)
                        after = p[:, s].sub_(mu)                                    # p - new mean
                        acc = m2[a:a + w][s]
                        # the last class: both differences are minus the sums of the other classes'
                        acc.add_(delta.sum(0).mul_(after.sum(0)))
                        acc.add_(delta.mul_(after).sum(0))
    finally:
        model.train(was_training)
    var_map = m2.div_(m)                                                   # (X, Y, Z), population variance
    entropy = -sum(_sum_plogp(mean[:, s]) + _sum_plogp((1 - mean[:, s].sum(0)).clamp_(min=0))   # last class
                   for s in _slabs(X))
    out = {"variance": var_map.mean().item(), "entropy": entropy / var_map.numel()}
    if return_map:
        out["variance_map"] = var_map.cpu().numpy()
    return out


def _slabs(n, width=8):
    return [slice(i, i + width) for i in range(0, n, width)]


def _sum_plogp(q):
    """Sum of q log q over a probability tensor (0 log 0 = 0), in float64."""
    return (q * q.clamp(min=1e-12).log()).sum(dtype=torch.float64).item()


def noisy_label(probs, tau=0.9):
    """Argmax where the max softmax probability exceeds tau, background elsewhere (paper sec. 3.3).

    probs: (C, X, Y, Z) float. Returns uint8 (X, Y, Z).
    """
    probs = np.asarray(probs)
    return np.where(probs.max(0) > tau, probs.argmax(0), 0).astype(np.uint8)

# ----------------------------------------------------------------------------- training data


class PatchStream(torch.utils.data.IterableDataset):
    """Endless foreground-balanced training patches, made in DataLoader workers off the training thread.

    volumes: list of (image_hu (X, Y, Z), label (X, Y, Z) uint8, fg_index) from data.cached_case /
    data.foreground_index. two_views=False yields (image (1, *P) float32, label (1, *P) int64), intensity-
    augmented; two_views=True yields (view1 clean, view2 intensity-augmented) of the same patch (the
    semi-supervised consistency pair; the label only steers where patches are centred).
    """

    def __init__(self, volumes, patch_vox, fg_fraction, window_hu, seed, two_views=False):
        self.volumes, self.patch_vox, self.fg_fraction = volumes, tuple(patch_vox), fg_fraction
        self.window_hu, self.seed, self.two_views = window_hu, seed, two_views

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            image_hu, label, fg_index = self.volumes[rng.integers(len(self.volumes))]
            patch, lab = sample_patch(image_hu, label, self.patch_vox, self.fg_fraction, rng,
                                      self.window_hu, fg_index=fg_index)
            if self.two_views:
                yield torch.from_numpy(patch[None]), torch.from_numpy(augment_intensity(patch, rng)[None])
            else:
                yield torch.from_numpy(augment_intensity(patch, rng)[None]), torch.from_numpy(lab[None].astype(np.int64))


def batches(stream, batch_size, workers, device):
    """An endless iterator of batches on `device` from a PatchStream."""
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    for batch in loader:
        yield [t.to(device, non_blocking=True) for t in batch]

# ----------------------------------------------------------------------------- training steps


def make_optimizer(model, lr, device):
    """Adam (paper: lr 1e-4) and a grad scaler that is active only for fp16 autocast."""
    return torch.optim.Adam(model.parameters(), lr=lr), torch.amp.GradScaler(device.type, enabled=needs_scaler(device))


def supervised_loss(model, batch):
    image, label = batch                                                  # (B, 1, *P), (B, 1, *P)
    return dice_ce_loss(model(image), label)


def semi_loss(model, batch, alpha=1.0, beta=1e-3):
    """alpha * DiceCE(labeled) + beta * DiceCE(view 2 logits, softmax of view 1, detached) (paper sec. 3.3)."""
    sup_batch, (view1, view2) = batch                                     # labeled pair; (B, 1, *P) each
    with torch.no_grad():
        target = model(view1).float().softmax(1)                          # (B, C, *P)
    return alpha * supervised_loss(model, sup_batch) + beta * dice_ce_loss(model(view2), target)


def train_steps(model, optimizer, scaler, step_loss, data, steps, device, tag="train", log_every_s=10.0):
    """Run `steps` optimiser steps of `step_loss(model, next(data))`.

    Returns {"loss": mean loss, "step_s": seconds per step, "data_wait": share of time spent waiting for data}.
    """
    model.train()
    progress = Progress(tag, steps, log_every_s)
    total, wait, t0 = 0.0, 0.0, time.time()
    with c_heap(device, "train"):               # keeps the activations out of the C heap
        for step in range(1, steps + 1):
            t = time.time()
            batch = next(data)
            wait += time.time() - t
            with autocast(device):
                loss = step_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item()
            progress.update(step, f"loss {total / step:.4f}")
    elapsed = max(time.time() - t0, 1e-9)
    return {"loss": total / max(steps, 1), "step_s": elapsed / max(steps, 1), "data_wait": wait / elapsed}


def evaluate(model, cases, num_classes, roi, overlap=0.25, batch_size=None):
    """Hard Dice per foreground class of each case: (n_cases, num_classes - 1) float64.

    cases: iterable of (image (X, Y, Z) in [0, 1], label (X, Y, Z) int), e.g. a generator that loads lazily.
    """
    model.eval()
    rows = []
    for image, label in cases:
        pred = sliding_window_predict(model, image, roi, overlap, batch_size).argmax(0)
        rows.append(dice_per_class(pred, np.asarray(label), num_classes))
    return np.array(rows).reshape(len(rows), num_classes - 1)


def train_proxy(model, volumes, val_cases, epochs, val_every, steps_per_epoch, device, seed, *,
                patch_vox, batch_size, window_hu, lr, workers, roi, fg_fraction=0.5):
    """Proxy model on pseudo labels (Algorithm 1 line 2): `epochs` epochs, validation Dice on the validation
    cases' pseudo labels every `val_every` epochs, the best weights kept (paper: 100 epochs, every 5).

    val_cases: a function returning an iterable of (image, pseudo label) pairs, or None.
    Returns the validation history [(epoch, dice)]; the model ends with its best weights.
    """
    optimizer, scaler = make_optimizer(model, lr, device)
    data = batches(PatchStream(volumes, patch_vox, fg_fraction, window_hu, seed), batch_size, workers, device)
    best, best_state, history = -1.0, None, []
    for epoch in range(0, epochs, val_every):
        chunk = min(val_every, epochs - epoch)
        train_steps(model, optimizer, scaler, supervised_loss, data, chunk * steps_per_epoch, device,
                    tag=f"proxy epochs {epoch + 1}-{epoch + chunk}/{epochs}")
        if val_cases is None:  # nothing to validate on: keep the last weights
            best_state = model.state_dict()
            continue
        scores = evaluate(model, val_cases(), 2, roi)
        if len(scores) == 0:
            raise ValueError("train_proxy: val_cases() gave no validation case; pass val_cases=None "
                             "to train the proxy without validation")
        dice = float(scores.mean())
        history.append((epoch + chunk, dice))
        print(f"  proxy epoch {epoch + chunk}/{epochs}: validation Dice on pseudo labels {dice:.4f}", flush=True)
        if dice > best:
            best, best_state = dice, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history
