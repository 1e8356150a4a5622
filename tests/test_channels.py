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


def test_one_file_per_channel(two_channel_bundle, tmp_path):
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
