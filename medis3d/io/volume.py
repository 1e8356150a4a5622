"""The Volume type: voxels in native units on the scan's own grid, with what is needed to write it back."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A scan as medis3d handles it.

    ``array`` is float32, channel-first ``(C, I, J, K)`` in the file's voxel order and in the
    scan's native units (HU for CT). ``affine`` maps voxel indices to RAS+ millimetres
    (nibabel's convention, also used for DICOM). ``stored_dtype``, ``slope`` and
    ``intercept`` describe how the file stores a voxel (``stored = (native - intercept) / slope``);
    ``slope`` and ``intercept`` broadcast over the spatial shape (DICOM slices may differ).
    ``meta`` holds format-specific details the writers need (NIfTI header, DICOM source).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    format: str = "nifti"
    stored_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    slope: Any = 1.0
    intercept: Any = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """A file-system-safe name for outputs (file name without its extensions)."""
        return "volume" if self.path is None else scan_name(self.path)

    @property
    def is_integer(self) -> bool:
        return np.issubdtype(self.stored_dtype, np.integer)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same scan (geometry, storage, metadata) holding other voxel values."""
        return replace(self, array=np.asarray(array, dtype=np.float32))

    @property
    def channel_volumes(self) -> list[Volume] | None:
        """The per-channel source volumes of a scan given as one file per channel."""
        return self.meta.get("channel_volumes")

    @property
    def stored_dtypes(self) -> list[np.dtype]:
        """How each channel is stored: its own file's type for a scan given as one file per channel."""
        if self.channel_volumes:
            return [v.stored_dtype for v in self.channel_volumes]
        return [self.stored_dtype] * self.channels

    def storable_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest native values the file's stored type can hold (broadcastable); for a scan given as one
        file per channel, each channel's own file's, ``(C, 1, 1, 1)``."""
        if self.channel_volumes:
            ranges = [v.storable_range() for v in self.channel_volumes]
            return (np.asarray([np.min(r[0]) for r in ranges], np.float64).reshape(-1, 1, 1, 1),
                    np.asarray([np.max(r[1]) for r in ranges], np.float64).reshape(-1, 1, 1, 1))
        if not self.is_integer:
            info = np.finfo(np.float32)
            return np.asarray(info.min), np.asarray(info.max)
        info = np.iinfo(self.stored_dtype)
        slope = np.asarray(self.slope, dtype=np.float64)
        intercept = np.asarray(self.intercept, dtype=np.float64)
        ends = (info.min * slope + intercept, info.max * slope + intercept)
        return np.minimum(*ends), np.maximum(*ends)

    def float32_is_coarse(self) -> bool:
        """Whether float32 (``array``'s type) may fail to tell two stored values apart once rescaled: an integer type
        whose native values can reach 2**21 stored units (``slope``) or more, where float32's rounding (2**-24 of the
        value) is no longer well below half a stored unit (an int32 series near 2**31 with slope 1e-6), or a float type
        wider than float32 (float64: near 1e9 a float32 step is 64)."""
        if self.channel_volumes:
            return any(v.float32_is_coarse() for v in self.channel_volumes)
        if not self.is_integer:
            return np.dtype(self.stored_dtype).itemsize > 4
        low, high = self.storable_range()
        largest = max(float(np.max(np.abs(low))), float(np.max(np.abs(high))))
        return largest / float(np.min(np.abs(np.asarray(self.slope, np.float64)))) >= 2**21

    def quantise(self, array: np.ndarray, clean: np.ndarray | None = None, eps: float | None = None,
                 norm: str = "linf", scale: np.ndarray | None = None) -> np.ndarray:
        """Native values as the file will hold them: rounded to the stored type and clipped. With ``clean`` and
        ``eps`` the stored perturbation stays within the ball of ``norm`` around ``clean``: L-inf, a value that
        rounding would take out of the ball is rounded toward ``clean`` instead; L2, where rounding lengthens the
        perturbation past ``eps`` (each voxel by up to half a stored step), the longest shorter perturbation along
        the same direction that still fits once stored. ``eps`` is in native units, or with ``scale`` (native units
        per unit of eps, broadcastable: one per channel, ``(C, 1, 1, 1)``) in those units: each channel's L-inf
        ball is ``eps * scale`` of its own, the L2 ball that of ``(stored - clean) / scale``."""
        if norm == "l2" and clean is not None and eps is not None:
            return self._quantise_l2(np.asarray(array, dtype=np.float64), np.asarray(clean, dtype=np.float64), float(eps),
                                     None if scale is None else np.asarray(scale, dtype=np.float64))
        array = np.asarray(array, dtype=np.float64)
        if eps is not None and scale is not None:  # each channel's own ball, in native units
            eps = np.asarray(eps, np.float64) * np.asarray(scale, np.float64)  # type: ignore[assignment]
        if self.channel_volumes:  # each channel as its own file stores it, in its own ball
            return np.stack([v.quantise(array[c : c + 1], None if clean is None else clean[c : c + 1], _channel(eps, c))[0]
                             for c, v in enumerate(self.channel_volumes)])
        if not self.is_integer:
            values = array.astype(np.float32)
            if clean is not None and eps is not None and self.float32_is_coarse():
                values = _inside_in_float32(values, np.asarray(clean, np.float32), eps)
            return values
        info = np.iinfo(self.stored_dtype)
        slope = np.asarray(self.slope, dtype=np.float64)
        intercept = np.asarray(self.intercept, dtype=np.float64)
        stored = np.rint((array - intercept) / slope)
        if clean is not None and eps is not None:
            ends = ((np.asarray(clean, np.float64) - eps - intercept) / slope, (np.asarray(clean, np.float64) + eps - intercept) / slope)
            stored = np.clip(stored, np.ceil(np.minimum(*ends) - 1e-6), np.floor(np.maximum(*ends) + 1e-6))
        stored = np.clip(stored, info.min, info.max)
        values = (stored * slope + intercept).astype(np.float32)
        if clean is not None and eps is not None and self.float32_is_coarse():
            values = _inside_in_float32(values, np.asarray(clean, np.float32), eps, slope)
        return values

    def _quantise_l2(self, array: np.ndarray, clean: np.ndarray, eps: float, units: np.ndarray | None = None) -> np.ndarray:
        """:meth:`quantise` inside the L2 ball (of ``(stored - clean) / units`` with ``units``): the stored
        perturbation's length grows with its scale (each voxel's rounded change does), so the largest scale of
        ``array - clean`` whose stored form fits is found by bisection. The length is the written change's
        (:meth:`written_change`): where float32 is coarse, the float32 values' difference could be up to half a stored
        unit a voxel shorter than the change written (an int32 file near 2**31 with slope 1e-6, 111 voxels each moved 4
        float32 steps: 10293.3 stored units written for a radius of 10288.7)."""
        delta = array - clean

        def stored(scale: float) -> tuple[np.ndarray, float]:
            values = self.quantise(clean + scale * delta)
            change = self.written_change(values, clean)
            return values, float(np.linalg.norm(change if units is None else change / units))

        values, length = stored(1.0)
        if length <= eps:
            return values
        low, high = 0.0, 1.0  # scale 0 stores the clean scan: no longer than its own rounding
        guess = eps / length * (1 - 1e-9)  # where no voxel rounds (a float scan), this one fits at once
        if stored(guess)[1] <= eps:
            low = guess
        else:
            high = guess
        while high - low > 1e-4 * high:  # the scale to a ten-thousandth: a few passes, none for a float scan
            middle = (low + high) / 2
            if stored(middle)[1] <= eps:
                low = middle
            else:
                high = middle
        return stored(low)[0]

    def written_change(self, values: np.ndarray, clean: np.ndarray) -> np.ndarray:
        """``values - clean`` (native, float64) as the writers write it: where float32 is coarse
        (:meth:`float32_is_coarse`) an integer type's change rounded to whole stored units (:meth:`stored_as_change`),
        not the difference of the float32 values (which may lie up to half a stored unit from it)."""
        if self.channel_volumes:
            return np.concatenate([v.written_change(values[c : c + 1], clean[c : c + 1])
                                   for c, v in enumerate(self.channel_volumes)])
        change = np.asarray(values, np.float64) - np.asarray(clean, np.float64)
        if not self.is_integer or not self.float32_is_coarse():
            return change
        slope = np.asarray(self.slope, np.float64)
        return np.rint(change / slope) * slope

    def stored_as_change(self, values: np.ndarray, clean: np.ndarray, original: np.ndarray | None = None,
                         read: np.ndarray | None = None) -> np.ndarray:
        """``values`` (native, any layout) in the stored type, each voxel written as the source's stored value plus its
        change from ``clean`` (``values``' clean scan, float32 as read, same layout), the change computed in float64:
        an integer type's rounded to whole stored units (through ``slope``), a float type's as it is (written
        unscaled). Where float32 is coarse (:meth:`float32_is_coarse`) rounding ``values`` alone moves voxels nobody
        changed and a change by up to half a float32 step (an int32 file near 2**31 with slope 1e-6: 122 stored units;
        a float64 one near 1e9: 32); this writes the change that was measured against the budget.

        The source's stored value is ``original`` (the source file's own: an integer type's stored integers, a float
        type's native values in float64) wherever it reads as ``clean`` (``read``: ``original`` as the reader gives it
        in float32; by default rescaled here), else ``clean``'s own stored value. A voxel whose value is ``clean``'s
        keeps ``original`` bit for bit; a changed one is exact below 2**53 (a float type's to float64's rounding of
        the sum)."""
        clean = np.asarray(clean, np.float32)
        change = np.asarray(values, np.float64) - clean.astype(np.float64)
        if self.is_integer:
            info = np.iinfo(self.stored_dtype)
            slope = np.broadcast_to(np.asarray(self.slope, np.float64), clean.shape)
            intercept = np.broadcast_to(np.asarray(self.intercept, np.float64), clean.shape)
            change = np.rint(change / slope)
            base = self.to_stored(clean)
            if original is not None and read is None:
                read = (np.asarray(original, np.float64) * slope + intercept).astype(np.float32)
        else:
            info = np.finfo(self.stored_dtype)
            base = clean.astype(self.stored_dtype)
            if original is not None and read is None:
                read = np.asarray(original).astype(np.float32)
        if original is not None:
            base = np.where(np.asarray(read) == clean, np.asarray(original).astype(self.stored_dtype), base)
        out = np.array(base, dtype=self.stored_dtype, copy=True)
        moved = change != 0
        out[moved] = np.clip(base[moved].astype(np.float64) + change[moved], info.min, info.max).astype(self.stored_dtype)
        return out

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """Native values converted to the stored type (after :meth:`quantise` semantics)."""
        if not self.is_integer:
            return np.asarray(array, dtype=self.stored_dtype)
        info = np.iinfo(self.stored_dtype)
        slope = np.asarray(self.slope, dtype=np.float64)
        intercept = np.asarray(self.intercept, dtype=np.float64)
        stored = np.clip(np.rint((np.asarray(array, np.float64) - intercept) / slope), info.min, info.max)
        return stored.astype(self.stored_dtype)


def _inside_in_float32(values: np.ndarray, clean: np.ndarray, eps, slope: np.ndarray | None = None) -> np.ndarray:
    """``values`` (float32) each moved toward ``clean`` by float32 steps until its change as the writers write it
    (:meth:`Volume.stored_as_change`: with ``slope``, an integer type's, rounded to stored units; without, a float
    type's, as it is) is no more than ``eps`` (in whole stored units). Where float32 is coarser than a stored unit (an
    int32 series near 2**31 with slope 1e-6: 244 units a step) the value nearest a stored value in the ball can lie up
    to half a float32 step outside it (measured: 110 units over a budget of 31481); in a float64 file near 1e9 the
    attack's float32 ``clean + delta`` rounds as far past the ball (a change of 128 for a budget of 100); elsewhere
    nothing moves."""
    if slope is None:  # a float type: its change itself
        most = np.asarray(eps, np.float64)
    else:
        slope = np.abs(slope)
        most = np.floor(np.asarray(eps, np.float64) / slope + 1e-6)  # the ball's radius in whole stored units
    for _ in range(8):  # one step a voxel is enough (the excess is under half a float32 step); a few for safety
        change = np.abs(values.astype(np.float64) - clean)
        over = (change if slope is None else np.rint(change / slope)) > most
        if not over.any():
            break
        values = np.where(over, np.nextafter(values, clean), values)
    return values


def _channel(eps, c: int):
    """Channel ``c``'s entry of an L-inf radius: ``eps`` itself where it is one for every channel."""
    if eps is None or np.ndim(eps) == 0:
        return eps
    return float(np.asarray(eps).reshape(-1)[c])


def scan_name(path: Path | str) -> str:
    """A scan's name for its outputs: the file (or folder) name without ``.nii.gz``, ``.nii`` or ``.dcm``, made safe."""
    base = Path(path).name
    for ext in (".nii.gz", ".nii", ".dcm"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return safe_name(base)


def safe_name(text: str, default: str = "volume") -> str:
    """Letters, digits, '.', '_' and '-' only; never a path."""
    cleaned = "".join(c if (c.isalnum() or c in "._-") else "_" for c in str(text)).strip("._")
    return cleaned[:120] or default


def make_names_unique(items: list, key: Callable[[Any], str] | None = None,
                      owns: Callable[[Any], bool] | None = None) -> list:
    """Give items (with a ``name`` attribute) unique names.

    Without ``key`` a repeat becomes ``name_2``, ``name_3``... in order. With ``key`` (an item's stable identity, such
    as its relative path) a shared name stays with the one item that ``owns`` it (its name is its own text, not one
    made safe), if exactly one does, and each other becomes ``name_<8 hex digits of its key's SHA-1>``: no item's name
    then depends on which other items there are, so a file added or removed never renames another one."""
    if key is not None:
        groups: dict[str, list] = {}
        for item in items:
            groups.setdefault(item.name, []).append(item)
        for name, group in groups.items():
            if len(group) < 2:
                continue
            owners = [item for item in group if owns is not None and owns(item)]
            for item in group:
                if len(owners) != 1 or item is not owners[0]:
                    item.name = f"{name}_{hashlib.sha1(key(item).encode()).hexdigest()[:8]}"
    seen: dict[str, int] = {}
    for item in items:  # what is still repeated (none, unless a file is named like another's hashed name)
        n = seen.get(item.name, 0)
        seen[item.name] = n + 1
        if n:
            item.name = f"{item.name}_{n + 1}"
    return items
