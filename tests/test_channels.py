"""Multi-channel inputs (one file per channel, or 4D NIfTI) and --labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SCAN_AFFINE, synthetic_scan

from medis3d.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def two_channel_bundle(tmp_path_factory):
    from monai.networks.nets import UNet

    root = tmp_path_factory.mktemp("mc_bundle")
    (root / "configs").mkdir()
    (root / "models").mkdir()
    config = {
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": [4, 8], "strides": [2]},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.25},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "bg", "1": "core", "2": "edema"}}}}}))
    torch.manual_seed(0)
    torch.save(UNet(3, 2, 3, (4, 8), (2,)).state_dict(), root / "models" / "model.pt")
    return root


def test_one_file_per_channel(two_channel_bundle, tmp_path, overview_kwargs):
    t1, _ = synthetic_scan(1)
    flair = synthetic_scan(2)[0].astype(np.float32) * 0.5
    nib.save(nib.Nifti1Image(t1, SCAN_AFFINE), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(flair, SCAN_AFFINE), str(tmp_path / "flair.nii.gz"))
    out = tmp_path / "out"
    scan = f"{tmp_path / 't1.nii.gz'},{tmp_path / 'flair.nii.gz'}"
    result = runner.invoke(app, ["attack", scan, "--bundle", str(two_channel_bundle), "--losses", "ce", "--steps", "2",
                                 "--eps", "20", "--eps-units", "native", "--step", "10", "--labels", "core", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["clean"]["dice"]) == ["core"]  # only the chosen structure is scored
    for name, source, dtype in (("t1", t1, np.int16), ("flair", flair, np.float32)):
        adv = nib.load(str(out / f"adversarial_{name}.nii.gz"))
        assert adv.get_data_dtype() == dtype and adv.shape == source.shape and np.allclose(adv.affine, SCAN_AFFINE)
        assert np.abs(adv.get_fdata() - source).max() <= 20 + 0.5
    # the overview shows the first channel only, and says so (it did not: its max |delta| read as the whole scan's)
    assert overview_kwargs["title"].endswith("; channel 1 of 2 shown"), overview_kwargs["title"]


def test_four_d_nifti_and_bad_labels(two_channel_bundle, tmp_path):
    data = np.stack([synthetic_scan(3)[0], synthetic_scan(4)[0]], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, SCAN_AFFINE), str(tmp_path / "mc.nii.gz"))
    out = tmp_path / "out"
    ok = runner.invoke(app, ["predict", str(tmp_path / "mc.nii.gz"), "--bundle", str(two_channel_bundle), "--out", str(out / "p.nii.gz")])
    assert ok.exit_code == 0, ok.output
    assert nib.load(str(out / "p.nii.gz")).shape == data.shape[:3]
    bad = runner.invoke(app, ["attack", str(tmp_path / "mc.nii.gz"), "--bundle", str(two_channel_bundle), "--labels", "tumour", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "tumour" in bad.output and not (tmp_path / "x").exists()
    wrong = runner.invoke(app, ["attack", str(tmp_path / "mc.nii.gz").replace("mc", "missing"), "--bundle", str(two_channel_bundle)])
    assert wrong.exit_code == 2


def test_the_report_gives_each_channel_files_stored_type(tmp_path):
    """A scan given as one file per channel is held as float32; the report said so (input.stored_dtype float32 for an
    int16 t1 beside a float32 channel), and now gives each file's type."""
    from medis3d.io import read_volume
    from medis3d.records import input_record

    t1, _ = synthetic_scan(1, shape=(32, 32, 32))
    nib.save(nib.Nifti1Image(t1, SCAN_AFFINE), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(t1.astype(np.float32) * 0.01, SCAN_AFFINE), str(tmp_path / "small.nii.gz"))
    both = input_record(read_volume(f"{tmp_path / 't1.nii.gz'},{tmp_path / 'small.nii.gz'}"))
    assert both["stored_dtype"] == "int16,float32" and both["stored_dtype_per_channel"] == ["int16", "float32"]
    alike = input_record(read_volume(f"{tmp_path / 't1.nii.gz'},{tmp_path / 't1.nii.gz'}"))
    assert alike["stored_dtype"] == "int16" and alike["stored_dtype_per_channel"] == ["int16", "int16"]
    one = input_record(read_volume(tmp_path / "t1.nii.gz"))
    assert one["stored_dtype"] == "int16" and one["stored_dtype_per_channel"] == ["int16"]

# -- channels in their own units -----------------------------------------------------------------------------------
# A t1 of -50..200 and a channel on a 100x smaller scale (-0.5..2), under a channel_wise NormalizeIntensity (as BraTS
# bundles z-score each channel by its own statistics): the model sees each channel in its own units, so a budget of
# 8/255 is 8/255 of each channel's own range. It was one eps from the range pooled over the channels (7.84, t1's): the
# small channel got 800/255 of its own range and went from -0.5..2 to -8.33..9.83.


def _apart_scan(tmp_path) -> tuple[str, list[np.ndarray]]:
    t1, _ = synthetic_scan(1)
    small = synthetic_scan(2)[0].astype(np.float32) * 0.01
    nib.save(nib.Nifti1Image(t1, SCAN_AFFINE), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(small, SCAN_AFFINE), str(tmp_path / "small.nii.gz"))
    return f"{tmp_path / 't1.nii.gz'},{tmp_path / 'small.nii.gz'}", [t1.astype(np.float64), small.astype(np.float64)]


def _own_range(channel: np.ndarray) -> float:
    low, high = np.percentile(channel, [0.5, 99.5])
    return float(high - low)


def _written(out, sources) -> list[np.ndarray]:
    return [np.asarray(nib.load(str(out / f"adversarial_{name}.nii.gz")).dataobj, dtype=np.float64) for name in ("t1", "small")]


def test_a_fraction_of_the_range_is_each_channels_own_share(two_channel_bundle, tmp_path):
    scan, sources = _apart_scan(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", scan, "--bundle", str(two_channel_bundle), "--members", "pgd:ce", "--steps", "3",
                                 "--eps", "8/255", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for source, written in zip(sources, _written(out, sources)):
        eps = 8 / 255 * _own_range(source)  # 7.84 for t1, 0.0784 for the small channel (it got 7.84 too)
        assert 0 < np.abs(written - source).max() <= eps * (1 + 1e-6)  # float32's rounding of the small channel
        assert source.min() <= written.min() and written.max() <= source.max()  # its own range, not the pooled one
    attack = report["attack"]
    assert attack["eps_native_per_channel"] == pytest.approx([8 / 255 * _own_range(s) for s in sources])
    assert attack["eps_native"] == pytest.approx(max(attack["eps_native_per_channel"]))
    assert [n.split(":")[0] for n in attack["normalization_per_channel"]] == ["t1", "small"]
    assert report["perturbation"]["linf_normalized"] <= 8 / 255 * (1 + 1e-6)
    assert report["perturbation"]["linf_normalized_per_channel"][1] == pytest.approx(8 / 255, rel=1e-5)
    assert report["adversarial"]["mean_iou"] < report["clean"]["mean_iou"] - 0.05  # the attack still bites


def test_an_l2_ball_is_measured_in_each_channels_own_range(two_channel_bundle, tmp_path):
    """Under an L2 budget in fractions of the range the ball bounds ``||delta / range||`` over the channels (an
    ellipsoid in native units), in the file as written."""
    scan, sources = _apart_scan(tmp_path)
    out = tmp_path / "out"
    eps = 4.0  # rms 4/255 of each channel's range over the 46,080 voxels of a channel
    result = runner.invoke(app, ["attack", scan, "--bundle", str(two_channel_bundle), "--members", "pgd:ce", "--steps", "3",
                                 "--norm", "l2", "--eps", str(eps), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    written = _written(out, sources)
    scaled = [(w - s) / _own_range(s) for w, s in zip(written, sources)]
    length = float(np.sqrt(sum((d**2).sum() for d in scaled)))
    assert 0.5 * eps < length <= eps * (1 + 1e-6)
    for source, adversarial in zip(sources, written):
        assert source.min() <= adversarial.min() and adversarial.max() <= source.max()
    assert np.abs(scaled[1]).max() < 0.5  # under half the small channel's range (native: the whole ball went there)
    assert report["perturbation"]["l2_normalized"] == pytest.approx(length, rel=1e-5)
    assert report["attack"]["eps_native_per_channel"] == pytest.approx([eps * _own_range(s) for s in sources])


def test_native_units_apply_in_each_channels_own_units(two_channel_bundle, tmp_path):
    """--eps-units native on channels the model normalises apart: the number as given in each channel's units (the
    budget is native, one unit for every channel), and the report's notice says what share of each range it is."""
    from medis3d.bundle import load_bundle
    from medis3d.fusion import MedIS
    from medis3d.io import read_volume
    from medis3d.workflow import _budget_notices

    scan, sources = _apart_scan(tmp_path)
    volume = read_volume(scan)
    medis = MedIS(load_bundle(two_channel_bundle), members_spec=["fgsm:ce"], eps=0.05, eps_units="native", steps=1)
    result = medis(volume)
    assert result.budget_scale is None and result.eps_native_per_channel == [0.05, 0.05]
    delta = np.abs(result.adversarial.array - volume.array).reshape(2, -1).max(1)
    assert delta[0] == 0  # t1 is stored as int16: 0.05 rounds to nothing
    assert 0 < delta[1] <= 0.05 * (1 + 1e-6)
    [notice] = _budget_notices(result, medis)
    assert "t1 0.051/255" in notice and "small 5.1/255" in notice


def test_one_unit_is_shared_under_a_fixed_window(two_channel_bundle, tmp_path):
    """A ScaleIntensityRange window maps every channel by one map: one native unit for every channel (the budget is
    native), while each channel keeps its own valid range; channel_wise steps and no intensity step give each
    channel its own."""
    import shutil

    from medis3d.attacks import Budget
    from medis3d.bundle import load_bundle
    from medis3d.io import read_volume

    scan, sources = _apart_scan(tmp_path)
    volume = read_volume(scan)
    apart = load_bundle(two_channel_bundle).intensity_scales(volume)
    assert apart.per_channel == pytest.approx([_own_range(s) for s in sources])
    for name, step in (("window", {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300,
                                   "b_min": 0, "b_max": 1}),
                       ("pooled", {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": False}),
                       ("percentiles", {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 1,
                                        "upper": 99, "b_min": 0, "b_max": 1, "channel_wise": True}),
                       ("raw", None)):
        bundle = tmp_path / name
        shutil.copytree(two_channel_bundle, bundle)
        config = json.loads((bundle / "configs" / "inference.json").read_text())
        config["preprocessing"]["transforms"] = config["preprocessing"]["transforms"][:1] + ([step] if step else [])
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        scales = load_bundle(bundle).intensity_scales(volume)
        assert (scales.per_channel is None) == (name in ("window", "pooled")), name
    budget = Budget.for_volume(volume, 1.0, 0.1, 1)
    assert np.asarray(budget.low).reshape(-1) == pytest.approx([s.min() for s in sources])
    assert np.asarray(budget.high).reshape(-1) == pytest.approx([s.max() for s in sources])


def test_the_finite_differences_step_each_channels_own_range(two_channel_bundle, tmp_path):
    """diagnose's finite differences step 1/255 of each channel's own range where the model sees the channels apart:
    a step of the pooled 250/255 on the small channel was 100 times its own 1/255, and the gradient's sign direction
    missed its central difference by 0.107 (flagged); stepping each channel's own 1/255 it misses by 0.0008."""
    from medis3d.bundle import load_bundle
    from medis3d.diagnose import Diagnose
    from medis3d.io import read_volume

    scan, sources = _apart_scan(tmp_path)
    volume = read_volume(scan)
    target = load_bundle(two_channel_bundle)
    check = Diagnose(target, member="pgd:ce", fd_voxels=2000).finite_differences(volume, target.predict(volume))
    assert check.measured["step_native_per_channel"] == pytest.approx([_own_range(s) / 255 for s in sources])
    assert all(row["relative_error"] < 0.1 for row in check.measured["directions"]), check.measured["directions"]


def test_a_studys_fusion_weighs_each_channels_own_share():
    """evaluate's fusion picks the least perturbation in the budget's units: with a budget per channel, the
    normalised sizes: a member that moved the small channel by all of its range (2.5 native) is not the least
    perturbation beside one that moved t1 by 5, 0.02 of its range."""
    from medis3d.study import fusion_rows

    def row(member, linf_native, linf_normalized, per_channel=True):
        return {"volume": "v", "eps": 8 / 255, "attack": "pgd", "loss": "ce", "member": member, "success": True,
                "adversarial_mean_iou": 0.1, "adversarial_dice": 0.1, "steps": 3, "linf_native": linf_native,
                "l2_native": 1.0, "linf_normalized": linf_normalized, "l2_normalized": 1.0,
                **({"budget_per_channel": True} if per_channel else {})}

    rows = [row("t1", 5.0, 0.02), row("small", 2.5, 1.0)]
    chosen = next(r for r in fusion_rows(rows, None) if r["attack"] == "medis_full")
    assert chosen["loss"] == "t1"
    rows = [row("t1", 5.0, 0.02, False), row("small", 2.5, 1.0, False)]  # one native unit: as before
    assert next(r for r in fusion_rows(rows, None) if r["attack"] == "medis_full")["loss"] == "small"


def test_channels_given_as_dicom_series_are_written_as_nifti(two_channel_bundle, tmp_path):
    """Two DICOM series as the channels: the default output was DICOM, which cannot be written for a stack, and the
    error came only after the whole attack, with nothing written. Now the default is one NIfTI file per channel, and
    an explicit DICOM output is refused before any attack, in one line."""
    from test_dicom import make_series

    from medis3d.io import read_volume

    for name, seed in (("t1", 1), ("t2", 2)):
        make_series(tmp_path / name, (synthetic_scan(seed, shape=(32, 32, 32))[0].astype(np.int32) + 1024).astype(np.int16),
                    spacing=(1.2, 1.2, 1.2), description=name)
    scan = f"{tmp_path / 't1'},{tmp_path / 't2'}"
    base = ["attack", scan, "--bundle", str(two_channel_bundle), "--losses", "ce", "--steps", "1", "--eps", "20",
            "--eps-units", "native", "--step", "10", "--quiet"]
    for option in (["--output-format", "dicom"], ["--output-format", "both"], ["--seg-format", "dicom"]):
        refused = runner.invoke(app, [*base, *option, "--out", str(tmp_path / "refused")])
        assert refused.exit_code == 2 and "\n" not in refused.output.strip() and "Traceback" not in refused.output
        assert f"{scan}: {' '.join(option)} cannot be written for channels given as 2 files" in refused.output
        assert "elapsed" not in refused.output and not (tmp_path / "refused").exists()  # before any attack
    out = tmp_path / "out"
    result = runner.invoke(app, [*base, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["outputs"]["adversarial_formats"] == ["nifti"]
    for name in ("t1", "t2"):
        source, adversarial = read_volume(tmp_path / name), read_volume(out / f"adversarial_{name}.nii.gz")
        assert np.allclose(source.affine, adversarial.affine, atol=1e-4) and adversarial.stored_dtype == np.int16
        assert np.abs(adversarial.array - source.array).max() <= 20 + 1e-3
