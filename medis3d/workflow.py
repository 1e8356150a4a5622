"""The attack and predict workflows on one scan: validate inputs, run MedIS, write every output
atomically, and measure the outcome on the volume as written (read back from disk)."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medis3d.config import AttackConfig
from medis3d.errors import InputError
from medis3d.fusion import MedIS, MedISResult
from medis3d.html_report import eps_label, size_label
from medis3d.io import channel_paths, check_scan, read_volume, write_nifti
from medis3d.io.atomic import staging_folder
from medis3d.io.outputs import (
    PERTURBATION_DESCRIPTION,
    PREDICTION_DESCRIPTION,
    adversarial_description,
    check_folder_replaceable,
    check_output_file,
    check_output_folder,
    check_replaceable_file,
    has_schema,
    is_our_prediction,
    output_lock,
    prediction_description,
    writing,
)
from medis3d.io.paths import within
from medis3d.io.volume import Volume
from medis3d.metrics import channel_norms, perturbation_norms
from medis3d.progress import notify
from medis3d.records import AttackReport, OutputsRecord, SegmentationRecord, attack_report
from medis3d.report import SCHEMA, reset_peak_memory, scan_units, write_json, write_overview
from medis3d.signals import deferred
from medis3d.target import Target, channel_names

OUTPUT_FILES = (
    "adversarial.nii.gz",
    "adversarial",  # DICOM series folder
    "perturbation.nii.gz",
    "prediction_clean.nii.gz",
    "prediction_adversarial.nii.gz",
    "prediction_clean.dcm",
    "prediction_adversarial.dcm",
    "report.json",
    "report.html",
    "overview.png",
)


def default_out_dir(name: str) -> Path:
    """``medis3d-out/<scan name>/``, beside where medis3d runs."""
    return Path("medis3d-out") / name


def check_same_grid(volume: Volume, other: Volume, what: str) -> None:
    if other.spatial_shape != volume.spatial_shape:
        raise InputError(f"{other.path}: {what} shape {other.spatial_shape} differs from the scan's {volume.spatial_shape}")
    if not np.allclose(other.affine, volume.affine, atol=1e-3, rtol=1e-4):
        raise InputError(f"{other.path}: {what} affine differs from the scan's (not on the same grid)")


def read_segmentation(path: Path, volume: Volume, target: Target, what: str) -> np.ndarray:
    """A label file on the scan's grid, in the form :meth:`Target.segment` gives."""
    seg = read_volume(path)
    check_same_grid(volume, seg, what)
    values = seg.array
    if not np.allclose(values, np.round(values)):
        raise InputError(f"{path}: {what} must hold integer labels")
    labels = np.round(values).astype(np.int64)
    if labels.min() < 0:
        raise InputError(f"{path}: {what} has negative labels")
    if target.activation == "softmax":
        if labels.shape[0] != 1:
            raise InputError(f"{path}: {what} must be a 3D label map for this model")
        if labels.max() >= target.out_channels:
            raise InputError(f"{path}: {what} has label {labels.max()}, the model has classes 0..{target.out_channels - 1}")
        return labels[0].astype(target.label_dtype)
    if labels.shape[0] == target.out_channels:
        return (labels > 0).astype(np.uint8)
    if labels.shape[0] == 1:
        if target.out_channels == 1:
            return (labels > 0).astype(np.uint8)
        if labels.max() > target.out_channels:  # silently dropped: a BraTS map's 4 (ET) on a 3-label model left ET empty
            raise InputError(f"{path}: {what} has label {labels.max()}; a 3D label map for this multi-label model holds "
                             f"0..{target.out_channels} (label k is output channel k-1): give overlapping labels as one "
                             "channel per label (4D NIfTI, channels last)")
        return np.stack([labels[0] == c + 1 for c in range(target.out_channels)]).astype(np.uint8)
    raise InputError(f"{path}: {what} has {labels.shape[0]} channels, the model has {target.out_channels}")


def read_region(path: Path, volume: Volume) -> np.ndarray:
    """The region a mask file lets the perturbation touch, ``(1, I, J, K)`` 0/1 on the scan's grid."""
    mask_volume = read_volume(Path(path))
    check_same_grid(volume, mask_volume, "mask")
    region = (mask_volume.array[:1] > 0).astype(np.float32)
    if not region.any():
        raise InputError(f"{path}: the mask is empty: nothing may be perturbed")
    return region


def _guard_inputs(out_dir: Path, inputs: Sequence[Path | None]) -> None:
    """Refuse an output folder whose outputs would overwrite one of the user's inputs."""
    resolved_out = out_dir.resolve()
    for p in inputs:
        if p is None:
            continue
        rp = Path(p).resolve()
        for name in OUTPUT_FILES + ("prediction.nii.gz",):
            if (resolved_out / name) == rp:
                raise InputError(f"{p}: refusing to write outputs over an input file; choose another --out")
        if rp.is_dir() and within(resolved_out, rp):
            raise InputError(f"{out_dir}: refusing to write outputs inside the input series folder {p}")


def check_replaceable(out: Path, names: Sequence[str]) -> None:
    """An attack's outputs replace an earlier medis3d attack's in ``out`` (its report.json says so) and nothing else."""
    check_folder_replaceable(out, names, lambda folder: has_schema(folder / "report.json", SCHEMA), "medis3d run")


def _scan_name(scan: Path | str) -> str:
    """How progress names a scan: its file or folder name (the channel files' names, comma-separated)."""
    return ", ".join(Path(p).name for p in channel_paths(scan) or [str(scan).strip()])


def run_attack(
    scan: Path | str | Volume,
    target: Target,
    options: AttackConfig,
    out_dir: Path | str | None = None,
    progress=None,
) -> AttackReport:
    """Attack one scan (a path, or a Volume already read) and write its outputs into ``out_dir``.

    ``progress(member, t, total, score)`` is called at every step; where it has ``phase(name)`` and
    ``member_done(...)`` (a :class:`medis3d.progress.Reporter`), it also hears of the phases and each member's end."""
    start = time.perf_counter()
    if isinstance(scan, Volume):
        volume = scan
    else:
        if progress is not None:
            check_scan(scan)  # a scan that is not there or not a scan is an error before any progress shows
        notify(progress, "phase", f"loading {_scan_name(scan)}")
        volume = read_volume(scan)
    out = Path(out_dir) if out_dir is not None else default_out_dir(volume.name)
    formats = options.formats(volume)
    target_file = None
    if options.target_mask is not None and str(options.target_mask) not in ("background", "foreground"):
        target_file = Path(options.target_mask)
    sources = list(volume.meta.get("dicom_files", [])) if volume.format == "dicom" else []
    sources += [v.path for v in volume.channel_volumes or []]
    _guard_inputs(out, [volume.path, options.label, target_file, options.mask, *sources])
    if not isinstance(scan, Volume):  # a DICOM series given by a folder above it: the next run would find ours there too
        for given in (Path(p) for p in channel_paths(scan) or [str(scan)]):
            if given.is_dir() and within(out, given):
                raise InputError(f"{out}: inside the input folder {given}, where the adversarial series would be found beside "
                                 "the source the next time; choose an --out outside it")
    check_output_folder(out)
    check_replaceable(out, OUTPUT_FILES)
    reset_peak_memory(target.device)  # the peak reported is this run's
    with output_lock(out):
        return _attack_and_write(volume, target, options, out, formats, target_file, progress, start)


def _attack_and_write(volume: Volume, target: Target, options: AttackConfig, out: Path, formats, target_file: Path | None,
                      progress, start: float) -> AttackReport:
    reference = read_segmentation(Path(options.label), volume, target, "label") if options.label else None
    region = read_region(Path(options.mask), volume) if options.mask is not None else None
    aim = read_segmentation(target_file, volume, target, "target") if target_file else (
        options.target_mask)
    memory_plan = None
    from medis3d.memory import auto_together, check_machine_fits, plan_memory

    model_shape = target.model_shape(volume)
    check_machine_fits(target, model_shape, volume)
    count = len(options.members)
    if options.memory_budget:
        memory_plan = plan_memory(target, model_shape, options.memory_budget,
                                  members=min(count, options.together or auto_together(target, model_shape, count)))
        if not memory_plan.fits:
            raise InputError(
                f"--memory-budget {options.memory_budget / 2**20:.3g} MB is below what any setting needs for {volume.path}: "
                f"the smallest (window batch {memory_plan.sw_batch_size}, checkpointing{', AMP' if memory_plan.amp else ''}) "
                f"is estimated at {memory_plan.estimate_bytes / 2**20:.0f} MB; give at least {math.ceil(memory_plan.estimate_bytes / 2**20)} MB"
            )
        # this volume's own target: the shared one is never changed, so the next volume starts as this one did
        target = target.configure(sw_batch_size=memory_plan.sw_batch_size, checkpoint=memory_plan.checkpoint, amp=memory_plan.amp)
        together = memory_plan.together
    else:
        # never more than the members there are (--together 100 of 4 members was reported as 100 sharing each pass;
        # under --memory-budget it already said 4)
        together = min(count, options.together or auto_together(target, model_shape, count))
    medis = options.fusion(target, progress, region)
    medis.together = together
    result = medis(volume, reference=reference, target_mask=aim)
    result.memory_plan = memory_plan
    notify(progress, "phase", "writing outputs")
    return _write_outputs(volume, target, medis, result, out, start, formats, options)


def _write_adversarial(volume: Volume, result: MedISResult, stage: Path, formats, options: AttackConfig, medis: MedIS,
                       uid_map: dict | None) -> Volume:
    """Write the adversarial scan in every asked format; return the primary one read back from disk (``uid_map``: the
    anonymised study's UIDs, shared with the SEGs)."""
    written: Volume | None = None
    budget = f"{medis.eps * 255:.3g}/255" if medis.eps_units == "normalized" else f"{medis.eps:.4g}"
    description = adversarial_description(budget, medis.norm, result.chosen.loss)  # in the file, as in the DICOM series
    untouched = result.adversarial.array == volume.array  # written as the source stores them, bit for bit
    for fmt in formats:
        if fmt == "nifti" and volume.channel_volumes:  # one file per channel, each as its source stores it
            paths = [
                write_nifti(source, stage / f"adversarial_{source.name}.nii.gz", result.adversarial.array[c : c + 1],
                            description=description, unchanged=untouched[c : c + 1])
                for c, source in enumerate(volume.channel_volumes)
            ]
            back = read_volume(",".join(str(p) for p in paths))
        elif fmt == "nifti":
            path = write_nifti(volume, stage / "adversarial.nii.gz", result.adversarial.array, description=description,
                               unchanged=untouched)
            back = read_volume(path)
        else:
            from medis3d.io.dicom import read_dicom_series, write_dicom_series

            files = write_dicom_series(
                volume,
                result.adversarial.array,
                stage / "adversarial",
                series_description=description[:64],
                derivation=f"medis3d MedIS adversarial attack, {budget}, {result.chosen.steps} steps of {result.chosen.loss}",
                anonymize=options.anonymize,
                uid_map=uid_map,
            )
            back = read_dicom_series(files[0].parent)
        if written is None:
            written = back
    assert written is not None
    return written


def _write_outputs(
    volume: Volume,
    target: Target,
    medis: MedIS,
    result: MedISResult,
    out: Path,
    start: float,
    formats: Sequence[str],
    options: AttackConfig,
) -> AttackReport:
    with writing(out):
        return _write_staged(volume, target, medis, result, out, start, formats, options)


def _write_staged(volume: Volume, target: Target, medis: MedIS, result: MedISResult, out: Path, start: float,
                  formats: Sequence[str], options: AttackConfig) -> AttackReport:
    stage = staging_folder(out, suffix=".partial")
    try:
        # Success is measured on what is written: read the file back and run the model on it.
        uid_map: dict | None = {} if options.anonymize else None  # one pseudonymous study: the series and both SEGs
        written = _write_adversarial(volume, result, stage, formats, options, medis, uid_map)
        adversarial_prediction = target.predict(written)
        delta = written.array - volume.array
        write_nifti(volume, stage / "perturbation.nii.gz", delta, dtype=np.float32, description=PERTURBATION_DESCRIPTION)
        clean_images = adversarial_images = None
        if options.seg_format == "dicom":  # each SEG references the series it segments: the source, the series written
            from medis3d.io.dicom import anonymized_headers

            if uid_map is not None:  # the source in the adversarial series' anonymised study
                clean_images = anonymized_headers(volume.meta["dicom_headers"], uid_map)
            adversarial_images = written.meta["dicom_headers"]  # formats put DICOM first where a SEG is asked
        _write_prediction(volume, target, stage, "prediction_clean", result.clean_prediction, options, clean_images)
        _write_prediction(volume, target, stage, "prediction_adversarial", adversarial_prediction, options, adversarial_images)
        norms: dict = perturbation_norms(delta, result.native_per_normalized, result.channel_scale)
        if volume.channels > 1:  # each channel's own L-inf: with several, the budget's per channel (report.json)
            norms |= channel_norms(delta, result.native_per_normalized_per_channel)
        outputs: OutputsRecord = {"adversarial_formats": list(formats), "measured_on": formats[0], "seg_format": options.seg_format,
                                  "notices": _empty_reference_notices(target, result, options) + _stored_step_notices(volume, result, medis)
                                  + _budget_notices(result, medis) + _smooth_notices(target, medis) + _output_notices(volume, formats)}
        report = attack_report(volume, target, options, medis, result, adversarial_prediction, norms, outputs, start)
        success, chosen = report["success"], result.chosen
        clean_any = np.asarray(target.masks(result.clean_prediction).any(0))
        adv_any = np.asarray(target.masks(adversarial_prediction).any(0))
        verdict = "succeeded" if success else "failed"
        units = scan_units(volume)
        write_overview(
            stage / "overview.png",
            volume.array[0],
            written.array[0],
            clean_any,
            adv_any,
            volume.affine,
            title=f"{volume.name}: attack {verdict} ({chosen.name}, {chosen.steps} steps, "
            f"{size_label(medis.norm, norms, short=True)})"
            # the figure shows the first channel only: said, so its max |delta| is not read as the verdict's over all
            + (f"; channel 1 of {volume.channels} shown" if volume.channels > 1 else ""),
            dice=_present_dice(target, result.reference, report["adversarial"]),
            reference=report["attack"]["reference"],
            units=units,
        )
        write_json(stage / "report.json", report)
        _write_attack_page(stage, report, delta, result.eps_native, units)
        check_replaceable(out, [entry.name for entry in stage.iterdir()])  # per-channel files too, and anything new since
        with deferred():  # a signal now would leave some outputs moved and others not
            out.mkdir(parents=True, exist_ok=True)
            for entry in sorted(stage.iterdir()):
                if (out / entry.name).is_dir():  # an earlier run's DICOM series: replace it whole
                    shutil.rmtree(out / entry.name)
                os.replace(entry, out / entry.name)
        report["output_dir"] = str(out)
        return report
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_attack_page(stage: Path, report: AttackReport, delta: np.ndarray, eps_native: float, units: str) -> None:
    """``report.html``: the report for a person, with the overview (already staged) and the perturbation's histogram."""
    from medis3d.html_report import attack_page
    from medis3d.io.atomic import write_text_atomic
    from medis3d.report import render_perturbation_histogram

    histogram = render_perturbation_histogram(delta, units=units, eps_native=eps_native, norm=report["attack"]["norm"])
    write_text_atomic(stage / "report.html", attack_page(report, (stage / "overview.png").read_bytes(), histogram))


def _present_dice(target: Target, reference: np.ndarray, scores: SegmentationRecord) -> dict[str, float] | float:
    """The Dice the overview's title gives: of each class present in the reference, whose mean is the report's
    ``mean_dice`` (every class's, a class absent from the reference among them, made a title's mean Dice 0.432 where
    the report's was 0.648); the report's ``mean_dice`` itself where the reference holds no class."""
    present = {target.class_name(c): scores["dice"][target.class_name(c)]
               for c, mask in zip(target.foreground_classes, target.masks(reference)) if mask.any()}
    return present or scores["mean_dice"]


def _empty_reference_notices(target: Target, result: MedISResult, options: AttackConfig) -> list[str]:
    """A notice when the reference holds none of an attacked structure: Dice 1.000 there then means nothing was added,
    not that the attack failed to take anything away."""
    if result.aim is not None:
        return []
    empty = [target.class_name(c) for c, mask in zip(target.foreground_classes, target.masks(result.reference)) if not mask.any()]
    if not empty:
        return []
    whose = "the label file" if options.label else "the model's clean prediction"
    return [f"the reference ({whose}) has no {', '.join(empty)} voxels: there is nothing to take away, an untargeted "
            "attack can only add structure, and a Dice of 1.000 there means it added none"]


def _stored_step_notices(volume: Volume, result: MedISResult, medis: MedIS) -> list[str]:
    """A notice when the budget is smaller than the step between the values a file stores (an integer type's slope,
    the smallest of a series' slices): every perturbation rounds back to the source there (Volume.quantise keeps the
    stored value within the budget), so no voxel of that file can change, whatever the attack."""
    notices = []
    sources = volume.channel_volumes or [volume]
    # each channel's own radius (with a budget per channel, its share of its own range) and native units per unit
    radii, units = result.eps_native_per_channel, result.native_per_normalized_per_channel
    for c, source in enumerate(sources):
        if not source.is_integer:
            continue
        eps = float(radii[c] if len(radii) == len(sources) else result.eps_native)
        step = float(np.min(np.abs(np.asarray(source.slope, dtype=np.float64))))
        if eps >= step * (1 - 1e-6):  # quantise's own tolerance: one stored step fits
            continue
        normalized = medis.eps_units == "normalized"
        unit = float(units[c] if len(units) == len(sources) else result.native_per_normalized)
        needed = _rounded_up(step / unit * 255 if normalized else step) + ("/255" if normalized else "")
        name = f" {source.path}" if volume.channel_volumes else ""
        notices.append(f"the budget ({'L2 ' if medis.norm == 'l2' else ''}eps {eps:.4g} native units) is below the stored "
                       f"step of the file{name} ({step:.4g} native units: {source.stored_dtype} with slope {step:.4g}), so "
                       f"no voxel of it can change and the attack cannot succeed; give at least --eps {needed}")
    return notices


def _rounded_up(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, rounded up (a budget given so is never below it)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return f"{math.ceil(value * scale - 1e-9) / scale:g}"


L2_CONVERGED_STEPS = 100  # bench/l2.py: APGD-CE at L2 8000 on the 2 mm T1 left Dice 0.268 after 20 iterations, 0.042 after 100


def _budget_notices(result: MedISResult, medis: MedIS) -> list[str]:
    """A notice when a native budget is applied to channels the model sees in their own units (the same number is a
    different share of each channel's range), and when an L2 attack failed after fewer iterations than L2 attacks need
    (measured: they converge far more slowly than L-inf ones, whose doubling from 50 to 100 moves Dice by 0.01)."""
    return _native_channels_notice(result, medis) + _l2_notice(result, medis) + _step_notice(medis)


def _smooth_notices(target: Target, medis: MedIS) -> list[str]:
    """A notice where a member asks for the smooth path (``gradient=smooth``, ``transfer``) of a preprocessing with no
    step that has a smooth stand-in: its gradient is then the standard path's, and the member runs as one without."""
    asking = [m.name for m in medis.members() if m.option("gradient") == "smooth" or float(m.option("transfer") or 0) > 0]
    if not asking or any(step.smooth_fn is not None for step in target.preprocessing.steps):
        return []
    return [f"{', '.join(asking)}: the preprocessing has no step with a smooth stand-in (a downsampling Spacing, "
            "percentile scaling), so the smooth path's gradient is the standard one's and the member runs as without it"]


def _step_notice(medis: MedIS) -> list[str]:
    """A notice where a given step (``--step`` or a member's ``step=``) is larger than eps: it is taken as eps, as
    ``evaluate`` and ``diagnose`` take it at every budget of their sweeps."""
    given = [] if medis.preset_step else [("--step", medis.step)]
    given += [(f"{m.name}'s step=", float(m.option("step"))) for m in medis.members() if m.option("step") is not None]
    units = medis.eps_units if medis.norm == "linf" else "native"  # an L2 size is no share of 255
    over = [f"{name} {eps_label(value, units)}" for name, value in given if value > medis.eps]
    if not over:
        return []
    return [f"{', '.join(over)} above eps ({eps_label(medis.eps, units)}): steps of eps were taken"]


def _native_channels_notice(result: MedISResult, medis: MedIS) -> list[str]:
    if medis.eps_units != "native" or result.channel_scale is None:
        return []
    shares = ", ".join(f"{name} {medis.eps / scale * 255:.3g}/255" for name, scale in
                       zip(channel_names(result.adversarial), result.native_per_normalized_per_channel))
    return [f"--eps-units native: eps {medis.eps:.4g} applies as given in each channel's own units, which the model "
            f"normalises apart: of each channel's range that is {shares}; --eps-units normalized gives every channel "
            "the same share of its own range"]


def _l2_notice(result: MedISResult, medis: MedIS) -> list[str]:
    if medis.norm != "l2" or result.success:
        return []
    fewest = min(int(m.option("steps") or medis.steps) for m in medis.members())  # a member's [steps=N] is its own
    if fewest >= L2_CONVERGED_STEPS:
        return []
    return [f"L2 attacks converge slowly: {fewest} iterations per member may stop far short (on the shipped brain "
            "SegResNet APGD-CE in an L2 ball of 8000 left Dice 0.268 after 20 iterations and 0.042 after 100); before "
            f"reading this as robustness, rerun with --steps {L2_CONVERGED_STEPS} (a member's own [steps=N] keeps its N) or "
            "--preset reliable, or check it with medis3d diagnose --norm l2"]


def _output_notices(volume: Volume, formats: Sequence[str]) -> list[str]:
    """What the outputs do differently from the input, said once in the report and the summary."""
    notices: list[str] = []
    if volume.format != "dicom" or "dicom" not in formats:
        return notices
    from pydicom.uid import UID

    syntax = UID(str(volume.meta.get("transfer_syntax_uid") or ""))
    if syntax and syntax.is_transfer_syntax and syntax.is_compressed:
        notices.append(f"the source series is compressed ({syntax.name}); the adversarial series is written uncompressed "
                       "(Explicit VR Little Endian), so every perturbed value is stored exactly")
    source = volume.meta.get("multi_frame_source")
    if source:
        notices.append(f"the source is one {UID(source).name} object with {volume.spatial_shape[2]} frames; the adversarial "
                       "series is written as classic single-frame images, one per frame, each referencing its source frame")
    return notices


def _write_prediction(volume: Volume, target: Target, stage: Path, name: str, labels: np.ndarray, options: AttackConfig,
                      images: list | None = None) -> None:
    """The label map as NIfTI, and as a DICOM SEG of ``images`` (the headers of the series it segments) where asked."""
    if options.seg_format == "dicom":
        from medis3d.io.dicom import write_dicom_seg

        names = {c: target.class_name(c) for c in target.foreground_classes}
        write_dicom_seg(volume, labels, stage / f"{name}.dcm", names, series_description=prediction_description(name),
                        images=images)
    write_nifti(volume, stage / f"{name}.nii.gz", labels, dtype=target.label_dtype, description=prediction_description(name))


def run_predict(scan: Path | str, target: Target, out_file: Path | str | None = None) -> tuple[Path, np.ndarray, Volume]:
    """Write the target's segmentation of ``scan`` on the scan's grid."""
    scan = Path(scan)
    volume = read_volume(scan)
    out = Path(out_file) if out_file is not None else default_out_dir(volume.name) / "prediction.nii.gz"
    if out.resolve() == scan.resolve():
        raise InputError(f"{scan}: refusing to overwrite the input with its prediction; choose another --out")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; --out names the prediction's file (.nii or .nii.gz), e.g. {out / 'prediction.nii.gz'}")
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{out}: --out must be a .nii or .nii.gz file")
    check_output_file(out)
    check_replaceable_file(out, is_our_prediction, "a prediction")
    prediction = target.predict(volume)
    write_nifti(volume, out, prediction, dtype=target.label_dtype, description=PREDICTION_DESCRIPTION)
    return out, prediction, volume
