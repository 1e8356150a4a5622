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

* :func:`plain_apgd`: Croce & Hein's APGD with cross-entropy, the class-balanced capped logit margin, SEA's
  Jensen-Shannon loss or SEA's masked spherical loss (of the raw logits, or of the log-probabilities as medis3d
  takes it) through the same real preprocessing: the independent counterpart of medis3d's ``apgd`` members. In an
  L-inf ball (signed steps) or an L2 ball (``norm="l2"``: steps along ``g / ||g||``, as Croce & Hein's L2 version),
  with the percentiles' own derivative (full autograd) or with them held constant (``hold_percentiles``).

The attacks take the clean prediction in model space as their reference and quantise their
iterate to the scan's stored integer type when it has one. The optimisers themselves
(:func:`sign_ascent`, :func:`apgd_ascent`) take any loss-and-gradient function and projection, and
:class:`Problem` any differentiable model, so the tests run the same ones on their tiny model
(``tests/plain_attacks.py``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
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


def real_preprocessing(bundle: Bundle, x: torch.Tensor, affine: np.ndarray, hold_percentiles: bool = False) -> torch.Tensor:
    """The bundle's preprocessing with MONAI's array transforms on tensors, differentiable (``hold_percentiles``:
    the percentiles' values without their derivative, which lands on the one or two voxels each sits on)."""
    img = MetaTensor(x, affine=torch.as_tensor(affine, dtype=torch.float64))
    img = Spacing(pixdim=bundle.pixdim, mode="bilinear")(Orientation(axcodes="RAS")(img)).as_tensor()
    flat = img.reshape(-1)
    lo, hi = _percentile(flat, bundle.lower), _percentile(flat, bundle.upper)
    if hold_percentiles:
        lo, hi = lo.detach(), hi.detach()
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


# -- plain optimisers: any loss and projection -------------------------------------------------------------
# ``loss_and_grad(x)`` returns (loss, its gradient in x, a score of x where lower is a stronger attack: Dice);
# ``project(x)`` is the nearest point of the ball (and valid range, stored grid) to x.
LossAndGrad = Callable[[torch.Tensor], "tuple[float, torch.Tensor, float]"]


def sign_ascent(loss_and_grad: LossAndGrad, project: Callable, x: torch.Tensor, step: float, steps: int,
                keep: str = "last") -> torch.Tensor:
    """IGSM / PGD: ``steps`` signed-gradient steps of ``step`` from ``x``; the last iterate, or (``keep="strongest"``)
    the one with the lowest score, the last included."""
    best = (math.inf, x)
    for _ in range(steps):
        _, grad, score = loss_and_grad(x)
        if score < best[0]:
            best = (score, x)
        x = project(x + step * grad.sign())
    if keep == "last":
        return x
    return x if loss_and_grad(x)[2] < best[0] else best[1]


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """The L2 ball's steepest-ascent direction: the gradient scaled to unit length."""
    return grad / grad.norm().clamp_min(1e-12)


def apgd_ascent(loss_and_grad: LossAndGrad, project: Callable, x: torch.Tensor, eps: float, steps: int,
                direction: Callable[[torch.Tensor], torch.Tensor] = torch.sign) -> torch.Tensor:
    """Croce & Hein's APGD (ICML 2020) from ``x``: step 2 eps, momentum 0.75; at their checkpoints (0.22, then
    gaps shrinking by 0.03 down to 0.06 of the iterations) the step is halved and the search sent back to the
    best point by the loss when under 75 % of the steps since the last checkpoint raised the loss, or when the
    step was not halved at the last checkpoint and the best loss has not risen since. The iterate returned is
    the strongest by score. Steps go along ``direction(gradient)``: its sign (L-inf), or :func:`l2_direction`."""
    marks = [0.0, 0.22]
    while marks[-1] < 1:
        marks.append(marks[-1] + max(marks[-1] - marks[-2] - 0.03, 0.06))
    checks = {math.ceil(q * steps) for q in marks[1:] if q <= 1}
    eta = 2 * eps
    x_prev = x
    f, grad, score = loss_and_grad(x)
    f_best, x_best, g_best = f, x, grad
    strongest = (score, x)
    since, raised, reduced, f_then = 0, 0, False, f_best
    for k in range(steps):
        z = project(x + eta * direction(grad))
        x_new = z if k == 0 else project(x + 0.75 * (z - x) + 0.25 * (x - x_prev))
        f_new, g_new, score = loss_and_grad(x_new)
        if score < strongest[0]:
            strongest = (score, x_new)
        raised += int(f_new > f)
        if f_new > f_best:
            f_best, x_best, g_best = f_new, x_new, g_new
        x_prev, x, f, grad = x, x_new, f_new, g_new
        if k + 1 in checks:
            reduced = raised < 0.75 * (k + 1 - since) or (not reduced and f_best <= f_then)
            if reduced:
                eta /= 2
                x = x_prev = x_best
                f, grad = f_best, g_best
            since, raised, f_then = k + 1, 0, f_best
    return strongest[1]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Foreground Dice of two label maps (class 1 against the rest)."""
    a, b = a == 1, b == 1
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def margin_loss(logits: torch.Tensor, reference: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """The class-balanced capped logit margin: per voxel ``max z(other) - z(true)`` capped at ``cap``, averaged
    within each reference class and then over the classes present."""
    z = logits[0]
    onehot = F.one_hot(reference, z.shape[0]).movedim(-1, 0).bool()
    gap = (z.masked_fill(onehot, -torch.inf).amax(0) - (z * onehot).sum(0)).clamp(max=cap)
    return torch.stack([gap[reference == c].mean() for c in reference.unique()]).mean()


def js_loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SEA's Jensen-Shannon divergence between the softmax and the one-hot reference, voxel mean."""
    p = logits[0].softmax(0)
    q = F.one_hot(reference, p.shape[0]).movedim(-1, 0).to(p.dtype)
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))), 0.0).sum(0)

    return ((kl(p, m) + kl(q, m)) / 2).mean()


def masked_spherical_loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SEA's masked spherical loss: minus the reference class's entry of the unit-length logit vector, on the
    voxels still predicted as the reference (the mask carries no gradient), voxel mean."""
    z = logits[0]
    unit = z / z.pow(2).sum(0, keepdim=True).sqrt()
    still = (z.detach().argmax(0) == reference).to(z.dtype)
    return -(unit.gather(0, reference[None])[0] * still).mean()


def masked_spherical_logp_loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The masked spherical loss of the log-probabilities (medis3d takes its losses on the scan grid's log-probabilities)."""
    return masked_spherical_loss(torch.log_softmax(logits, 1), reference)


LOSSES = {"ce": lambda logits, reference: F.cross_entropy(logits, reference[None]), "margin": margin_loss, "js": js_loss,
          "masked_spherical": masked_spherical_loss, "masked_spherical_logp": masked_spherical_logp_loss}


class Problem:
    """A scan under attack, for the plain optimisers: ``logits(x)`` (the scan's voxels ``(1, I, J, K)`` to
    ``(1, C, *model grid)`` logits, differentiable), the clean voxels ``x0``, the L-inf ball of ``eps`` (native
    units; ``norm="l2"``: the L2 ball) inside the scan's own intensity range, the loss ascended (a name of :data:`LOSSES`; APGD compares
    iterates by it too), and the reference: the clean prediction where ``logits`` puts it.

    An integer scan is attacked on its stored grid one of two ways: ``rounding="inside"`` rounds each iterate
    straight-through inside the loss (the iterate itself stays real: the benchmark's), ``"project"`` makes every
    iterate whole in the projection, inside a whole-number ball (the tests'; L-inf only)."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, eps: float, loss: str = "ce",
                 integer: bool = True, rounding: str = "inside", norm: str = "linf"):
        if rounding not in ("inside", "project"):
            raise ValueError(f"rounding is inside or project, not {rounding!r}")
        if norm not in ("linf", "l2") or (norm == "l2" and integer and rounding == "project"):
            raise ValueError(f"the ball is linf or l2 (l2 rounds inside the loss), not {norm!r} with rounding {rounding!r}")
        self.norm = norm
        self.logits, self.x0 = logits, x0
        self.loss = LOSSES[loss]
        self.low, self.high = float(x0.min()), float(x0.max())
        self.round_inside = integer and rounding == "inside"
        self.round_projected = integer and rounding == "project"
        self.eps = float(math.floor(eps)) if self.round_projected else float(eps)
        with torch.no_grad():
            self.reference = logits(x0)[0].argmax(0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "l2":
            delta = x - self.x0
            return (self.x0 + delta * min(1.0, self.eps / max(float(delta.norm()), 1e-12))).clamp(self.low, self.high)
        x = torch.minimum(torch.maximum(x, self.x0 - self.eps), self.x0 + self.eps)
        return (torch.round(x) if self.round_projected else x).clamp(self.low, self.high)

    @property
    def direction(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ball's steepest-ascent direction of a gradient (for :func:`apgd_ascent`)."""
        return l2_direction if self.norm == "l2" else torch.sign

    def loss_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        x = x.clone().requires_grad_(True)
        stored = x + (torch.round(x) - x).detach() if self.round_inside else x
        logits = self.logits(stored)
        loss = self.loss(logits, self.reference)
        (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad, dice(logits[0].detach().argmax(0), self.reference)

    def random_start(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.project(self.x0 + (torch.rand(self.x0.shape, generator=g) * 2 - 1) * self.eps)


def scan_problem(bundle: Bundle, scan: nib.Nifti1Image, eps: float, preprocess, loss: str = "ce", norm: str = "linf") -> Problem:
    """A NIfTI scan under attack through ``bundle``'s network after ``preprocess`` (scan voxels to the model's input)."""
    x0 = torch.from_numpy(np.asarray(scan.dataobj, dtype=np.float32).reshape(scan.shape[:3]))[None]
    return Problem(lambda x: bundle.infer(preprocess(x)[None]), x0, eps, loss,
                   integer=bool(np.issubdtype(scan.get_data_dtype(), np.integer)), norm=norm)


def _pgd(bundle: Bundle, scan: nib.Nifti1Image, eps: float, steps: int, step: float, preprocess, seed: int = 0) -> np.ndarray:
    """PGD-CE with a random start in the L-inf ball (native units), against the clean prediction in model space;
    its last iterate."""
    problem = scan_problem(bundle, scan, eps, preprocess)
    adversarial = sign_ascent(problem.loss_and_grad, problem.project, problem.random_start(seed), step, steps)
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


def plain_apgd(bundle: Bundle, scan: nib.Nifti1Image, eps: float, steps: int, loss: str = "ce", norm: str = "linf",
               hold_percentiles: bool = False) -> np.ndarray:
    """APGD (from the clean scan) with ``loss`` (a name of :data:`LOSSES`) through the bundle's own transforms and
    sliding-window inference, full autograd (``hold_percentiles``: but the percentiles' own derivative), in the
    ``norm`` ball of ``eps``; its strongest iterate by Dice in model space."""
    problem = scan_problem(bundle, scan, eps, lambda x: real_preprocessing(bundle, x, scan.affine, hold_percentiles), loss, norm)
    return apgd_ascent(problem.loss_and_grad, problem.project, problem.x0, eps, steps, problem.direction)[0].numpy()
