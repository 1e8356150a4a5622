"""Property-based fuzzing of the readers: every generated NIfTI file or DICOM series either reads as a
volume or raises medis3d's own error (one line for the user); never anything else.

The default run tries a few hundred cases of each; ``pytest -m slow tests/test_fuzz.py`` runs
10,000 of each (``MEDIS3D_FUZZ_CASES`` sets the number).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from test_dicom import make_series

from medis3d.errors import Medis3dError
from medis3d.io import read_volume
from medis3d.io.volume import Volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # skipped-file notices of broken series
DEFAULT_CASES = 250
SLOW_CASES = int(os.environ.get("MEDIS3D_FUZZ_CASES", "10000"))
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _reads_or_refuses(path: Path) -> None:
    try:
        volume = read_volume(path)
    except Medis3dError as exc:
        message = str(exc)
        assert message and "\n" not in message and str(path) in message, message
        return
    assert isinstance(volume, Volume)
    assert volume.array.ndim == 4 and np.isfinite(volume.array).all() and np.isfinite(volume.affine).all()


# -- NIfTI header ------------------------------------------------------------------------------------
def _base_nifti() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.nii"
        data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
        image = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
        image.header.set_slope_inter(0.5, -10.0)
        nib.save(image, str(path))
        return path.read_bytes()


BASE_NIFTI = _base_nifti()
# (offset, struct format) of the NIfTI-1 header fields a reader interprets
FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"), "qform_code": (252, "<h"),
    "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"), "magic": (344, "<4s"),
}
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
ANY_SHORT = st.integers(-(2**15), 2**15 - 1)
SMALL_SHORT = st.integers(-3, 12)


def _values(name: str):
    fmt = FIELDS[name][1]
    count = int(fmt[1:-1] or 1)
    kind = fmt[-1]
    if kind == "s":
        return st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"xxxx"]).map(lambda b: (b,))
    if kind == "f":
        return st.tuples(*[st.one_of(ANY_FLOAT, st.floats(-4, 4, width=32))] * count)
    if kind == "i":
        return st.tuples(st.sampled_from([348, 540, 0, -1, 2**31 - 1]))
    return st.tuples(*[st.one_of(SMALL_SHORT, ANY_SHORT)] * count)


mutation = st.one_of(
    st.sampled_from(list(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), _values(name))),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, len(BASE_NIFTI) - 1), st.integers(0, 255))),
    st.tuples(st.just("truncate"), st.tuples(st.integers(0, len(BASE_NIFTI)))),
)


def _mutated(mutations) -> bytes:
    raw = bytearray(BASE_NIFTI)
    for name, values in mutations:
        if name == "flip":
            offset, byte = values
            if offset < len(raw):
                raw[offset] = byte
        elif name == "truncate":
            raw = raw[: values[0]]
        else:
            offset, fmt = FIELDS[name]
            if offset + struct.calcsize(fmt) <= len(raw):
                struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def _fuzz_nifti(tmp_path: Path, mutations, compressed: bool) -> None:
    path = tmp_path / ("case.nii.gz" if compressed else "case.nii")
    raw = _mutated(mutations)
    path.write_bytes(gzip.compress(raw, mtime=0) if compressed else raw)
    _reads_or_refuses(path)


def _nifti_test(cases: int):
    @settings(max_examples=cases, **FUZZ)
    @given(mutations=st.lists(mutation, min_size=1, max_size=4), compressed=st.booleans())
    def run(tmp_path_factory, mutations, compressed):
        _fuzz_nifti(tmp_path_factory.mktemp("nifti"), mutations, compressed)

    return run


test_nifti_header_fuzz = _nifti_test(DEFAULT_CASES)
test_nifti_header_fuzz_long = pytest.mark.slow(_nifti_test(SLOW_CASES))


# -- DICOM series ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    rng = np.random.default_rng(0)
    make_series(folder, rng.integers(0, 2000, size=(8, 7, 4)).astype(np.int16), spacing=(1.0, 1.2, 2.0))
    return folder


TAGS = {
    "ImagePositionPatient": st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-50, 50)), min_size=0, max_size=4)
    .map(lambda v: [f"{x:.6g}" for x in v]),
    "ImageOrientationPatient": st.lists(st.one_of(st.floats(-1, 1), st.sampled_from([0.0, float("nan"), 1e30])), min_size=0, max_size=7)
    .map(lambda v: [f"{x:.6g}" for x in v]),
    "PixelSpacing": st.lists(st.one_of(st.floats(-2, 3), st.just(float("nan"))), min_size=0, max_size=3).map(lambda v: [f"{x:.6g}" for x in v]),
    "Rows": st.integers(0, 70000), "Columns": st.integers(0, 70000), "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64, 0]),
    "BitsStored": st.integers(0, 40), "PixelRepresentation": st.integers(0, 3), "SamplesPerPixel": st.integers(0, 4),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", ""]),
    "RescaleSlope": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3)).map(lambda x: f"{x:.6g}"),
    "RescaleIntercept": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2000, 2000)).map(lambda x: f"{x:.6g}"),
    "NumberOfFrames": st.integers(0, 5), "SliceThickness": st.floats(-5, 5).map(lambda x: f"{x:.6g}"),
}
dicom_mutation = st.one_of(
    st.tuples(st.integers(0, 3), st.sampled_from(list(TAGS)).flatmap(lambda t: st.tuples(st.just(t), TAGS[t]))),
    st.tuples(st.integers(0, 3), st.tuples(st.just("delete"), st.sampled_from(list(TAGS) + ["PixelData", "SeriesInstanceUID"]))),
    st.tuples(st.integers(0, 3), st.tuples(st.just("pixels"), st.integers(0, 200))),
    st.tuples(st.integers(0, 3), st.tuples(st.just("bytes"), st.tuples(st.integers(0, 2000), st.integers(0, 255)))),
    st.tuples(st.integers(0, 3), st.tuples(st.just("truncate"), st.integers(0, 2000))),
    st.tuples(st.integers(0, 3), st.tuples(st.just("remove"), st.just(None))),
)


def _fuzz_dicom(folder: Path, base: Path, mutations) -> None:
    shutil.copytree(base, folder)
    files = sorted(folder.iterdir())
    for index, (what, value) in mutations:
        path = files[index % len(files)]
        if not path.exists():
            continue
        if what == "remove":
            path.unlink()
        elif what in ("bytes", "truncate"):
            raw = bytearray(path.read_bytes())
            if what == "bytes" and value[0] < len(raw):
                raw[value[0]] = value[1]
            elif what == "truncate":
                raw = raw[: value]
            path.write_bytes(bytes(raw))
        else:
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # an earlier mutation already broke the file: leave it broken
                continue
            try:
                if what == "delete":
                    if value in ds:
                        delattr(ds, value)
                elif what == "pixels":
                    if ds.get("PixelData"):
                        ds.PixelData = ds.PixelData[: value * 7]
                else:
                    setattr(ds, what, value)
                ds.save_as(path)
            except Exception:  # pydicom cannot write what an earlier byte flip made of it: a broken file, fine
                continue
    _reads_or_refuses(folder)


def _dicom_test(cases: int):
    @settings(max_examples=cases, **FUZZ)
    @given(mutations=st.lists(dicom_mutation, min_size=1, max_size=3))
    def run(tmp_path_factory, base_series, mutations):
        _fuzz_dicom(tmp_path_factory.mktemp("dicom") / "series", base_series, mutations)

    return run


test_dicom_series_fuzz = _dicom_test(DEFAULT_CASES)
test_dicom_series_fuzz_long = pytest.mark.slow(_dicom_test(SLOW_CASES))
