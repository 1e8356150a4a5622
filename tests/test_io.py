"""NIfTI reading and writing keeps shape, affine, orientation and stored type; bad files fail clearly."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medis3d.errors import InputError
from medis3d.io import read_volume, write_nifti

AFFINE = np.array([[-0.9, 0.1, 0, 30], [0, 1.1, 0.05, -10], [0, 0, 2.5, 4], [0, 0, 0, 1]])


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_keeps_geometry_and_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((12, 10, 8)) * 200).astype(dtype)
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    assert vol.array.shape == (1, 12, 10, 8) and vol.stored_dtype == np.dtype(dtype)
    noisy = vol.array + rng.normal(0, 3, vol.array.shape).astype(np.float32)
    write_nifti(vol, tmp_path / "out.nii.gz", noisy)
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert back.shape == (12, 10, 8)
    assert back.get_data_dtype() == np.dtype(dtype)
    assert np.allclose(back.affine, AFFINE, atol=1e-5)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(AFFINE)
    expected = vol.quantise(noisy)[0]
    assert np.allclose(back.get_fdata(), expected, atol=1e-4)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        assert back.get_fdata().min() >= info.min and back.get_fdata().max() <= info.max


def test_scaled_integer_storage(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(0.5, -10)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    assert np.allclose(vol.array[0], data * 0.5 - 10)
    write_nifti(vol, tmp_path / "out.nii.gz", vol.array + 0.3)
    back = read_volume(tmp_path / "out.nii.gz")
    assert back.stored_dtype == np.int16
    assert np.allclose(back.array, vol.quantise(vol.array + 0.3))
    assert np.abs(back.array - (vol.array + 0.3)).max() <= 0.25 + 1e-6


def test_a_scaled_float_source_is_written_as_the_values_scored(tmp_path):
    """A float file with a slope and intercept in its header: the values are written unscaled (slope 1), so the file
    holds the adversarial that was scored. It kept the source's slope before, so a reader applied it to values that
    were already scaled (2x + 10 here: 220 off on this scan)."""
    data = (np.random.default_rng(0).random((6, 5, 4)) * 100).astype(np.float32)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    assert np.allclose(vol.array[0], data * 2 + 10)
    scored = vol.quantise(vol.array + 0.3)
    write_nifti(vol, tmp_path / "out.nii.gz", scored)
    back = read_volume(tmp_path / "out.nii.gz")
    assert back.stored_dtype == np.float32 and np.array_equal(back.array, scored)


def test_label_map_written_on_grid(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), AFFINE), str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 3:5, 1:6] = 1
    write_nifti(vol, tmp_path / "lab.nii.gz", labels, dtype=np.uint8)
    back = nib.load(str(tmp_path / "lab.nii.gz"))
    assert back.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, AFFINE, atol=1e-5)


def test_a_header_without_geometry_codes_is_written_as_the_scan_reads(tmp_path):
    """A scan with neither sform nor qform code gets its geometry by each reader's fallback, and nibabel's (x flipped,
    centred) is not ITK's (3D Slicer, ITK-SNAP). Outputs stated nibabel's as their geometry (codes 1), so in SimpleITK
    the prediction lay elsewhere than the scan: 19541 of 46080 voxels of its overlay differed on a 40x36x32 head. They
    now keep the scan's codes, and every reader puts them where it puts the scan."""
    sitk = pytest.importorskip("SimpleITK")
    image = nib.Nifti1Image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), AFFINE)
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    labels = (vol.array[0] % 3 == 0).astype(np.uint8)
    written = [write_nifti(vol, tmp_path / "labels.nii.gz", labels, dtype=np.uint8),
               write_nifti(vol, tmp_path / "scan.nii.gz", vol.array + 1)]
    scan = sitk.ReadImage(str(tmp_path / "in.nii.gz"))
    for path in written:
        back = sitk.ReadImage(str(path))
        assert np.allclose(back.GetOrigin(), scan.GetOrigin()) and np.allclose(back.GetDirection(), scan.GetDirection()), path
        assert np.allclose(back.GetSpacing(), scan.GetSpacing()), path
        assert np.allclose(nib.load(str(path)).affine, vol.affine), path  # and nibabel's fallback is the scan's too
    overlay = sitk.Resample(sitk.ReadImage(str(written[0])), scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(overlay).transpose(2, 1, 0), labels)


def test_maps_do_not_inherit_the_scans_display_window_or_intent(tmp_path):
    """Label maps and the perturbation copied the scan's cal_min/cal_max (-100..300: labels 0 and 1 drawn black in a
    viewer that honours them) and its intent (a t statistic). A map now has no window, the label intent for labels
    and none for the perturbation; the adversarial scan keeps the scan's header as it was."""
    header = nib.Nifti1Header()
    header["cal_min"], header["cal_max"] = -100, 300
    header.set_intent("t test", (10,), name="tstat")
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), AFFINE, header), str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 3:5, 1:6] = 1
    written = {"labels": write_nifti(vol, tmp_path / "labels.nii.gz", labels, dtype=np.uint8),
               "perturbation": write_nifti(vol, tmp_path / "perturbation.nii.gz", labels * 0.5, dtype=np.float32),
               "scan": write_nifti(vol, tmp_path / "scan.nii.gz", labels * 7.0)}
    back = {name: nib.load(str(path)).header for name, path in written.items()}
    for name, intent in (("labels", "label"), ("perturbation", "none")):
        assert (float(back[name]["cal_min"]), float(back[name]["cal_max"])) == (0.0, 0.0), name
        assert back[name].get_intent() == (intent, (), ""), name
        assert back[name].get_slope_inter() in ((None, None), (1.0, 0.0)), name
    assert (float(back["scan"]["cal_min"]), float(back["scan"]["cal_max"])) == (-100.0, 300.0)
    assert back["scan"].get_intent()[0] == "t test"


def test_multichannel_4d(tmp_path):
    data = np.random.default_rng(1).random((6, 7, 8, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "mc.nii.gz"))
    vol = read_volume(tmp_path / "mc.nii.gz")
    assert vol.array.shape == (2, 6, 7, 8)
    assert np.allclose(vol.array[1], data[..., 1])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("hello"), "not a"),
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((5, 5), np.float32), np.eye(4)), str(p)), "expected a 3D volume"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), str(p)), "NaN"),
    ],
)
def test_bad_inputs_raise_one_line(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(InputError) as err:
        read_volume(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize("shape", [(6, 7, 8), (6, 7, 8, 2)])
def test_unchanged_voxels_keep_the_sources_float64_values(tmp_path, shape):
    """float32, the attack's type, cannot hold a float64 file's values: written back, every voxel changed (by up to
    1e-4 here). The voxels marked unchanged are now the source's own, channels last as in the file (and, each voxel
    written as the source's value plus its change, so are those left without the mark)."""
    data = np.random.default_rng(2).uniform(-1000, 3000, shape)
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    moved = vol.array.copy()
    moved[..., :4] += 5
    write_nifti(vol, tmp_path / "plain.nii.gz", moved)  # written as its change from the source: the same values kept
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "plain.nii.gz")).dataobj)[:, :, 4:], data[:, :, 4:])
    write_nifti(vol, tmp_path / "out.nii.gz", moved, unchanged=moved == vol.array)
    back = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert back.dtype == np.float64 and np.array_equal(back[:, :, 4:], data[:, :, 4:])
    assert np.allclose(back[:, :, :4], data[:, :, :4] + 5, atol=1e-3)


def _int32_near_the_top(tmp_path, rng, shape, slope: float | None = 1e-6):
    """An int32 NIfTI file of values near 2**31 (with ``slope`` as its scl_slope, or none), where a float32 step is
    coarser than a stored unit: its stored values and the volume read from it."""
    stored = (2**31 - 1 - rng.integers(0, 1_000_000, size=shape)).astype(np.int32)
    image = nib.Nifti1Image(stored, AFFINE)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, str(tmp_path / "src.nii.gz"))
    return stored, read_volume(tmp_path / "src.nii.gz")


@pytest.mark.parametrize("slope", [1e-6, None])
def test_an_int32_nifti_beyond_float32_is_written_within_its_budget(tmp_path, slope):
    """int32 values near 2**31, with scl_slope 1e-6 (native values near 2147) or none: a float32 step there is 244 or
    128 stored units. The writer rounded each changed voxel's float32 value, not its change, so a change reached up to
    half a step past the budget (a budget of 31298 units came back as 31372, 130 of 507 changed voxels over; raw, one
    of 16409 units as 16448). Now each voxel is the source's stored value plus its rounded change:
    read back raw and scaled, no change passes the budget and the voxels left are the source's bit for bit."""
    rng = np.random.default_rng(0)
    stored, source = _int32_near_the_top(tmp_path, rng, (16, 16, 4), slope)
    unit = float(source.slope)  # native units per stored unit
    assert source.stored_dtype == np.int32 and source.float32_is_coarse()
    step = 2.0**-12 if slope is not None else 128.0  # float32's step at these values
    left = rng.random(source.array.shape) < 0.5
    for share in (0.2, 0.47, 0.7):  # the budget this share of a float32 step past 128 steps
        eps = (128 + share) * step
        signs = np.sign(rng.standard_normal(left.shape))
        adv = source.quantise(source.array + np.where(left, 0, signs * eps).astype(np.float32), source.array, eps)
        write_nifti(source, tmp_path / "adv.nii.gz", adv, unchanged=adv == source.array)
        back = nib.load(str(tmp_path / "adv.nii.gz"))
        raw = np.asarray(back.dataobj.get_unscaled())
        assert raw.dtype == np.int32 and np.array_equal(raw[left[0]], stored[left[0]])
        change = raw.astype(np.int64) - stored
        budget = np.floor(eps / unit + 1e-6)
        assert np.abs(change).max() <= budget and np.abs(change).max() > 0.99 * budget
        scaled = np.asarray(back.get_fdata(dtype=np.float64)) - stored.astype(np.float64) * unit
        assert np.abs(scaled).max() <= eps * (1 + 1e-12)


def test_medis_result_save_writes_a_coarse_int32_scan_within_its_budget(tiny_target, tmp_path):
    """MedISResult.save wrote the adversarial as its own source, rounding each changed voxel's float32 value (the
    drift the CLI's writer no longer has: an int32 file near 2**31 with scl_slope 1e-6, a float32 step 244 stored
    units). It now writes from the attacked scan: the changes within the budget, the untouched voxels bit for bit."""
    from medis3d.fusion import MedIS

    stored, volume = _int32_near_the_top(tmp_path, np.random.default_rng(1), (24, 24, 16))
    eps = (128 + 0.47) * 2.0**-12  # native: 0.47 of a float32 step past 128 steps, where rounding the value drifts most
    result = MedIS(tiny_target, members_spec=["pgd:ce"], eps=eps, eps_units="native", step=eps, steps=2)(volume)
    result.save(tmp_path / "out")
    raw = np.asarray(nib.load(str(tmp_path / "out" / "adversarial.nii.gz")).dataobj.get_unscaled())
    change = raw.astype(np.int64) - stored
    left = result.adversarial.array[0] == volume.array[0]
    assert (~left).sum() > 100 and np.array_equal(raw[left], stored[left])
    assert np.abs(change).max() <= np.floor(eps / 1e-6 + 1e-6)


def test_an_int32_nifti_beyond_float32_is_written_within_its_l2_budget(tmp_path):
    """int32 near 2**31 with scl_slope 1e-6: a float32 step is 244.14 stored units, and a change of 4 steps is written
    as 977 units (rounded in float64), 0.44 more than the float32 values' difference. The L2 quantiser measured that
    difference, so at a radius of the float32 view's length (111 voxels moved 4 steps) the file's change was 10293.3
    units long for a radius of 10288.7. It now measures the change as written: read back, within the radius."""
    rng = np.random.default_rng(0)
    stored, source = _int32_near_the_top(tmp_path, rng, (16, 16, 4))
    unit = float(source.slope)
    moved = rng.random(source.array.shape) < 0.1
    pushed = np.where(moved, source.array + 4 * 2.0**-12, source.array).astype(np.float32)
    eps = float(np.linalg.norm(pushed.astype(np.float64) - source.array))
    adv = source.quantise(pushed, source.array, eps, "l2")
    write_nifti(source, tmp_path / "adv.nii.gz", adv, unchanged=adv == source.array)
    raw = np.asarray(nib.load(str(tmp_path / "adv.nii.gz")).dataobj.get_unscaled())
    assert np.array_equal(raw[~moved[0]], stored[~moved[0]])
    length = np.linalg.norm((raw.astype(np.int64) - stored) * unit)
    assert 0.95 * eps < length <= eps


def test_a_float64_nifti_beyond_float32_is_written_within_its_budget(tmp_path):
    """float64 values near 1e9, where a float32 step is 64: the attack's float32 ``clean + delta`` (clamped to 100)
    rounded to a change of 128, and the writer wrote the float32 value itself, up to 32 more from the file's own
    value: 159.99 for a budget of 100, 448 of 475 changed voxels over. Now a value past the ball moves a float32 step
    toward the clean one, and each voxel is written as the source's value plus its change: read back, within the
    budget, and the voxels left are the source's bit for bit."""
    import torch

    rng = np.random.default_rng(0)
    data = 1e9 + rng.random((16, 16, 4)) * 1000.0
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "src.nii.gz"))
    source = read_volume(tmp_path / "src.nii.gz")
    left = rng.random(source.array.shape) < 0.5
    for eps in (100.0, 1000.0):
        delta = np.where(left, 0, np.sign(rng.standard_normal(left.shape)) * 1.5 * eps).astype(np.float32)
        pushed = torch.from_numpy(source.array) + torch.clamp(torch.from_numpy(delta), -eps, eps)  # as Budget.project
        adv = source.quantise(pushed.numpy(), source.array, eps)
        write_nifti(source, tmp_path / "adv.nii.gz", adv, unchanged=adv == source.array)
        back = np.asarray(nib.load(str(tmp_path / "adv.nii.gz")).dataobj)
        assert back.dtype == np.float64 and np.array_equal(back[left[0]], data[left[0]])
        change = np.abs(back - data)
        assert change.max() <= eps and change.max() >= eps - 64


def test_a_complex_valued_nifti_is_refused_in_one_line(tmp_path):
    """A complex64 NIfTI was read as its real part, with numpy's ComplexWarning printed (a third-party warning where
    the README promises none); an attack of it attacked another image than the file holds. Now refused, naming it."""
    import nibabel as nib

    from medis3d.errors import InputError
    from medis3d.io import read_volume

    path = tmp_path / "complex.nii.gz"
    values = (np.random.default_rng(0).normal(size=(8, 8, 8)) * (1 + 1j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    with pytest.raises(InputError, match="complex-valued voxels") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_an_output_that_cannot_be_written_is_named_not_its_staging_file(tmp_path):
    """``predict --out /proc/x.nii.gz`` said "/proc/.x.nii.gz.fjcqupka.nii.gz: No such file or directory": the staging
    file beside the output, a name the user never gave. Now the output is named."""
    from medis3d.errors import OutputError
    from medis3d.io.atomic import write_text_atomic

    (tmp_path / "a_file").write_text("")
    for path in (tmp_path / "a_file" / "x.json", Path("/proc/medis3d-test.json")):
        with pytest.raises(OutputError, match=r"cannot be written") as info:
            write_text_atomic(path, "{}")
        assert str(info.value).startswith(f"{path}: ") and ".medis3d-test.json." not in str(info.value)
