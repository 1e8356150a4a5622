"""Reports: report.json (schema medis3d.report/1) and overview.png."""

from __future__ import annotations

import json
import math
import resource
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


def write_json(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(clean_json(data), indent=2) + "\n")


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a spatial array to RAS so the panels look the same for any input orientation."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    return nio.apply_orientation(array, nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")))


def write_overview(
    path: Path,
    scan: np.ndarray,
    adversarial: np.ndarray,
    clean_mask: np.ndarray,
    adversarial_mask: np.ndarray,
    affine: np.ndarray,
    title: str = "",
) -> Path:
    """Three orthogonal slices through the segmented structure: scan, adversarial, perturbation
    (amplified, its scale written), and the clean and adversarial predictions overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    import nibabel.orientations as nio

    perm = [int(a) for a in nio.io_orientation(affine)[:, 0]]
    ras_spacing = np.empty(3)
    ras_spacing[perm] = spacing
    scan_c = _canonical(scan, affine)
    adv_c = _canonical(adversarial, affine)
    clean_c = _canonical(clean_mask.astype(np.uint8), affine)
    advm_c = _canonical(adversarial_mask.astype(np.uint8), affine)
    delta = adv_c - scan_c
    structure = clean_c if clean_c.any() else (advm_c if advm_c.any() else np.ones_like(clean_c))
    center = [int(round(c.mean())) for c in np.nonzero(structure)]
    lo, hi = np.percentile(scan_c, [0.5, 99.5])
    dmax = float(np.abs(delta).max()) or 1.0
    views = [
        ("axial", lambda a: a[:, :, center[2]].T, ras_spacing[1] / ras_spacing[0]),
        ("coronal", lambda a: a[:, center[1], :].T, ras_spacing[2] / ras_spacing[0]),
        ("sagittal", lambda a: a[center[0], :, :].T, ras_spacing[2] / ras_spacing[1]),
    ]
    columns = ["scan", "adversarial", f"perturbation (x{(hi - lo) / (2 * dmax):.0f}; ±{dmax:.3g})", "clean prediction", "adversarial prediction"]
    fig, axes = plt.subplots(3, 5, figsize=(16, 10))
    for row, (name, cut, aspect) in enumerate(views):
        panels = [cut(scan_c), cut(adv_c), cut(delta), cut(scan_c), cut(adv_c)]
        masks = [None, None, None, cut(clean_c), cut(advm_c)]
        for col in range(5):
            ax = axes[row, col]
            if col == 2:
                ax.imshow(panels[col], cmap="seismic", vmin=-dmax, vmax=dmax, origin="lower", aspect=aspect)
            else:
                ax.imshow(panels[col], cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
            if masks[col] is not None and masks[col].any():
                overlay = np.ma.masked_where(masks[col] == 0, masks[col])
                ax.imshow(overlay, cmap="autumn" if col == 3 else "cool", alpha=0.45, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
