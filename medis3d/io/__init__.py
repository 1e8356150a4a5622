"""Reading and writing scans: NIfTI files and DICOM series, into and out of :class:`Volume`."""

from __future__ import annotations

from pathlib import Path

from medis3d.errors import InputError
from medis3d.io.nifti import is_nifti, read_nifti, write_nifti
from medis3d.io.volume import Volume, safe_name

__all__ = ["Volume", "read_volume", "write_nifti", "safe_name", "is_nifti"]


def read_volume(path: Path | str) -> Volume:
    """Read a scan: a NIfTI file, or a DICOM series (its folder or any file of it)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file() and is_nifti(path):
        return read_nifti(path)
    try:
        from medis3d.io import dicom
    except ImportError:  # pragma: no cover - DICOM support ships with the package
        dicom = None
    if dicom is not None and dicom.looks_like_dicom(path):
        return dicom.read_dicom_series(path)
    raise InputError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a DICOM series")
