"""Reports: report.json (schema medis3d.report/1) and overview.png."""

from __future__ import annotations

import io
import json
import math
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medis3d.io.atomic import atomic_path, write_text_atomic

SCHEMA = "medis3d.report/1"


def _is_cuda(device) -> bool:
    try:
        import torch

        return device is not None and torch.device(device).type == "cuda"
    except Exception:
        return False


def reset_peak_memory(device=None) -> None:
    """Start measuring the peak anew (CUDA's allocator peak; on Linux the process's resident high-water mark)."""
    if _is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def peak_memory_mb(device=None) -> float:
    """Peak memory since :func:`reset_peak_memory`: GPU memory on CUDA, resident memory otherwise (``VmHWM``
    on Linux; elsewhere the process's lifetime peak)."""
    if _is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    from medis3d.io.limits import status_mb

    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(clean_json(data), indent=2) + "\n")


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a spatial array to RAS so the panels look the same for any input orientation."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    return nio.apply_orientation(array, nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")))


def choose_slices(delta: np.ndarray, structure: np.ndarray | None = None) -> tuple[int, int, int]:
    """Index of the plane to show along each axis of a 3-D ``delta`` (the perturbation).

    Along each axis the slice is one whose perturbation is non-zero, near the centre of ``structure``
    (a boolean mask of the same shape; its centroid, or the volume's centre when it is empty or ``None``):
    among the non-zero planes within a few voxels of the nearest one to the centre (``max(2, 10%`` of the
    structure's extent along that axis``)``), the one with most perturbation energy (sum of squares).
    A plane whose perturbation is all zero is chosen only when every plane along that axis is zero.
    This matters when the model sees the scan at a coarser grid (a 1 mm scan seen at 2 mm): whole planes
    are never read by the model, so the attack leaves them untouched.
    """
    delta = np.asarray(delta)
    if delta.ndim != 3:
        raise ValueError(f"delta must be 3-D, got shape {delta.shape}")
    mask = None if structure is None else np.asarray(structure, dtype=bool)
    if mask is not None and mask.shape != delta.shape:
        raise ValueError(f"structure has shape {mask.shape}, delta has {delta.shape}")
    if mask is not None and not mask.any():
        mask = None
    nonzero = delta != 0
    chosen = []
    for axis, size in enumerate(delta.shape):
        others = tuple(a for a in range(3) if a != axis)
        if mask is None:
            centre, extent = (size - 1) / 2.0, float(size)
        else:
            where = np.flatnonzero(mask.any(axis=others))
            counts = mask.sum(axis=others)
            centre = float((np.arange(size) * counts).sum() / counts.sum())
            extent = float(where[-1] - where[0] + 1)
        planes = np.flatnonzero(nonzero.any(axis=others))
        if planes.size == 0:
            chosen.append(int(min(max(round(centre), 0), size - 1)))
            continue
        subscripts = "ijk,ijk->" + "ijk"[axis]
        energy = np.einsum(subscripts, delta, delta, dtype=np.float64)[planes]
        distance = np.abs(planes - centre)
        near = distance <= distance.min() + max(2.0, 0.1 * extent)
        order = np.lexsort((distance[near], -energy[near]))  # most energy first, then nearest
        chosen.append(int(planes[near][order[0]]))
    return tuple(chosen)  # type: ignore[return-value]


def _dice_text(dice: float | Mapping[str, float] | None, reference: str | None) -> str:
    if dice is None:
        return ""
    if isinstance(dice, Mapping):
        values = [float(v) for v in dice.values() if v is not None and math.isfinite(float(v))]
        if not values:
            return ""
        text = f"Dice {values[0]:.3f}" if len(values) == 1 else f"mean Dice {float(np.mean(values)):.3f}"
    else:
        if not math.isfinite(float(dice)):
            return ""
        text = f"Dice {float(dice):.3f}"
    return text + (f" (reference = {reference})" if reference else "")


def figure_png(fig) -> bytes:
    """A figure's PNG bytes (80 dpi)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    return buffer.getvalue()


def new_figure(figsize: tuple[float, float]):
    """A figure drawn by Agg, outside pyplot: nothing global to switch or close, safe beside other figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def scan_units(volume) -> str:
    """The name of the scan's units in figures (colour bars, histograms): ``HU`` for a CT series (its Modality says so),
    else ``intensity units``. One rule for every command's figures: evaluate's overview said "intensity units" where
    attack's said "HU" for the same CT."""
    meta = getattr(volume, "meta", None) or {}
    return "HU" if str(meta.get("modality") or "").upper() == "CT" else "intensity units"


def render_overview(
    scan: np.ndarray,
    adversarial: np.ndarray,
    clean_mask: np.ndarray,
    adversarial_mask: np.ndarray,
    affine: np.ndarray,
    title: str = "",
    *,
    dice: float | Mapping[str, float] | None = None,
    reference: str | None = None,
    units: str = "intensity units",
) -> bytes:
    """The overview as PNG bytes: three orthogonal slices (rows) through the segmented structure, each where the
    perturbation is non-zero (:func:`choose_slices`), and six columns: scan, adversarial, perturbation (its colour
    bar in ``units``, the scan's native units), the clean and adversarial predictions overlaid, and the voxels
    lost (in the clean prediction, not the adversarial one) and gained (the reverse).

    ``scan`` and ``adversarial`` are 3-D in native units, the masks 3-D booleans, all on the grid of ``affine``;
    the panels are shown in RAS orientation whatever the file's. ``dice`` (a number, or one per class whose mean
    is shown) and ``reference`` (what it was measured against) go in the title when given.
    """
    import nibabel.orientations as nio
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ornt = nio.io_orientation(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    perm = [int(a) for a in ornt[:, 0]]
    ras_spacing = np.empty(3)
    ras_spacing[perm] = spacing
    ras_affine = affine @ nio.inv_ornt_aff(nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")), scan.shape)
    scan_c = _canonical(np.asarray(scan, dtype=np.float32), affine)
    adv_c = _canonical(np.asarray(adversarial, dtype=np.float32), affine)
    clean_c = _canonical(np.asarray(clean_mask, dtype=bool), affine)
    advm_c = _canonical(np.asarray(adversarial_mask, dtype=bool), affine)
    delta = adv_c - scan_c
    structure = clean_c if clean_c.any() else advm_c
    index = choose_slices(delta, structure)
    position = ras_affine @ np.array([*index, 1.0])
    lo, hi = (float(v) for v in np.percentile(scan_c, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    dmax = float(np.abs(delta).max()) or 1.0
    lost_c, gained_c = clean_c & ~advm_c, advm_c & ~clean_c
    views = [
        ("axial", "S", lambda a: a[:, :, index[2]].T, ras_spacing[1] / ras_spacing[0], 2),
        ("coronal", "A", lambda a: a[:, index[1], :].T, ras_spacing[2] / ras_spacing[0], 1),
        ("sagittal", "R", lambda a: a[index[0], :, :].T, ras_spacing[2] / ras_spacing[1], 0),
    ]
    # lost / gained / kept as one label image: 0 nothing, 1 kept, 2 lost, 3 gained
    change_cmap = ListedColormap([(0, 0, 0, 0), (1.0, 0.85, 0.0, 0.35), (0.9, 0.1, 0.1, 0.9), (0.0, 0.85, 1.0, 0.9)])
    columns = ["scan", "adversarial", f"perturbation (max |δ| {dmax:.3g})", "clean prediction",
               "adversarial prediction", "lost / gained"]
    fig = new_figure((17, 8.5))
    axes = fig.subplots(3, 6)
    perturbation_image = None
    for row, (name, axis_code, cut, aspect, axis) in enumerate(views):
        for col in range(6):
            ax = axes[row, col]
            if col == 2:
                perturbation_image = ax.imshow(cut(delta), cmap="seismic", vmin=-dmax, vmax=dmax, origin="lower",
                                               aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(cut(adv_c if col in (1, 4) else scan_c), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                          aspect=aspect)
            if col in (3, 4):
                mask = cut(clean_c if col == 3 else advm_c)
                if mask.any():
                    ax.imshow(np.ma.masked_where(~mask, mask.astype(np.uint8)), cmap="autumn" if col == 3 else "cool",
                              alpha=0.45, origin="lower", aspect=aspect, interpolation="nearest")
            if col == 5:
                labels = cut(clean_c & advm_c).astype(np.uint8) + 2 * cut(lost_c) + 3 * cut(gained_c)
                ax.imshow(labels, cmap=change_cmap, vmin=0, vmax=3, origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{name} ({axis_code} {position[axis]:.1f} mm)")
    fig.colorbar(perturbation_image, ax=axes[:, 2], shrink=0.8, label=f"perturbation ({units})")
    handles = [Patch(color=(0.9, 0.1, 0.1), label=f"lost ({int(lost_c.sum()):,} voxels)"),
               Patch(color=(0.0, 0.85, 1.0), label=f"gained ({int(gained_c.sum()):,} voxels)"),
               Patch(color=(1.0, 0.85, 0.0, 0.35), label="in both")]
    axes[2, 5].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)
    heading = " - ".join(t for t in (title, _dice_text(dice, reference)) if t)
    if heading:
        fig.suptitle(heading, fontsize=11)
    return figure_png(fig)


def write_overview(
    path: Path,
    scan: np.ndarray,
    adversarial: np.ndarray,
    clean_mask: np.ndarray,
    adversarial_mask: np.ndarray,
    affine: np.ndarray,
    title: str = "",
    *,
    dice: float | Mapping[str, float] | None = None,
    reference: str | None = None,
    units: str,
) -> Path:
    """Write :func:`render_overview`'s PNG to ``path`` atomically; returns ``path``. ``units``, the colour bar's, has no
    default: each command names them by :func:`scan_units` (one that fell back on a default said "intensity units" for a
    CT that attack's overview of it called "HU")."""
    png = render_overview(scan, adversarial, clean_mask, adversarial_mask, affine, title,
                          dice=dice, reference=reference, units=units)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def render_perturbation_histogram(delta: np.ndarray, units: str = "intensity units",
                                  eps_native: float | None = None, norm: str = "linf") -> bytes:
    """PNG bytes of a histogram of the perturbation's non-zero values in native ``units`` (log count axis), with how
    many voxels changed in the title. Under ``norm`` "linf" the budget ``±eps_native`` bounds each voxel and is drawn
    as dashed lines; under "l2" it bounds the whole perturbation's length, no voxel's value, so no line is drawn and
    the legend gives the perturbation's L2 against it."""
    delta = np.asarray(delta)
    total = int(delta.size)
    values = delta[delta != 0].astype(np.float64, copy=False)
    changed = int(values.size)
    fig = new_figure((6.4, 3.6))
    ax = fig.subplots()
    per_voxel = float(eps_native or 0.0) if norm == "linf" else 0.0  # the axis reaches a per-voxel budget only
    span = max(float(np.abs(values).max()) if changed else 0.0, per_voxel) or 1.0
    if changed:
        ax.hist(values, bins=np.linspace(-span, span, 102), color="tab:blue")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no voxel changed", ha="center", va="center", transform=ax.transAxes)
    if eps_native and norm == "linf":
        for x in (-eps_native, eps_native):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([], [], color="tab:red", linestyle="--", linewidth=1, label=f"budget ±{eps_native:.3g}")
        ax.legend(fontsize=8, loc="upper right")
    elif eps_native:
        length = float(np.linalg.norm(values))
        ax.plot([], [], " ", label=f"L2 {length:.4g} of budget {eps_native:.4g}\n(a length: no per-voxel bound)")
        ax.legend(fontsize=8, loc="upper right", handlelength=0)
    ax.set_xlim(-1.05 * span, 1.05 * span)
    ax.set_xlabel(f"perturbation ({units})")
    ax.set_ylabel("voxels")
    fraction = changed / total if total else 0.0
    ax.set_title(f"{changed:,} of {total:,} voxels changed ({100 * fraction:.2f}%)", fontsize=10)
    return figure_png(fig)
