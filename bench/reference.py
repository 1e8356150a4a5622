"""Independent references for the strength benchmark: no medis3d attack, engine or preprocessing code.

* :func:`bundle_segmentation`: the bundle as MONAI runs it (``ConfigParser``: its own preprocessing,
  inferer and postprocessing, minus saving) on an array written to a NIfTI file first, so every
  attack is scored on the file as a user would store it.
* :func:`plain_pgd`: PGD with cross-entropy in a few lines of torch: MONAI's own array transforms on
  tensors (Orientation, Spacing), percentiles with ``torch.quantile``-style interpolation, a
  straight-through clip, and full autograd through ``monai.inferers.sliding_window_inference``.
* :func:`standin_pgd`: the same PGD through a simpler stand-in of the preprocessing (trilinear
  resize with ``F.interpolate``, quantiles of a subsample, straight-through clip); its adversarial
  is a transfer attack on the real bundle.

Both attacks take the clean prediction in model space as their reference and quantise their
iterate to the scan's stored integer type when it has one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, Spacing


class Bundle:
    """A MONAI bundle's network and config, read with MONAI's own ConfigParser (the shipped bundles are trusted)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.parser = ConfigParser()
        self.parser.read_config(str(self.root / "configs" / "inference.json"))
        self.parser["bundle_root"] = str(self.root)
        self.network = self.parser.get_parsed_content("network_def")
        state = torch.load(str(self.root / "models" / "model.pt"), map_location="cpu", weights_only=True)
        self.network.load_state_dict(state)
        self.network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        inferer = self.parser.get_parsed_content("inferer")
        self.roi, self.sw_batch, self.overlap, self.mode = inferer.roi_size, inferer.sw_batch_size, inferer.overlap, inferer.mode
        pre = self.parser.config["preprocessing"]["transforms"]
        spacing = next(t for t in pre if t["_target_"].startswith("Spacing"))
        percentiles = next(t for t in pre if t["_target_"].startswith("ScaleIntensityRangePercentiles"))
        self.pixdim = tuple(float(v) for v in spacing["pixdim"])
        self.lower, self.upper = float(percentiles["lower"]), float(percentiles["upper"])

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, self.roi, self.sw_batch, self.network, overlap=self.overlap, mode=self.mode)


def bundle_segmentation(bundle: Bundle, array: np.ndarray, like: nib.Nifti1Image) -> np.ndarray:
    """The bundle's label map on the scan's grid for ``array`` (the scan's voxels) written like the file ``like``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "scan.nii.gz")
        dtype = like.get_data_dtype()
        values = np.asarray(array).reshape(like.shape)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            values = np.clip(np.rint(values), info.min, info.max)
        nib.save(nib.Nifti1Image(values.astype(dtype), like.affine, like.header), path)
        data = bundle.parser.get_parsed_content("preprocessing", instantiate=True)({"image": path})
        with torch.no_grad():
            data["pred"] = bundle.infer(data["image"][None])[0]
        post = bundle.parser.get_parsed_content("postprocessing")
        out = Compose([t for t in post.transforms if type(t).__name__ != "SaveImaged"])(data)
        return out["pred"][0].numpy().astype(np.uint8)


def _percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``np.percentile`` (linear) through sorting: differentiable for any size."""
    values = torch.sort(flat).values
    pos = q / 100 * (values.numel() - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, values.numel() - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


def _clip(y: torch.Tensor) -> torch.Tensor:
    return y + (y.clamp(0, 1) - y).detach()


def real_preprocessing(bundle: Bundle, x: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """The bundle's preprocessing with MONAI's array transforms on tensors, differentiable."""
    img = MetaTensor(x, affine=torch.as_tensor(affine, dtype=torch.float64))
    img = Spacing(pixdim=bundle.pixdim, mode="bilinear")(Orientation(axcodes="RAS")(img)).as_tensor()
    flat = img.reshape(-1)
    lo, hi = _percentile(flat, bundle.lower), _percentile(flat, bundle.upper)
    return _clip((img - lo) / (hi - lo))


def standin_preprocessing(bundle: Bundle, x: torch.Tensor, affine: np.ndarray, model_shape) -> torch.Tensor:
    """A simpler stand-in: RAS by flips, a trilinear resize to the model's grid, quantiles of a subsample."""
    codes = nib.aff2axcodes(affine)
    flip = [d for d, c in enumerate(codes) if c in "LPI"]
    order = [next(d for d, c in enumerate(codes) if c in pair) for pair in ("LR", "PA", "IS")]
    img = x.permute(0, *[o + 1 for o in order])
    flip = [order.index(d) + 1 for d in flip]
    img = torch.flip(img, flip) if flip else img
    img = F.interpolate(img[None], size=tuple(model_shape), mode="trilinear", align_corners=False)[0]
    sample = img.reshape(-1)[::7]
    lo, hi = torch.quantile(sample, bundle.lower / 100), torch.quantile(sample, bundle.upper / 100)
    return _clip((img - lo) / (hi - lo))


def _pgd(bundle: Bundle, scan: nib.Nifti1Image, eps: float, steps: int, step: float, preprocess, seed: int = 0) -> np.ndarray:
    """PGD-CE with a random start in the L-inf ball (native units), against the clean prediction in model space."""
    x0 = torch.from_numpy(np.asarray(scan.dataobj, dtype=np.float32).reshape(scan.shape[:3]))[None]
    low, high = float(x0.min()), float(x0.max())
    integer = np.issubdtype(scan.get_data_dtype(), np.integer)
    with torch.no_grad():
        reference = bundle.infer(preprocess(x0)[None])[0].argmax(0)
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x0.shape, generator=g) * 2 - 1) * eps
    for _ in range(steps):
        x = (x0 + delta).clamp(low, high)
        if integer:
            x = x + (torch.round(x) - x).detach()
        x.requires_grad_(True)
        loss = F.cross_entropy(bundle.infer(preprocess(x)[None]), reference[None].long())
        (grad,) = torch.autograd.grad(loss, x)
        delta = (delta + step * grad.sign()).clamp(-eps, eps).detach()
    adversarial = (x0 + delta).clamp(low, high)
    return adversarial[0].numpy()


def plain_pgd(bundle: Bundle, scan: nib.Nifti1Image, eps: float, steps: int, step: float, seed: int = 0) -> np.ndarray:
    """PGD-CE through the bundle's own transforms and sliding-window inference, full autograd."""
    return _pgd(bundle, scan, eps, steps, step, lambda x: real_preprocessing(bundle, x, scan.affine), seed)


def standin_pgd(bundle: Bundle, scan: nib.Nifti1Image, eps: float, steps: int, step: float, seed: int = 0) -> np.ndarray:
    """PGD-CE through the stand-in preprocessing (a transfer attack on the real bundle)."""
    x0 = torch.from_numpy(np.asarray(scan.dataobj, dtype=np.float32).reshape(scan.shape[:3]))[None]
    with torch.no_grad():
        shape = real_preprocessing(bundle, x0, scan.affine).shape[1:]
    return _pgd(bundle, scan, eps, steps, step, lambda x: standin_preprocessing(bundle, x, scan.affine, shape), seed)
