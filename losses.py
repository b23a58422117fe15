"""DiceCE loss for training and the hard Dice metric for validation (paper sec. 3: DiceCE, weights 1 and 1).

Partial labels: a voxel whose label is IGNORE is unknown (outside the annotated boxes of region-level
active learning) and takes no part in the loss.
"""
import numpy as np
import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # in numerator and denominator, as MONAI's DiceCELoss defaults (smooth_nr = smooth_dr = 1e-5)
# The label of an unannotated voxel: the largest value of the uint8 label volumes (data.py), so it stays
# above every class, as nnU-Net requires of its ignore label. nnActive (Lüth et al., TMLR 2025,
# nnactive/data/create_empty_masks.py) uses the largest class + 1 instead; a fixed value needs no
# dataset.json and serves any dataset of up to 255 classes.
IGNORE = 255


def soft_dice_loss(probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample and class (background included), averaged.

    probs, target_probs: (B, C, *S) float. Sums run over the spatial axes only.
    """
    dims = tuple(range(2, probs.ndim))
    inter = (probs * target_probs).sum(dims)                     # (B, C)
    denom = probs.sum(dims) + target_probs.sum(dims)             # (B, C)
    return (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                 ce_weight: float = 1.0) -> torch.Tensor:
    """Soft Dice + cross-entropy, weights 1 and 1 (the DiceCE that the paper cites).

    logits: (B, C, *S) float.
    target: (B, 1, *S) int64 class labels, IGNORE where unannotated (partial labels: those voxels are
            skipped by both terms), or (B, C, *S) class probabilities (semi-supervised consistency:
            soft Dice against the probabilities, cross-entropy against their argmax).
    Returns a scalar tensor, computed in float32 even under autocast. Without any IGNORE voxel no mask is
    applied at all, so fully labeled training gives the plain DiceCE bit for bit.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if target.shape[1] == num_classes and target.is_floating_point():
        target_probs = target.float()
        labels = target.argmax(1)                                 # (B, *S)
    elif target.shape[1] == 1:
        labels = target[:, 0].long()
        known = labels != IGNORE                                  # (B, *S) bool
        if not bool(known.all()):
            return _partial_dice_ce(logits, labels, known, dice_weight, ce_weight)
        target_probs = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    else:
        raise ValueError(f"target shape {tuple(target.shape)} fits neither (B, 1, *S) labels "
                         f"nor (B, {num_classes}, *S) probabilities")
    dice = soft_dice_loss(logits.softmax(1), target_probs)
    ce = F.cross_entropy(logits, labels)
    return dice_weight * dice + ce_weight * ce


def _partial_dice_ce(logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor,
                     dice_weight: float, ce_weight: float) -> torch.Tensor:
    """DiceCE over the known voxels only (labels != IGNORE somewhere).

    logits (B, C, *S) float32, labels (B, *S) int64, known (B, *S) bool.
    Soft Dice: unknown voxels leave the intersection and both denominator sums of each sample and class;
    a sample with no known voxel gives 0 for each class (smoothing over smoothing), as nnU-Net's masked
    soft Dice. Cross-entropy: the mean over known voxels; 0 when none is known (nnU-Net's DC_and_CE_loss
    also drops the CE term then), so an all-unknown batch gives 0, finite, still with a graph.
    """
    mask = known.unsqueeze(1).float()                             # (B, 1, *S)
    probs = logits.softmax(1) * mask                              # (B, C, *S)
    target_probs = F.one_hot(labels.where(known, 0), logits.shape[1]).movedim(-1, 1).float() * mask
    dice = soft_dice_loss(probs, target_probs)
    if bool(known.any()):
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    else:
        ce = probs.sum()                                          # exactly 0, with a grad_fn
    return dice_weight * dice + ce_weight * ce


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard Dice of each foreground class 1..num_classes-1 of one case: (num_classes - 1,) float64.

    pred, target: (*S) integer label arrays of the same shape (prediction, annotation).
    Dice = 2 |P and T| / (|P| + |T|) for a class present in target. A class absent from target is NaN,
    whatever the prediction: the case has nothing to find for it and is left out of that class's mean
    (as MONAI's DiceMetric with ignore_empty=True, the metric the paper reports). Average over cases with
    np.nanmean.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {target.shape}")
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        n_target = t.sum()
        if n_target:
            out[c - 1] = 2.0 * np.logical_and(p, t).sum() / (p.sum() + n_target)
    return out
