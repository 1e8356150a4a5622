"""NIfTI reading and writing that keeps the scan's grid, orientation and stored type."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from medis3d.errors import InputError, first_line
from medis3d.io.atomic import atomic_path
from medis3d.io.limits import check_readable, human
from medis3d.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_description(path: Path | str) -> str:
    """The header description (``descrip``) of the NIfTI file at ``path``; empty where it has none or cannot be read."""
    try:
        header = nib.load(str(path)).header
        raw = header["descrip"] if isinstance(header, nib.Nifti1Header) else b""  # NIfTI-2's header is one too
    except Exception:  # not a NIfTI file: it has no description of ours
        return ""
    return bytes(np.asarray(raw).item()).decode("ascii", "replace").rstrip("\x00").strip()


def open_nifti(path: Path | str):
    """The NIfTI image at ``path`` with its header read and its voxel data not yet (nibabel's proxy)."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except Exception as exc:  # nibabel raises many types for a file it cannot parse
        raise InputError(f"{path}: not a readable NIfTI volume ({first_line(exc)})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI volume")
    return image


def read_nifti(path: Path | str) -> Volume:
    """Read a 3D (or 4D multi-channel) NIfTI file into a channel-first :class:`Volume`."""
    path = Path(path)
    image = open_nifti(path)
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:  # (I, J, K, 1) is still 3D
        shape = shape[:-1]
    if len(shape) not in (3, 4) or min(shape[:3]) < 2:
        raise InputError(f"{path}: expected a 3D volume (or 4D with channels last), got shape {tuple(image.shape)}")
    _check_size(path, image)
    if np.dtype(image.get_data_dtype()).kind == "c":  # nibabel would drop the imaginary part with a numpy warning
        raise InputError(f"{path}: complex-valued voxels ({image.get_data_dtype()}); give a real-valued image (the magnitude)")
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:
        raise InputError(f"{path}: voxel data cannot be read ({first_line(exc)})") from exc
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {bad} voxel(s) are NaN or infinite")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the header's geometry cannot be interpreted (voxel-to-world matrix "
                         f"{np.array2string(affine[:3], precision=4, separator=',').replace(chr(10), '')}: not finite or singular)")
    array = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    # nibabel moves the header's scaling onto the data proxy when it loads a file
    slope = getattr(image.dataobj, "slope", None)
    intercept = getattr(image.dataobj, "inter", None)
    return Volume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        affine=affine,
        path=path,
        format="nifti",
        stored_dtype=np.dtype(image.get_data_dtype()),
        slope=1.0 if slope is None or not np.isfinite(slope) else float(slope),
        intercept=0.0 if intercept is None or not np.isfinite(intercept) else float(intercept),
        meta={"header": image.header.copy()},
    )


def _check_size(path: Path, image) -> None:
    """Refuse a header that claims more voxel data than the file holds (uncompressed files) or than
    memory can take, before anything is allocated."""
    voxels = math.prod(int(n) for n in image.shape)
    stored = voxels * np.dtype(image.get_data_dtype()).itemsize
    offset = int(getattr(image.dataobj, "offset", 0) or 0)
    if not path.name.lower().endswith(".gz"):
        have = path.stat().st_size - offset
        if have < stored:
            raise InputError(f"{path}: the header describes {'x'.join(map(str, image.shape))} {image.get_data_dtype()} voxels "
                             f"({human(stored)}), but the file holds {human(max(have, 0))} of voxel data: truncated, or a wrong header")
    check_readable(path, image.shape)


def write_nifti(volume: Volume, path: Path | str, array: np.ndarray | None = None, *, dtype=None,
                description: str | None = None, unchanged: np.ndarray | None = None) -> Path:
    """Write ``array`` (default: the volume's own) on ``volume``'s grid, atomically.

    Without ``dtype`` the file stores values as the source does (quantised and clipped for
    integer types, same slope and intercept; float types as they are, unscaled), with the source's header. With
    ``dtype`` the file is a map derived from the scan, not the scan: values are written as that type with no scaling,
    the scan's display window (``cal_min``/``cal_max``) is cleared so a viewer scales the map by its own values, and
    the intent says what it is: ``NIFTI_INTENT_LABEL`` for an integer type (a label map), none for a float type
    (a perturbation). ``description`` replaces the source's header description (``descrip``, 79 ASCII characters at
    most), so a file says what it is.

    ``unchanged`` (a boolean map shaped like ``array``: the voxels left as the source had them) keeps those voxels'
    stored values exactly as the source file at ``volume.path`` holds them, where float32 (the array's type) cannot
    hold every value of the stored type (float64, 32- and 64-bit integers): without it such a file would change at
    voxels nothing touched. Where float32 cannot tell the stored values apart (:meth:`Volume.float32_is_coarse`: int32
    near 2**31, a float32 step 128 stored units, 244 with scl_slope 1e-6; float64) each voxel is written as the source
    file's stored value plus its change from ``volume.array``, in float64 (an integer type's rounded;
    :meth:`Volume.stored_as_change`, as the DICOM writer does): rounding the float32 value itself took a change up to
    half a float32 step past the budget.
    """
    path = Path(path)
    values = _file_layout(volume.array if array is None else np.asarray(array))
    header = volume.meta.get("header")
    header = header.copy() if header is not None else nib.Nifti1Header()
    if dtype is None:
        stored = volume.to_stored(values)
        source: tuple[np.ndarray | None, np.ndarray | None] | None = None  # the source file's values, where read
        slope, intercept = volume.slope, volume.intercept
        if not volume.is_integer:  # float values are stored as they are: the source's scaling would be applied twice
            slope, intercept = 1.0, 0.0
        if np.ndim(slope) or np.ndim(intercept):  # per-slice scaling (DICOM source): store float
            stored, slope, intercept = volume.quantise(values).astype(np.float32), 1.0, 0.0
        elif volume.float32_is_coarse() and volume.array.size == values.size:  # the change from the source, as it is
            clean = _file_layout(volume.array)
            source = _source_values(volume, clean.shape)  # read once: the unchanged voxels below take the same values
            stored = volume.stored_as_change(values, clean, *source)
        if unchanged is not None:
            stored = _with_source_values(volume, stored, unchanged, source)
    else:
        stored, slope, intercept = np.asarray(values).astype(dtype), 1.0, 0.0
    header = header if isinstance(header, nib.Nifti1Header) else nib.Nifti1Header()
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image  # a NIfTI-2 source stays NIfTI-2
    image = kind(stored, volume.affine, header)
    image.set_data_dtype(stored.dtype)
    image.header.set_slope_inter(float(slope), float(intercept))
    if dtype is not None:  # a map of the scan: not the scan's window, and its own intent
        image.header["cal_min"] = image.header["cal_max"] = 0
        image.header.set_intent("label" if np.issubdtype(stored.dtype, np.integer) else "none")
    if description is not None:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    # a header with no sform or qform code gives its geometry by fallback (nibabel's from the voxel sizes, ITK's and so
    # 3D Slicer's and ITK-SNAP's another one): a NIfTI source's such header is kept as it is, so that every reader puts
    # the output where it puts the scan; stating nibabel's fallback as the geometry (codes 1) once moved a prediction
    # in SimpleITK to other voxels than the scan's (19541 of 46080 voxels of its overlay differed)
    fallback = (volume.meta.get("header") is not None and header.get("sform_code", 0) == 0 and header.get("qform_code", 0) == 0
                and np.allclose(image.header.get_best_affine(), volume.affine))
    if header.get("sform_code", 0) == 0 and header.get("qform_code", 0) == 0 and not fallback:
        image.set_sform(volume.affine, code=1)
        image.set_qform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path




def _beyond_float32(dtype: np.dtype) -> bool:
    """Whether float32 cannot hold every value of ``dtype`` (float64, 32- and 64-bit integers)."""
    return dtype.itemsize > 4 or (np.issubdtype(dtype, np.integer) and dtype.itemsize == 4)


def _file_layout(array: np.ndarray) -> np.ndarray:
    """A channel-first array ``(C, I, J, K)`` as the file lays it out: ``(I, J, K)``, or ``(I, J, K, C)``."""
    if array.ndim == 4 and array.shape[0] == 1:
        return array[0]
    return np.moveaxis(array, 0, -1) if array.ndim == 4 else array


def _source_values(volume: Volume, shape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The NIfTI source file's own values in the file's layout, ``shape``: as stored (an integer type's stored integers,
    written with the source's slope and intercept; a float type's values scaled in float64 as nibabel reads them,
    written unscaled), and as :func:`read_nifti` reads them (float32); None, None where the file at ``volume.path`` is
    no NIfTI file stored as ``volume`` says."""
    source = volume.path
    if source is None or volume.format != "nifti" or not is_nifti(Path(source)):
        return None, None
    try:
        image = open_nifti(source)
    except InputError:
        return None, None
    if np.dtype(image.get_data_dtype()) != volume.stored_dtype or math.prod(image.shape) != math.prod(shape):
        return None, None
    if volume.is_integer:
        exact = np.asarray(image.dataobj.get_unscaled()).reshape(shape)
    else:
        exact = np.asarray(image.get_fdata(dtype=np.float64)).reshape(shape)
    return exact, np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)


def _with_source_values(volume: Volume, stored: np.ndarray, unchanged: np.ndarray,
                        source: tuple[np.ndarray | None, np.ndarray | None] | None = None) -> np.ndarray:
    """``stored`` with the voxels in ``unchanged`` as the NIfTI source file stores them (see :func:`write_nifti`);
    ``source``: :func:`_source_values` where already read."""
    if not _beyond_float32(stored.dtype) or np.dtype(volume.stored_dtype) != stored.dtype:
        return stored
    exact = (source or _source_values(volume, stored.shape))[0]
    if exact is None:
        return stored
    keep = _file_layout(np.asarray(unchanged, dtype=bool))
    out = np.array(stored, copy=True)
    out[keep] = exact.astype(stored.dtype)[keep]
    return out
