"""DICOM series discovery, reading (order, geometry, rescale) and derived-series writing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medis3d.errors import InputError
from medis3d.io import read_volume
from medis3d.io.dicom import (
    LPS_TO_RAS,
    SkippedDicomWarning,
    find_series,
    looks_like_dicom,
    read_dicom_series,
    write_dicom_seg,
    write_dicom_series,
)

COLUMNS, ROWS, SLICES = 16, 20, 12  # I, J, K
AXIAL = np.eye(3)


def _oblique() -> np.ndarray:
    """An orthonormal frame (columns: row cosine, column cosine, normal) tilted about two axes."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def make_series(
    folder: Path,
    stored: np.ndarray,
    *,
    frame: np.ndarray = AXIAL,
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),  # (column step, row step, slice step) in mm
    origin: tuple[float, float, float] = (-10.0, 20.0, 35.0),
    slopes: np.ndarray | float = 1.0,
    intercepts: np.ndarray | float = -1024.0,
    series_uid: str | None = None,
    description: str = "CT abdomen",
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    shuffle_seed: int | None = 0,
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Write ``stored`` (I, J, K) as one CT slice per file.

    Returns the files in slice order, the native values and the RAS+ affine.

    File names are shuffled and InstanceNumber runs backwards, so only positions give the order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = stored.shape[2]
    # as the DS strings written below hold them
    slopes = np.array([float(f"{v:g}") for v in np.broadcast_to(np.asarray(slopes, float), (n,))])
    intercepts = np.array([float(f"{v:g}") for v in np.broadcast_to(np.asarray(intercepts, float), (n,))])
    series_uid = series_uid or generate_uid()
    row_cos, col_cos, normal = frame[:, 0], frame[:, 1], frame[:, 2]
    names = [f"IM{i:03d}" for i in np.random.default_rng(shuffle_seed).permutation(n)] if shuffle_seed is not None \
        else [f"IM{i:03d}" for i in range(n)]
    files = []
    for k in range(n):
        position = np.asarray(origin) + k * spacing[2] * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PAT-001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
        ds.StudyTime = "101010"
        ds.AccessionNumber = "ACC42"
        ds.InstitutionName = "General Hospital"
        ds.ReferringPhysicianName = "Who^Doctor"
        ds.StudyID = "S1"
        ds.Modality = "CT"
        ds.SeriesNumber = 3
        ds.SeriesDescription = description
        ds.InstanceNumber = n - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # (between rows, between columns)
        ds.SliceThickness = "5"  # deliberately not the slice step
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        signed = np.issubdtype(stored.dtype, np.signedinteger)
        ds.BitsAllocated = ds.BitsStored = 8 * stored.dtype.itemsize  # 16 bits, 32 for an int32 array
        ds.HighBit = ds.BitsAllocated - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype(stored.dtype.newbyteorder("<")).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    native = stored.astype(np.float64) * slopes + intercepts
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[0]
    lps[:3, 1] = col_cos * spacing[1]
    lps[:3, 2] = normal * spacing[2]
    lps[:3, 3] = origin
    return files, native.astype(np.float32), LPS_TO_RAS @ lps


def stored_values(dtype=np.int16, shape=(COLUMNS, ROWS, SLICES), seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    low, high = (max(info.min, -1000), 3000) if info.min < 0 else (0, 3000)
    return rng.integers(low, high, size=shape).astype(dtype)


def sitk_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def sitk_read(folder: Path, uid: str | None = None) -> sitk.Image:
    uid = uid or sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))[0]
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    return sitk.ReadImage(names, sitk.sitkFloat32)


@pytest.fixture
def ct(tmp_path):
    folder = tmp_path / "ct"
    files, native, affine = make_series(folder, stored_values())
    return folder, files, native, affine


# ----------------------------------------------------------------------------- reading


def test_slices_ordered_by_position_not_name_or_instance_number(ct):
    folder, files, native, affine = ct
    assert sorted(p.name for p in files) != [p.name for p in files]  # names are not in slice order
    volume = read_dicom_series(folder)
    assert volume.format == "dicom" and volume.array.shape == (1, COLUMNS, ROWS, SLICES)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], native)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.meta["dicom_files"] == files
    assert [int(h.InstanceNumber) for h in volume.meta["dicom_headers"]] == list(range(SLICES, 0, -1))
    assert volume.meta["sop_instance_uids"] == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    assert volume.meta["sop_class_uid"] == CTImageStorage
    assert volume.meta["patient"]["PatientID"] == "PAT-001"
    assert all("PixelData" not in h for h in volume.meta["dicom_headers"])
    assert volume.stored_dtype == np.int16 and volume.slope == 1.0 and volume.intercept == -1024.0
    # the spacing comes from positions (2.5 mm), not SliceThickness (5 mm)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.7, 2.5), atol=1e-6)


def test_any_file_of_the_series_and_read_volume(ct):
    folder, files, native, _ = ct
    for path in (files[5], folder):
        np.testing.assert_array_equal(read_volume(path).array[0], native)


@pytest.mark.parametrize("frame", [AXIAL, _oblique()], ids=["axial", "oblique"])
def test_geometry_and_values_match_simpleitk_and_nibabel(tmp_path, frame):
    folder = tmp_path / "series"
    _, native, affine = make_series(folder, stored_values(), frame=frame)
    volume = read_dicom_series(folder)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    image = sitk_read(folder)
    np.testing.assert_allclose(volume.affine, sitk_affine(image), atol=1e-4)
    np.testing.assert_allclose(volume.array[0], sitk.GetArrayFromImage(image).transpose(2, 1, 0), atol=1e-3)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    nifti = nib.load(str(tmp_path / "series.nii.gz"))
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-4)
    np.testing.assert_allclose(volume.array[0], nifti.get_fdata(), atol=1e-3)


def test_missing_slice_is_an_error(tmp_path):
    files, _, _ = make_series(tmp_path / "s", stored_values(shape=(COLUMNS, ROWS, 20)), shuffle_seed=None)
    files[9].unlink()
    with pytest.raises(InputError, match=r"slice\(s\) missing.*about 1 slice"):
        read_dicom_series(tmp_path / "s")


def test_inconsistent_orientation_and_size_are_errors(tmp_path):
    files, _, _ = make_series(tmp_path / "o", stored_values(), shuffle_seed=None)
    ds = pydicom.dcmread(files[4])
    ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    ds.save_as(files[4])
    with pytest.raises(InputError, match="ImageOrientationPatient differs"):
        read_dicom_series(tmp_path / "o")
    files, _, _ = make_series(tmp_path / "r", stored_values(), shuffle_seed=None)
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.PixelData = ROWS // 2, ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(files[2])
    with pytest.raises(InputError, match=r"image size \(Rows, Columns\) differs"):
        read_dicom_series(tmp_path / "r")


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "two"
    first = generate_uid()
    second = generate_uid()
    make_series(folder / "a", stored_values(shape=(COLUMNS, ROWS, 4)), series_uid=first, description="arterial")
    _, native, _ = make_series(folder / "b", stored_values(shape=(COLUMNS, ROWS, 5), seed=2), series_uid=second,
                               description="venous")
    series = find_series(folder)
    assert {(s.uid, s.description, len(s.files)) for s in series} == {(first, "arterial", 4), (second, "venous", 5)}
    with pytest.raises(InputError) as error:
        read_dicom_series(folder)
    message = str(error.value)
    assert "2 image series" in message and "\n" not in message
    assert all(text in message for text in (first, second, "arterial", "venous"))
    # what the command line can take: a file of each (it said "choose one by series UID", which no option takes)
    assert "give a file of the one to read" in message and all(str(s.files[0]) in message for s in series)
    np.testing.assert_array_equal(read_dicom_series(Path(message.split("e.g. ")[-1])).array[0], native)
    chosen = next(s for s in series if s.uid == second)
    np.testing.assert_array_equal(read_dicom_series(folder, series_uid=second).array[0], native)
    np.testing.assert_array_equal(read_dicom_series(chosen).array[0], native)
    with pytest.raises(InputError, match="no image series with UID 1.2.3"):
        read_dicom_series(folder, series_uid="1.2.3")


def structured_report(path: Path) -> Path:
    """A DICOM Basic Text SR: DICOM, but not an image slice (reading a folder skips it, with a notice)."""
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    return path


def test_non_image_objects_are_skipped_with_a_notice(ct):
    folder, files, native, _ = ct
    structured_report(folder / "report.dcm")
    no_pixels = pydicom.dcmread(files[0])
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.save_as(folder / "header_only.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    with pytest.warns(SkippedDicomWarning) as record:
        series = find_series(folder)
    assert len(series) == 1 and len(series[0].files) == SLICES
    skipped = {p.name: reason for p, reason in record[0].message.skipped}
    assert set(skipped) == {"report.dcm", "header_only.dcm"}
    assert "Basic Text SR" in skipped["report.dcm"] and "no pixel data" in skipped["header_only.dcm"]
    with pytest.warns(SkippedDicomWarning):
        np.testing.assert_array_equal(read_dicom_series(folder).array[0], native)
    with pytest.raises(InputError, match="Basic Text SR Storage, not an image"):
        read_dicom_series(folder / "report.dcm")


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_a_slice_that_cannot_be_placed_refuses_the_series_not_shortens_it(ct, keyword):
    folder, files, _, _ = ct
    broken = pydicom.dcmread(files[3])
    delattr(broken, keyword)
    broken.save_as(files[3])
    for given in (folder, files[0]):  # the folder, or another file of the series
        with pytest.warns(SkippedDicomWarning), pytest.raises(InputError, match=rf"slice {files[3].name} has no {keyword}; "
                                                                                 r"refusing to read the series without it"):
            read_dicom_series(given)


@pytest.mark.parametrize("cut", ["before the pixel data", "inside the header"])
@pytest.mark.parametrize("end", [0, -1])
def test_a_slice_file_cut_short_refuses_the_series_not_shortens_it(ct, cut, end):
    # an end slice's file truncated (a copy that stopped part-way): it was skipped as "no pixel data", and the series
    # read one slice shorter (11 of 12 slices, its origin moved a slice) with no error
    folder, files, _, _ = ct
    raw = files[end].read_bytes()
    at = raw.find(b"\xe0\x7f\x10\x00") if cut == "before the pixel data" else raw.find(b"\x28\x00\x10\x00") + 6
    files[end].write_bytes(raw[:at] + (b"\xff\xff" if cut == "inside the header" else b""))
    for given in (folder, files[1]):
        with pytest.warns(SkippedDicomWarning), pytest.raises(InputError, match=rf"slice {files[end].name} has no pixel data "
                                                                                 r"\(CT Image Storage\); refusing to read"):
            read_dicom_series(given)


def test_colour_and_secondary_capture_objects_beside_a_series_are_skipped_with_a_notice(ct):
    folder, files, native, _ = ct
    rgb = pydicom.dcmread(files[0])
    rgb.SeriesInstanceUID = generate_uid()
    rgb.SOPInstanceUID = rgb.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit, rgb.PixelRepresentation = 7, 0
    rgb.PixelData = bytes(rgb.Rows * rgb.Columns * 3)
    rgb.save_as(folder / "screenshot.dcm")
    capture = pydicom.dcmread(files[1])
    capture.SeriesInstanceUID = generate_uid()
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.save_as(folder / "capture.dcm")
    with pytest.warns(SkippedDicomWarning) as record:
        volume = read_dicom_series(folder)
    np.testing.assert_array_equal(volume.array[0], native)
    skipped = {p.name: reason for p, reason in record[0].message.skipped}
    assert "a colour image (RGB, 3 samples per pixel)" in skipped["screenshot.dcm"]
    assert "a secondary capture" in skipped["capture.dcm"]


def test_gantry_tilt_is_a_clear_error(tmp_path):
    files, _, _ = make_series(tmp_path / "tilted", stored_values())
    for k, path in enumerate(sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))):
        ds = pydicom.dcmread(path)  # each slice shifted along the rows as it goes: 10 degrees of tilt
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [f"{position[0]:.6f}", f"{position[1] + k * 2.5 * np.tan(np.radians(10)):.6f}", f"{position[2]:.6f}"]
        ds.save_as(path)
    with pytest.raises(InputError, match=r"tilted 10.00 degrees from the slice normal \(gantry tilt"):
        read_dicom_series(tmp_path / "tilted")


def test_folder_without_image_series(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("hello")
    assert find_series(tmp_path / "empty") == []
    with pytest.raises(InputError, match="no DICOM image series found"):
        read_dicom_series(tmp_path / "empty")


def test_per_slice_rescale(tmp_path):
    slopes = np.linspace(0.5, 2.0, SLICES)
    intercepts = np.linspace(-1024, -900, SLICES)
    _, native, _ = make_series(tmp_path / "s", stored_values(), slopes=slopes, intercepts=intercepts)
    volume = read_dicom_series(tmp_path / "s")
    np.testing.assert_allclose(volume.array[0], native, rtol=1e-6)
    assert np.shape(volume.slope) == (1, 1, SLICES) and np.shape(volume.intercept) == (1, 1, SLICES)
    np.testing.assert_allclose(np.ravel(volume.slope), slopes, rtol=1e-5)
    np.testing.assert_array_equal(volume.quantise(volume.array), volume.array)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_signed_and_unsigned_pixels(tmp_path, dtype):
    stored = stored_values(dtype)
    _, native, _ = make_series(tmp_path / "s", stored, slopes=1.0, intercepts=0.0)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.stored_dtype == np.dtype(dtype)
    np.testing.assert_array_equal(volume.array[0], native)
    assert (native.min() < 0) == (dtype == np.int16)


def test_multi_frame_and_undecodable_data_are_explained(tmp_path):
    files, _, _ = make_series(tmp_path / "mf", stored_values(shape=(COLUMNS, ROWS, 2)), shuffle_seed=None)
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(files[0])
    files[1].unlink()
    with pytest.raises(InputError, match="multi-frame DICOM .* not supported"):
        read_dicom_series(tmp_path / "mf")

    files, _, _ = make_series(tmp_path / "jp", stored_values(shape=(COLUMNS, ROWS, 3)), shuffle_seed=None)
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless, with bytes that are not
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51 not a codestream" * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(files[1], enforce_file_format=True)
    with pytest.raises(InputError, match="compressed as JPEG 2000.*cannot be decoded"):
        read_dicom_series(tmp_path / "jp")


def test_looks_like_dicom(ct, tmp_path):
    folder, files, _, _ = ct
    assert looks_like_dicom(folder) and looks_like_dicom(files[0]) and looks_like_dicom(tmp_path)
    bare = tmp_path / "bare"
    ds = pydicom.dcmread(files[0])
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, implicit_vr=True, little_endian=True)  # a bare data set: no preamble, no file meta
    assert bare.read_bytes()[128:132] != b"DICM" and looks_like_dicom(bare)
    (tmp_path / "bare_series").mkdir()
    for f in files[:3]:  # a series of bare data sets reads as well
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(tmp_path / "bare_series" / f.name, implicit_vr=True, little_endian=True)
    assert read_dicom_series(tmp_path / "bare_series").array.shape == (1, COLUMNS, ROWS, 3)
    (tmp_path / "x.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / "x.nii.gz"))
    assert not looks_like_dicom(tmp_path / "x.txt") and not looks_like_dicom(tmp_path / "x.nii.gz")
    assert not looks_like_dicom(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- writing


def _perturbed(volume, seed=3):
    rng = np.random.default_rng(seed)
    return volume.array + rng.uniform(-3, 3, size=volume.array.shape).astype(np.float32)


def test_write_then_read_back_round_trip(tmp_path):
    slopes = np.linspace(0.5, 1.5, SLICES)
    make_series(tmp_path / "src", stored_values(), slopes=slopes, frame=_oblique())
    source = read_dicom_series(tmp_path / "src")
    adversarial = _perturbed(source)
    adversarial[0, 0, 0, 0] = 1e6  # beyond int16 * slope: clipped
    out = tmp_path / "out" / "adv"
    written = write_dicom_series(source, adversarial, out, series_description="medis3d adversarial",
                                 derivation="MedIS attack, eps 4 HU")
    assert [p.parent for p in written] == [out] * SLICES and sorted(out.iterdir()) == sorted(written)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adv"]  # no temporary folder left

    back = read_dicom_series(out)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    assert back.stored_dtype == source.stored_dtype
    np.testing.assert_allclose(np.ravel(back.slope), np.ravel(source.slope))
    expected = source.quantise(adversarial)
    np.testing.assert_allclose(back.array, expected, atol=1e-3)
    half_step = np.broadcast_to(np.asarray(source.slope) / 2, source.spatial_shape)[None]
    inside = np.ones(adversarial.shape, bool)
    inside[0, 0, 0, 0] = False
    assert np.all(np.abs(back.array - adversarial)[inside] <= half_step[inside] + 1e-3)
    assert back.array[0, 0, 0, 0] == pytest.approx(32767 * slopes[0] - 1024, abs=1e-2)

    image = sitk_read(out)
    np.testing.assert_allclose(sitk_affine(image), source.affine, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).transpose(2, 1, 0), expected[0], atol=1e-2)

    headers = [pydicom.dcmread(p) for p in written]
    source_headers = source.meta["dicom_headers"]
    assert {h.SeriesInstanceUID for h in headers} == {back.meta["series_instance_uid"]}
    assert back.meta["series_instance_uid"] != source.meta["series_instance_uid"]
    new_uids = [h.SOPInstanceUID for h in headers]
    assert len(set(new_uids)) == SLICES and not set(new_uids) & set(source.meta["sop_instance_uids"])
    assert all(UID(u).is_valid for u in new_uids + [headers[0].SeriesInstanceUID])
    for h, src in zip(headers, source_headers):
        assert list(h.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert h.SeriesDescription == "medis3d adversarial" and h.DerivationDescription == "MedIS attack, eps 4 HU"
        (ref,) = h.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID and ref.ReferencedSOPClassUID == src.SOPClassUID
        assert h.ImagePositionPatient == src.ImagePositionPatient and h.PixelSpacing == src.PixelSpacing
        assert h.SliceThickness == src.SliceThickness and h.SOPClassUID == src.SOPClassUID
        assert h.file_meta.MediaStorageSOPInstanceUID == h.SOPInstanceUID
        assert h.StudyInstanceUID == src.StudyInstanceUID and h.PatientName == "Doe^Jane"


def test_an_int32_series_beyond_float32_keeps_its_stored_values_and_its_budget(tmp_path):
    """An int32 series stored near 2**31 with RescaleSlope 1e-6: native values near 2147, where a float32 step is 244
    stored units. Written back untouched, 1022 of 1024 stored values changed by up to 122 units; attacked at the edge
    of a budget of 31298 units, the written perturbation reached 31371 (286 voxels over). Now every voxel left as it
    was keeps its stored value exactly, and no written change passes the budget, at any budget's place between two
    float32 steps (the value nearest a stored one in the ball once lay half a float32 step outside it)."""
    rng = np.random.default_rng(0)
    stored = (2**31 - 1 - rng.integers(0, 1_000_000, size=(16, 16, 4))).astype(np.int32)
    make_series(tmp_path / "src", stored, slopes=1e-6, intercepts=0.0)
    source = read_dicom_series(tmp_path / "src")
    assert source.stored_dtype == np.int32 and source.float32_is_coarse()

    def written(array, name):
        files = write_dicom_series(source, array, tmp_path / name, series_description="adv", derivation="test")
        back = read_dicom_series(files[0].parent)
        return np.stack([pydicom.dcmread(f).pixel_array.T for f in back.meta["dicom_files"]], -1).astype(np.int64)

    np.testing.assert_array_equal(written(source.array, "same"), stored)
    left = rng.random(source.array.shape) < 0.5
    for share in (0.2, 0.7):  # the budget 0.2 and 0.7 of a float32 step past 128 steps
        eps = (128 + share) * 2.0**-12
        pushed = source.array + np.where(left, 0, np.sign(rng.standard_normal(left.shape)) * eps).astype(np.float32)
        change = written(source.quantise(pushed, source.array, eps), f"adv{share}") - stored
        assert not change[left[0]].any()
        assert np.abs(change).max() <= np.floor(eps / 1e-6) and np.abs(change).max() > 0.99 * eps / 1e-6


def test_write_accepts_spatial_array_and_unsigned_source(tmp_path):
    make_series(tmp_path / "src", stored_values(np.uint16), slopes=1.0, intercepts=0.0)
    source = read_dicom_series(tmp_path / "src")
    adversarial = source.array[0] - 5000.0  # partly below 0: clipped to uint16's 0
    write_dicom_series(source, adversarial, tmp_path / "adv", series_description="adv", derivation="test")
    back = read_dicom_series(tmp_path / "adv")
    assert back.stored_dtype == np.uint16
    np.testing.assert_array_equal(back.array[0], np.clip(adversarial, 0, None))


def test_anonymize_keeps_study_consistent(tmp_path):
    make_series(tmp_path / "src", stored_values())
    source = read_dicom_series(tmp_path / "src")
    uid_map: dict = {}
    outputs = []
    for name in ("adv1", "adv2"):
        write_dicom_series(source, source.array, tmp_path / name, series_description=name, derivation="x",
                           anonymize=True, uid_map=uid_map)
        outputs.append([pydicom.dcmread(p) for p in sorted((tmp_path / name).iterdir())])
    headers = outputs[0] + outputs[1]
    for h in headers:
        assert h.PatientName != "Doe^Jane" and h.PatientID != "PAT-001" and str(h.PatientName) == h.PatientID
        assert h.PatientBirthDate == "" and h.StudyDate == "" and h.AccessionNumber == ""
        assert "InstitutionName" not in h and h.ReferringPhysicianName == ""
        assert h.PatientIdentityRemoved == "YES"
        assert h.StudyInstanceUID == uid_map["1.2.826.0.1.3680043.8.498.1"]
        assert h.FrameOfReferenceUID == uid_map["1.2.826.0.1.3680043.8.498.2"]
    assert len({h.PatientID for h in headers}) == 1 and len({h.SeriesInstanceUID for h in headers}) == 2
    for h, sop in zip(outputs[1], source.meta["sop_instance_uids"]):
        assert h.SourceImageSequence[0].ReferencedSOPInstanceUID == uid_map[sop] != sop
    back = read_dicom_series(tmp_path / "adv1")
    np.testing.assert_array_equal(back.array, source.array)
    np.testing.assert_allclose(back.affine, source.affine)


def test_never_overwrites_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    files, _, _ = make_series(tmp_path / "src", stored_values(shape=(COLUMNS, ROWS, 4)))
    source = read_dicom_series(tmp_path / "src")
    before = {p: p.read_bytes() for p in files}
    kwargs = dict(series_description="adv", derivation="x")
    with pytest.raises(InputError, match="holds the source series"):
        write_dicom_series(source, source.array, tmp_path / "src", **kwargs)
    with pytest.raises(InputError, match="holds the source series"):
        write_dicom_series(source, source.array, tmp_path, **kwargs)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "0001.dcm").write_bytes(b"keep me")
    with pytest.raises(InputError, match="not empty"):
        write_dicom_series(source, source.array, busy, **kwargs)
    assert (busy / "0001.dcm").read_bytes() == b"keep me"

    calls = []
    original = Dataset.save_as

    def failing_save(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kw)

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(source, source.array, tmp_path / "out" / "adv", **kwargs)
    assert list((tmp_path / "out").iterdir()) == []
    assert {p: p.read_bytes() for p in files} == before

    monkeypatch.setattr(Dataset, "save_as", original)
    (tmp_path / "empty").mkdir()
    assert len(write_dicom_series(source, source.array, tmp_path / "empty", **kwargs)) == 4  # empty folder is fine


def test_write_dicom_seg(tmp_path):
    hd = pytest.importorskip("highdicom")
    from medis3d.io.dicom import write_dicom_seg

    make_series(tmp_path / "src", stored_values(shape=(COLUMNS, ROWS, 4)))
    source = read_dicom_series(tmp_path / "src")
    labels = np.zeros(source.spatial_shape, np.uint8)
    labels[2:6, 3:9, 1:3] = 1
    labels[10:12, 10:15, 2] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_dicom_seg(source, labels, tmp_path / "seg.dcm", {1: "liver", 4: "tumour"})
        seg = hd.seg.segread(str(path))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "tumour"]
    assert seg.StudyInstanceUID == source.meta["study_instance_uid"]
    assert seg.FrameOfReferenceUID == source.meta["frame_of_reference_uid"]
    sops = source.meta["sop_instance_uids"]
    mask = seg.get_pixels_by_source_instance(sops, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    # mask: (slices, rows, columns, segments)
    np.testing.assert_array_equal(mask[..., 0].transpose(2, 1, 0), labels == 1)
    np.testing.assert_array_equal(mask[..., 1].transpose(2, 1, 0), labels == 4)


def test_dicom_seg_names_the_medis3d_version_that_wrote_it(tmp_path):
    """SoftwareVersions (and the segmentation algorithm's version) is medis3d's own, read back with pydicom."""
    pytest.importorskip("highdicom")
    import medis3d
    from medis3d.io.dicom import write_dicom_seg

    make_series(tmp_path / "src", stored_values(shape=(COLUMNS, ROWS, 4)))
    source = read_dicom_series(tmp_path / "src")
    labels = np.zeros(source.spatial_shape, np.uint8)
    labels[2:6, 3:9, 1:3] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_dicom_seg(source, labels, tmp_path / "seg.dcm", {1: "liver"})
    seg = pydicom.dcmread(path)
    assert seg.SoftwareVersions == medis3d.__version__ and seg.Manufacturer == "medis3d"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medis3d" and algorithm.AlgorithmVersion == medis3d.__version__


def test_write_dicom_seg_overlapping_labels(tmp_path):
    """A multi-label (sigmoid) prediction, one 0/1 channel per label, becomes overlapping segments."""
    hd = pytest.importorskip("highdicom")
    from medis3d.io.dicom import write_dicom_seg

    make_series(tmp_path / "src", stored_values(shape=(COLUMNS, ROWS, 4)))
    source = read_dicom_series(tmp_path / "src")
    labels = np.zeros((3, *source.spatial_shape), np.uint8)
    labels[0, 2:10, 3:12, 0:4] = 1
    labels[1, 4:8, 5:9, 1:3] = 1  # inside label 0
    labels[2, 6:12, 6:14, 2] = 1  # overlaps both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_dicom_seg(source, labels, tmp_path / "seg.dcm", {0: "halo", 2: "core"})
        seg = hd.seg.segread(str(path))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["halo", "core"]
    mask = seg.get_pixels_by_source_instance(source.meta["sop_instance_uids"], segment_numbers=[1, 2],
                                             assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(mask[..., 0].transpose(2, 1, 0), labels[0] == 1)
    np.testing.assert_array_equal(mask[..., 1].transpose(2, 1, 0), labels[2] == 1)
    with pytest.raises(InputError, match="channels"):
        write_dicom_seg(source, labels, tmp_path / "bad.dcm", {3: "nothing"})


def test_dicom_seg_of_an_enhanced_source_references_its_frames(tmp_path):
    # the SEG of a series read from one enhanced object referenced it once per frame (6 references of one instance) in
    # the classic class (CT Image Storage, not Legacy Converted Enhanced CT) and named no frame
    import highdicom as hd

    files, _, _ = make_series(tmp_path / "classic", stored_values(np.int16, (24, 20, 6)), spacing=(1.5, 1.5, 2.0))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "volume.dcm")
    source = read_dicom_series(tmp_path / "enhanced")
    labels = np.zeros(source.spatial_shape, np.uint8)
    labels[4:12, 5:15, :] = 1
    seg = pydicom.dcmread(write_dicom_seg(source, labels, tmp_path / "seg.dcm", {1: "blob"}))
    wanted = (str(enhanced.SOPClassUID), str(enhanced.SOPInstanceUID))
    for items in (seg.SourceImageSequence, seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence):
        assert [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in items] == [wanted]
    positions = {int(k) + 1: [float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]
                 for k, g in enumerate(enhanced.PerFrameFunctionalGroupsSequence)}
    assert seg.NumberOfFrames == 6
    for group in seg.PerFrameFunctionalGroupsSequence:  # each SEG frame names the source frame at its own position
        item = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)) == wanted
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   positions[int(item.ReferencedFrameNumber)], atol=1e-4)


def test_compressed_series_decode_and_the_adversarial_is_written_uncompressed(tmp_path, tiny_bundle):
    import shutil

    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
    from typer.testing import CliRunner

    from medis3d.cli import app

    plain = tmp_path / "plain"
    make_series(plain, stored_values(np.int16, (64, 64, 8)), spacing=(1.5, 1.5, 2.0))
    reference = read_dicom_series(plain).array
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):  # JPEG 2000 needs 32+ pixels a side
        folder = tmp_path / syntax.name.replace(" ", "_")
        shutil.copytree(plain, folder)
        for path in folder.iterdir():
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(path)
        volume = read_dicom_series(folder)
        assert volume.meta["transfer_syntax_uid"] == syntax
        np.testing.assert_array_equal(volume.array, reference)  # lossless: the same values
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attack", str(tmp_path / JPEGLSLossless.name.replace(" ", "_")), "--bundle", str(tiny_bundle),
                                      "--out", str(out), "--losses", "ce", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert any("compressed (JPEG-LS Lossless" in n and "written uncompressed" in n for n in report["outputs"]["notices"])
    written = sorted((out / "adversarial").iterdir())
    assert len(written) == 8 and all(pydicom.dcmread(p).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for p in written)


def test_enhanced_multi_frame_ct_reads_as_its_classic_series_and_is_written_classic(tmp_path, tiny_bundle):
    import highdicom as hd
    from typer.testing import CliRunner

    from medis3d.cli import app

    classic = tmp_path / "classic"
    files, _, _ = make_series(classic, stored_values(np.int16, (24, 20, 6)), spacing=(1.5, 1.5, 2.0), slopes=1.0, intercepts=-1024.0)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    folder = tmp_path / "enhanced"
    folder.mkdir()
    enhanced.save_as(folder / "volume.dcm")
    want, got = read_dicom_series(classic), read_dicom_series(folder)
    np.testing.assert_array_equal(got.array, want.array)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
    assert got.meta["multi_frame_source"] == "1.2.840.10008.5.1.4.1.1.2.2"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attack", str(folder), "--bundle", str(tiny_bundle), "--out", str(out), "--losses", "ce",
                                      "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert any("written as classic single-frame images" in n for n in report["outputs"]["notices"])
    written = [pydicom.dcmread(p) for p in sorted((out / "adversarial").iterdir())]
    assert len(written) == 6 and {str(d.SOPClassUID) for d in written} == {CTImageStorage}
    frames = sorted(int(d.SourceImageSequence[0].ReferencedFrameNumber) for d in written)
    assert frames == [1, 2, 3, 4, 5, 6]
    assert sorted(int(d.InstanceNumber) for d in written) == frames  # each its own (all six were 1, the enhanced object's)
    assert all(d.SourceImageSequence[0].ReferencedSOPInstanceUID == enhanced.SOPInstanceUID for d in written)
    back = read_dicom_series(out / "adversarial")  # the classic series reads back on the source's grid
    np.testing.assert_allclose(back.affine, want.affine, atol=1e-5)


def test_attack_refuses_an_out_inside_the_folder_given_above_the_series(tmp_path, tiny_bundle):
    # `attack study --out study/results` with the series in study/ct wrote the adversarial series into study/, so the
    # same command run again failed: "study: holds 2 image series" (the source and the adversarial)
    from typer.testing import CliRunner

    from medis3d.cli import app

    study = tmp_path / "study"
    make_series(study / "ct", stored_values(np.int16, (24, 20, 6)), spacing=(1.5, 1.5, 2.0))
    before = {p: p.read_bytes() for p in study.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["attack", str(study), "--bundle", str(tiny_bundle), "--out", str(study / "results"),
                                      "--losses", "ce", "--steps", "1", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "inside the input folder" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in study.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in study.iterdir()) == ["ct"]


def test_cli_gives_the_files_skipped_beside_a_series_as_one_notice_line(tmp_path, tiny_bundle):
    # they came as a Python warning: "<...>/medis3d/io/__init__.py:73: SkippedDicomWarning: ..." and the source line
    # "  return dicom.read_dicom_series(path)" under it, before the one-line error (3 lines where 2 say it)
    from typer.testing import CliRunner

    from medis3d.cli import app

    folder = tmp_path / "ct"
    files, _, _ = make_series(folder, stored_values(np.int16, (24, 20, 6)), spacing=(1.5, 1.5, 2.0))
    structured_report(folder / "report.dcm")
    files[2].unlink()  # a slice missing: the read fails after the skip was noticed
    result = CliRunner().invoke(app, ["attack", str(folder), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"),
                                      "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 2, result.output
    assert lines[0].startswith("medis3d: notice: ") and "report.dcm: Basic Text SR Storage, not an image" in lines[0]
    assert lines[1].startswith("medis3d: error: ") and "slice(s) missing" in lines[1]


def test_the_report_names_the_series_it_attacked(tmp_path, tiny_bundle):
    """report.json said which folder, not which series of it (a folder may hold several, and batch names them apart
    only by its own names); it now gives the source's SeriesInstanceUID, and none under --anonymize."""
    from typer.testing import CliRunner

    from medis3d.cli import app

    rng = np.random.default_rng(3)
    folder = tmp_path / "series"
    folder.mkdir()
    make_series(folder, rng.integers(900, 1300, size=(24, 20, 12)).astype(np.int16), series_uid="1.2.826.0.1.3680043.8.498.77")
    for anonymize, expected in ((False, "1.2.826.0.1.3680043.8.498.77"), (True, None)):
        out = tmp_path / f"out_{anonymize}"
        result = CliRunner().invoke(app, ["attack", str(folder), "--bundle", str(tiny_bundle), "--out", str(out), "--losses", "ce",
                                          "--steps", "1", *(["--anonymize"] if anonymize else [])])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "report.json").read_text())["input"]["series_instance_uid"] == expected
