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
