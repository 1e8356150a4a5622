"""The shipped default bundle: valid metadata, runs in MONAI's own runner, and medis3d's attack
workflow runs inside MONAI's runner through the config fragment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medis3d.bundle import default_bundle_path, load_bundle
from medis3d.monai_workflow import fragment_path

BUNDLE = default_bundle_path()
ROOT = Path(__file__).resolve().parent.parent


def _head(folder: Path) -> Path:
    """A small synthetic T1-like volume (2 mm, LAS) the bundle can run on."""
    from monai.data import create_test_image_3d

    folder.mkdir(parents=True, exist_ok=True)
    img, _ = create_test_image_3d(48, 56, 48, num_objs=5, rad_max=14, noise_max=0.05, random_state=np.random.RandomState(0))
    path = folder / "head.nii.gz"
    nib.save(nib.Nifti1Image((img * 800).astype(np.int16), np.diag([-2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def test_metadata_verifies_offline():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(ROOT / "bundles" / "metadata_schema.json"))


def test_loads_safely_with_its_weights():
    target = load_bundle()
    assert target.name == "SegResNet" and target.activation == "softmax" and target.out_channels == 2
    assert target.class_names == {0: "background", 1: "brain"}
    assert not any("random weights" in n for n in target.notices)


def _monai_run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True, timeout=600, cwd=BUNDLE)


def test_monai_bundle_run_inference(tmp_path):
    scan = _head(tmp_path / "data")
    out = tmp_path / "out"
    done = _monai_run(["--config_file", "configs/inference.json", "--bundle_root", str(BUNDLE),
                       "--dataset_dir", str(scan.parent), "--output_dir", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(out.rglob("*.nii.gz"))
    assert len(written) == 1
    pred = nib.load(str(written[0]))
    assert pred.shape[:3] == (48, 56, 48) and np.allclose(pred.affine, nib.load(str(scan)).affine)


def test_attack_workflow_inside_monai_runner(tmp_path):
    scan = _head(tmp_path / "data")
    out = tmp_path / "out"
    configs = json.dumps([str(BUNDLE / "configs" / "inference.json"), str(fragment_path())])
    done = _monai_run(["attack", "--config_file", configs, "--bundle_root", str(BUNDLE), "--dataset_dir", str(scan.parent),
                       "--output_dir", str(out), "--medis3d_attack#steps", "1", "--medis3d_attack#losses", "ce"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "head" / "report.json").read_text())
    assert report["attack"]["losses"] == ["ce"] and report["attack"]["steps"] == 1
    adv = nib.load(str(out / "head" / "adversarial.nii.gz"))
    assert adv.shape == (48, 56, 48) and adv.get_data_dtype() == np.int16
    assert json.loads((out / "medis3d_summary.json").read_text())[0]["input"].endswith("head.nii.gz")
