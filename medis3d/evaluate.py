"""Robustness evaluation over a dataset: every volume x attack x loss x budget, with MedIS
fusion computed from the members, into results.csv, summary.json, robustness.png and a
Markdown report. Resumable: each member's outcome is cached as it finishes."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medis3d.attacks import OWN_LOSS
from medis3d.errors import InputError
from medis3d.io import read_volume
from medis3d.io.atomic import write_text_atomic
from medis3d.io.nifti import is_nifti
from medis3d.io.volume import make_names_unique, safe_name
from medis3d.medis import MedIS, select_member
from medis3d.metrics import dice_per_class, hd95_per_class, mean_iou, perturbation_norms
from medis3d.pipeline import read_segmentation
from medis3d.report import clean_json
from medis3d.target import Target

COLUMNS = [
    "volume", "attack", "loss", "eps", "clean_dice", "adversarial_dice", "clean_dice_per_class", "adversarial_dice_per_class",
    "adversarial_hd95", "clean_mean_iou", "adversarial_mean_iou", "success", "linf_native", "l2_native",
    "linf_normalized", "l2_normalized", "steps", "time_s",
]


@dataclass
class Case:
    name: str
    image: Path
    label: Path | None


def read_dataset(dataset: Path, labels: Path | None = None) -> list[Case]:
    """A Decathlon-style datalist (``test``, ``testing`` or ``validation``) or a folder of images."""
    dataset = Path(dataset)
    if dataset.is_file():
        try:
            data = json.loads(dataset.read_text())
        except ValueError as exc:
            raise InputError(f"{dataset}: not a JSON datalist ({exc})")
        entries = None
        for key in ("test", "testing", "validation"):
            if isinstance(data, dict) and data.get(key):
                entries = data[key]
                break
        if entries is None:
            raise InputError(f"{dataset}: no 'test', 'testing' or 'validation' entries")
        cases = []
        for entry in entries:
            image = entry["image"] if isinstance(entry, dict) else entry
            label = entry.get("label") if isinstance(entry, dict) else None
            image_path = (dataset.parent / image).resolve()
            label_path = (dataset.parent / label).resolve() if label else None
            cases.append(Case(safe_name(Path(image).name.split(".nii")[0]), image_path, label_path))
        return make_names_unique(cases)
    if dataset.is_dir():
        images = sorted(p for p in dataset.iterdir() if p.is_file() and is_nifti(p))
        if not images:
            raise InputError(f"{dataset}: no NIfTI images")
        cases = []
        for image in images:
            label = labels / image.name if labels is not None and (labels / image.name).is_file() else None
            cases.append(Case(safe_name(image.name.split(".nii")[0]), image, label))
        return make_names_unique(cases)
    raise InputError(f"{dataset}: no such datalist or folder")


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def member_row(target: Target, case: Case, attack: str, loss: str, eps: float, member, reference, clean_pred, volume, scale, elapsed) -> dict:
    names = [target.class_name(c) for c in target.foreground_classes]
    clean_d = dice_per_class(target.masks(clean_pred), target.masks(reference))
    adv_d = dice_per_class(target.masks(member.prediction), target.masks(reference))
    norms = perturbation_norms(member.adversarial - volume.array, scale)
    return {
        "volume": case.name, "attack": attack, "loss": loss, "eps": eps,
        "clean_dice": _mean(clean_d), "adversarial_dice": _mean(adv_d),
        "clean_dice_per_class": json.dumps(dict(zip(names, [round(v, 6) for v in clean_d]))),
        "adversarial_dice_per_class": json.dumps(dict(zip(names, [round(v, 6) for v in adv_d]))),
        "adversarial_hd95": _mean(hd95_per_class(target.masks(member.prediction), target.masks(reference), volume.spacing)),
        "clean_mean_iou": mean_iou(target.masks(clean_pred), target.masks(reference)),
        "adversarial_mean_iou": mean_iou(target.masks(member.prediction), target.masks(reference)),
        "success": bool(member.success), "steps": member.steps, "time_s": round(elapsed, 3),
        **{k: norms[k] for k in ("linf_native", "l2_native", "linf_normalized", "l2_normalized")},
    }


def evaluate_dataset(
    target: Target,
    cases: Sequence[Case],
    out: Path,
    *,
    attacks: Sequence[str],
    losses: str | Sequence[str],
    eps_list: Sequence[float],
    step: float,
    steps: int,
    eps_units: str = "normalized",
    success: float | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every member on every case at every budget (cached), then write the tables and plot."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    rows: list[dict] = []
    for case in cases:
        volume = read_volume(case.image)
        reference = read_segmentation(case.label, volume, target, "label") if case.label else None
        for eps in eps_list:
            medis = MedIS(target, losses=losses, attacks=attacks, eps=eps, step=min(step, eps), steps=steps,
                          eps_units=eps_units, success_threshold=success, seed=seed)
            pending = [(a, l) for a, l in medis.members() if not (cache / case.name / f"{a}_{l}_{eps:.6g}.json").is_file()]
            if pending:
                started = time.perf_counter()
                medis_pending = MedIS(target, losses=[l for a, l in pending if a not in OWN_LOSS] or "ce",
                                      attacks=sorted({a for a, _ in pending}), eps=eps, step=min(step, eps), steps=steps,
                                      eps_units=eps_units, success_threshold=success, seed=seed)
                result = medis_pending(volume, reference=reference)
                scale = result.native_per_normalized
                for m in result.members:
                    loss = m.loss if m.attack not in OWN_LOSS else m.attack
                    if (m.attack, loss) not in pending:
                        continue
                    row = member_row(target, case, m.attack, loss, eps, m, result.reference, result.clean_prediction, volume, scale,
                                     m.time_s or (time.perf_counter() - started))
                    write_text_atomic(cache / case.name / f"{m.attack}_{loss}_{eps:.6g}.json", json.dumps(clean_json(row)))
            if progress is not None:
                progress(case.name)
            for a, l in medis.members():
                rows.append(json.loads((cache / case.name / f"{a}_{l}_{eps:.6g}.json").read_text()))
    fused = fusion_rows(rows, success)
    all_rows = rows + fused
    _write_csv(out / "results.csv", all_rows)
    summary = summarise(all_rows)
    write_text_atomic(out / "summary.json", json.dumps(clean_json(summary), indent=2) + "\n")
    plot_robustness(out / "robustness.png", summary)
    write_text_atomic(out / "report.md", markdown_report(summary, len(cases)))
    return summary


def fusion_rows(rows: list[dict], threshold: float | None) -> list[dict]:
    """MedIS fusion per (volume, eps): over each attack's losses, and over every member ("medis_full")."""
    from medis3d.attacks import MemberResult

    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["volume"], r["eps"], r["attack"]), []).append(r)
        groups.setdefault((r["volume"], r["eps"], "medis_full"), []).append(r)
    for (volume, eps, attack), members in groups.items():
        if attack != "medis_full" and len(members) < 2:
            continue
        proxies = [MemberResult(m["attack"], m["loss"], m["success"], m["steps"], np.zeros(1), np.zeros(1), m["adversarial_mean_iou"], m["linf_native"]) for m in members]
        chosen = members[select_member(proxies, goal_targeted=False)]
        out.append({**chosen, "attack": "medis_full" if attack == "medis_full" else f"medis_{attack}", "loss": f"{chosen['attack']}:{chosen['loss']}"})
    return out


def summarise(rows: list[dict]) -> dict:
    """Per attack and eps: mean robust Dice, attack success rate, mean distortion; loss wins."""
    table: dict[str, dict] = {}
    for r in rows:
        fused = r["attack"].startswith("medis")
        key = r["attack"] if fused else f"{r['attack']}:{r['loss']}"
        table.setdefault(key, {}).setdefault(f"{r['eps']:.6g}", []).append(r)
    summary: dict = {"per_member": {}, "fusion": {}, "loss_wins": {}}
    for key, by_eps in table.items():
        entry = {}
        for eps, rs in by_eps.items():
            succ = [r for r in rs if r["success"]]
            entry[eps] = {
                "mean_clean_dice": _mean(r["clean_dice"] for r in rs),
                "mean_robust_dice": _mean(r["adversarial_dice"] for r in rs),
                "attack_success_rate": len(succ) / len(rs),
                "mean_distortion_linf_normalized": _mean(r["linf_normalized"] for r in succ) if succ else None,
                "volumes": len(rs),
            }
        summary["fusion" if key.startswith("medis") else "per_member"][key] = entry
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


def plot_robustness(path: Path, summary: dict) -> None:
    """Mean robust Dice against eps, one line per member, fusion highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medis3d.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, style in (("per_member", dict(lw=1, alpha=0.6)), ("fusion", dict(lw=3))):
        for key, by_eps in summary[group].items():
            eps = sorted(by_eps, key=float)
            ax.plot([float(e) * 255 for e in eps], [by_eps[e]["mean_robust_dice"] for e in eps], marker="o", label=key, **style)
    ax.set_xlabel("eps (x/255 of the intensity range)")
    ax.set_ylabel("mean Dice under attack")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def markdown_report(summary: dict, volumes: int) -> str:
    lines = [f"# medis3d robustness evaluation\n\n{volumes} volume(s).\n", "| attack | eps (x/255) | mean clean Dice | mean robust Dice | success rate | mean distortion (x/255) |", "|---|---|---|---|---|---|"]
    for group in ("fusion", "per_member"):
        for key, by_eps in summary[group].items():
            for eps in sorted(by_eps, key=float):
                e = by_eps[eps]
                dist = e["mean_distortion_linf_normalized"]
                lines.append(f"| {'**' + key + '**' if group == 'fusion' else key} | {float(eps) * 255:.3g} | {e['mean_clean_dice']:.3f} | "
                             f"{e['mean_robust_dice']:.3f} | {e['attack_success_rate']:.2f} | {'-' if dist is None else f'{dist * 255:.2f}'} |")
    if summary["loss_wins"]:
        lines.append("\nMembers chosen by the full fusion: " + ", ".join(f"{k} ({v})" for k, v in sorted(summary["loss_wins"].items(), key=lambda kv: -kv[1])))
    lines.append("\n![robustness](robustness.png)\n")
    return "\n".join(lines) + "\n"
