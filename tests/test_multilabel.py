"""Multi-label sigmoid models end to end: a tiny bundle with three overlapping labels (sigmoid,
threshold 0.5), attacked through the command line; the written files are read back and checked."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from conftest import TINY_CONFIG, save_nifti, synthetic_scan, train_tiny_unet

from medis3d.cli import app
from medis3d.io import read_volume

runner = CliRunner()
NAMES = ("halo", "blob", "core")  # nested, so every blob voxel carries two or three labels
EPS_HU = 60  # 15 % of the bundle's intensity window (-100..300 HU)
# the sigmoid bundle has no Invertd (its prediction is its labels on the model's grid); tests of the probabilities' way
# back to the scan's grid give their copy this one, as the MONAI pipeline they compare with has
INVERT = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key", "nearest_interp": False}


def overlapping_labels(seg: np.ndarray) -> np.ndarray:
    """``(3, I, J, K)`` 0/1: the blobs grown by two voxels, the blobs, the blobs shrunk by one."""
    blob = seg > 0
    return np.stack([ndimage.binary_dilation(blob, iterations=2), blob, ndimage.binary_erosion(blob)]).astype(np.uint8)


@pytest.fixture(scope="module")
def sigmoid_bundle(tmp_path_factory):
    from monai.losses import DiceCELoss

    root = tmp_path_factory.mktemp("sigmoid_bundle")
    (root / "configs").mkdir()
    (root / "models").mkdir()
    config = json.loads(json.dumps(TINY_CONFIG))
    config["network_def"]["out_channels"] = len(NAMES)
    config["postprocessing"]["transforms"] = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
    ]
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(
        json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": dict(enumerate(NAMES))}}}})
    )
    net = train_tiny_unet(len(NAMES), overlapping_labels, DiceCELoss(sigmoid=True), steps=80)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture()
def scan_and_labels(tmp_path):
    hu, seg = synthetic_scan(7)
    label = np.moveaxis(overlapping_labels(seg), 0, -1)  # 4D NIfTI, channels last
    return save_nifti(tmp_path / "scan.nii.gz", hu), save_nifti(tmp_path / "labels.nii.gz", label)


def _channels(path) -> np.ndarray:
    """A written prediction as ``(C, I, J, K)``."""
    return np.moveaxis(np.asarray(nib.load(str(path)).dataobj), -1, 0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _attack(bundle, scan, label, out, *extra):
    result = runner.invoke(app, ["attack", str(scan), "--bundle", str(bundle), "--label", str(label),
                                 "--eps", str(EPS_HU), "--eps-units", "native", "--step", "10", "--steps", "5",
                                 "--out", str(out), "--json", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_sigmoid_multilabel_attack_end_to_end(sigmoid_bundle, scan_and_labels, tmp_path):
    scan, label = scan_and_labels
    out = tmp_path / "out"
    report = _attack(sigmoid_bundle, scan, label, out, "--losses", "all")
    assert report["target"]["activation"] == "sigmoid"
    assert report["target"]["classes"] == dict(zip("012", NAMES))
    src = nib.load(str(scan))
    ref = _channels(label).astype(bool)

    # predictions: one channel per label, on the scan's grid, 0/1
    for name in ("prediction_clean.nii.gz", "prediction_adversarial.nii.gz"):
        pred = nib.load(str(out / name))
        assert pred.shape == src.shape + (len(NAMES),), name
        assert np.allclose(pred.affine, src.affine, atol=1e-5), name
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}, name
    clean, adv = _channels(out / "prediction_clean.nii.gz").astype(bool), _channels(out / "prediction_adversarial.nii.gz").astype(bool)

    # the model segments every label before the attack, and the labels overlap
    assert (clean[0] & clean[1]).sum() > 0.5 * clean[1].sum()
    clean_dice = [_dice(clean[c], ref[c]) for c in range(len(NAMES))]
    assert min(clean_dice) > 0.6, clean_dice
    assert report["clean"]["dice"] == pytest.approx(dict(zip(NAMES, clean_dice)), abs=1e-4)

    # Dice drops, measured on what was written
    adv_dice = [_dice(adv[c], ref[c]) for c in range(len(NAMES))]
    assert report["adversarial"]["dice"] == pytest.approx(dict(zip(NAMES, adv_dice)), abs=1e-4)
    assert report["success"] and np.mean(adv_dice) < np.mean(clean_dice) - 0.1, (clean_dice, adv_dice)
    from medis3d.bundle import load_bundle

    again = load_bundle(sigmoid_bundle).predict(read_volume(out / "adversarial.nii.gz"))
    assert np.array_equal(again.astype(bool), adv)

    # the L-inf budget holds in the written file (int16: quantisation adds at most half a unit)
    written = nib.load(str(out / "adversarial.nii.gz"))
    assert written.shape == src.shape and written.get_data_dtype() == np.int16
    delta = written.get_fdata() - src.get_fdata()
    assert 0 < np.abs(delta).max() <= EPS_HU + 0.5
    assert report["perturbation"]["linf_native"] == pytest.approx(np.abs(delta).max())


def test_sigmoid_labels_select_a_subset(sigmoid_bundle, scan_and_labels, tmp_path):
    scan, label = scan_and_labels
    out = tmp_path / "out"
    report = _attack(sigmoid_bundle, scan, label, out, "--losses", "dice", "--labels", "core,0")  # by name and by index
    ref = _channels(label).astype(bool)
    clean, adv = _channels(out / "prediction_clean.nii.gz").astype(bool), _channels(out / "prediction_adversarial.nii.gz").astype(bool)
    assert clean.shape[0] == len(NAMES)  # every label is still written
    for part in ("clean", "adversarial"):  # only the chosen labels are scored, each under its own name
        assert set(report[part]["dice"]) == {"halo", "core"}
    assert report["clean"]["dice"]["core"] == pytest.approx(_dice(clean[2], ref[2]), abs=1e-4)
    assert report["clean"]["dice"]["halo"] == pytest.approx(_dice(clean[0], ref[0]), abs=1e-4)
    assert report["adversarial"]["dice"]["core"] == pytest.approx(_dice(adv[2], ref[2]), abs=1e-4)
    ious = [(a & r).sum() / max(1, (a | r).sum()) for a, r in ((adv[0], ref[0]), (adv[2], ref[2]))]
    assert report["adversarial"]["mean_iou"] == pytest.approx(float(np.mean(ious)), abs=1e-4)
    assert report["success"] == (report["adversarial"]["mean_iou"] <= report["attack"]["success_threshold"])
    bad = runner.invoke(app, ["attack", str(scan), "--bundle", str(sigmoid_bundle), "--labels", "3"])
    assert bad.exit_code == 2 and "halo" in bad.output


def test_confident_sigmoid_voxels_keep_their_logit_and_its_gradient_on_the_scan_grid(sigmoid_bundle, scan_file):
    """A label on by a logit of 30 (and one off by -30) keeps that logit and its gradient on the scan grid: the
    inverse resamples in float32, where a probability within 6e-8 of 1 is 1, so the logit is taken from the
    probability and its complement, each precise where it is small."""
    from medis3d.bundle import load_bundle

    target = load_bundle(sigmoid_bundle)
    vol = read_volume(scan_file)
    model_in = target.model_input(torch.from_numpy(vol.array), vol)
    stitched = torch.full((1, len(NAMES), *model_in.shape[1:]), 30.0)
    stitched[:, 0] = -30.0
    stitched.requires_grad_(True)
    scan = target.to_scan_grid(stitched, model_in)
    assert torch.allclose(scan[0, 1:], torch.full_like(scan[0, 1:], 30.0), atol=1e-3)
    assert torch.allclose(scan[0, 0], torch.full_like(scan[0, 0], -30.0), atol=1e-3)
    (grad,) = torch.autograd.grad(scan.mean(), stitched)
    assert float(grad.sum()) == pytest.approx(1.0, rel=1e-3)


def test_the_overview_title_gives_the_reports_mean_dice_when_a_label_is_absent(sigmoid_bundle, scan_and_labels, tmp_path,
                                                                                overview_kwargs):
    """The overview's title averaged every label's Dice, one absent from the reference (Dice 0 there) among them:
    measured "mean Dice 0.432" where report.json's mean_dice (over the labels present) was 0.648."""
    from medis3d.report import _dice_text

    scan, label = scan_and_labels
    labels = _channels(label)
    labels[2] = 0  # no "core" in the reference; the model still predicts some
    label = save_nifti(tmp_path / "no_core.nii.gz", np.moveaxis(labels, 0, -1))
    seen = overview_kwargs
    report = _attack(sigmoid_bundle, scan, label, tmp_path / "out", "--members", "apgd:ce")
    adversarial = report["adversarial"]
    assert adversarial["dice"]["core"] == 0.0 and adversarial["mean_dice"] > 0.3
    assert _dice_text(seen["dice"], None) == f"mean Dice {adversarial['mean_dice']:.3f}"


def test_a_label_map_value_beyond_the_models_labels_is_refused(tmp_path):
    """A 3D label map is read as label k = output channel k-1; a value beyond the model's labels (a BraTS map's 4, ET,
    on a 3-label model) was silently dropped: the reference held none of the label file's 1792 ET voxels, and the report
    said the reference had none. It is refused as a softmax model's is."""
    from types import SimpleNamespace

    from medis3d.errors import InputError
    from medis3d.workflow import read_segmentation

    hu, seg = synthetic_scan(7)
    volume = read_volume(save_nifti(tmp_path / "scan.nii.gz", hu))
    target = SimpleNamespace(activation="sigmoid", out_channels=3)
    brats = (overlapping_labels(seg)[0] * 2).astype(np.uint8)  # edema 2 ...
    brats[overlapping_labels(seg)[2] > 0] = 4  # ... enhancing tumour 4
    with pytest.raises(InputError, match="label 4"):
        read_segmentation(save_nifti(tmp_path / "brats.nii.gz", brats), volume, target, "label")
    three = overlapping_labels(seg)[0] + overlapping_labels(seg)[1] + overlapping_labels(seg)[2]  # 1, 2, 3: one per channel
    read = read_segmentation(save_nifti(tmp_path / "ok.nii.gz", three.astype(np.uint8)), volume, target, "label")
    assert [int(c.sum()) for c in read] == [int((three == k).sum()) for k in (1, 2, 3)]


def test_sigmoid_labels_next_to_a_crop_are_thresholded_as_the_bundle_does(sigmoid_bundle, scan_file, tmp_path):
    """A crop after the resampling: MONAI's Invertd pads the probabilities with zeros and resamples them, so next to
    the crop a label's probability is mixed with that padding, and the bundle thresholds it at 0.5. Its logit was
    taken from the probability against its complement, both diluted alike: 342 voxel-labels called on that MONAI's
    own pipeline leaves off (halo 3830 voxels against MONAI's 3669, blob 3106 against 2978, core 2627 against 2574).
    Now the same label maps, voxel for voxel."""
    import shutil

    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import CenterSpatialCropd, Compose, Invertd, Orientationd, ScaleIntensityRanged, Spacingd

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "cropped"
    shutil.copytree(sigmoid_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(5, {"_target_": "CenterSpatialCropd", "keys": "@image_key", "roi_size": [22, 22, 22]})
    config["postprocessing"]["transforms"].insert(1, INVERT)  # the bundle inverts its probabilities, as the reference below
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    target = load_bundle(bundle)
    ours = target.predict(read_volume(scan_file))

    image = nib.load(str(scan_file))
    steps = Compose([Orientationd("image", "RAS"), Spacingd("image", (1.5, 1.5, 1.5), mode="bilinear"),
                     ScaleIntensityRanged("image", -100, 300, 0, 1, clip=True), CenterSpatialCropd("image", (22, 22, 22))])
    data = steps({"image": MetaTensor(torch.from_numpy(np.asarray(image.dataobj, np.float32))[None],
                                      affine=torch.as_tensor(image.affine))})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], (24, 24, 24), 4, target.network, overlap=0.25, mode="gaussian")[0]
    data["pred"] = MetaTensor(torch.sigmoid(logits), affine=data["image"].affine, meta=data["image"].meta)
    theirs = (Invertd("pred", steps, "image", nearest_interp=False)(data)["pred"].as_tensor() > 0.5).numpy()
    assert ours.shape == theirs.shape and ours.astype(bool).any()
    assert int((ours.astype(bool) != theirs).sum()) == 0, ([int(c.sum()) for c in ours], [int(c.sum()) for c in theirs])


def test_a_bundles_own_threshold_decides_the_labels(sigmoid_bundle, scan_file, tmp_path):
    """A bundle whose AsDiscreted thresholds its sigmoid labels at 0.3 had them thresholded at 0.5, silently (1541
    voxel-labels off that the bundle has on: halo 3803 voxels against its 4419, blob 3130 against 3638, core 2790
    against 3207). The scan
    grid's logits are now taken against the bundle's threshold: MONAI's own pipeline's label maps, voxel for voxel."""
    import shutil

    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Invertd, Orientationd, ScaleIntensityRanged, Spacingd

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "low_threshold"
    shutil.copytree(sigmoid_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"][1]["threshold"] = 0.3
    config["postprocessing"]["transforms"].insert(1, INVERT)  # the bundle inverts its probabilities, as the reference below
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    target = load_bundle(bundle)
    ours = target.predict(read_volume(scan_file)).astype(bool)

    image = nib.load(str(scan_file))
    steps = Compose([Orientationd("image", "RAS"), Spacingd("image", (1.5, 1.5, 1.5), mode="bilinear"),
                     ScaleIntensityRanged("image", -100, 300, 0, 1, clip=True)])
    data = steps({"image": MetaTensor(torch.from_numpy(np.asarray(image.dataobj, np.float32))[None],
                                      affine=torch.as_tensor(image.affine))})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], (24, 24, 24), 4, target.network, overlap=0.25, mode="gaussian")[0]
    data["pred"] = MetaTensor(torch.sigmoid(logits), affine=data["image"].affine, meta=data["image"].meta)
    probability = Invertd("pred", steps, "image", nearest_interp=False)(data)["pred"].as_tensor().numpy()
    theirs = probability > 0.3
    assert int((ours != theirs).sum()) == 0, ([int(c.sum()) for c in ours], [int(c.sum()) for c in theirs])
    assert int((theirs != (probability > 0.5)).sum()) > 100  # the threshold matters here
