"""The shipped bundles (SegResNet, UNETR): valid metadata, they run in MONAI's own runner and
medis3d's prediction agrees with it, medis3d's attack workflow runs inside MONAI's runner through
the config fragment, and a shipped bundle can be picked by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medis3d.bundle import default_bundle_path, load_bundle, shipped_bundles
from medis3d.cli import app
from medis3d.io import read_volume
from medis3d.monai_workflow import fragment_path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"brain_t1_segresnet": "SegResNet", "brain_t1_unetr": "UNETR", "brain_t1_segresnet_robust": "SegResNet"}  # bundle name: network


@pytest.fixture(params=sorted(SHIPPED))
def bundle(request) -> Path:
    return shipped_bundles()[request.param]


def _head(folder: Path) -> Path:
    """A small synthetic T1-like volume (2 mm, LAS) the bundle can run on."""
    from monai.data import create_test_image_3d

    folder.mkdir(parents=True, exist_ok=True)
    img, _ = create_test_image_3d(48, 56, 48, num_objs=5, rad_max=14, noise_max=0.05, random_state=np.random.RandomState(0))
    path = folder / "head.nii.gz"
    nib.save(nib.Nifti1Image((img * 800).astype(np.int16), np.diag([-2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def test_both_shipped_and_segresnet_is_the_default():
    assert set(SHIPPED) <= set(shipped_bundles())
    assert default_bundle_path() == shipped_bundles()["brain_t1_segresnet"]


def test_metadata_verifies_offline(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(ROOT / "bundles" / "metadata_schema.json"))


def test_a_wheel_installs_every_shipped_bundle(bundle):
    """pyproject's data-files carry each shipped bundle's configs, weights, README and licence."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {p.resolve() for patterns in data_files.values() for pattern in patterns for p in ROOT.glob(pattern)}
    needed = [*sorted((bundle / "configs").glob("*.json")), bundle / "models" / "model.pt", bundle / "docs" / "README.md",
              bundle / "LICENSE"]
    assert [p for p in needed if p.resolve() not in installed] == []
    for folder, patterns in data_files.items():
        for pattern in patterns:
            if pattern.startswith(f"bundles/{bundle.name}/"):
                assert folder == f"share/medis3d/{Path(pattern).parent}".rstrip("/"), (folder, pattern)


def test_loads_safely_with_its_weights(bundle):
    target = load_bundle(bundle.name)  # by name: the shipped bundle
    assert target.source == str(bundle)
    assert target.name == SHIPPED[bundle.name] and target.activation == "softmax" and target.out_channels == 2
    assert target.class_names == {0: "background", 1: "brain"}
    assert not any("random weights" in n for n in target.notices)
    state = torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    assert (bundle / "models" / "model.pt").stat().st_size < 25e6
    assert (bundle / "LICENSE").is_file() and (bundle / "docs" / "README.md").is_file()


def test_train_config_builds_the_inference_network(bundle):
    """configs/train.json states the recipe as a SupervisedTrainer over the same network."""
    from monai.bundle import ConfigParser

    train = json.loads((bundle / "configs" / "train.json").read_text())
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert train["network_def"] == inference["network_def"]
    assert train["train"]["trainer"]["_target_"] == "SupervisedTrainer"
    parser = ConfigParser(train)
    # The training data come from the train extra's packages (pydeface's mean head): only the
    # recipe is checked here, so its one data path that imports a package is given directly.
    parser["pydeface_head"] = "/data/mean_reg2mean.nii.gz"
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert type(parser.get_parsed_content("network")).__name__ == SHIPPED[bundle.name]
    assert scheduler.optimizer is optimizer


def _monai_run(bundle: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True, timeout=600, cwd=bundle)


def test_monai_bundle_run_agrees_with_medis3d(bundle, tmp_path):
    scan = _head(tmp_path / "data")
    out = tmp_path / "out"
    done = _monai_run(bundle, ["--config_file", "configs/inference.json", "--bundle_root", str(bundle),
                               "--dataset_dir", str(scan.parent), "--output_dir", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(out.rglob("*.nii.gz"))
    assert len(written) == 1
    pred = nib.load(str(written[0]))
    assert pred.shape[:3] == (48, 56, 48) and np.allclose(pred.affine, nib.load(str(scan)).affine)
    monai_mask = np.asarray(pred.dataobj).reshape(pred.shape[:3]) > 0
    ours = load_bundle(bundle).predict(read_volume(scan))
    assert ours.shape == monai_mask.shape
    assert 0.02 < monai_mask.mean() < 0.98  # the model does segment something here: the comparison means something
    disagree = np.logical_xor(ours > 0, monai_mask).mean()
    assert disagree < 1e-3, f"{disagree:.2%} of voxels differ from monai.bundle run"


def test_attack_workflow_inside_monai_runner(bundle, tmp_path):
    scan = _head(tmp_path / "data")
    out = tmp_path / "out"
    configs = json.dumps([str(bundle / "configs" / "inference.json"), str(fragment_path())])
    done = _monai_run(bundle, ["attack", "--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(scan.parent),
                               "--output_dir", str(out), "--medis3d_attack#steps", "1", "--medis3d_attack#losses", "ce"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "head" / "report.json").read_text())
    assert report["attack"]["losses"] == ["ce"] and report["attack"]["steps"] == 1
    assert report["target"]["network"] == SHIPPED[bundle.name]
    adv = nib.load(str(out / "head" / "adversarial.nii.gz"))
    assert adv.shape == (48, 56, 48) and adv.get_data_dtype() == np.int16
    assert json.loads((out / "medis3d_summary.json").read_text())[0]["input"].endswith("head.nii.gz")


def test_command_line_picks_a_shipped_bundle_by_name(tmp_path, monkeypatch):
    """``--bundle brain_t1_unetr`` (attack, predict, batch, evaluate, bundle check load the same way)."""
    scan = _head(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # no folder of that name here: the name means the shipped bundle
    out = tmp_path / "pred.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(scan), "--bundle", "brain_t1_unetr", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = load_bundle(shipped_bundles()["brain_t1_unetr"]).predict(read_volume(scan))
    assert np.array_equal(np.asarray(nib.load(str(out)).dataobj), expected)
    unknown = CliRunner().invoke(app, ["attack", str(scan), "--bundle", "brain_t1_nosuch"])
    assert unknown.exit_code == 2 and "brain_t1_unetr" in unknown.output  # the error names the shipped bundles


def test_bundle_check_passes(bundle):
    """``medis3d bundle check``: the gradient reaches the scan (UNETR takes only its 96^3 window)."""
    result = CliRunner().invoke(app, ["bundle", "check", bundle.name, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["network"] == SHIPPED[bundle.name] and report["gradient"]["ok"]
    assert report["gradient"]["fraction_of_voxels_reached"] > 0.5
    steps = {s["transform"]: s for s in report["preprocessing"]}
    # the percentiles have a gradient at any size (MONAI's own have none above a million voxels), and say so
    assert "any size" in steps["ScaleIntensityRangePercentiles"]["stand_in"]
    assert steps["ScaleIntensityRangePercentiles"]["smooth_stand_in"] == "kernel-smoothed percentiles"
    assert steps["Spacing"]["smooth_stand_in"].startswith("box average")
    paths = report["gradient"]["paths"]
    assert paths["smooth"]["fraction_of_voxels_reached"] >= paths["exact"]["fraction_of_voxels_reached"] > 0
    table = CliRunner().invoke(app, ["bundle", "check", bundle.name], env={"COLUMNS": "400"})  # the plain table says so too
    assert table.exit_code == 0, table.output
    rows = {line.split("│")[1].strip(): line for line in table.output.splitlines() if line.count("│") >= 6}
    assert "kernel-smoothed percentiles" in rows["ScaleIntensityRangePercentiles"] and "box average" in rows["Spacing"]
