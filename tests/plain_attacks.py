"""Independent reference attacks for the tiny bundle of the tests, with full autograd through MONAI's own array
transforms (Orientation, Spacing) and ``monai.inferers.sliding_window_inference``, and no medis3d code: the tiny
bundle as MONAI runs it, and the plain optimisers of ``bench/reference.py`` (the strength benchmark's, a few
lines of torch each). medis3d's attacks are checked against these on the same model, scan and budget.

Each attack ascends cross-entropy against the clean prediction in model space, keeps its iterate inside the
L-inf ball (native units, whole HU: the scan is int16) and the scan's own intensity range, and returns its
strongest iterate by Dice (APGD, PGD) or its last (FGSM, IGSM). Scoring is independent too (:func:`dice`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Orientation, Spacing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reference  # noqa: E402  (bench/reference.py: the plain optimisers)


class PlainModel:
    """The tiny bundle as MONAI would run it (its config is ``conftest.TINY_CONFIG``), differentiable."""

    def __init__(self, network: torch.nn.Module, config: dict, affine: np.ndarray):
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        steps = {t["_target_"]: t for t in config["preprocessing"]["transforms"]}
        self.pixdim = tuple(steps["Spacingd"]["pixdim"])
        window = steps["ScaleIntensityRanged"]
        self.a_min, self.a_max = float(window["a_min"]), float(window["a_max"])
        inferer = config["inferer"]
        self.roi, self.sw_batch, self.overlap, self.mode = (inferer["roi_size"], inferer["sw_batch_size"], inferer["overlap"],
                                                            inferer["mode"])
        self.affine = torch.as_tensor(affine, dtype=torch.float64)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(1, I, J, K) scan in HU -> (1, C, model grid) logits; the intensity clip passes its gradient straight through."""
        img = MetaTensor(x, affine=self.affine)
        img = Spacing(pixdim=self.pixdim, mode="bilinear")(Orientation(axcodes="RAS")(img)).as_tensor()
        y = (img - self.a_min) / (self.a_max - self.a_min)
        y = y + (y.clamp(0, 1) - y).detach()
        return sliding_window_inference(y[None], self.roi, self.sw_batch, self.network, overlap=self.overlap, mode=self.mode)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x)[0].argmax(0)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Foreground Dice of two label maps."""
    return reference.dice(a, b)


class _Problem:
    def __init__(self, model: PlainModel, scan: np.ndarray, eps_hu: float):
        self.model = model
        self.x0 = torch.from_numpy(np.asarray(scan, np.float32))[None]
        self.low, self.high = float(self.x0.min()), float(self.x0.max())
        self.eps = float(math.floor(eps_hu))  # whole HU: every iterate is a storable int16 scan inside the ball
        self.reference = model.predict(self.x0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.round(torch.minimum(torch.maximum(x, self.x0 - self.eps), self.x0 + self.eps))
        return x.clamp(self.low, self.high)

    def loss_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        x = x.clone().requires_grad_(True)
        logits = self.model.logits(x)
        loss = F.cross_entropy(logits, self.reference[None])
        (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad, dice(logits[0].detach().argmax(0), self.reference)


def fgsm(model: PlainModel, scan: np.ndarray, eps_hu: float) -> torch.Tensor:
    p = _Problem(model, scan, eps_hu)
    return reference.sign_ascent(p.loss_and_grad, p.project, p.x0, p.eps, 1)


def igsm(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int) -> torch.Tensor:
    p = _Problem(model, scan, eps_hu)
    return reference.sign_ascent(p.loss_and_grad, p.project, p.x0, step_hu, steps)


def pgd(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int, seed: int = 0) -> torch.Tensor:
    p = _Problem(model, scan, eps_hu)
    g = torch.Generator().manual_seed(seed)
    start = p.project(p.x0 + (torch.rand(p.x0.shape, generator=g) * 2 - 1) * p.eps)
    return reference.sign_ascent(p.loss_and_grad, p.project, start, step_hu, steps, keep="strongest")


def apgd(model: PlainModel, scan: np.ndarray, eps_hu: float, steps: int) -> torch.Tensor:
    p = _Problem(model, scan, eps_hu)
    return reference.apgd_ascent(p.loss_and_grad, p.project, p.x0, p.eps, steps)
