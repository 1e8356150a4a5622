"""The Target attacks what MONAI runs: same preprocessing, same prediction, exact gradients in the scan's space."""

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medis3d.io import read_volume
from medis3d.metrics import dice_per_class


def test_preprocessing_equals_bundle_preprocessing(tiny_bundle, tiny_target, scan_file):
    parser = ConfigParser()
    parser.read_config(str(tiny_bundle / "configs" / "inference.json"))
    monai_pre = parser.get_parsed_content("preprocessing")
    expected = monai_pre({"image": str(scan_file)})["image"]
    vol = read_volume(scan_file)
    got = tiny_target.model_input(torch.from_numpy(vol.array), vol)
    assert got.shape == expected.shape
    assert torch.allclose(got.as_tensor(), expected.as_tensor().float(), atol=1e-5)
    assert np.allclose(got.affine.numpy(), expected.affine.numpy(), atol=1e-5)


def test_prediction_matches_monai_inference_on_scan_grid(tiny_bundle, tiny_target, scan_file):
    parser = ConfigParser()
    parser.read_config(str(tiny_bundle / "configs" / "inference.json"))
    monai_pre = parser.get_parsed_content("preprocessing")
    data = monai_pre({"image": str(scan_file)})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], (24, 24, 24), 4, tiny_target.network, overlap=0.25, mode="gaussian")
    pred = MetaTensor(torch.softmax(logits[0], 0), meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    out = Invertd(keys="pred", transform=monai_pre, orig_keys="image", nearest_interp=False)({"image": data["image"], "pred": pred})
    monai_labels = out["pred"].argmax(0).numpy()
    vol = read_volume(scan_file)
    ours = tiny_target.predict(vol)
    assert ours.shape == vol.spatial_shape == monai_labels.shape
    dice = dice_per_class(tiny_target.masks(ours), tiny_target.masks(monai_labels))
    assert dice[0] >= 0.99


def test_native_gradient_equals_full_autograd(tiny_target, scan_file):
    """Gradient of a scan-grid loss w.r.t. the native scan: engine + inverse vs one big autograd graph."""
    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array)
    weights = torch.randn(1, 2, *vol.spatial_shape, generator=torch.Generator().manual_seed(0))

    def loss(scan_logits):
        return (scan_logits * weights).sum()

    ours = tiny_target.evaluate(x, vol, loss).grad
    leaf = x.clone().requires_grad_(True)
    model_in = tiny_target.model_input(leaf, vol)
    logits = sliding_window_inference(model_in[None], (24, 24, 24), 4, tiny_target.network, overlap=0.25, mode="gaussian")
    scan_logits = tiny_target.to_scan_grid(logits, model_in)
    (expected,) = torch.autograd.grad(loss(scan_logits), leaf)
    assert expected.abs().sum() > 0
    assert (ours - expected).norm() / expected.norm() <= 1e-4


def test_clipped_voxels_still_get_gradient(tiny_target, scan_file):
    """The HU window clips at -100..300; BPDA passes the gradient through the clip."""
    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array).clone()
    x[0, :5] = 1000.0  # far above the window: clamp would give zero gradient
    grad = tiny_target.evaluate(x, vol, lambda l: torch.softmax(l, 1)[:, 1].mean()).grad
    assert grad[0, :5].abs().sum() > 0


def test_intensity_scale_from_window(tiny_target, scan_file):
    scale, note = tiny_target.intensity_scale(read_volume(scan_file))
    assert scale == 400.0 and "ScaleIntensityRange" in note
