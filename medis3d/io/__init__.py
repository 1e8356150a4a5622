"""Reading and writing scans: NIfTI files and DICOM series, into and out of :class:`Volume`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medis3d.errors import InputError
from medis3d.io.nifti import is_nifti, open_nifti, read_nifti, write_nifti
from medis3d.io.volume import Volume, safe_name

__all__ = ["Volume", "read_volume", "read_channels", "check_scan", "write_nifti", "safe_name", "is_nifti"]


def read_channels(paths: Sequence[Path | str]) -> Volume:
    """One scan from one file per channel (e.g. BraTS T1, T1ce, T2, FLAIR), all on one grid."""
    volumes = [read_volume(p) for p in paths]
    first = volumes[0]
    for v in volumes[1:]:
        if v.spatial_shape != first.spatial_shape or not np.allclose(v.affine, first.affine, atol=1e-3):
            raise InputError(f"{v.path}: not on the same grid as {first.path} (channels must share shape and affine)")
        if v.channels != 1:
            raise InputError(f"{v.path}: a channel file must be 3D")
    stacked = np.concatenate([v.array for v in volumes])
    return Volume(array=stacked, affine=first.affine, path=first.path, format=first.format,
                  stored_dtype=np.dtype(np.float32), meta={"channel_volumes": volumes, "header": first.meta.get("header")})


def channel_paths(path: Path | str) -> list[str] | None:
    """The files of a comma-separated scan (one per channel), or None for one file or folder."""
    text = str(path)
    if "," in text and not Path(text).exists():
        return [p.strip() for p in text.split(",") if p.strip()]
    return None


def _kind(path: Path) -> str:
    """"nifti" or "dicom", from the name and a look at the file(s); the usual error for anything else."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() and is_nifti(path):
        return "nifti"
    from medis3d.io import dicom  # imported here: pydicom is not needed for NIfTI

    if dicom.looks_like_dicom(path):
        return "dicom"
    raise InputError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a DICOM series")


def check_scan(path: Path | str) -> None:
    """Raise the error :func:`read_volume` would for a scan that is not there, is neither NIfTI nor DICOM,
    or is a NIfTI file whose header cannot be read, without reading its voxel data (a cheap check before
    a command shows its progress)."""
    channels = channel_paths(path)
    for p in channels if channels is not None else [path]:
        if _kind(Path(p)) == "nifti":
            open_nifti(p)


def read_volume(path: Path | str) -> Volume:
    """Read a scan: a NIfTI file, or a DICOM series (its folder or any file of it); several
    files separated by commas are the channels of one scan."""
    channels = channel_paths(path)
    if channels is not None:
        return read_channels(channels)
    path = Path(path)
    if _kind(path) == "nifti":
        return read_nifti(path)
    from medis3d.io import dicom

    return dicom.read_dicom_series(path)


def write_volume(volume: Volume, path: Path | str, array: np.ndarray | None = None, *, overwrite: bool = False,
                 description: str = "medis3d") -> Path:
    """Write ``array`` (default: the volume's own) on ``volume``'s grid, stored as the source stores it.

    A path ending in ``.nii`` or ``.nii.gz`` is one NIfTI file, refused where it exists unless
    ``overwrite``; any other path is a new (or empty) folder for a DICOM series derived from a DICOM
    ``volume`` (new UIDs, ``description`` as its series description; a NIfTI file's header description). The
    source's own files are never overwritten. Returns ``path``.
    """
    from medis3d.errors import OutputError

    path = Path(path)
    sources = [volume.path, *(v.path for v in volume.channel_volumes or [])] + list(volume.meta.get("dicom_files", []))
    if any(s is not None and path.resolve() == Path(s).resolve() for s in sources):
        raise OutputError(f"{path}: is the scan's own file; medis3d never overwrites its input")
    if is_nifti(path):
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: already exists; choose a new path (or pass overwrite=True)")
        return write_nifti(volume, path, array, description=description)
    if volume.format != "dicom":
        raise OutputError(f"{path}: a {volume.format} scan is written as .nii or .nii.gz (DICOM output needs a DICOM source)")
    from medis3d.io.dicom import write_dicom_series

    files = write_dicom_series(volume, volume.array if array is None else array, path,
                               series_description=description[:64], derivation=description)
    return files[0].parent
