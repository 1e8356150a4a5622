"""``medis3d bundle check``: what medis3d will attack in a bundle, and whether gradients reach the scan.

Loads the bundle safely, lists the network, its size, the inferer settings and the
preprocessing chain with each step's gradient treatment, then runs a gradient-flow check on
a scan (a synthetic one if none is given): the gradient of a loss of the prediction with
respect to the scan in its own space, and the network layers that block it or zero it, with
the stand-in medis3d uses for each non-differentiable step (the paper's guideline for
non-differentiable layers, automated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medis3d.bpda import gradient_flow
from medis3d.bundle import NO_INVERTD_NOTICE
from medis3d.io import read_volume
from medis3d.io.volume import Volume
from medis3d.target import Target

STAND_INS = {
    "straight-through clamp": "intensity clipping: exact clamp forward, identity gradient (BPDA)",
    "straight-through": "no gradient from MONAI: identity gradient (BPDA)",
    "differentiable equivalent": "re-implemented without in-place operations (exact gradient)",
    "exact": "MONAI's own transform on tensors (exact gradient)",
    "percentiles held constant": "the scaling's own gradient with the percentiles held constant",
}  # a step's gradient may name several of these, separated by ", "
PERCENTILES = ("percentiles computed by medis3d on tensors of any size (MONAI's own switch to numpy above a million "
               "voxels), their own gradient (one or two voxels each, where it is large) kept for diagnose's exact "
               "path; ")
ALWAYS = [
    {"step": "argmax / threshold (postprocessing)", "stand_in": "losses on softmax / sigmoid probabilities"},
    {"step": "rounding to the stored type", "stand_in": "steps taken in float, every iterate evaluated as stored (quantised)"},
    {"step": "resampling (Spacing, inverse)", "stand_in": "bilinear grid sampling, differentiable; a downsampling Spacing "
     "reads only the voxels its interpolation lands on (the rest cannot change the prediction); members with "
     "gradient=smooth take a box average over every voxel a model voxel stands for"},
]


def _other_steps(target: Target) -> list[dict]:
    """:data:`ALWAYS`, told as this bundle does them: its decision (the sigmoid threshold) and its resampling
    (Spacing's mode forward; back to the scan's grid as its Invertd does, nearest or interpolated)."""
    steps = [dict(step) for step in ALWAYS]
    if target.activation == "sigmoid" and target.threshold != 0.5:
        steps[0]["stand_in"] += f" (the logits taken relative to the bundle's threshold {target.threshold:g})"
    modes = sorted({str(s.args.get("mode", "bilinear")) for s in target.preprocessing.steps if s.name == "Spacing"})
    forward = "/".join(modes) or "bilinear"
    back = "nearest" if target.invert == "labels" or target.invert_nearest else forward
    if NO_INVERTD_NOTICE in target.notices:  # the losses take the probabilities back by the inverse, the prediction is the labels
        back = forward
        how = "the probabilities, for the losses; the bundle has no Invertd, so the prediction is its labels, nearest"
    else:
        how = f"as the bundle's Invertd{', on the labels' if target.invert == 'labels' else ', on the logits' if target.invert_logits else ''}"
    steps[2]["stand_in"] = steps[2]["stand_in"].replace(
        "bilinear grid sampling, differentiable", f"{forward} grid sampling forward, {back} back to the scan's grid ({how}), "
        "differentiable in the values")
    steps.extend({"step": f"{step.name}d (postprocessing)", "stand_in": f"MONAI's own transform on every prediction "
                  f"({step.describe()}); identity gradient (BPDA): the losses take the probabilities before it"}
                 for step in target.label_steps)
    return steps


def synthetic_scan(target: Target) -> Volume:
    """A blob volume in the scan intensity range the preprocessing expects (64^3, 1.5 mm)."""
    from monai.data import create_test_image_3d

    image, _ = create_test_image_3d(64, 64, 64, num_objs=8, rad_max=12, noise_max=0.1, random_state=np.random.RandomState(0))
    low, high = 0.0, 1.0
    for step in target.preprocessing.steps:
        if step.name == "ScaleIntensityRange":
            low, high = float(step.args.get("a_min", 0.0)), float(step.args.get("a_max", 1.0))
    array = (low + image * (high - low)).astype(np.float32)[None].repeat(target.in_channels, 0)
    return Volume(array=array, affine=np.diag([1.5, 1.5, 1.5, 1.0]))


def check_bundle(target: Target, scan: Path | None = None) -> dict:
    """The report ``medis3d bundle check`` prints."""
    volume = read_volume(scan) if scan is not None else synthetic_scan(target)
    params = sum(p.numel() for p in target.network.parameters())
    x = torch.from_numpy(volume.array)
    fg = target.foreground_classes

    def loss(scan_logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scan_logits, 1) if target.activation == "softmax" else torch.sigmoid(scan_logits)
        return probs[:, fg].mean()

    evaluation = target.evaluate(x, volume, loss)
    grad = evaluation.gradient()
    reaching = float(grad.ne(0).float().mean())
    paths = {}
    for path in ("exact", "smooth"):  # the real forward's own derivative, and BPDA for the whole path
        g = target.evaluate(x, volume, loss, gradient=path).gradient()
        paths[path] = {"fraction_of_voxels_reached": float(g.ne(0).float().mean()), "input_grad_norm": float(g.norm())}
    from monai.utils import fall_back_tuple

    model_shape = target.model_shape(volume)
    roi = fall_back_tuple(target.window.roi_size, model_shape)
    small = [min(r, 64) for r in roi]  # a smaller probe is cheaper, where the network takes any size
    try:
        flow = gradient_flow(target.network, torch.randn((1, target.in_channels, *small), device=target.device))
    except RuntimeError:  # a network with a fixed input size (UNETR's img_size) takes the window only
        flow = gradient_flow(target.network, torch.randn((1, target.in_channels, *roi), device=target.device))
    prediction = evaluation.segmentation
    return {
        "bundle": target.source,
        "network": target.name,
        "parameters": params,
        "activation": target.activation,
        "classes": {str(c): target.class_name(c) for c in range(target.out_channels)},
        "inferer": target.window.as_dict(),
        "preprocessing": [
            {**step, "stand_in": (PERCENTILES if step["transform"] == "ScaleIntensityRangePercentiles" else "")
             + "; ".join(STAND_INS.get(part, part) for part in step["gradient"].split(", "))}
            for step in target.preprocessing.describe()
        ],
        "other_non_differentiable_steps": _other_steps(target),
        "notices": list(target.notices),
        "scan": str(volume.path) if volume.path else "synthetic 64^3 blobs",
        "scan_shape": list(volume.spatial_shape),
        "model_shape": list(model_shape),
        "gradient": {
            "input_grad_norm": float(grad.norm()),
            "finite": bool(torch.isfinite(grad).all()),
            "fraction_of_voxels_reached": reaching,
            "network_input_grad_norm": flow["input_grad_norm"],
            "blocking_layers": flow["blocked"],
            "zero_gradient_layers": flow["zero"],
            "ok": bool(torch.isfinite(grad).all() and grad.abs().sum() > 0 and not flow["blocked"]),
            "paths": paths,
        },
        "foreground_voxels": {target.class_name(c): int(m.sum()) for c, m in zip(fg, target.masks(prediction))},
    }
