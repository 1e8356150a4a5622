"""Robustness evaluation over a dataset: every volume x attack x loss x budget, with MedIS
fusion computed from the members, into results.csv, summary.json, robustness.png, a
Markdown report and a self-contained report.html. With victims, every adversarial made on the
source model is also scored on each victim model (transfer). Resumable: each member's outcome
is cached as it finishes."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medis3d.cache import OutcomeCache, cached_outcomes
from medis3d.errors import InputError, first_line
from medis3d.fusion import MedIS, MemberOutcome, select_member
from medis3d.html_report import (
    RISE_TOLERANCE,
    SIZES_WORDS,
    budget_words,
    dice_curves,
    distortion,
    eps_label,
    evaluation_page,
    medis_sizes,
    reference_words,
    rise_words,
    stopping_words,
)
from medis3d.io import check_scan, read_volume
from medis3d.io.atomic import write_text_atomic
from medis3d.io.nifti import is_nifti
from medis3d.io.outputs import check_folder_replaceable, check_output_folder, mark_folder, marked_by, output_lock, writing
from medis3d.io.volume import make_names_unique, safe_name, scan_name
from medis3d.metrics import (
    confusion_counts,
    dice_per_class,
    flipped_fraction,
    hd95_per_class,
    mean_dice,
    mean_iou,
    perturbation_norms,
)
from medis3d.progress import notify
from medis3d.report import clean_json
from medis3d.target import Target
from medis3d.workflow import read_region, read_segmentation

STUDY_OUTPUTS = ("results.csv", "summary.json", "robustness.png", "report.md", "report.html", "cache", "diagnose")
COLUMNS = [
    "volume", "member", "attack", "loss", "eps", "clean_dice", "adversarial_dice", "clean_dice_per_class", "adversarial_dice_per_class",
    "adversarial_hd95", "clean_mean_iou", "adversarial_mean_iou", "success", "linf_native", "l2_native",
    "linf_normalized", "l2_normalized", "steps", "time_s", "time_share_s", "flipped_fraction", "counts", "transfer",
    "stop_at_success", "found_at_eps",
]


@dataclass
class Victim:
    """A model the source's adversarials are scored on (transfer): its name as given and its target."""

    name: str
    target: Target
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def fingerprint(self) -> str:
        """:meth:`Target.fingerprint` of the victim (its weights, preprocessing, classes), computed once."""
        if self._fingerprint is None:
            self._fingerprint = self.target.fingerprint()
        return self._fingerprint


@dataclass
class _VictimCase:
    """A victim on one volume: its reference (the label, else its own clean prediction) and clean Dice."""

    victim: Victim
    reference: np.ndarray
    clean_dice: float

    def score(self, adversarial) -> dict:
        """The victim's clean and adversarial mean Dice on the adversarial volume ``adversarial``."""
        t = self.victim.target
        prediction = t.predict(adversarial)
        return {"clean_dice": self.clean_dice,
                "adversarial_dice": mean_dice(t.masks(prediction), t.masks(self.reference)), "model": self.victim.fingerprint()}


@dataclass
class Case:
    """One volume of a study: its image, and optionally its label and the mask of the region it may be perturbed in."""

    name: str
    image: Path
    label: Path | None
    mask: Path | None = None


def datalist_cases(entries: Sequence, dataset: Path, key: str, need_label: str | None = None) -> list[Case]:
    """Cases from a datalist's ``key`` entries (an image path, a list of channel paths, or ``{"image", "label",
    "mask"}``), paths relative to the datalist; with ``need_label`` (why), an entry without a label is an input error."""
    cases = []
    for entry in entries:
        image = entry.get("image") if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        mask = entry.get("mask") if isinstance(entry, dict) else None
        if not image:
            raise InputError(f"{dataset}: a {key} entry has no image: {entry!r}")
        if need_label and not label:
            raise InputError(f"{dataset}: {key} entry {image} has no label; {need_label}")
        images = [str((dataset.parent / i).resolve()) for i in image] if isinstance(image, list) else [str((dataset.parent / image).resolve())]
        cases.append(Case(scan_name(images[0]), Path(",".join(images)), (dataset.parent / label).resolve() if label else None,
                          (dataset.parent / mask).resolve() if mask else None))
    return cases


def read_datalist(dataset: Path) -> Any:
    """A datalist file's JSON, or the one-line error naming the file."""
    try:
        return json.loads(Path(dataset).read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"{dataset}: not a JSON datalist ({first_line(exc)})") from exc


def read_dataset(dataset: Path, labels: Path | None = None, masks: Path | None = None) -> list[Case]:
    """A Decathlon-style datalist (``test``, ``testing`` or ``validation``) or a folder of images, with ``labels``
    and ``masks`` folders holding files named like the images (a volume without one has none)."""
    given = {option: folder for option, folder in (("--labels", labels), ("--masks", masks)) if folder is not None}
    for option, folder in given.items():
        if not Path(folder).is_dir():
            raise InputError(f"{folder}: {option} must be a folder of files named like the images")
    dataset = Path(dataset)
    if dataset.is_file():
        if given:
            raise InputError(f"{dataset}: {' and '.join(given)} name folders for a folder of images; a datalist gives each "
                             "entry's own \"label\" and \"mask\"")
        data = read_datalist(dataset)
        entries = None
        for key in ("test", "testing", "validation"):
            if isinstance(data, dict) and data.get(key):
                entries = data[key]
                break
        if entries is None:
            raise InputError(f"{dataset}: no 'test', 'testing' or 'validation' entries")
        cases = datalist_cases(entries, dataset, key)
        return make_names_unique(cases)
    if dataset.is_dir():
        images = sorted(p for p in dataset.iterdir() if p.is_file() and is_nifti(p))
        if not images:
            raise InputError(f"{dataset}: no NIfTI images")
        cases = []
        for image in images:
            label = labels / image.name if labels is not None and (labels / image.name).is_file() else None
            mask = masks / image.name if masks is not None and (masks / image.name).is_file() else None
            cases.append(Case(scan_name(image), image, label, mask))
        return make_names_unique(cases)
    raise InputError(f"{dataset}: no such datalist or folder")


def eps_key(eps: float) -> str:
    """The text a budget is keyed by everywhere a study groups or caches by budget (six significant digits: 48/255
    and 0.188235 are one budget)."""
    return f"{eps:.6g}"


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def member_row(target: Target, case: Case, member, eps: float, result, reference, clean_pred, volume, scale,
               channel_scale: np.ndarray | None = None) -> dict:
    """One results.csv row: a member's outcome on one volume at one budget (normalised sizes in each channel's own
    range with ``channel_scale``, where the model sees the channels apart)."""
    names = [target.class_name(c) for c in target.foreground_classes]
    clean_masks, adv_masks, ref_masks = target.masks(clean_pred), target.masks(result.prediction), target.masks(reference)
    clean_d, adv_d = dice_per_class(clean_masks, ref_masks), dice_per_class(adv_masks, ref_masks)
    norms = perturbation_norms(result.adversarial - volume.array, scale, channel_scale)
    return {
        "volume": case.name, "member": member.name, "attack": member.attack, "loss": member.loss, "eps": eps,
        "clean_dice": mean_dice(clean_masks, ref_masks, clean_d),
        "adversarial_dice": mean_dice(adv_masks, ref_masks, adv_d),
        "clean_dice_per_class": json.dumps(dict(zip(names, [round(v, 6) for v in clean_d]))),
        "adversarial_dice_per_class": json.dumps(dict(zip(names, [round(v, 6) for v in adv_d]))),
        "adversarial_hd95": _mean(hd95_per_class(adv_masks, ref_masks, volume.spacing)),
        "clean_mean_iou": mean_iou(clean_masks, ref_masks),
        "adversarial_mean_iou": mean_iou(adv_masks, ref_masks),
        "success": bool(result.success), "steps": result.steps, "time_s": round(result.time_s, 3),
        "time_share_s": round(result.cost_s, 3),
        "flipped_fraction": flipped_fraction(target, result.prediction, reference),
        "counts": json.dumps(confusion_counts(target, result.prediction, reference)),
        **{k: norms[k] for k in ("linf_native", "l2_native", "linf_normalized", "l2_normalized")},
        # the budget is in each channel's own range (Budget.scale): the fusion weighs the normalised sizes (not in the CSV)
        **({"budget_per_channel": True} if getattr(result, "linf_scaled", None) is not None else {}),
    }


# what a cached row's figures mean: 2, mean Dice over the classes present in the reference (metrics.mean_dice)
ROWS_VERSION = 2


def _cache_key(case: Case, member, eps: float, setting: dict) -> dict:
    """Everything a member's row at ``eps`` depends on: the member, the case's files (their paths and contents),
    ``setting`` (the model, its run settings, the step, steps, units, seed and success threshold) and what the row's
    figures mean (:data:`ROWS_VERSION`)."""
    files = {"image": str(case.image), "label": str(case.label or "")} | ({"mask": str(case.mask)} if case.mask else {})
    contents = {"contents": [files_digest(path) for path in files.values() if path]}
    # a chain's iterations were once run twice over (steps + steps), now split (steps // 2 of the second loss)
    chain = {"chain": "split"} if member.option("then") else {}
    return {"member": member.name, "eps": eps_key(eps), **files, **contents, **setting, "rows": ROWS_VERSION, **chain}


def files_digest(path: str) -> str:
    """A digest of the contents of ``path``: a file, a folder (a DICOM series: every file in it) or channel files
    joined by commas; recomputed only where a file's size or time changed."""
    given = Path(path)
    parts = [given] if given.exists() else [Path(p) for p in path.split(",")]
    return contents_digest([f for part in parts for f in ([part] if part.is_file() else part.rglob("*") if part.is_dir() else [])])


def contents_digest(files: Sequence[Path]) -> str:
    """A digest of the contents of ``files`` (those that are files, in sorted order); recomputed only where a file's
    size or time changed."""
    stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(f) for f in files) if f.is_file())
    return _digest_of(stamps)


@functools.lru_cache(maxsize=4096)
def _digest_of(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha1()
    for name, _, _ in stamps:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def evaluate_dataset(
    target: Target,
    cases: Sequence[Case],
    out: Path,
    *,
    attacks: Sequence[str] = ("igsm",),
    losses: str | Sequence[str] = "all",
    members: str | Sequence | None = None,
    eps_list: Sequence[float],
    step: float,
    steps: int,
    eps_units: str = "normalized",
    success: float | None = None,
    seed: int = 0,
    norm: str = "linf",
    diagnose: bool = False,
    progress: Callable[[str], None] | None = None,
    steps_progress: Any = None,
    together: int | None = None,
    victims: Sequence[Victim] = (),
    source: str | None = None,
    settings: dict | None = None,
    stop_at_success: bool = False,
    preset_step: bool = False,
) -> dict:
    """Run every member on every case at every budget (cached), then write the tables, the plot and the
    reports; with ``diagnose``, the gradient-masking checks on each case at the largest budget
    (``diagnose/<case>.json``); with ``victims``, each member's adversarial is also scored on every victim
    (``transfer`` in each row, a transfer matrix in the summary). ``source`` names ``target`` there, and
    ``settings`` (the study's options and command line) go into the summary and the HTML report as they are.
    ``progress(volume)`` is called as each volume x budget (and diagnosis) ends; ``steps_progress`` (a
    :class:`medis3d.progress.Reporter`) hears each volume's phases and its members' steps.

    Each member runs all its iterations and its row is its strongest iterate (the lowest Dice it reaches in the
    budget), unless ``stop_at_success``: then it stops at its first success (faster, and enough for the success
    rate and the least-perturbation fusion, but Dice at a budget where it succeeds is where it stopped).
    ``preset_step``: ``step`` is the preset's, not the user's (:attr:`medis3d.fusion.MedIS.preset_step`).

    ``out`` is checked before any work, held against a second run, and a failed write is one line. Every case's
    files are checked first too (there, and readable as scans), so a typo in a datalist is one line before anything
    is written, not an error at that volume after the ones before it have run."""
    for case in cases:
        for path in (case.image, case.label, case.mask):
            if path is not None:
                check_scan(path)
    check_study_folder(out)
    with output_lock(out), writing(out):
        return _evaluate_dataset(target, cases, out, attacks=attacks, losses=losses, members=members, eps_list=eps_list,
                                 step=step, steps=steps, eps_units=eps_units, success=success, seed=seed, norm=norm, diagnose=diagnose,
                                 progress=progress, steps_progress=steps_progress, together=together, victims=victims,
                                 source=source, settings=settings, stop_at_success=stop_at_success, preset_step=preset_step)


def check_study_folder(out: Path) -> None:
    """Refuse an output folder a study cannot write, or one of the user's that holds a file named like its outputs
    (a study's own folder, resumed, is fine), before any work."""
    check_output_folder(out)
    check_folder_replaceable(out, STUDY_OUTPUTS, marked_by("evaluate"), "medis3d evaluate")


def run_setting(target: Target) -> dict:
    """What of the target changes a member's outcome: the model (:meth:`Target.fingerprint`: weights, preprocessing,
    classes), the attacked classes, the windows (size, overlap, blending) and mixed precision, as part of a study's
    cache key and a batch's settings."""
    setting: dict[str, Any] = {"model": target.fingerprint(),
                               "inferer": {k: v for k, v in target.window.as_dict().items() if k != "sw_batch_size"}}
    if target.attacked_classes:
        setting["classes"] = list(target.attacked_classes)
    if target.precision.enabled:
        setting["amp"] = str(target.precision.resolve(target.device))
    return setting


def _usable(row: dict | None, victims: Sequence[Victim], stop_at_success: bool) -> dict | None:
    """A cached row, or None where it lacks a victim's transfer score (or has one of another model under the victim's
    name: a victim folder retrained in place, or another one given under the same name) or succeeded under the other
    stopping rule (a member that never succeeded ran the same iterations under both; rows from before the rule was
    recorded stopped at success)."""
    if row is None:
        return None
    transfer = json.loads(row.get("transfer") or "{}")
    if row.get("success") and bool(row.get("stop_at_success", True)) != stop_at_success:
        return None
    return row if all(transfer.get(v.name, {}).get("model") == v.fingerprint() for v in victims) else None


def _evaluate_dataset(target: Target, cases: Sequence[Case], out: Path, *, attacks, losses, members, eps_list, step, steps,
                      eps_units, success, seed, diagnose, progress, steps_progress=None, norm: str = "linf", together=None,
                      victims: Sequence[Victim] = (),
                      source: str | None = None, settings: dict | None = None, stop_at_success: bool = False,
                      preset_step: bool = False) -> dict:
    cache = out / "cache"
    store = OutcomeCache(cache)
    outcome_setting = {"target": f"{target.source}:{target.name}", "step": f"{step:.6g}", "steps": steps,
                       "eps_units": eps_units, "seed": seed, "success": success, "norm": norm, **run_setting(target)}
    if preset_step and (eps_units != "normalized" or norm == "l2"):
        # the preset's step means another size there than it did (MedIS.preset_step); elsewhere it is the step it was,
        # and the key is as before, so earlier outcomes still count
        outcome_setting["preset_step"] = True
    rows: list[dict] = []
    diagnoses: dict[str, dict] = {}
    failed: list[dict] = []
    for case in cases:
        notify(steps_progress, "phase", f"loading {case.name}")
        try:
            run = _VolumeRun(target, case, store, outcome_setting, victims, together, stop_at_success)
        except InputError as exc:  # this volume's files, read now: the study goes on without it, as batch does
            failed.append({"volume": case.name, "error": str(exc)})
            notify(steps_progress, "phase", f"skipped {case.name}: {exc}")
            for _ in range(len(eps_list) + int(diagnose)):
                if progress is not None:
                    progress(case.name)
            continue
        mark_folder(out, "evaluate")  # not before a volume has loaded: a study of none leaves nothing
        for eps in eps_list:
            medis = MedIS(target, losses=losses, attacks=attacks, members_spec=members, eps=eps,
                          step=step, preset_step=preset_step,
                          steps=steps, eps_units=eps_units, success_threshold=success, seed=seed, norm=norm,
                          stop_at_success=stop_at_success, region=run.region, progress=steps_progress)
            case_rows, ran = run.rows(medis, eps)
            rows.extend(case_rows)
            if eps == max(eps_list):
                _write_case_overview(target, case, run.volume, case_rows, ran, success, cache, eps_units, norm)
            if progress is not None:
                progress(case.name)
        if diagnose:
            diagnoses[case.name] = _diagnose_case(target, case, run, out / "diagnose", max(eps_list), step,
                                                  steps, eps_units, seed, members, preset_step, norm, success)
            if progress is not None:
                progress(case.name)
    if failed and len(failed) == len(cases):
        more = f" (and {len(failed) - 1} more volume(s) could not be read)" if len(failed) > 1 else ""
        raise InputError(failed[0]["error"] + more)
    fused = fusion_rows(rows, success, norm)
    all_rows = rows + fused
    _write_csv(out / "results.csv", all_rows)
    summary = summarise(all_rows)
    summary["eps_units"] = eps_units
    summary["norm"] = norm
    summary["stop_at_success"] = bool(stop_at_success)
    # what MedIS fusion's least perturbation compared: each member's kept iterate, its first success only where it stopped there
    summary["medis_sizes"] = medis_sizes(summary)
    if target.notices:
        summary["notices"] = list(target.notices)
    summary["volumes"] = per_volume(all_rows, cache, {case.name: "label" if case.label else "clean prediction" for case in cases})
    if victims:
        summary["transfer"] = transfer_matrix(all_rows, source or "source", [v.name for v in victims])
    if diagnose:
        summary["diagnose"] = {name: {"flagged": d["flagged"], "flags": [c["check"] for c in d["checks"] if c["flagged"]],
                                      "causes": {c["check"]: c.get("cause") for c in d["checks"] if c["flagged"]}}
                               for name, d in diagnoses.items()}
    if settings is not None:
        summary["settings"] = settings
    if failed:
        summary["failed_volumes"] = failed
    write_text_atomic(out / "summary.json", json.dumps(clean_json(summary), indent=2) + "\n")
    plot_robustness(out / "robustness.png", summary, eps_units)
    write_text_atomic(out / "report.md", markdown_report(summary, len(cases), eps_units))
    write_text_atomic(out / "report.html", evaluation_page(summary, out))
    return summary


class _VolumeRun:
    """One volume of a study: its members' rows at each budget, from the store where it holds them, else run (the
    missing members together) and stored; the clean prediction and the victims' references made once, when needed."""

    def __init__(self, target: Target, case: Case, store: OutcomeCache, setting: dict, victims: Sequence[Victim],
                 together: int | None, stop_at_success: bool):
        self.target, self.case, self.store, self.setting = target, case, store, setting
        self.victims, self.together, self.stop_at_success = victims, together, stop_at_success
        self.volume = read_volume(case.image)
        if self.volume.channels > 1:  # each channel's own valid range, and its own budget where the model sees them apart
            apart = target.channels_apart(self.volume) and setting.get("eps_units") == "normalized"
            self.setting = {**setting, "channel_budgets": "own range" if apart else "own valid range"}
        self.reference = read_segmentation(case.label, self.volume, target, "label") if case.label else None
        self.region = read_region(case.mask, self.volume) if case.mask else None
        self.clean_prediction: np.ndarray | None = None
        self.per_pass: int | None = None
        self.victim_cases: list[_VictimCase] | None = None

    def rows(self, medis: MedIS, eps: float) -> tuple[list[dict], dict[str, tuple]]:
        """Every member's row at ``eps`` (in the members' order), and the outcomes of those run now, by name."""
        ran: dict[str, tuple] = {}

        def place(member) -> dict:
            return {"key": _cache_key(self.case, member, eps, self.setting), "where": self.case.name,
                    "label": safe_name(member.name), "tail": eps_key(eps)}

        def keep(member, outcome: tuple) -> dict:
            ran[member.name] = outcome
            return self.store.put(outcome=self._row(member, eps, *outcome), **place(member))

        kept = cached_outcomes(medis.members(), lambda m: m.name,
                               lambda m: _usable(self.store.get(**place(m)), self.victims, self.stop_at_success),
                               lambda missing: self._run(medis, missing, eps), keep)
        # a row cached by a run that wrote the budget another way (48/255, then 0.188235: one key at 6 digits) keeps
        # this run's eps, so the fusions group it with the members run now (it split them: two worst cases a volume);
        # ``outcome`` names the settings it was made under (its cache key's digest; not a column of results.csv), so an
        # overview drawn from it is told apart from one of the same member and budget under other settings
        return [{**kept[m.name], "eps": eps, "outcome": self.store.digest(place(m)["key"])} for m in medis.members()], ran

    def _run(self, medis: MedIS, missing: list, eps: float) -> list[tuple]:
        """The members not stored yet, batched through the network with --together: (result, setting) each."""
        from medis3d.memory import auto_together

        setting = medis.prepare(self.volume, self.reference, clean_prediction=self.clean_prediction)
        self.clean_prediction = setting.clean_prediction
        if self.per_pass is None:  # once per volume: the default needs the model-space shape (a preprocessing run)
            self.per_pass = self.together or auto_together(self.target, self.target.model_shape(self.volume), len(medis.members()))
        if self.victims and self.victim_cases is None:
            notify(medis.progress, "phase", "the victims' clean predictions")
            self.victim_cases = [_victim_case(v, self.case, self.volume) for v in self.victims]
        medis.together = self.per_pass
        notify(medis.progress, "phase", f"{self.case.name} at {eps_label(eps, self.setting['eps_units'])}: "
                                        f"{len(missing)} member(s) to run", len(missing))
        results = medis.run_members(missing, setting.budget, setting.goal, self.volume, setting.factor)
        return [(result, setting) for result in results]

    def _row(self, member, eps: float, result, setting) -> dict:
        scales = setting.scales.array() if setting.scales is not None else None
        row = member_row(self.target, self.case, member, eps, result, setting.goal.reference, setting.clean_prediction,
                         self.volume, setting.scale, scales)
        row["stop_at_success"] = bool(self.stop_at_success)
        adversarial = self.volume.with_array(result.adversarial)
        row["transfer"] = json.dumps(clean_json({vc.victim.name: vc.score(adversarial) for vc in self.victim_cases or []}))
        return clean_json(row)


def _victim_case(victim: Victim, case: Case, volume) -> _VictimCase:
    """The victim's reference on ``case`` (its label, else the victim's own clean prediction) and clean Dice."""
    t = victim.target
    clean = t.predict(volume)
    reference = read_segmentation(case.label, volume, t, "label") if case.label else clean
    return _VictimCase(victim, reference, mean_dice(t.masks(clean), t.masks(reference)))


def _overview_file(cache: Path, case: Case) -> Path:
    return cache / case.name / "overview.png"


def _write_case_overview(target: Target, case: Case, volume, case_rows: list[dict], ran: dict, success, cache: Path,
                         eps_units: str, norm: str = "linf") -> None:
    """The overview of the member the full fusion chose at the largest budget, where it ran in this session
    (a member cached by an earlier run kept no adversarial: an overview is shown only where ``overview.json``
    says it is of the member chosen now, at this budget, under this run's settings)."""
    from medis3d.report import scan_units, write_overview

    chosen = next(r for r in fusion_rows(case_rows, success, norm) if r["attack"] == "medis_full")["loss"]
    if chosen not in ran:
        return
    result, setting = ran[chosen]
    clean_any = np.asarray(target.masks(setting.clean_prediction).any(0))
    adv_any = np.asarray(target.masks(result.prediction).any(0))
    row = next(r for r in case_rows if r["member"] == chosen)
    verdict = "succeeded" if row["success"] else "failed"
    path = _overview_file(cache, case)
    write_overview(path, volume.array[0], result.adversarial[0], clean_any, adv_any, volume.affine,
                   title=f"{case.name}: {chosen} {verdict} at {eps_label(row['eps'], eps_units)}",
                   dice=row["adversarial_dice"], reference="label" if case.label else "clean prediction",
                   units=scan_units(volume))
    write_text_atomic(path.with_suffix(".json"), json.dumps(_overview_identity(row)))


def _overview_identity(row: dict) -> dict:
    """What an overview is of: the member, the budget, and the settings its outcome was made under (a rerun with
    another --steps, --seed, model ... chooses the same member at the same budget, and the earlier run's picture, its
    Dice in the title, is not this run's)."""
    return {"member": row.get("member") if row["attack"] != "medis_full" else row["loss"], "eps": eps_key(row["eps"]),
            "outcome": row.get("outcome")}


def per_volume(rows: list[dict], cache: Path, references: dict[str, str]) -> list[dict]:
    """A line per volume: clean Dice, the full fusion's and the worst case's Dice at each budget, the smallest
    budget at which the full fusion succeeded, the member it chose there (else at the largest budget), the
    members' time, what Dice was measured against (``references``: "label" or "clean prediction" per volume),
    and the overview's path where one was written."""
    volumes: dict[str, dict] = {}
    fused_rows: dict[str, list[dict]] = {}
    for r in rows:
        v = volumes.setdefault(r["volume"], {"volume": r["volume"], "clean_dice": r["clean_dice"], "medis_full": {},
                                             "worst_case": {}, "time_s": 0.0, "smallest_successful_eps": None,
                                             "winner": None, "reference": references.get(r["volume"], "clean prediction")})
        eps = eps_key(r["eps"])
        if r["attack"] in ("medis_full", "worst_case"):
            v[r["attack"]][eps] = r["adversarial_dice"]
        if r["attack"] == "medis_full":
            fused_rows.setdefault(r["volume"], []).append(r)
        elif not r["attack"].startswith(("medis", "worst")):  # the members' own time (a fusion row repeats one)
            v["time_s"] += float(r.get("time_share_s") or r["time_s"] or 0.0)  # spans overlap under --together
    for name, v in volumes.items():
        fused = sorted(fused_rows.get(name, []), key=lambda r: r["eps"])
        wins = [r for r in fused if r["success"]]
        if wins:
            v["smallest_successful_eps"], v["winner"] = wins[0]["eps"], wins[0]["loss"]
        elif fused:
            v["winner"] = fused[-1]["loss"]
        overview = cache / name / "overview.png"
        v["overview"] = None
        if fused and overview.is_file() and overview.with_suffix(".json").is_file():
            made = json.loads(overview.with_suffix(".json").read_text())  # of the member chosen now, at this budget, these settings?
            if made == _overview_identity(fused[-1]):
                v["overview"] = str(overview.relative_to(cache.parent))
    return list(volumes.values())


def transfer_matrix(rows: list[dict], source: str, victims: Sequence[str]) -> dict:
    """Mean Dice over volumes of the adversarials made on ``source``, scored on the source and on each victim:
    per budget, for the full fusion's and the worst case's choice, with each model's clean Dice."""
    out: dict = {"source": source, "victims": list(victims), "models": [source, *victims], "clean": {}, "by_eps": {}}
    fused = [r for r in rows if r["attack"] in ("medis_full", "worst_case")]
    smallest = min((r["eps"] for r in fused), default=None)
    first = [r for r in fused if r["attack"] == "medis_full" and r["eps"] == smallest]
    out["clean"][source] = _mean(r["clean_dice"] for r in first)
    for name in victims:
        out["clean"][name] = _mean(json.loads(r["transfer"])[name]["clean_dice"] for r in first)
    for r in fused:
        entry = out["by_eps"].setdefault(eps_key(r["eps"]), {}).setdefault(r["attack"], {})
        entry.setdefault(source, []).append(r["adversarial_dice"])
        scores = json.loads(r["transfer"])
        for name in victims:  # the victims asked for (a row may also hold an earlier run's)
            entry.setdefault(name, []).append(scores[name]["adversarial_dice"])
    for by_fusion in out["by_eps"].values():
        for entry in by_fusion.values():
            for name in list(entry):
                entry[name] = _mean(entry[name])
    return out


def _diagnose_case(target: Target, case: Case, run: _VolumeRun, folder: Path, eps: float, step: float, steps: int,
                   eps_units: str, seed: int, members, preset_step: bool = False, norm: str = "linf",
                   success: float | None = None) -> dict:
    """The gradient-masking checks on one case, with the study's first APGD member (else its first member) at the
    largest budget, inside the case's mask, a success being the study's; kept in ``folder/<case>.json`` with the settings they ran under, and
    run again where those differ."""
    from medis3d.diagnose import CHECKS_VERSION, DEFAULT_MEMBER, Diagnose
    from medis3d.members import parse_members

    parsed = parse_members(members or DEFAULT_MEMBER)
    chosen = next((m for m in parsed if m.attack == "apgd"), parsed[0])
    key = _cache_key(case, chosen, eps, run.setting) | {"checks": CHECKS_VERSION}
    setting = json.loads(json.dumps(key, default=str))
    path = folder / f"{case.name}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("setting") == setting:
            return kept
    result = Diagnose(target, member=chosen.name, eps=eps, step=None if preset_step else step, steps=steps, seed=seed,
                      region=run.region, norm=norm, eps_units=eps_units, success=success)(run.volume, run.reference).as_dict()
    result["setting"] = setting
    write_text_atomic(path, json.dumps(clean_json(result), indent=2))
    return result


def fusion_rows(rows: list[dict], threshold: float | None, norm: str = "linf") -> list[dict]:
    """Fusions per (volume, eps), selected from the members' recorded outcomes by :func:`select_member`:
    MedIS (least perturbation among the successful, by the size of each member's kept iterate: its strongest where
    members ran every iteration, its first success only under --stop-at-success; ``medis_sizes`` in the summary)
    over each attack's members (``medis_<attack>``) and over every member (``medis_full``), and the per-volume worst case over every member
    (``worst_case``: the member that leaves the lowest Dice, the figure a study reports, as SEA reports its
    ensemble by its own metric; ties by mean IoU. Chosen by mean IoU, the goal's measure, it could report a Dice
    above another member's where a model has several classes. The volume counts as broken there when any member
    broke it: the lowest-Dice member need not be a successful one, success being decided on mean IoU. It chooses
    among the members' outcomes at this budget and every smaller one, each inside this budget's ball: a member
    that does worse with more budget stopped short, and the worst case keeps what the smaller budget found;
    ``found_at_eps`` says which budget's adversarial it is)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    by_volume: dict[str, list[dict]] = {}
    for r in rows:
        eps = eps_key(r["eps"])  # as the cache keys it
        groups.setdefault((r["volume"], eps, f"medis_{r['attack']}"), []).append(r)
        groups.setdefault((r["volume"], eps, "medis_full"), []).append(r)
        groups.setdefault((r["volume"], eps, "worst_case"), []).append(r)
        by_volume.setdefault(r["volume"], []).append(r)
    for (volume, eps, name), members in groups.items():
        if name.startswith("medis_") and name != "medis_full" and len(members) < 2:
            continue
        if name == "worst_case":
            # every member's outcome at this budget or a smaller one: a smaller ball lies inside this one, so an
            # adversarial found there is one here too, and the worst case never rises with the budget
            within = _within(by_volume[volume], eps)
            chosen = min(within, key=lambda m: (float(m["adversarial_dice"]), float(m["adversarial_mean_iou"]),
                                                eps_key(m["eps"]) != eps))
            chosen = {**chosen, "success": any(bool(m["success"]) for m in within), "eps": members[0]["eps"],
                      "found_at_eps": chosen["eps"]}
        else:
            outcomes = [MemberOutcome(bool(m["success"]), float(m["adversarial_mean_iou"]), int(m["steps"]),
                                      float(m["linf_native"]), float(m["l2_native"]),
                                      *((float(m["linf_normalized"]), float(m["l2_normalized"])) if m.get("budget_per_channel")
                                        else (None, None))) for m in members]
            chosen = members[select_member(outcomes, goal_targeted=False, select="least", norm=norm)]
        out.append({**chosen, "attack": name, "loss": chosen.get("member") or f"{chosen['attack']}:{chosen['loss']}",
                    "member": name})
    return out


def _within(rows: list[dict], eps: str) -> list[dict]:
    """The rows at budget ``eps`` (as the cache keys it, 6 digits) or a smaller one: each inside ``eps``'s ball."""
    return [r for r in rows if float(eps_key(r["eps"])) <= float(eps)]


def _pooled_dice(options: dict[str, list[dict]], classes: list[str], choice: dict[str, int]) -> float:
    """The Dice of each class pooled over volumes (each volume's outcome ``choice[v]`` among ``options[v]``,
    per-class ``[TP, FP, FN]`` counts), averaged over the classes present in some volume's reference (as
    :func:`medis3d.metrics.mean_dice`: a class in no reference is not one the model got right)."""
    values, spurious = [], False
    for c in classes:
        tp = sum(options[v][i].get(c, [0, 0, 0])[0] for v, i in choice.items())
        fp = sum(options[v][i].get(c, [0, 0, 0])[1] for v, i in choice.items())
        fn = sum(options[v][i].get(c, [0, 0, 0])[2] for v, i in choice.items())
        if tp + fn:
            values.append(2 * tp / (2 * tp + fp + fn))
        spurious |= fp > 0
    if not values:
        return 0.0 if spurious else 1.0
    return float(np.mean(values))


def greedy_worst_case(rows: list[dict]) -> dict[str, float]:
    """SEA's dataset-level worst case (Croce et al. 2024): per eps, one member's outcome per volume, chosen
    greedily (volume by volume, repeated until nothing changes, from the first member everywhere and from each
    volume's own worst, the lower kept) to minimise the dataset Dice, the Dice of
    each class pooled over all volumes (``2 sum TP / (2 sum TP + sum FP + sum FN)``), averaged over classes.
    Per-volume mean Dice is minimised by each volume's worst member alone; a pooled metric is not. As the per-volume
    worst case, each budget's choice includes the outcomes at smaller budgets (inside its ball)."""
    members = [r for r in rows if r.get("counts") and not r["attack"].startswith(("medis", "worst"))]
    out = {}
    for eps in sorted({eps_key(r["eps"]) for r in members}, key=float):
        volumes: dict[str, list[dict]] = {}
        for r in _within(members, eps):
            volumes.setdefault(r["volume"], []).append(r)
        options = {v: [json.loads(r["counts"]) for r in rs] for v, rs in volumes.items()}
        classes = sorted({c for opts in options.values() for o in opts for c in o})
        # two starts, the first member everywhere and each volume's own worst, each refined until nothing changes:
        # one start alone can stop at a choice above another it never tries
        own_worst = {v: _own_worst(options, classes, v) for v in options}
        out[eps] = min(_pooled_dice(options, classes, _greedy(options, classes, start))
                       for start in ({v: 0 for v in options}, own_worst))
    return out


def _own_worst(options: dict[str, list[dict]], classes: list[str], volume: str) -> int:
    """The outcome of ``volume`` with the lowest Dice on that volume alone."""
    return min(range(len(options[volume])), key=lambda i: _pooled_dice(options, classes, {volume: i}))


def _greedy(options: dict[str, list[dict]], classes: list[str], choice: dict[str, int]) -> dict[str, int]:
    """``choice`` changed volume by volume to the outcome that lowers the pooled Dice most, until no change helps
    (each change lowers it, so this ends)."""
    choice = dict(choice)
    changed = True
    while changed:
        changed = False
        for v in options:
            best = min(range(len(options[v])), key=lambda i: (_pooled_dice(options, classes, {**choice, v: i}), i != choice[v]))
            changed |= best != choice[v]
            choice[v] = best
    return choice


def rises_with_budget(rows: list[dict], tolerance: float = RISE_TOLERANCE) -> list[dict]:
    """Where a member leaves a volume's Dice higher at a larger budget than at a smaller one by more than
    ``tolerance``: its smaller budget's adversarial lies inside the larger ball, so the larger budget's attack stopped
    short of it (Carlini et al., "On Evaluating Adversarial Robustness": more budget must not lower success).
    The worst case already keeps the smaller budget's outcome; these say which member to run longer."""
    by_member: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if not r["attack"].startswith(("medis", "worst")):
            by_member.setdefault((r["volume"], r.get("member") or f"{r['attack']}:{r['loss']}"), []).append(r)
    out = []
    for (volume, member), rs in by_member.items():
        lowest: dict | None = None
        for r in sorted(rs, key=lambda r: float(r["eps"])):
            if lowest is not None and float(r["eps"]) > float(lowest["eps"]) \
                    and float(r["adversarial_dice"]) > float(lowest["adversarial_dice"]) + tolerance:
                out.append({"volume": volume, "member": member, "eps": eps_key(r["eps"]), "dice": float(r["adversarial_dice"]),
                            "smaller_eps": eps_key(lowest["eps"]), "smaller_dice": float(lowest["adversarial_dice"])})
            if lowest is None or float(r["adversarial_dice"]) < float(lowest["adversarial_dice"]):
                lowest = r
    return out


def summarise(rows: list[dict]) -> dict:
    """Per member, fusion and eps: mean clean and robust Dice, attack success rate, mean distortion; which
    members the full fusion chose; SEA's greedy dataset-level worst case."""
    table: dict[str, dict] = {}
    for r in rows:
        key = r["attack"] if r["attack"].startswith(("medis", "worst")) else (r.get("member") or f"{r['attack']}:{r['loss']}")
        table.setdefault(key, {}).setdefault(eps_key(r["eps"]), []).append(r)
    summary: dict = {"per_member": {}, "fusion": {}, "loss_wins": {}, "greedy_dataset_dice": greedy_worst_case(rows),
                     "rises_with_budget": rises_with_budget(rows)}
    for key, by_eps in table.items():
        entry = {}
        for eps, rs in by_eps.items():
            succ = [r for r in rs if r["success"]]
            entry[eps] = {
                "mean_clean_dice": _mean(r["clean_dice"] for r in rs),
                "mean_robust_dice": _mean(r["adversarial_dice"] for r in rs),
                "attack_success_rate": len(succ) / len(rs),
                "mean_distortion_linf_normalized": _mean(r["linf_normalized"] for r in succ) if succ else None,
                "mean_distortion_l2_native": _mean(r["l2_native"] for r in succ) if succ else None,
                "volumes": len(rs),
            }
        summary["fusion" if key.startswith(("medis", "worst")) else "per_member"][key] = entry
    for r in rows:
        if r["attack"] == "medis_full":
            summary["loss_wins"][r["loss"]] = summary["loss_wins"].get(r["loss"], 0) + 1
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def plot_robustness(path: Path, summary: dict, units: str = "normalized") -> None:
    """``robustness.png``: mean Dice and success rate against eps, one line per member, the fusions in bold."""
    from medis3d.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(dice_curves(summary, units))


_MARKDOWN_SPECIAL = re.compile(r"[\\`*<>|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def markdown_text(text: object) -> str:
    """``text`` as Markdown shows it literally: a path's ``<x>`` is no HTML tag, its ``*y*`` no emphasis, a ``|`` no
    column; an underscore between letters (``masked_spherical``) can mark no emphasis and is left as it is."""
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), str(text))


def diagnose_words(diagnoses: dict) -> str | None:
    """One line on the volumes whose gradient-masking checks flag something (None where none does)."""
    flagged = {name: d["flags"] for name, d in diagnoses.items() if d["flagged"]}
    if not flagged:
        return None
    each = "; ".join(f"{name}: {', '.join(flags)}" for name, flags in sorted(flagged.items()))
    return (f"the gradient-masking checks flag {len(flagged)} of {len(diagnoses)} volume(s) ({each}): "
            "the attack may stop short there, so its Dice is not yet an upper bound on robustness")


def diagnose_lines(diagnoses: dict) -> list[str]:
    """report.md's section on the gradient-masking checks (``--diagnose``): each volume's flags and their likely causes."""
    lines = ["\n## Gradient-masking checks (`--diagnose`, at the largest budget)\n"]
    words = diagnose_words(diagnoses)
    lines.append(f"**Flagged:** {markdown_text(words)}.\n" if words else "No check flags any volume.\n")
    for name, d in sorted(diagnoses.items()):
        if not d["flagged"]:
            lines.append(f"- {markdown_text(name)}: no flag (`diagnose/{name}.json`)")
            continue
        causes = d.get("causes") or {}
        lines.append(f"- {markdown_text(name)}: " + "; ".join(f"**{markdown_text(check)}**" + (f": {markdown_text(causes[check])}" if causes.get(check) else "")
                                              for check in d["flags"]) + f" (`diagnose/{name}.json`)")
    return lines


def markdown_report(summary: dict, volumes: int, units: str = "normalized") -> str:
    failed = summary.get("failed_volumes") or []
    md = markdown_text
    lines = [f"# medis3d robustness evaluation\n\n{volumes - len(failed)} volume(s); {reference_words(summary)}; {stopping_words(summary)}; "
             f"{budget_words(units, summary.get('norm', 'linf'))}.\n"]
    if failed:
        lines.append(f"**{len(failed)} volume(s) not evaluated** (no figure below includes them):\n")
        lines += [f"- {md(f['volume'])}: {md(f['error'])}" for f in failed] + [""]
    lines += [f"| attack | eps | mean clean Dice | mean robust Dice | success rate | {distortion(summary, {})[0]} |",
              "|---|---|---|---|---|---|"]
    for group in ("fusion", "per_member"):
        for key, by_eps in summary[group].items():
            for eps in sorted(by_eps, key=float):
                e = by_eps[eps]
                lines.append(f"| {'**' + md(key) + '**' if group == 'fusion' else md(key)} | {eps_label(eps, units)} | {e['mean_clean_dice']:.3f} | "
                             f"{e['mean_robust_dice']:.3f} | {e['attack_success_rate']:.2f} | {distortion(summary, e)[1]} |")
    if summary.get("rises_with_budget"):
        lines.append(f"\n**{rise_words(summary['rises_with_budget'])}**\n")
        lines += [f"- {md(r['volume'])}, {md(r['member'])}: Dice {r['dice']:.3f} at {eps_label(r['eps'], units)}, "
                  f"{r['smaller_dice']:.3f} at {eps_label(r['smaller_eps'], units)}" for r in summary["rises_with_budget"]]
    if summary.get("diagnose"):
        lines += diagnose_lines(summary["diagnose"])
    if summary["loss_wins"]:
        lines.append(f"\nMembers chosen by the full fusion (by {SIZES_WORDS[medis_sizes(summary)]}): " + ", ".join(f"{md(k)} ({v})" for k, v in sorted(summary["loss_wins"].items(), key=lambda kv: -kv[1])))
    if summary.get("transfer"):
        t = summary["transfer"]
        lines.append(f"\n## Transfer: adversarials made on {md(t['source'])}, mean Dice on each model\n")
        lines.append("| adversarial | eps | " + " | ".join(md(m) for m in t["models"]) + " |")
        lines.append("|---|---|" + "---|" * len(t["models"]))
        lines.append("| clean | 0 | " + " | ".join(f"{t['clean'][m]:.3f}" for m in t["models"]) + " |")
        for eps in sorted(t["by_eps"], key=float):
            for fusion, entry in t["by_eps"][eps].items():
                lines.append(f"| {fusion} | {eps_label(eps, units)} | " + " | ".join(f"{entry.get(m, float('nan')):.3f}" for m in t["models"]) + " |")
    lines.append("\n![robustness](robustness.png)\n\nThe whole study on one page: [report.html](report.html)\n")
    return "\n".join(lines) + "\n"
