"""Surrogate losses for attacking segmentation models: the MedIS paper's six and a few MONAI baselines.

One registry serves multi-class softmax and binary / multi-label sigmoid models alike, in 1, 2
or 3 spatial dimensions. ``logits`` are ``(B, C, *S)``; the segmentation is integer labels
``(B, 1, *S)`` for softmax (C >= 2) and 0/1 channels ``(B, C, *S)`` for sigmoid. Every loss
follows the training convention (larger = prediction further from the segmentation), so an
untargeted attack ascends it against the reference and a targeted one descends it towards the
target mask. Losses compute in float32 with autocast switched off, whatever the logits' dtype.

Conventions shared by the losses written here:

* Foreground is channels 1..C-1 for softmax and every channel for sigmoid; Dice- and IoU-type
  terms are taken over the foreground, per batch item and class, then averaged.
* Soft Dice uses ``(2 I + 1) / (|P| + |G| + 1)``: the smooth term 1 keeps an empty class finite
  and still informative (with MONAI's 1e-5 an empty class sits at Dice ~ 0 with a gradient of
  ~1e-5 / |P|^2). ``dice``, ``tversky`` and ``bce_dice`` use the same smooth term;
  ``generalized_dice`` keeps MONAI's 1e-5 because its 1/|G|^2 weights make the numerator tiny.

Gradients (what an attacker sees). All losses give finite gradients for any target, including
an empty class or a single-class volume. The cross-entropy terms (``ce``, ``focal``,
``bce_dice``, ``exp_log``, ``structure``, ``combined``) stay informative everywhere. Lovasz
saturates: the Berman hinge ``relu(1 - margin)`` is exactly flat once every voxel is right by a
margin of 1, so ``lovasz`` uses the smooth hinge ``softplus(1 - margin)`` (never flat, but its
gradient decays like ``exp(-margin)``); Lovasz-softmax and the Dice-type losses decay like the
softmax / sigmoid derivative once probabilities saturate, i.e. on confidently right *or*
confidently wrong voxels. ``generalized_dice`` has undefined class weights when an item has no
foreground at all; MONAI then returns a constant, so we fall back to uniform weights (Dice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss

from medis3d.reductions import channel_argmax, channel_cosine

LossFn = Callable[..., torch.Tensor]  # fn(logits, target, t=0, steps=1, targeted=False) -> scalar
LossFactory = Callable[[str], LossFn]

ACTIVATIONS = ("softmax", "sigmoid")
DICE_SMOOTH = 1.0
EXP_LOG_GAMMA = 0.3
EXP_LOG_WEIGHTS = (0.8, 0.2)  # Dice term, cross-entropy term (Wong et al. 2018)
EXP_LOG_OFFSET = 1e-6  # x**0.3 has an infinite slope at 0: (x + 1e-6)**0.3 keeps gradients finite
TVERSKY_ALPHA_BETA = (0.3, 0.7)  # false positives, false negatives (Salehi et al. 2017); 0.5/0.5 is Dice
COMBINED_WEIGHTS = {"logcosh_dice": 0.21, "bce_dice": 0.18, "exp_log": 0.20, "structure": 0.15, "lovasz": 0.26}
_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
# Losses that take the iteration and the direction: ``(logits, target, t, steps, targeted)``.
STEP_AWARE = frozenset({"segpgd", "cospgd", "masked_ce", "masked_ce_balanced", "masked_spherical", "masked_spherical_logp",
                        "margin"})
# Losses whose value is taken over a mask (or a schedule) that changes between iterates: APGD's
# step-size control compares iterates by plain cross-entropy for them. SEA does so for its masked CE and
# SegPGD (and for JS, tracked by itself here); it tracks its masked spherical loss by itself, which ends within
# 0.02 Dice of tracking it by CE, either way, on the tests' model and 0.003 on the shipped brain SegResNet.
TRACKED_BY_CE = frozenset({"segpgd", "masked_ce", "masked_ce_balanced", "masked_spherical", "masked_spherical_logp"})
# Softmax losses that are not invariant to a shift of a voxel's logits: an attack gives them the network's own
# logits mapped back to the scan grid (``Target.to_scan_grid(raw=True)``), not the log-probabilities the others see.
RAW_LOGITS = frozenset({"masked_spherical"})
# Losses whose pull stops (or fades) on a voxel once it is flipped, by design: their value is not
# monotone in how wrong the prediction is (everything flipped leaves nothing to pull on).
STOPS_AT_FLIPPED = frozenset({"segpgd", "cospgd", "masked_ce", "masked_ce_balanced", "masked_spherical",
                              "masked_spherical_logp"})


# -- shared pieces -----------------------------------------------------------------------------
def _in_float32(factory: LossFactory) -> LossFactory:
    """Make ``factory``'s losses take float32 logits with autocast off (bf16 sums and sorts are too coarse)."""

    @wraps(factory)
    def make(activation: str) -> LossFn:
        loss = factory(activation)

        step_aware = factory.__name__ in STEP_AWARE

        def fn(logits: torch.Tensor, target: torch.Tensor, t: int = 0, steps: int = 1, targeted: bool = False) -> torch.Tensor:
            with torch.autocast(logits.device.type, enabled=False):
                if step_aware:
                    return loss(logits.float(), target, t, steps, targeted)
                return loss(logits.float(), target)

        fn.raw_logits = activation == "softmax" and factory.__name__ in RAW_LOGITS  # type: ignore[attr-defined]
        return fn

    return make


def _probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)


def _labels(target: torch.Tensor) -> torch.Tensor:
    """Softmax targets as ``(B, *S)`` class indices."""
    return target[:, 0].long()


def _one_hot(target: torch.Tensor, logits: torch.Tensor, activation: str) -> torch.Tensor:
    """The segmentation as float channels shaped like ``logits``."""
    if activation == "softmax":
        labels = _labels(target)  # (class values are checked against the model's classes where labels are read)
        return torch.stack([labels == c for c in range(logits.shape[1])], 1).to(logits.dtype)
    return target.to(logits.dtype)


def _foreground(x: torch.Tensor, activation: str) -> torch.Tensor:
    return x[:, 1:] if activation == "softmax" and x.shape[1] > 1 else x


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def _neg_log_soft_dice(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """``-ln`` of the soft Dice per (batch, class), computed as a difference of logs (no log of 0)."""
    dims = _spatial(probs)
    overlap = 2 * (probs * onehot).sum(dims) + DICE_SMOOTH
    total = probs.sum(dims) + onehot.sum(dims) + DICE_SMOOTH
    return (torch.log(total) - torch.log(overlap)).clamp_min(0.0)  # 2I <= |P| + |G|, up to rounding


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice per (batch, class)."""
    dims = _spatial(probs)
    return (2 * (probs * onehot).sum(dims) + DICE_SMOOTH) / (probs.sum(dims) + onehot.sum(dims) + DICE_SMOOTH)


def _voxel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, activation: str) -> torch.Tensor:
    """``-ln p(true label)`` per voxel: ``(B, *S)`` for softmax, ``(B, C, *S)`` for sigmoid."""
    if activation == "softmax":
        return F.cross_entropy(logits, _labels(target), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")


# -- the paper's losses --------------------------------------------------------------------------
def logcosh_dice(activation: str) -> LossFn:
    """log(cosh(soft Dice loss)) over the foreground classes (Jadon 2020)."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = _foreground(_probabilities(logits, activation), activation)
        onehot = _foreground(_one_hot(target, logits, activation), activation)
        dice_loss = 1 - _soft_dice(probs, onehot).mean()
        return torch.log(torch.cosh(dice_loss))

    return fn


def bce_dice(activation: str) -> LossFn:
    """CE + Dice (softmax, MONAI's DiceCELoss) or BCE + Dice (sigmoid), weighted 1:1."""
    if activation == "softmax":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False,
                             smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)

        def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return dice_ce(logits, target.long())

        return fn
    # DiceCELoss would take a softmax cross-entropy across several channels, which is wrong for
    # independent (multi-label) sigmoid channels: BCE per channel instead.
    dice = DiceLoss(sigmoid=True, include_background=True, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)

    def fn_sigmoid(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target) + dice(logits, target)

    return fn_sigmoid


def exp_log(activation: str) -> LossFn:
    """Exponential logarithmic loss (Wong et al., MICCAI 2018), gamma 0.3, weights 0.8 Dice / 0.2 CE.

    ``0.8 * mean_i (-ln Dice_i)^0.3 + 0.2 * mean_voxels w_l (-ln p_l)^0.3`` with class weights
    ``w_l = (sum_k f_k / f_l)^0.5`` from the target's class frequencies over the batch. For
    sigmoid channels each channel is a binary problem whose classes are "in" and "out".
    ``-ln`` is taken stably (difference of logs, log-softmax / log-sigmoid), never of a clamp.
    """
    gamma = EXP_LOG_GAMMA
    w_dice, w_ce = EXP_LOG_WEIGHTS

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = _probabilities(logits, activation)
        onehot = _one_hot(target, logits, activation)
        neg_log_dice = _neg_log_soft_dice(_foreground(probs, activation), _foreground(onehot, activation))
        dice_term = (neg_log_dice + EXP_LOG_OFFSET).pow(gamma).mean()
        voxel_ce = _voxel_cross_entropy(logits, target, activation)
        if activation == "softmax":
            frequency = onehot.sum((0, *_spatial(onehot))).clamp_min(1.0)  # (C,)
            class_weight = (frequency.sum() / frequency).sqrt()
            voxel_weight = class_weight[_labels(target)]
        else:
            dims = (0, *_spatial(onehot))
            inside = onehot.sum(dims, keepdim=True)
            outside = (1 - onehot).sum(dims, keepdim=True)
            total = inside + outside
            voxel_weight = torch.where(onehot > 0.5, total / inside.clamp_min(1.0), total / outside.clamp_min(1.0)).sqrt()
        ce_term = (voxel_weight * (voxel_ce + EXP_LOG_OFFSET).pow(gamma)).mean()
        return w_dice * dice_term + w_ce * ce_term

    return fn


def structure_kernel(spatial_dims: int) -> int:
    """PraNet's boundary window: 31 in 2D; 11 in 3D (11^3 = 1331 voxels, about as many as 31^2 = 961)."""
    return 31 if spatial_dims <= 2 else 11


def structure(activation: str) -> LossFn:
    """The PraNet structure loss: boundary-weighted BCE + weighted IoU (Fan et al., MICCAI 2020).

    Voxel weights are ``1 + 5 |avgpool(mask) - mask|`` with a stride-1 window of
    :func:`structure_kernel` (shrunk to the volume if it is smaller; padding not counted, so the
    volume's border is not mistaken for an edge). Sigmoid: weighted BCE + weighted IoU per channel.
    Softmax: the one-hot segmentation gives one weight map per class; each voxel's cross-entropy
    (in place of BCE) is weighted by its own class's map, and the weighted IoU on softmax
    probabilities is taken per foreground class.
    """

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = _one_hot(target, logits, activation)
        spatial_dims = logits.ndim - 2
        if spatial_dims not in _POOLS:
            raise ValueError(f"structure loss takes 1 to 3 spatial dimensions, got {spatial_dims}")
        largest_odd = min((n - 1) | 1 for n in logits.shape[2:])
        k = min(structure_kernel(spatial_dims), largest_odd)
        local_mean = _POOLS[spatial_dims](onehot, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        weight = 1 + 5 * (local_mean - onehot).abs()
        dims = _spatial(logits)
        voxel_ce = _voxel_cross_entropy(logits, target, activation)
        if activation == "softmax":
            voxel_weight = (weight * onehot).sum(1)  # each voxel's weight in its own class's map
            voxel_dims = tuple(range(1, voxel_ce.ndim))
            weighted_ce = (voxel_weight * voxel_ce).sum(voxel_dims) / voxel_weight.sum(voxel_dims)
        else:
            weighted_ce = (weight * voxel_ce).sum(dims) / weight.sum(dims)
        probs = _probabilities(logits, activation)
        inter = (probs * onehot * weight).sum(dims)
        union = ((probs + onehot) * weight).sum(dims)
        weighted_iou = _foreground(1 - (inter + 1) / (union - inter + 1), activation)
        return weighted_ce.mean() + weighted_iou.mean()

    return fn


def _lovasz_jaccard_weights(truth_by_error: torch.Tensor) -> torch.Tensor:
    """Weights of the Lovasz extension of the Jaccard loss (Berman et al., CVPR 2018), per row.

    ``truth_by_error`` is ``(R, N)``: 0/1 ground truth of each voxel, ordered by decreasing error.
    Counting the first ``i`` voxels as mistakes gives a Jaccard loss ``J_i`` (foreground voxels
    among them are missed, background ones are false alarms); the extension weighs the ``i``-th
    largest error by ``J_i - J_{i-1}``.
    """
    foreground = truth_by_error.sum(1, keepdim=True)
    missed = truth_by_error.cumsum(1)
    false_alarms = (1 - truth_by_error).cumsum(1)
    # the denominator is >= 1: either foreground > 0, or every voxel so far is a false alarm
    jaccard_loss = 1 - (foreground - missed) / (foreground + false_alarms)
    return torch.diff(jaccard_loss, dim=1, prepend=torch.zeros_like(jaccard_loss[:, :1]))


def _lovasz_extension(errors: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per row of ``(R, N)`` errors and 0/1 truth: the Lovasz-Jaccard surrogate ``sum_i e_(i) w_i``."""
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    weights = _lovasz_jaccard_weights(torch.gather(truth, 1, order))
    return (errors_sorted * weights).sum(1)


def lovasz(activation: str) -> LossFn:
    """Lovasz hinge per sigmoid channel and item, or Lovasz-softmax over each item's present classes.

    The hinge error is ``softplus(1 - s x)`` (s = +-1 the truth, x the logit) rather than Berman's
    ``relu(1 - s x)``, which is exactly flat once every voxel is right by a margin of 1; the
    gradient still decays like ``exp(-margin)`` on confidently right voxels. Lovasz-softmax uses
    errors ``|g - p_c|`` on softmax probabilities for the classes present in each item.
    """

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, c = logits.shape[:2]
        onehot = _one_hot(target, logits, activation).reshape(b * c, -1)
        if activation == "sigmoid":
            errors = F.softplus(1 - logits.reshape(b * c, -1) * (2 * onehot - 1))
            return _lovasz_extension(errors, onehot).mean()
        probs = torch.softmax(logits, 1).reshape(b * c, -1)
        per_class = _lovasz_extension((onehot - probs).abs(), onehot)
        present = onehot.sum(1) > 0  # every item has at least one class present
        return (per_class * present).view(b, c).sum(1).div(present.view(b, c).sum(1)).mean()

    return fn


def combined(activation: str) -> LossFn:
    """The paper's combined loss: 0.21 log-cosh Dice + 0.18 BCE-Dice + 0.20 exp-log + 0.15 structure + 0.26 Lovasz."""
    parts = {name: LOSSES[name](activation) for name in COMBINED_WEIGHTS}

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = [weight * parts[name](logits, target) for name, weight in COMBINED_WEIGHTS.items()]
        return torch.stack(terms).sum(0)

    return fn


# -- MONAI's losses and plain cross-entropy -----------------------------------------------------
def _monai_target(target: torch.Tensor, activation: str) -> torch.Tensor:
    return target.long() if activation == "softmax" else target.float()


def _monai_dice_type(cls: type, **options) -> LossFactory:
    """A MONAI Dice-type loss: softmax with one-hot labels and no background, or sigmoid on all channels."""

    def factory(activation: str) -> LossFn:
        if activation == "softmax":
            loss = cls(to_onehot_y=True, softmax=True, include_background=False, **options)
        else:
            loss = cls(sigmoid=True, include_background=True, **options)

        def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss(logits, _monai_target(target, activation))

        return fn

    factory.__doc__ = f"MONAI's {cls.__name__} for a softmax or sigmoid model."
    return factory


def generalized_dice(activation: str) -> LossFn:
    """MONAI's GeneralizedDiceLoss; uniform weights (Dice) for items with no foreground voxel at all."""
    softmax = activation == "softmax"
    act: dict[str, Any] = (dict(to_onehot_y=True, softmax=True, include_background=False) if softmax
                           else dict(sigmoid=True, include_background=True))
    generalized = GeneralizedDiceLoss(reduction="none", **act)
    uniform = DiceLoss(reduction="none", smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH, **act)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _monai_target(target, activation)
        per_item = generalized(logits, target).reshape(logits.shape[0])
        foreground = (target > 0) if softmax else (target > 0.5)
        empty = ~foreground.flatten(1).any(1)
        if empty.any():  # 1/|G|^2 weights are all infinite: MONAI returns a constant there
            per_item = torch.where(empty, uniform(logits, target).reshape(logits.shape[0], -1).mean(1), per_item)
        return per_item.mean()

    return fn


def focal(activation: str) -> LossFn:
    """MONAI's FocalLoss (gamma 2) over all channels: softmax with one-hot labels, or sigmoid."""
    loss = FocalLoss(to_onehot_y=True, use_softmax=True) if activation == "softmax" else FocalLoss()

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(logits, _monai_target(target, activation))

    return fn


def ce(activation: str) -> LossFn:
    """Plain cross-entropy (softmax) or binary cross-entropy with logits (sigmoid), voxel mean."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _voxel_cross_entropy(logits, target, activation).mean()

    return fn


_LN2 = math.log(2.0)
MARGIN_CAP = 1.0  # logit margin beyond which a flipped voxel stops pulling on the attack


def margin(activation: str) -> LossFn:
    """Class-balanced capped logit margin (a CW / DLR-style loss for dense outputs).

    Per voxel, ``m = z(true) - max z(other)`` (sigmoid: ``(2y - 1) z`` per channel); the loss is
    ``-max(m, -MARGIN_CAP)`` averaged over each reference class and then over the classes present.
    Unlike cross-entropy, whose gradient vanishes on confidently right voxels and stays large on
    voxels already wrong, every voxel still on its class pulls with the same weight and a voxel
    stops pulling once it is wrong by the cap, so the budget goes to voxels not yet flipped; the
    class balance keeps small structures from being drowned by the background. A targeted attack descends it
    towards the target, so there the cap is on the other side: ``-min(m, MARGIN_CAP)``, a voxel stops pulling
    once it is on target by the cap (capped as untargeted, every voxel still off target by more than the cap
    was flat: the member did nothing).
    """

    def fn(logits: torch.Tensor, target: torch.Tensor, t: int = 0, steps: int = 1, targeted: bool = False) -> torch.Tensor:
        if activation == "softmax":
            onehot = _one_hot(target, logits, activation)
            true = (logits * onehot).sum(1)
            other = logits.masked_fill(onehot.bool(), float("-inf")).amax(1)
            gap = (other - true)[None]  # (1, B, *S)
            members = onehot.movedim(1, 0)  # (C, B, *S): one mask per class
        else:
            labels = target.to(logits.dtype)
            gap = ((1 - 2 * labels) * logits)[None]  # (1, B, C, *S)
            members = torch.stack([labels, 1 - labels])  # (2, B, C, *S): each label and its complement
        dims = tuple(range(members.ndim - (logits.ndim - 2), members.ndim))
        sizes = members.sum(dims)
        capped = gap.clamp_min(-MARGIN_CAP) if targeted else gap.clamp_max(MARGIN_CAP)
        per_class = (members * capped).sum(dims) / sizes.clamp_min(1)
        present = (sizes > 0).to(per_class.dtype)
        return (per_class * present).sum() / present.sum().clamp_min(1)

    return fn


# -- step-aware and masked losses (SegPGD, CosPGD, SEA) ------------------------------------------
# These take ``(logits, target, t, steps, targeted)``: the iteration ``t`` of ``steps`` (SegPGD's
# schedule) and whether the attack descends towards a target (then "still to change" means "not
# yet on target" rather than "still right").
def _voxel_correct(logits: torch.Tensor, target: torch.Tensor, activation: str) -> torch.Tensor:
    """Whether each voxel's prediction agrees with ``target``: ``(B, *S)`` (softmax) or ``(B, C, *S)`` (sigmoid)."""
    if activation == "softmax":
        return channel_argmax(logits, 1) == _labels(target)
    return (logits > 0) == (target > 0.5)


def _still_to_change(logits: torch.Tensor, target: torch.Tensor, activation: str, targeted: bool) -> torch.Tensor:
    """The voxels an attack still has to move: right ones (untargeted) or ones not yet on target (targeted)."""
    correct = _voxel_correct(logits.detach(), target, activation)
    return ~correct if targeted else correct


def _binary_pair(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid channels as two-class problems: probabilities and one-hot ``(B, 2, C, *S)`` ("out", "in")."""
    p = torch.sigmoid(logits)
    y = target.to(logits.dtype)
    return torch.stack([1 - p, p], 1), torch.stack([1 - y, y], 1)


def segpgd(activation: str) -> LossFn:
    """SegPGD's loss (Gu et al., ECCV 2022): per-voxel CE of the right voxels weighted ``1 - lambda(t)`` and
    of the wrong ones ``lambda(t)``, ``lambda(t) = t / (2T)`` (the paper's ``(t-1)/2T`` counting from 1);
    targeted, the voxels not yet on target come first."""

    def fn(logits, target, t=0, steps=1, targeted=False):
        lam = t / (2.0 * max(1, steps))
        ce = _voxel_cross_entropy(logits, target, activation)
        first = _still_to_change(logits, target, activation, targeted)
        return torch.where(first, 1.0 - lam, lam).mul(ce).mean()

    return fn


def cospgd(activation: str) -> LossFn:
    """CosPGD's loss (Agnihotri & Keuper, ICML 2024): per-voxel CE weighted by the detached cosine between
    the predicted distribution and the one-hot target (``1 - cosine`` when targeted), so voxels already
    wrong (or already on target) pull less."""

    def fn(logits, target, t=0, steps=1, targeted=False):
        ce = _voxel_cross_entropy(logits, target, activation)
        with torch.no_grad():
            if activation == "softmax":
                cos = channel_cosine(torch.softmax(logits, 1), _one_hot(target, logits, activation))
            else:
                probs, onehot = _binary_pair(logits, target)
                cos = channel_cosine(probs, onehot)
        return ((1 - cos if targeted else cos) * ce).mean()

    return fn


def js(activation: str) -> LossFn:
    """Jensen-Shannon divergence between the predicted distribution and the one-hot target, per voxel, mean
    (SEA, Croce, Singh & Hein, ECCV 2024): bounded by ln 2, so a flipped voxel stops pulling.

    With a one-hot target it depends on the target class's probability ``p`` alone: every other class ``c``
    contributes ``p_c ln 2`` (its mixture is ``p_c / 2``), so ``JS = ((1 - p) ln 2 + p ln p - (1 + p) ln((1 + p) / 2)) / 2``,
    taken from the log-probability of the target class (one channel, where the divergence over every channel costs
    several full-size passes)."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if activation == "softmax":
            log_p = torch.log_softmax(logits, 1).gather(1, _labels(target)[:, None])
        else:  # each channel a two-class problem: the log-probability of its label
            log_p = F.logsigmoid((2 * target.to(logits.dtype) - 1) * logits)
        p = log_p.exp()
        log_m = torch.log1p(p) - _LN2  # the mixture's target-class probability, (1 + p) / 2
        return (((1 - p) * _LN2 + p * log_p - (1 + p) * log_m) / 2).mean()

    return fn


def masked_ce(activation: str) -> LossFn:
    """Cross-entropy of the voxels still to change only (SEA's masked CE): the budget goes to voxels not yet flipped."""

    def fn(logits, target, t=0, steps=1, targeted=False):
        mask = _still_to_change(logits, target, activation, targeted)
        return (_voxel_cross_entropy(logits, target, activation) * mask).mean()

    return fn


def _class_members(target: torch.Tensor, logits: torch.Tensor, activation: str) -> torch.Tensor:
    """One 0/1 mask per reference class, ``(K, B, ...)`` shaped like the per-voxel losses: softmax classes, or
    for sigmoid each label and its complement."""
    if activation == "softmax":
        return _one_hot(target, logits, activation).movedim(1, 0)
    labels = target.to(logits.dtype)
    return torch.stack([labels, 1 - labels])


def masked_ce_balanced(activation: str) -> LossFn:
    """Class-balanced masked CE: the masked CE averaged within each reference class (weights ``1/N_c``) and
    then over the classes present, so every class's Dice is pulled on alike, small ones included."""

    def fn(logits, target, t=0, steps=1, targeted=False):
        mask = _still_to_change(logits, target, activation, targeted)
        voxel = _voxel_cross_entropy(logits, target, activation) * mask
        members = _class_members(target, logits, activation)
        dims = tuple(range(members.ndim - (logits.ndim - 2), members.ndim))  # per class (and per sigmoid label)
        sizes = members.sum(dims)
        per_class = (members * voxel[None]).sum(dims) / sizes.clamp_min(1)
        present = (sizes > 0).to(per_class.dtype)
        return (per_class * present).sum() / present.sum().clamp_min(1)

    return fn


def masked_spherical(activation: str) -> LossFn:
    """Masked spherical loss (SEA): minus the target's entry of the unit-normalised logit vector
    ``z_y / ||z||`` (sigmoid: of the two-class probability vector ``p_y / ||p||``), on the voxels still
    to change; its scale does not grow with confidence, so every such voxel pulls alike.

    Unlike the other softmax losses it changes when every logit of a voxel moves by the same amount, so an attack
    gives it the network's own logits mapped back to the scan grid (:data:`RAW_LOGITS`), as SEA takes it, rather
    than the log-probabilities the other losses see (:func:`masked_spherical_logp`)."""

    def fn(logits, target, t=0, steps=1, targeted=False):
        mask = _still_to_change(logits, target, activation, targeted)
        if activation == "softmax":
            onehot = _one_hot(target, logits, activation)
            score = (logits * onehot).sum(1) / logits.norm(dim=1).clamp_min(1e-6)
        else:
            probs, onehot = _binary_pair(logits, target)
            score = (probs * onehot).sum(1) / probs.norm(dim=1).clamp_min(1e-6)
        return (-score * mask).mean()

    return fn


def masked_spherical_logp(activation: str) -> LossFn:
    """The masked spherical loss of the log-probabilities (what the scan grid's softmax logits are) rather than of
    the network's logits: it pulls hardest on the voxels closest to flipping. Which of the two breaks more depends
    on the model (APGD at 8/255 on the shipped brain SegResNet, 50 iterations: 0.774 against SEA's 0.748; on the
    tests' tiny model at 16/255, 10 iterations: 0.65 against 0.88). Sigmoid: the same as ``masked_spherical``."""
    return masked_spherical(activation)


def cosine(activation: str) -> LossFn:
    """``1 - cos`` between the predicted distribution and the one-hot target per voxel, mean: the cosine loss
    of projected-Adam attacks (Halmosi et al., ECCV 2024), bounded, so flipped voxels stop pulling."""

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if activation == "softmax":
            cos = channel_cosine(torch.softmax(logits, 1), _one_hot(target, logits, activation))
        else:
            probs, onehot = _binary_pair(logits, target)
            cos = channel_cosine(probs, onehot)
        return (1 - cos).mean()

    return fn


_FACTORIES: dict[str, LossFactory] = {
    "logcosh_dice": logcosh_dice,
    "bce_dice": bce_dice,
    "exp_log": exp_log,
    "structure": structure,
    "lovasz": lovasz,
    "combined": combined,
    "dice": _monai_dice_type(DiceLoss, smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH),
    "tversky": _monai_dice_type(TverskyLoss, alpha=TVERSKY_ALPHA_BETA[0], beta=TVERSKY_ALPHA_BETA[1],
                                smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH),
    "focal": focal,
    "generalized_dice": generalized_dice,
    "ce": ce,
    "margin": margin,
    "segpgd": segpgd,
    "cospgd": cospgd,
    "js": js,
    "masked_ce": masked_ce,
    "masked_ce_balanced": masked_ce_balanced,
    "masked_spherical": masked_spherical,
    "masked_spherical_logp": masked_spherical_logp,
    "cosine": cosine,
}
LOSSES: dict[str, LossFactory] = {name: _in_float32(factory) for name, factory in _FACTORIES.items()}
PAPER_LOSSES: tuple[str, ...] = ("logcosh_dice", "bce_dice", "exp_log", "structure", "lovasz", "combined")


def get_loss(name: str, activation: str = "softmax") -> LossFn:
    """The loss called ``name`` for a ``"softmax"`` or ``"sigmoid"`` model: ``fn(logits, target) -> scalar``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from: {', '.join(ACTIVATIONS)}")
    return LOSSES[name](activation)


def parse_losses(spec: str | Sequence[str]) -> list[str]:
    """Loss names from ``"all"`` (the paper's six), ``"a,b"`` or a list: checked, in order, without repeats."""
    tokens = spec.split(",") if isinstance(spec, str) else [t for item in spec for t in str(item).split(",")]
    names: list[str] = []
    for token in (t.strip() for t in tokens):
        if not token:
            continue
        for name in PAPER_LOSSES if token == "all" else (token,):
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; choose from: {', '.join(LOSSES)}, or all")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no loss given; choose from: {', '.join(LOSSES)}, or all")
    return names
