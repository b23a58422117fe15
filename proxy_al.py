"""The method's building blocks: pseudo labels, sliding-window and MC-dropout inference,
noisy labels, and the training steps (proxy, supervised, semi-supervised).

Arrays called `image` are windowed to [0, 1] (data.window); `image_hu` are Hounsfield units.
"""
import itertools
import math
import time
import warnings
from contextlib import nullcontext

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from data import augment_intensity, sample_patch
from losses import dice_ce_loss, dice_per_class
from unet import enable_mc_dropout

# ----------------------------------------------------------------------------- progress


class Progress:
    """Prints `tag i/n  elapsed  ETA` at most every `every_s` seconds (and at the end), after `prefix`."""
    prefix, poll = "", None   # a study on several ranks sets its rank, and a check that stops it if another failed

    def __init__(self, tag, total, every_s=10.0):
        self.tag, self.total, self.every_s = tag, total, every_s
        self.t0 = self.last = time.time()

    def update(self, done, extra=""):
        if self.poll:
            self.poll()
        now = time.time()
        if (now - self.last < self.every_s and done < self.total) or self.total == 1:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"{self.prefix}  {self.tag} {done}/{self.total}  {extra}  elapsed {fmt_s(elapsed)}  ETA {fmt_s(eta)}", flush=True)


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
    plain histogram peak is usually muscle and bowel (on an unenhanced scan the peak can sit near 20 HU
    with the liver near 46). docs/method.md lists its pseudo-label Dice on real scans.
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

# ----------------------------------------------------------------------------- inference


def window_starts(size, roi, overlap):
    """Evenly spaced window starts along one axis; the last window ends flush with the edge."""
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    if size <= roi:
        return [0]
    n = math.ceil((size - roi) / max(1, int(roi * (1 - overlap)))) + 1
    return sorted(set(np.linspace(0, size - roi, n).round().astype(int).tolist()))


def default_batch(device):
    """Forward passes per batch: 4 on CUDA; 1 on the CPU, where a bigger batch is no faster and costs memory."""
    return 4 if device.type == "cuda" else 1


@torch.inference_mode()
def sliding_window(model, image, roi=(96, 96, 96), overlap=0.25, passes=1, batch_size=None):
    """Softmax of `passes` forward passes over evenly spaced windows, overlaps averaged (uniform weights).
    image: (X, Y, Z) float32 in [0, 1]. The model runs in whatever mode it is in (eval: deterministic;
    enable_mc_dropout: each pass draws its own dropout masks). A batch holds up to batch_size (window, pass)
    pairs, the passes of a window next to each other; on CUDA it runs under autocast.
    Returns probs (passes, C, X, Y, Z) float32 on the model's device. Memory: passes x C full-volume maps
    of the padded image plus one count volume.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch(device)
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=device)
    pad = [max(0, r - s) for s, r in zip(x.shape, roi)]                     # at least one window per axis
    x = F.pad(x[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))             # (1, 1, X', Y', Z')
    boxes = [tuple(slice(a, a + r) for a, r in zip(corner, roi))
             for corner in itertools.product(*(window_starts(s, r, overlap) for s, r in zip(x.shape[2:], roi)))]
    todo = [(box, j) for box in boxes for j in range(passes)]
    out, count = None, torch.zeros(x.shape[2:], device=device)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        crops = torch.cat([x[(..., *box)] for box, _ in chunk])            # (n, 1, *roi)
        with autocast(device):
            probs = model(crops).float().softmax(1)                         # (n, C, *roi)
        if out is None:
            out = torch.zeros((passes, probs.shape[1]) + x.shape[2:], device=device)
        for p, (box, j) in zip(probs, chunk):
            out[(j, slice(None), *box)] += p
    for box in boxes:
        count[box] += 1
    X, Y, Z = image.shape
    return out.div_(count)[..., :X, :Y, :Z]


def sliding_window_predict(model, image, roi=(96, 96, 96), overlap=0.25, batch_size=None):
    """Softmax probabilities (C, X, Y, Z) float32 numpy of `image` (X, Y, Z) in [0, 1].

    Uses the model in whatever mode it is in (call model.eval() for a deterministic result).
    """
    return sliding_window(model, image, roi, overlap, 1, batch_size)[0].cpu().numpy()


def n_windows(shape, roi=(96, 96, 96), overlap=0.25):
    """Number of sliding windows over a volume of `shape` (after padding to at least `roi`)."""
    return math.prod(len(window_starts(max(s, r), r, overlap)) for s, r in zip(shape, roi))


@torch.inference_mode()
def mc_scores(model, image, m=10, roi=(96, 96, 96), overlap=0.25, batch_size=None, return_map=False):
    """MC-dropout uncertainty of one volume under `model` (paper sec. 3.1).
    m stochastic passes (dropout on, norms in eval mode), each a full sliding-window prediction p_k.
    variance: per-voxel variance over the passes of the softmax (population variance, ddof 0),
              summed over classes, mean over voxels.
    entropy:  entropy (nats) of the mean softmax, summed over classes, mean over voxels.
    bald:     mutual information: entropy of the mean softmax minus the mean over passes of each pass's
              entropy, mean over voxels (Houlsby et al. 2011; not in the paper).
    A running mean and sum of squared deviations per voxel (Welford) take the passes one by one (no
    cancellation; m does not change the memory). A sweep over the windows runs as many passes as fill one
    batch (batch_size // windows, at least 1: one on the CPU, where the batch is one window).
    Memory on the model's device, in float32 volumes of the image's size: the sweep's pass maps (C each),
    the mean and one delta (C each), the variance and entropy sums and the window counts (1 each). For a
    340 x 340 x 740 volume (342 MB each) with 2 classes and one pass per sweep that is about 3.4 GB.
    Returns {"variance", "entropy", "bald"} floats (+ "variance_map" (X, Y, Z) float32 numpy with return_map).
    """
    if m < 1:
        raise ValueError(f"mc_scores: m = {m} passes; MC dropout needs at least 1 (paper: 10)")
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch(device)
    per_sweep = max(1, batch_size // n_windows(image.shape, roi, overlap))
    modes = [(module, module.training) for module in model.modules()]
    enable_mc_dropout(model)
    mean = m2 = pass_entropy = None
    k = 0
    try:
        for first in range(0, m, per_sweep):
            for p in sliding_window(model, image, roi, overlap, min(per_sweep, m - first), batch_size):
                k += 1                                                      # p: (C, X, Y, Z), pass k
                if mean is None:
                    mean, m2, pass_entropy = torch.zeros_like(p), torch.zeros_like(p[0]), torch.zeros_like(p[0])
                pass_entropy += _entropy(p)
                delta = p - mean                                            # p - old mean
                mean.add_(delta, alpha=1.0 / k)
                m2 += delta.mul_(p.sub_(mean)).sum(0)                       # (p - old mean)(p - new mean)
    finally:
        for module, training in modes:                                      # the caller's modes, layer by layer
            module.training = training
    var_map = m2.div_(m)                                                    # (X, Y, Z), summed over classes
    entropy_map = _entropy(mean)
    out = {"variance": var_map.mean(dtype=torch.float64).item(),
           "entropy": entropy_map.mean(dtype=torch.float64).item(),
           "bald": entropy_map.sub_(pass_entropy.div_(m)).mean(dtype=torch.float64).item()}
    if return_map:
        out["variance_map"] = var_map.cpu().numpy()
    return out


def _entropy(probs):
    """Entropy in nats over the class axis of probs (C, *S), 0 log 0 = 0. Returns (*S).
    Class by class, so the temporaries are single volumes."""
    return -sum(q * q.clamp(min=1e-12).log() for q in probs)


def noisy_label(probs, tau=0.9):
    """Argmax where the max softmax probability exceeds tau, background elsewhere (paper sec. 3.3).

    probs: (C, X, Y, Z) float. Returns uint8 (X, Y, Z).
    """
    probs = np.asarray(probs)
    return np.where(probs.max(0) > tau, probs.argmax(0), 0).astype(np.uint8)

# ----------------------------------------------------------------------------- training data


class PatchStream(torch.utils.data.IterableDataset):
    """Endless foreground-balanced training patches, made in DataLoader workers off the training thread.
    volumes: list of (image_hu (X, Y, Z), label (X, Y, Z) uint8, data.foreground_index of the label).
    Yields (image (1, *P) float32 intensity-augmented, label (1, *P) int64), or with two_views (view 1 clean,
    view 2 intensity-augmented) of one patch: the semi-supervised pair (the label only steers the centre).
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


def lr_schedule(optimizer, steps, warmup_steps=0, cosine=False):
    """Learning-rate factor per step: a linear warm-up over warmup_steps, then constant (the paper) or a
    cosine decay that reaches 0 after `steps` (a short run then ends converged, not mid-training)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps + 1) / max(1, steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done)) if cosine else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def supervised_loss(model, batch):
    image, label = batch                                                  # (B, 1, *P), (B, 1, *P)
    return dice_ce_loss(model(image), label)


def semi_loss(model, batch, alpha=1.0, beta=1e-3):
    """alpha * DiceCE(labeled) + beta * DiceCE(view 2 logits, softmax of view 1, detached) (paper sec. 3.3)."""
    sup_batch, (view1, view2) = batch                                     # labeled pair; (B, 1, *P) each
    with torch.no_grad():
        target = model(view1).float().softmax(1)                          # (B, C, *P)
    return alpha * supervised_loss(model, sup_batch) + beta * dice_ce_loss(model(view2), target)


def train_steps(model, optimizer, scaler, step_loss, data, steps, device, tag="train", log_every_s=10.0,
                schedule=None):
    """Run `steps` optimiser steps of `step_loss(model, next(data))`, stepping the lr `schedule` if given.

    Returns {"loss": mean loss, "step_s": seconds per step, "data_wait": share of time spent waiting for data}.
    """
    model.train()
    progress = Progress(tag, steps, log_every_s)
    total, wait, t0 = 0.0, 0.0, time.time()
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
        if schedule is not None:
            schedule.step()
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
                patch_vox, batch_size, window_hu, lr, workers, roi, fg_fraction=0.5, warmup_steps=0, cosine=False):
    """Proxy model on pseudo labels (Algorithm 1 line 2): `epochs` epochs, validation Dice on the validation
    cases' pseudo labels every `val_every` epochs, the best weights kept (paper: 100 epochs, every 5).
    val_cases: a function returning an iterable of (image, pseudo label) pairs, or None. warmup_steps,
    cosine: the lr schedule over all epochs. Returns [(epoch, dice)]; the model ends with its best weights.
    """
    optimizer, scaler = make_optimizer(model, lr, device)
    schedule = lr_schedule(optimizer, epochs * steps_per_epoch, warmup_steps, cosine)
    data = batches(PatchStream(volumes, patch_vox, fg_fraction, window_hu, seed), batch_size, workers, device)
    best, best_state, history = -1.0, None, []
    for epoch in range(0, epochs, val_every):
        chunk = min(val_every, epochs - epoch)
        train_steps(model, optimizer, scaler, supervised_loss, data, chunk * steps_per_epoch, device,
                    tag=f"proxy epochs {epoch + 1}-{epoch + chunk}/{epochs}", schedule=schedule)
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
