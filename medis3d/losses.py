"""Surrogate losses: differentiable stand-ins for the metrics a segmentation is judged by.

One registry for multi-class softmax and binary / multi-label sigmoid models alike, in any
number of spatial dimensions. Every loss follows the training convention: larger means the
prediction is further from the given segmentation. Untargeted attacks ascend a loss against
the reference; targeted ones descend it towards the target.

``logits`` are ``(B, C, *S)``. The segmentation is integer labels ``(B, 1, *S)`` for softmax
and 0/1 channels ``(B, C, *S)`` for sigmoid. Losses compute in float32 (also under autocast).
Foreground is channels 1..C-1 for softmax and every channel for sigmoid.

Saturation: Lovasz, Dice-type and log-cosh Dice losses have small gradients far from the
decision boundary once the prediction is entirely wrong; the cross-entropy terms (``ce``,
``bce_dice``, ``exp_log``, ``structure``, ``combined``) keep an informative gradient
everywhere, which is one reason MedIS fuses several losses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SMOOTH = 1e-5
EXP_LOG_GAMMA = 0.3
EXP_LOG_WEIGHTS = (0.8, 0.2)  # Dice term, cross-entropy term (Wong et al. 2018)
COMBINED_WEIGHTS = {"logcosh_dice": 0.21, "bce_dice": 0.18, "exp_log": 0.20, "structure": 0.15, "lovasz": 0.26}


# -- shared pieces -------------------------------------------------------------------------
def _probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)


def _one_hot(target: torch.Tensor, logits: torch.Tensor, activation: str) -> torch.Tensor:
    """The segmentation as float channels shaped like ``logits``."""
    if activation == "softmax":
        labels = target[:, 0].long().clamp(0, logits.shape[1] - 1)
        return F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    return target.to(logits.dtype)


def _foreground(x: torch.Tensor, activation: str) -> torch.Tensor:
    return x[:, 1:] if activation == "softmax" and x.shape[1] > 1 else x


def _soft_dice_per_class(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice per (batch, class), reduced over the spatial dimensions."""
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + SMOOTH) / (total + SMOOTH)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, activation: str, reduction: str = "mean") -> torch.Tensor:
    if activation == "softmax":
        return F.cross_entropy(logits, target[:, 0].long(), reduction=reduction)
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction=reduction)


# -- the paper's losses ----------------------------------------------------------------------
def logcosh_dice(activation: str) -> LossFn:
    """log(cosh(soft Dice loss)) over the foreground (Jadon 2020)."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        probs = _foreground(_probabilities(logits, activation), activation)
        onehot = _foreground(_one_hot(target, logits, activation), activation)
        dice_loss = 1 - _soft_dice_per_class(probs, onehot).mean()
        return torch.log(torch.cosh(dice_loss))

    return fn


def bce_dice(activation: str) -> LossFn:
    """BCE + Dice (sigmoid) or CE + Dice (softmax, MONAI's DiceCELoss)."""
    if activation == "softmax":
        loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=SMOOTH, smooth_dr=SMOOTH)

        def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss(logits.float(), target.long())

        return fn
    # MONAI's DiceCELoss takes a softmax cross-entropy across channels when there are several,
    # which is wrong for independent (multi-label) sigmoid channels: BCE per channel instead.
    dice = DiceLoss(sigmoid=True, include_background=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH)

    def fn_sigmoid(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, target.float()) + dice(logits, target.float())

    return fn_sigmoid


def exp_log(activation: str) -> LossFn:
    """Exponential logarithmic loss (Wong et al., MICCAI 2018): Dice and CE terms under ``(-ln x)^0.3``."""
    gamma = EXP_LOG_GAMMA
    w_dice, w_ce = EXP_LOG_WEIGHTS

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        probs = _probabilities(logits, activation)
        onehot = _one_hot(target, logits, activation)
        dice = _soft_dice_per_class(_foreground(probs, activation), _foreground(onehot, activation))
        dice_term = (-torch.log(dice.clamp(1e-6, 1.0))).pow(gamma).mean()
        dims = tuple(range(2, logits.ndim))
        frequency = onehot.sum(dims).sum(0) + 1.0  # per class, over the batch
        class_weight = (frequency.sum() / frequency).sqrt()
        if activation == "softmax":
            p_true = (probs * onehot).sum(1).clamp(1e-6, 1.0)  # probability of the true class
            w = (class_weight.view(1, -1, *[1] * len(dims)) * onehot).sum(1)
            ce_term = (w * (-torch.log(p_true)).pow(gamma)).mean()
        else:
            p_true = torch.where(onehot > 0.5, probs, 1 - probs).clamp(1e-6, 1.0)
            w = torch.where(onehot > 0.5, class_weight.view(1, -1, *[1] * len(dims)), torch.ones_like(onehot))
            ce_term = (w * (-torch.log(p_true)).pow(gamma)).mean()
        return w_dice * dice_term + w_ce * ce_term

    return fn


def structure_kernel(spatial_dims: int) -> int:
    """PraNet's 31x31 pooling window, scaled to 3D: 11^3 voxels is about as many as 31^2 pixels."""
    return 31 if spatial_dims == 2 else 11


def structure(activation: str) -> LossFn:
    """The PraNet structure loss: boundary-weighted BCE + weighted IoU (Fan et al., MICCAI 2020).

    Voxels near a boundary of the segmentation (where a local average differs from the mask)
    weigh up to 6 times more. For softmax models each class is a channel of the one-hot
    segmentation, with a weighted cross-entropy in place of the BCE.
    """

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        onehot = _one_hot(target, logits, activation)
        dims = logits.ndim - 2
        k = min(structure_kernel(dims), *[(n - 1) | 1 for n in logits.shape[2:]])  # no larger than the volume
        pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
        weight = 1 + 5 * (pool(onehot, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False) - onehot).abs()
        axes = tuple(range(2, logits.ndim))
        if activation == "softmax":
            voxel_axes = tuple(range(1, logits.ndim - 1))
            voxel_weight = (weight * onehot).sum(1)  # each voxel's weight for its own class
            voxel_ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
            wce = (voxel_weight * voxel_ce).sum(voxel_axes) / voxel_weight.sum(voxel_axes)
            probs = torch.softmax(logits, 1)
        else:
            bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            wce = (weight * bce).sum(axes) / weight.sum(axes)
            probs = torch.sigmoid(logits)
        inter = (probs * onehot * weight).sum(axes)
        union = ((probs + onehot) * weight).sum(axes)
        wiou = _foreground(1 - (inter + 1) / (union - inter + 1), activation)
        return wce.mean() + wiou.mean()

    return fn


def _lovasz_gradient(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1 - sorted_truth).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_truth.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def _lovasz_hinge_flat(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    signs = 2.0 * truth - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, order = torch.sort(errors, descending=True)
    grad = _lovasz_gradient(truth[order])
    return torch.dot(F.elu(errors_sorted) + 1, grad)


def _lovasz_softmax_flat(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``probs`` (N, C), ``labels`` (N,): mean over the classes present of the Lovasz-Jaccard loss."""
    losses = []
    for c in range(probs.shape[1]):
        truth = (labels == c).float()
        if truth.sum() == 0:
            continue
        errors = (truth - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_gradient(truth[order])))
    if not losses:  # no class present (cannot happen for a label map); keep the graph alive
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz(activation: str) -> LossFn:
    """Lovasz hinge per sigmoid channel, or Lovasz-softmax over the present classes.

    The hinge uses ``elu(error) + 1`` instead of ``relu(error)`` (a common smooth variant) so
    voxels already far on the right side keep a small gradient.
    """

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        values = []
        for b in range(logits.shape[0]):
            if activation == "softmax":
                probs = torch.softmax(logits[b], 0).reshape(logits.shape[1], -1).t()
                values.append(_lovasz_softmax_flat(probs, target[b, 0].reshape(-1).long()))
            else:
                for c in range(logits.shape[1]):
                    values.append(_lovasz_hinge_flat(logits[b, c].reshape(-1), target[b, c].reshape(-1).float()))
        return torch.stack(values).mean()

    return fn


def combined(activation: str) -> LossFn:
    """The paper's combined loss: 0.21 log-cosh Dice + 0.18 BCE-Dice + 0.20 exp-log + 0.15 structure + 0.26 Lovasz."""
    parts = {name: LOSSES[name](activation) for name in COMBINED_WEIGHTS}

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * parts[name](logits, target) for name, w in COMBINED_WEIGHTS.items())

    return fn


# -- MONAI's losses and plain cross-entropy ---------------------------------------------------
def _monai(cls, **extra):
    def factory(activation: str) -> LossFn:
        if activation == "softmax":
            loss = cls(to_onehot_y=True, softmax=True, include_background=False, **extra)
        else:
            loss = cls(sigmoid=True, include_background=True, **extra)

        def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss(logits.float(), target.long() if activation == "softmax" else target.float())

        return fn

    return factory


def _focal(activation: str) -> LossFn:
    if activation == "softmax":
        loss = FocalLoss(to_onehot_y=True, use_softmax=True, include_background=True)
    else:
        loss = FocalLoss(include_background=True)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(logits.float(), target.long() if activation == "softmax" else target.float())

    return fn


def ce(activation: str) -> LossFn:
    """Plain cross-entropy (softmax) or binary cross-entropy with logits (sigmoid)."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _cross_entropy(logits.float(), target, activation)

    return fn


LOSSES: dict[str, Callable[[str], LossFn]] = {
    "logcosh_dice": logcosh_dice,
    "bce_dice": bce_dice,
    "exp_log": exp_log,
    "structure": structure,
    "lovasz": lovasz,
    "combined": combined,
    "dice": _monai(DiceLoss, smooth_nr=SMOOTH, smooth_dr=SMOOTH),
    "tversky": _monai(TverskyLoss, smooth_nr=SMOOTH, smooth_dr=SMOOTH),
    "focal": _focal,
    "generalized_dice": _monai(GeneralizedDiceLoss, smooth_nr=SMOOTH, smooth_dr=SMOOTH),
    "ce": ce,
}
PAPER_LOSSES: tuple[str, ...] = ("logcosh_dice", "bce_dice", "exp_log", "structure", "lovasz", "combined")


def get_loss(name: str, activation: str = "softmax") -> LossFn:
    """The loss called ``name`` for a softmax or sigmoid model."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}")
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
    return LOSSES[name](activation)


def parse_losses(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` (the paper's six), ``"a,b"`` or a list, checked and without repeats."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n and n.strip()]
    if names == ["all"]:
        return list(PAPER_LOSSES)
    out: list[str] = []
    for n in names:
        if n not in LOSSES:
            raise ValueError(f"unknown loss {n!r}; choose from: {', '.join(LOSSES)}, or all")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"no loss given; choose from: {', '.join(LOSSES)}, or all")
    return out
