"""Segmentation metrics (MONAI's Dice, IoU, HD95) on boolean class masks, and perturbation norms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou


def _one_hot(masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[None]


def dice_per_class(pred_masks: np.ndarray, ref_masks: np.ndarray) -> list[float]:
    """Dice of each class (masks ``(N, I, J, K)``); a class empty in both counts 1, empty in one counts 0."""
    values = compute_dice(_one_hot(pred_masks), _one_hot(ref_masks), include_background=True, ignore_empty=False)
    return [float(v) for v in values[0]]


def mean_dice(pred_masks: np.ndarray, ref_masks: np.ndarray, per_class: Sequence[float] | None = None) -> float:
    """Mean Dice over the classes present in the reference, as :func:`mean_iou` (1.0 when the reference and the
    prediction are empty, 0.0 when only the reference is): a class absent from the reference is not a class the
    model got right (counted as 1, an attack that erased the one structure there was reported Dice 0.667 with
    two absent classes beside it). ``per_class``: :func:`dice_per_class` of the same masks, where it is at hand."""
    present = np.asarray(ref_masks).reshape(len(ref_masks), -1).any(1)
    if not present.any():
        return 1.0 if not np.asarray(pred_masks).any() else 0.0
    values = dice_per_class(pred_masks, ref_masks) if per_class is None else per_class
    return float(np.asarray(values)[present].mean())


def iou_per_class(pred_masks: np.ndarray, ref_masks: np.ndarray, ignore_empty: bool = False) -> list[float]:
    """IoU of each class; with ``ignore_empty`` a class absent from the reference gives NaN."""
    values = compute_iou(_one_hot(pred_masks), _one_hot(ref_masks), include_background=True, ignore_empty=ignore_empty)
    return [float(v) for v in values[0]]


def mean_iou(pred_masks: np.ndarray, ref_masks: np.ndarray) -> float:
    """Mean IoU over the classes present in the reference (1.0 when the reference and prediction are empty)."""
    values = [v for v in iou_per_class(pred_masks, ref_masks, ignore_empty=True) if not math.isnan(v)]
    if values:
        return float(np.mean(values))
    return 1.0 if not pred_masks.any() else 0.0


def smooth_mean_iou(pred_masks: np.ndarray, ref_masks: np.ndarray, smooth: float = 1.0) -> float:
    """Mean of ``(|P & R| + smooth) / (|P | R| + smooth)`` over the classes present in the prediction or the
    reference (a class empty in both says nothing of how close the two are: counted 1, it lifted a clean prediction
    with no overlap to a targeted success on a model with two more classes); 1.0 when every class is empty in both.

    Graded: against an empty reference a class scores ``1 / (|P| + 1)``, so an all-background target is reached
    only when the prediction is empty.
    """
    values = []
    for p, r in zip(pred_masks, ref_masks):
        inter = float(np.logical_and(p, r).sum())
        union = float(np.logical_or(p, r).sum())
        if union:
            values.append((inter + smooth) / (union + smooth))
    return float(np.mean(values)) if values else 1.0


def hd95_per_class(pred_masks: np.ndarray, ref_masks: np.ndarray, spacing: Sequence[float]) -> list[float | None]:
    """95th-percentile Hausdorff distance in mm per class: the scan's diagonal where one mask is empty and the
    other not (a class the attack erased is as far off as a class can be: left out, the attack that erases a class
    reported a better HD95 than one that only moved it), None where both are."""
    out: list[float | None] = []
    for p, r in zip(pred_masks, ref_masks):
        if not p.any() and not r.any():
            out.append(None)
            continue
        if not p.any() or not r.any():
            out.append(float(np.linalg.norm((np.asarray(p.shape) - 1) * np.asarray(spacing, dtype=np.float64))))
            continue
        value = compute_hausdorff_distance(
            _one_hot(p[None]), _one_hot(r[None]), include_background=True, percentile=95, spacing=list(spacing)
        )
        v = float(value.reshape(-1)[0])
        out.append(v if math.isfinite(v) else None)
    return out


def perturbation_norms(delta_native: np.ndarray, native_per_normalized: float,
                       channel_scale: np.ndarray | None = None) -> dict[str, float]:
    """L-inf and L2 of a perturbation, in native units and in fractions of the model's intensity range: of each
    channel's own with ``channel_scale`` (native units per unit of each channel's range, ``(C, 1, 1, 1)``; a scan
    whose channels the model sees in their own units): the largest channel's L-inf share, the L2 of ``delta / scale``."""
    delta = np.asarray(delta_native, dtype=np.float64)
    linf = float(np.abs(delta).max()) if delta.size else 0.0
    l2 = float(np.sqrt((delta**2).sum()))
    if channel_scale is not None:
        scaled = delta / np.asarray(channel_scale, dtype=np.float64)
        return {"linf_native": linf, "l2_native": l2, "linf_normalized": float(np.abs(scaled).max()) if scaled.size else 0.0,
                "l2_normalized": float(np.sqrt((scaled**2).sum()))}
    return {
        "linf_native": linf,
        "l2_native": l2,
        "linf_normalized": linf / native_per_normalized,
        "l2_normalized": l2 / native_per_normalized,
    }


def channel_norms(delta_native: np.ndarray, native_per_normalized: Sequence[float]) -> dict[str, list[float]]:
    """Each channel's L-inf, native and in fractions of its ``native_per_normalized`` (one per channel)."""
    delta = np.abs(np.asarray(delta_native, dtype=np.float64)).reshape(len(delta_native), -1)
    linf = [float(d.max()) if d.size else 0.0 for d in delta]
    return {"linf_native_per_channel": linf,
            "linf_normalized_per_channel": [v / float(s) for v, s in zip(linf, native_per_normalized)]}


def flipped_fraction(target, prediction: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of the reference's structure voxels (its foreground classes together) that the
    prediction no longer gives their reference class: how much of the structure the attack flipped."""
    pred, ref = target.masks(prediction), target.masks(reference)
    total = int(ref.sum())
    if total == 0:
        return 0.0
    return float((ref & ~pred).sum() / total)


def confusion_counts(target, prediction: np.ndarray, reference: np.ndarray) -> dict[str, list[int]]:
    """Per foreground class: ``[TP, FP, FN]`` voxel counts of the prediction against the reference."""
    pred, ref = target.masks(prediction), target.masks(reference)
    out = {}
    for c, p, r in zip(target.foreground_classes, pred, ref):
        out[target.class_name(c)] = [int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())]
    return out
