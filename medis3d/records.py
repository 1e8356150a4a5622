"""The report of one attack (``report.json``, schema ``medis3d.report/1``) as typed records, built from the
attack's results: what the report holds is declared here once, and :func:`attack_report` is the one place
that fills it. Writing the files (staging, the overview, the page) is the workflow's (``workflow.py``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from medis3d import threads
from medis3d.metrics import dice_per_class, flipped_fraction, hd95_per_class, iou_per_class, mean_dice, mean_iou, smooth_mean_iou
from medis3d.report import SCHEMA, peak_memory_mb

if TYPE_CHECKING:
    from medis3d.attacks import MemberResult
    from medis3d.config import AttackConfig
    from medis3d.fusion import MedIS, MedISResult
    from medis3d.io.volume import Volume
    from medis3d.target import Target


class InputRecord(TypedDict):
    path: str
    format: str
    shape: list[int]
    channels: int
    spacing: list[float]
    stored_dtype: str  # a scan given as one file per channel: its files' type, or their types comma-separated where they differ
    stored_dtype_per_channel: list[str]
    # a DICOM series: which one of the folder (a folder may hold several); None for other files, or where
    # --anonymize hides the source's UIDs
    series_instance_uid: str | None


class OutputsRecord(TypedDict):
    adversarial_formats: list[str]
    measured_on: str
    seg_format: str
    notices: list[str]


class TargetRecord(TypedDict):
    bundle: str | None
    network: str
    activation: str
    classes: dict[str, str]
    inferer: dict
    preprocessing: Any
    device: str
    threads: dict  # the CPU threads torch ran with, and why (medis3d.threads)
    settings: dict
    memory_plan: dict | None
    notices: list[str]


class AttackRecord(TypedDict):
    name: str
    config: dict  # the AttackConfig as run, whole
    preset: str
    members: list[str]
    attacks: list[str]
    norm: str
    mask: str | None
    min_eps: bool
    select: str
    targeted: bool
    target: str | None
    losses: list[str]
    eps: float
    step: float
    steps: int
    eps_units: str
    eps_native: float  # the largest of eps_native_per_channel
    eps_native_per_channel: list[float]  # each channel's radius in its own units
    step_native: float
    step_native_per_channel: list[float]
    native_per_normalized: float  # the largest of native_per_normalized_per_channel where the model sees channels apart
    native_per_normalized_per_channel: list[float]
    normalization: str
    normalization_per_channel: list[str]
    success_threshold: float
    success_metric: str
    reference: str  # "label file" or "clean prediction"
    seed: int
    together: dict


class TargetScores(TypedDict):
    mean_iou: float
    dice: dict[str, float]


class SegmentationRecord(TypedDict, total=False):
    dice: dict[str, float]
    mean_dice: float  # over the classes present in the reference (one empty in both counts 1 in ``dice``, not here)
    iou: dict[str, float]
    mean_iou: float
    hd95: dict[str, float | None]  # the scan's diagonal where a class is empty in one only, None in both
    flipped_fraction: float
    against_target: TargetScores  # targeted attacks only


class SelectedRecord(TypedDict):
    member: str
    attack: str
    loss: str
    steps: int
    linf_normalized: float
    linf_native: float
    l2_normalized: float
    l2_native: float


class TraceRecord(TypedDict):
    step: int
    loss: float | None
    score: float
    success: bool
    in_budget: bool


class MemberRecord(TypedDict):
    member: str
    attack: str
    loss: str
    success: bool
    steps: int
    linf_normalized: float
    linf_native: float
    l2_normalized: float
    l2_native: float
    mean_iou: float | None
    target_mean_iou: float | None
    time_s: float  # its wall span: under --together it holds the passes it shared, and members' spans overlap
    time_share_s: float  # its share: alone, time_s; together, its own computation and an equal share of each pass
    flipped_fraction: float
    trace: list[TraceRecord]


class AttackReport(TypedDict, total=False):
    schema: str
    input: InputRecord
    outputs: OutputsRecord
    target: TargetRecord
    attack: AttackRecord
    clean: SegmentationRecord
    adversarial: SegmentationRecord
    perturbation: dict[str, Any]  # floats, and for a scan of several channels each channel's L-inf (lists)
    flip_budgets: dict[str, float | None] | None
    success: bool
    selected: SelectedRecord
    members: list[MemberRecord]
    time_s: float
    peak_memory_mb: float
    output_dir: str  # where the outputs went: in the report run_attack returns, once they are in place (not in the file)


def segmentation_record(target: Target, prediction: np.ndarray, reference: np.ndarray, spacing) -> SegmentationRecord:
    """Dice, IoU, HD95 (mm) per foreground class, mean Dice and mean IoU and the flipped fraction of ``prediction`` against
    ``reference``."""
    pm, rm = target.masks(prediction), target.masks(reference)
    names = [target.class_name(c) for c in target.foreground_classes]
    dice = dice_per_class(pm, rm)
    return {
        "dice": dict(zip(names, dice)),
        "mean_dice": mean_dice(pm, rm, dice),
        "iou": dict(zip(names, iou_per_class(pm, rm))),
        "mean_iou": mean_iou(pm, rm),
        "hd95": dict(zip(names, hd95_per_class(pm, rm, spacing))),
        "flipped_fraction": flipped_fraction(target, prediction, reference),
    }


def target_scores(target: Target, prediction: np.ndarray, aim: np.ndarray) -> TargetScores:
    """How close ``prediction`` is to a targeted attack's aim: smoothed mean IoU and Dice per class."""
    pm, am = target.masks(prediction), target.masks(aim)
    names = [target.class_name(c) for c in target.foreground_classes]
    return {"mean_iou": smooth_mean_iou(pm, am), "dice": dict(zip(names, dice_per_class(pm, am)))}


def input_record(volume: Volume, anonymize: bool = False) -> InputRecord:
    dtypes = [str(d) for d in volume.stored_dtypes]
    stored = str(volume.stored_dtype) if not volume.channel_volumes else ",".join(dict.fromkeys(dtypes))
    record: InputRecord = {"path": str(volume.path), "format": volume.format, "shape": list(volume.spatial_shape),
                           "channels": volume.channels, "spacing": list(volume.spacing), "stored_dtype": stored,
                           "stored_dtype_per_channel": dtypes, "series_instance_uid": None}
    if volume.format == "dicom" and volume.meta.get("series_instance_uid") and not anonymize:
        record["series_instance_uid"] = str(volume.meta["series_instance_uid"])
    return record


def target_record(target: Target, result: MedISResult) -> TargetRecord:
    return {
        "bundle": target.source,
        "network": target.name,
        "activation": target.activation,
        "classes": {str(c): target.class_name(c) for c in range(target.out_channels)},
        "inferer": target.window.as_dict(),
        "preprocessing": target.preprocessing.describe(),
        "device": str(target.device),
        "threads": threads.choice(),
        "settings": target.settings(),
        "memory_plan": result.memory_plan.as_dict() if result.memory_plan is not None else None,
        "notices": list(target.notices),
    }


def attack_record(config: AttackConfig, medis: MedIS, result: MedISResult) -> AttackRecord:
    targeted = result.aim is not None
    members = medis.members()
    return {
        "name": "medis",
        "config": config.as_dict(),
        "preset": config.preset,
        "members": [m.name for m in members],
        "attacks": list(dict.fromkeys(m.attack for m in members)),
        "norm": medis.norm,
        "mask": str(config.mask) if config.mask else None,
        "min_eps": medis.min_eps,
        "select": medis.select,
        "targeted": targeted,
        "target": config.target_mask,
        "losses": list(dict.fromkeys(m.loss for m in members)),
        "eps": medis.eps,
        # the step taken, in eps's units (the preset's step is a tenth of eps under L2, and --step is capped at eps)
        "step": medis.eps * result.step_native / result.eps_native,
        "steps": medis.steps,
        "eps_units": medis.eps_units,
        "eps_native": result.eps_native,
        "eps_native_per_channel": result.eps_native_per_channel,
        "step_native": result.step_native,
        "step_native_per_channel": result.step_native_per_channel,
        "native_per_normalized": result.native_per_normalized,
        "native_per_normalized_per_channel": result.native_per_normalized_per_channel,
        "normalization": result.scale_note,
        "normalization_per_channel": result.normalization_per_channel,
        "success_threshold": result.threshold,
        "success_metric": "smoothed mean IoU vs target over foreground classes >= threshold" if targeted
        else "mean IoU vs reference over foreground classes <= threshold",
        "reference": "label file" if result.reference is not result.clean_prediction else "clean prediction",
        "seed": medis.seed,
        "together": {"members": medis.together, **(result.together or {})},
    }


def member_record(m: MemberResult, target: Target, result: MedISResult) -> MemberRecord:
    targeted = result.aim is not None
    linf_normalized, l2_normalized = result.member_normalized(m)
    return {
        "member": m.name,
        "attack": m.attack,
        "loss": m.loss,
        "success": m.success,
        "steps": m.steps,
        "linf_normalized": linf_normalized,
        "linf_native": m.linf_native,
        "l2_normalized": l2_normalized,
        "l2_native": m.l2_native,
        "mean_iou": m.score if not targeted else None,
        "target_mean_iou": m.score if targeted else None,
        "time_s": m.time_s,
        "time_share_s": m.cost_s,
        "flipped_fraction": flipped_fraction(target, m.prediction, result.reference),
        "trace": [{"step": r.step, "loss": r.loss, "score": r.score, "success": r.success, "in_budget": r.in_budget}
                  for r in m.trace],
    }


def selected_record(result: MedISResult) -> SelectedRecord:
    chosen = result.chosen
    linf_normalized, l2_normalized = result.member_normalized(chosen)
    return {"member": chosen.name, "attack": chosen.attack, "loss": chosen.loss, "steps": chosen.steps,
            "linf_normalized": linf_normalized, "linf_native": chosen.linf_native,
            "l2_normalized": l2_normalized, "l2_native": chosen.l2_native}


def attack_report(volume: Volume, target: Target, config: AttackConfig, medis: MedIS, result: MedISResult,
                  prediction: np.ndarray, perturbation: dict[str, float], outputs: OutputsRecord, start: float) -> AttackReport:
    """The report of one attack: ``prediction`` is the model's segmentation of the adversarial as written (read back
    from disk), ``perturbation`` its norms, ``outputs`` what was written, ``start`` when the run began. Success is
    decided on that prediction's scores: its mean IoU against the reference, or (targeted) against the aim."""
    adversarial = segmentation_record(target, prediction, result.reference, volume.spacing)
    if result.aim is not None:
        adversarial["against_target"] = target_scores(target, prediction, result.aim)
        success = adversarial["against_target"]["mean_iou"] >= result.threshold
    else:
        success = adversarial["mean_iou"] <= result.threshold
    report: AttackReport = {
        "schema": SCHEMA,
        "input": input_record(volume, config.anonymize),
        "outputs": outputs,
        "target": target_record(target, result),
        "attack": attack_record(config, medis, result),
        "clean": segmentation_record(target, result.clean_prediction, result.reference, volume.spacing),
        "adversarial": adversarial,
        "perturbation": perturbation,
        "flip_budgets": None if result.flip_budgets is None else {
            f"{k}_{unit}": (None if v is None else result.flip_budget(v, unit))
            for k, v in result.flip_budgets.items() for unit in ("native", "normalized")},
        "success": bool(success),
        "selected": selected_record(result),
        "members": [member_record(m, target, result) for m in result.members],
        "time_s": time.perf_counter() - start,
        "peak_memory_mb": peak_memory_mb(target.device),
    }
    if result.aim is not None:
        report["clean"]["against_target"] = target_scores(target, result.clean_prediction, result.aim)
    return report
