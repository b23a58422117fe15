"""losses.py: DiceCE by hand and its edge cases, hard Dice per class, the partial-label (masked) DiceCE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import dice_ce_loss, dice_per_class, IGNORE, _partial_dice_ce, soft_dice_loss


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

# ----------------------------------------------------------------------------- partial-label loss


def logits_and_labels(shape=(2, 3, 17, 19, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    labels = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=g)
    return logits, labels


def test_loss_without_ignore_is_the_plain_dice_ce_bit_for_bit():
    logits, labels = logits_and_labels()
    plain = (soft_dice_loss(logits.softmax(1), F.one_hot(labels[:, 0], 3).movedim(-1, 1).float())
             + F.cross_entropy(logits, labels[:, 0]))
    assert torch.equal(dice_ce_loss(logits, labels), plain)
    # The masked path itself, with every voxel known, gives the same bits too.
    known = torch.ones_like(labels[:, 0], dtype=torch.bool)
    assert torch.equal(_partial_dice_ce(logits, labels[:, 0], known, 1.0, 1.0), plain)


def test_loss_ignores_what_is_masked():
    logits, labels = logits_and_labels()
    target = labels.clone()
    target[0, :, 3:11, :, 5:] = IGNORE
    target[1, :, :, 10:] = IGNORE
    ignored = (target == IGNORE).expand_as(logits)

    def loss_and_grad(lg):
        lg = lg.clone().requires_grad_(True)
        loss = dice_ce_loss(lg, target)
        loss.backward()
        return loss, lg.grad

    loss, grad = loss_and_grad(logits)
    assert loss.item() != pytest.approx(dice_ce_loss(logits, labels).item())   # the mask did change the loss
    other = logits.clone()
    other[ignored] = torch.randn(int(ignored.sum()), generator=torch.Generator().manual_seed(1)) * 5
    loss2, grad2 = loss_and_grad(other)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad[~ignored], grad2[~ignored])
    assert (grad[ignored] == 0).all()


def test_loss_of_a_partial_label_equals_the_loss_on_its_known_box():
    logits, labels = logits_and_labels((1, 3, 17, 19, 21), seed=2)
    target = torch.full_like(labels, IGNORE)
    box = (..., slice(2, 13), slice(4, 19), slice(0, 9))
    target[box] = labels[box]
    assert torch.allclose(dice_ce_loss(logits, target), dice_ce_loss(logits[box], labels[box]), rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_with_a_graph_and_no_nan():
    logits, labels = logits_and_labels()
    logits.requires_grad_(True)
    loss = dice_ce_loss(logits, torch.full_like(labels, IGNORE))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
    # One sample all unknown, the other partly known: finite, and the unknown sample gets no gradient.
    target = labels.clone()
    target[0] = IGNORE
    target[1, :, :8] = IGNORE
    logits.grad = None
    loss = dice_ce_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and (logits.grad[0] == 0).all()
