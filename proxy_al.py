"""The method's building blocks, with any model of your own: pseudo labels (Algorithm 1 line 2),
sliding-window and MC-dropout inference (lines 3, 9, 12, 15), noisy labels (line 10) and the semi-supervised
loss (line 11), and the validation Dice.

This file ports on its own: it imports only torch, numpy, scipy and losses.py. `model` is any
torch.nn.Module mapping (B, 1, X, Y, Z) float to logits (B, C, X, Y, Z), with dropout layers for MC dropout.
Arrays called `image` are windowed to [0, 1]; `image_hu` are Hounsfield units.
"""
import itertools
import math
import warnings
from contextlib import nullcontext

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import dice_ce_loss, dice_per_class

# ----------------------------------------------------------------------------- devices


def autocast(device: torch.device):
    """bf16 autocast on CUDA where supported, else fp16 (needs a grad scaler); plain float32 on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ----------------------------------------------------------------------------- pseudo labels


def auto_hu_band(image_hu: np.ndarray, width_hu: float = 50.0) -> tuple:
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


def pseudo_label(image_hu: np.ndarray, hu_band=(100, 150), case_id: str = "case") -> np.ndarray:
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


def window_starts(size: int, roi: int, overlap: float) -> list:
    """Evenly spaced window starts along one axis; the last window ends flush with the edge."""
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    if size <= roi:
        return [0]
    n = math.ceil((size - roi) / max(1, int(roi * (1 - overlap)))) + 1
    return sorted(set(np.linspace(0, size - roi, n).round().astype(int).tolist()))


def default_batch(device: torch.device) -> int:
    """Forward passes per batch: 4 on CUDA; 1 on the CPU, where a bigger batch is no faster and costs memory."""
    return 4 if device.type == "cuda" else 1


@torch.inference_mode()
def sliding_window(model: nn.Module, image: np.ndarray, roi=(96, 96, 96), overlap: float = 0.25, mc_passes: int = 1,
                   batch_size: int = None) -> torch.Tensor:
    """Softmax of `mc_passes` forward passes (1: a plain prediction) over evenly spaced windows, overlaps
    averaged (uniform weights).
    image: (X, Y, Z) float32 in [0, 1]. The model runs in whatever mode it is in (eval: deterministic;
    enable_mc_dropout: each pass draws its own dropout masks). A batch holds up to batch_size (window, pass)
    pairs, the passes of a window next to each other; on CUDA it runs under autocast.
    Returns probs (mc_passes, C, X, Y, Z) float32 on the model's device. Memory: mc_passes x C full-volume maps
    of the padded image plus one count volume.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch(device)
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=device)
    pad = [max(0, r - s) for s, r in zip(x.shape, roi)]                     # at least one window per axis
    x = F.pad(x[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))             # (1, 1, X', Y', Z')
    boxes = [tuple(slice(a, a + r) for a, r in zip(corner, roi))
             for corner in itertools.product(*(window_starts(s, r, overlap) for s, r in zip(x.shape[2:], roi)))]
    todo = [(box, j) for box in boxes for j in range(mc_passes)]
    out, count = None, torch.zeros(x.shape[2:], device=device)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        crops = torch.cat([x[(..., *box)] for box, _ in chunk])            # (n, 1, *roi)
        with autocast(device):
            probs = model(crops).float().softmax(1)                         # (n, C, *roi)
        if out is None:
            out = torch.zeros((mc_passes, probs.shape[1]) + x.shape[2:], device=device)
        for p, (box, j) in zip(probs, chunk):
            out[(j, slice(None), *box)] += p
    for box in boxes:
        count[box] += 1
    X, Y, Z = image.shape
    return out.div_(count)[..., :X, :Y, :Z]


def sliding_window_predict(model: nn.Module, image: np.ndarray, roi=(96, 96, 96), overlap: float = 0.25,
                           batch_size: int = None) -> np.ndarray:
    """Softmax probabilities (C, X, Y, Z) float32 numpy of `image` (X, Y, Z) in [0, 1].

    Uses the model in whatever mode it is in (call model.eval() for a deterministic result).
    """
    return sliding_window(model, image, roi, overlap, 1, batch_size)[0].cpu().numpy()


def n_windows(shape, roi=(96, 96, 96), overlap: float = 0.25) -> int:
    """Number of sliding windows over a volume of `shape` (after padding to at least `roi`)."""
    return math.prod(len(window_starts(max(s, r), r, overlap)) for s, r in zip(shape, roi))


def enable_mc_dropout(model: nn.Module) -> nn.Module:
    """Eval mode everywhere (norms use their eval behaviour) except dropout, which stays stochastic."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    return model


MIN_MC_PASSES = 2   # a variance over the passes needs two of them


@torch.inference_mode()
def mc_scores(model: nn.Module, image: np.ndarray, mc_passes: int = 10, roi=(96, 96, 96), overlap: float = 0.25,
              batch_size: int = None, return_map: bool = False, variance_classes: str = "foreground",
              return_maps: bool = False) -> dict:
    """MC-dropout uncertainty of one volume under `model` (paper sec. 3.1).
    mc_passes (the paper's m, 10) stochastic passes (dropout on, norms in eval mode), each a full sliding-window
    prediction p_k.
    variance: per-voxel variance over the passes of the softmax (population variance, ddof 0), summed over
              classes, mean over voxels. variance_classes "foreground" (the first author's tutorial,
              MONAI tutorials active_learning/liver_tumor_al/active_learning.py): the background channel
              dropped and probabilities <= 0 set to 0.0005 before the variance; "all": every class.
    entropy:  entropy (nats) of the mean softmax, summed over classes, mean over voxels.
    bald:     mutual information: entropy of the mean softmax minus the mean over passes of each pass's
              entropy, mean over voxels (Houlsby et al. 2011; not in the paper).
    A running mean and sum of squared deviations per voxel (Welford) take the passes one by one (no
    cancellation; mc_passes does not change the memory). A sweep over the windows runs as many passes as fill one
    batch (batch_size // windows, at least 1: one on the CPU, where the batch is one window).
    Its memory: PERFORMANCE.md.
    Returns {"variance", "entropy", "bald"} floats (+ "variance_map" (X, Y, Z) float32 numpy with return_map;
    + "maps" {"variance", "entropy", "bald"} of per-voxel (X, Y, Z) float32 numpy with return_maps: the maps
    whose means the floats are, for region queries).
    """
    if mc_passes < MIN_MC_PASSES:
        raise ValueError(f"mc_scores: mc_passes = {mc_passes}; a variance needs at least {MIN_MC_PASSES} passes "
                         "(paper: m = 10)")
    if variance_classes not in ("foreground", "all"):
        raise ValueError(f"mc_scores: variance_classes {variance_classes!r}; choose foreground or all")
    if not any(isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 for mod in model.modules()):
        warnings.warn(f"mc_scores: {type(model).__name__} has no dropout layer with p > 0, so every pass is the "
                      "same and the variance and BALD are zero; add nn.Dropout layers for MC dropout", stacklevel=2)
    first_class = 1 if variance_classes == "foreground" else 0
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch(device)
    per_sweep = max(1, batch_size // n_windows(image.shape, roi, overlap))
    modes = [(module, module.training) for module in model.modules()]
    enable_mc_dropout(model)
    mean = m2 = pass_entropy = None
    k = 0
    try:
        for first in range(0, mc_passes, per_sweep):
            for p in sliding_window(model, image, roi, overlap, min(per_sweep, mc_passes - first), batch_size):
                k += 1                                                      # p: (C, X, Y, Z), pass k
                if mean is None:
                    mean, m2, pass_entropy = torch.zeros_like(p), torch.zeros_like(p[0]), torch.zeros_like(p[0])
                    var_mean = mean if first_class == 0 else torch.zeros_like(p[first_class:])
                pass_entropy += _entropy(p)
                q = p                                                       # the classes of the variance
                if first_class:                                             # the tutorial's floor
                    q = p[first_class:].masked_fill(p[first_class:] <= 0, 0.0005)
                    mean.add_(p - mean, alpha=1.0 / k)                      # the mean softmax, for the entropy
                delta = q - var_mean                                        # q - old mean
                var_mean.add_(delta, alpha=1.0 / k)
                m2 += delta.mul_(q.sub_(var_mean)).sum(0)                   # (q - old mean)(q - new mean)
    finally:
        for module, training in modes:                                      # the caller's modes, layer by layer
            module.training = training
    var_map = m2.div_(mc_passes)                                                    # (X, Y, Z), summed over its classes
    entropy_map = _entropy(mean)
    out = {"variance": var_map.mean(dtype=torch.float64).item(),
           "entropy": entropy_map.mean(dtype=torch.float64).item()}
    if return_maps:
        maps = {"variance": var_map.cpu().numpy(), "entropy": entropy_map.cpu().numpy().copy()}   # sub_ below
    out["bald"] = entropy_map.sub_(pass_entropy.div_(mc_passes)).mean(dtype=torch.float64).item()
    if return_map:
        out["variance_map"] = var_map.cpu().numpy()
    if return_maps:
        out["maps"] = {**maps, "bald": entropy_map.cpu().numpy()}
    return out


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the class axis of probs (C, *S), 0 log 0 = 0. Returns (*S).
    Class by class, so the temporaries are single volumes."""
    return -sum(q * q.clamp(min=1e-12).log() for q in probs)


def noisy_label(probs: np.ndarray, tau: float = 0.9) -> np.ndarray:
    """Argmax where the max softmax probability exceeds tau, background elsewhere (paper sec. 3.3).

    probs: (C, X, Y, Z) float softmax probabilities (e.g. sliding_window_predict), not logits: tau is a
    probability. Values outside [0, 1] raise a ValueError. Returns uint8 (X, Y, Z).
    """
    probs = np.asarray(probs)
    if probs.size and (probs.min() < 0 or probs.max() > 1 + 1e-6):
        raise ValueError(f"noisy_label: probs span [{probs.min():.3g}, {probs.max():.3g}], outside [0, 1]; pass "
                         "softmax probabilities (C, X, Y, Z), e.g. logits.softmax(0), not logits")
    return np.where(probs.max(0) > tau, probs.argmax(0), 0).astype(np.uint8)


def semi_loss(model: nn.Module, batch, alpha: float = 1.0, beta: float = 1e-3) -> torch.Tensor:
    """alpha * DiceCE(labeled) + beta * DiceCE(view 2 logits, softmax of view 1, detached) (paper sec. 3.3).

    batch: ((image (B, 1, *P), label (B, 1, *P) int64), (view1 (B, 1, *P), view2 (B, 1, *P))): a labeled
    pair, and two views of one patch of a most-certain case (view 1 plain, view 2 intensity-augmented).
    Mode: the caller's. semi_loss does not switch it; call model.train() first (train_steps does), so that the
    view-1 target, like every other forward here, runs with dropout on, as a Pi-model does: both views see the
    network as it trains, and the target's dropout noise is part of the regularisation. In eval mode the
    target is deterministic and dropout does not act on the training forwards either.
    Returns a scalar tensor.
    """
    (image, label), (view1, view2) = batch
    with torch.no_grad():
        target = model(view1).float().softmax(1)                          # (B, C, *P)
    return alpha * dice_ce_loss(model(image), label) + beta * dice_ce_loss(model(view2), target)

# ----------------------------------------------------------------------------- validation


def evaluate(model: nn.Module, cases, num_classes: int, roi, overlap: float = 0.25,
             batch_size: int = None) -> np.ndarray:
    """Hard Dice per foreground class of each case: (n_cases, num_classes - 1) float64.

    cases: iterable of (image (X, Y, Z) in [0, 1], label (X, Y, Z) int), e.g. a generator that loads lazily.
    """
    model.eval()
    rows = []
    for image, label in cases:
        pred = sliding_window_predict(model, image, roi, overlap, batch_size).argmax(0)
        rows.append(dice_per_class(pred, np.asarray(label), num_classes))
    return np.array(rows).reshape(len(rows), num_classes - 1)


