"""Independent reference attacks for the tiny bundle of the tests, with full autograd through MONAI's own array
transforms (Orientation, Spacing) and ``monai.inferers.sliding_window_inference``, and no medis3d code: the tiny
bundle as MONAI runs it, and the plain optimisers of ``bench/reference.py`` (the strength benchmark's, a few
lines of torch each). medis3d's attacks are checked against these on the same model, scan and budget.

Each attack ascends a loss of ``bench/reference.py`` (cross-entropy unless told otherwise) against the clean
prediction in model space, keeps its iterate inside the L-inf ball (native units, whole HU: the scan is int16) and
the scan's own intensity range, and returns its strongest iterate by Dice (APGD, PGD) or its last (FGSM, IGSM).
Scoring is independent too (:func:`dice`). APGD can take its gradient through a stand-in of the resampling (BPDA,
the counterpart of medis3d's ``gradient=smooth``). Projected Adam, the low-frequency attack, DAG, SegPGD and CosPGD
take their loss on the scan's grid, as medis3d does, and return their strongest iterate by Dice."""

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

    def logits(self, x: torch.Tensor, gradient: str = "standard", grid: str = "model") -> torch.Tensor:
        """(1, I, J, K) scan in HU -> (1, C, model grid) logits; the intensity clip passes its gradient straight through.

        ``gradient="smooth"``: BPDA for the resampling, the real value with the gradient of a stand-in (PyTorch's
        area interpolation of the reoriented scan onto the model grid's shape). ``grid="scan"``: the probabilities
        mapped back to the scan's grid by MONAI's own inverse of the transforms (as a bundle's ``Invertd`` does), as
        logs, ``(1, C, I, J, K)``; ``"scan_raw"``: the network's logits mapped back the same way."""
        if grid not in ("model", "scan", "scan_raw"):
            raise ValueError(f"grid is model, scan or scan_raw, not {grid!r}")
        orientation, spacing = Orientation(axcodes="RAS"), Spacing(pixdim=self.pixdim, mode="bilinear")
        oriented = orientation(MetaTensor(x, affine=self.affine))
        resampled = spacing(oriented)
        img = resampled.as_tensor()
        if gradient == "smooth":
            stand_in = F.interpolate(oriented.as_tensor()[None], size=img.shape[1:], mode="area")[0]
            img = img.detach() + stand_in - stand_in.detach()
        y = (img - self.a_min) / (self.a_max - self.a_min)
        y = y + (y.clamp(0, 1) - y).detach()
        z = sliding_window_inference(y[None], self.roi, self.sw_batch, self.network, overlap=self.overlap, mode=self.mode)
        if grid == "model":
            return z
        values = z[0].softmax(0) if grid == "scan" else z[0]
        back = MetaTensor(values, affine=resampled.affine, meta=resampled.meta, applied_operations=resampled.applied_operations)
        back = orientation.inverse(spacing.inverse(back)).as_tensor()
        return (back.clamp_min(1e-30).log() if grid == "scan" else back)[None]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x)[0].argmax(0)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Foreground Dice of two label maps."""
    return reference.dice(a, b)


def _problem(model: PlainModel, scan: np.ndarray, eps_hu: float, loss: str = "ce", gradient: str = "standard",
             grid: str = "model"):
    """The scan under attack: whole-HU iterates (the scan is int16) in a whole-HU ball, the loss of ``reference.LOSSES``
    taken on ``grid`` (:meth:`PlainModel.logits`); the reference is the clean prediction there."""
    x0 = torch.from_numpy(np.asarray(scan, np.float32))[None]
    return reference.Problem(lambda x: model.logits(x, gradient, grid), x0, eps_hu, loss, rounding="project")


def fgsm(model: PlainModel, scan: np.ndarray, eps_hu: float) -> torch.Tensor:
    p = _problem(model, scan, eps_hu)
    return reference.sign_ascent(p.loss_and_grad, p.project, p.x0, p.eps, 1)


def igsm(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int) -> torch.Tensor:
    p = _problem(model, scan, eps_hu)
    return reference.sign_ascent(p.loss_and_grad, p.project, p.x0, step_hu, steps)


def pgd(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int, seed: int = 0) -> torch.Tensor:
    p = _problem(model, scan, eps_hu)
    return reference.sign_ascent(p.loss_and_grad, p.project, p.random_start(seed), step_hu, steps, keep="strongest")


def apgd(model: PlainModel, scan: np.ndarray, eps_hu: float, steps: int, loss: str = "ce", gradient: str = "standard",
         seed: int | None = None, grid: str = "model", start: torch.Tensor | None = None) -> torch.Tensor:
    """APGD ascending ``loss`` (on ``grid``) from the clean scan, (``seed``) from a random point of the ball, or from
    ``start`` (a chain: the end of another attack)."""
    p = _problem(model, scan, eps_hu, loss, gradient, grid)
    if start is None:
        start = p.x0 if seed is None else p.random_start(seed)
    return reference.apgd_ascent(p.loss_and_grad, p.project, start, p.eps, steps)


def _l2_problem(model: PlainModel, scan: np.ndarray, eps: float, loss: str = "ce", grid: str = "scan"):
    """The scan in the L2 ball of ``eps`` HU, its iterates real-valued (a float scan: nothing to round)."""
    x0 = torch.from_numpy(np.asarray(scan, np.float32))[None]
    return reference.Problem(lambda x: model.logits(x, "standard", grid), x0, eps, loss, integer=False, norm="l2")


def apgd_l2(model: PlainModel, scan: np.ndarray, eps: float, steps: int, loss: str = "ce", grid: str = "scan") -> torch.Tensor:
    """APGD in its L2 version (steps along ``g / ||g||``, the L2 ball of ``eps`` HU) ascending ``loss`` on ``grid``
    from the clean scan."""
    p = _l2_problem(model, scan, eps, loss, grid)
    return reference.apgd_ascent(p.loss_and_grad, p.project, p.x0, p.eps, steps, p.direction)


def _l2_ascent(p, x: torch.Tensor, step: float, steps: int, keep: str = "last") -> torch.Tensor:
    """``steps`` steps of length ``step`` along ``g / ||g||`` from ``x``, each projected onto the ball; the last
    iterate, or (``keep="strongest"``) the one with the lowest Dice, the last included."""
    best = (math.inf, x)
    for _ in range(steps):
        _, grad, score = p.loss_and_grad(x)
        best = _better(best, score, x)
        x = p.project(x + step * reference.l2_direction(grad))
    return x if keep == "last" else _strongest(p, x, best)[1]


def fgsm_l2(model: PlainModel, scan: np.ndarray, eps: float) -> torch.Tensor:
    """One step of ``eps`` along ``g / ||g||``."""
    p = _l2_problem(model, scan, eps)
    return _l2_ascent(p, p.x0, eps, 1)


def igsm_l2(model: PlainModel, scan: np.ndarray, eps: float, step: float, steps: int) -> torch.Tensor:
    """``steps`` steps of ``step`` from the clean scan; the last iterate."""
    p = _l2_problem(model, scan, eps)
    return _l2_ascent(p, p.x0, step, steps)


def pgd_l2(model: PlainModel, scan: np.ndarray, eps: float, step: float, steps: int, seed: int = 0) -> torch.Tensor:
    """The same from a random point of the ball's surface (uniform noise of the L-inf ball of ``eps``, projected);
    the strongest iterate."""
    p = _l2_problem(model, scan, eps)
    return _l2_ascent(p, p.random_start(seed), step, steps, keep="strongest")


def _better(best: tuple[float, torch.Tensor], score: float, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The stronger of ``best`` and the iterate ``x`` whose Dice against the reference is ``score`` (lower is stronger)."""
    return (score, x) if score < best[0] else best


def _strongest(p, x: torch.Tensor, best: tuple[float, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The stronger of ``best`` and the last iterate ``x``, scored by one more forward pass. (The loops below score
    every other iterate from the forward pass its next step takes anyway.)"""
    with torch.no_grad():
        return _better(best, dice(p.logits(x)[0].argmax(0), p.reference), x)


def adam(model: PlainModel, scan: np.ndarray, eps_hu: float, lr_hu: float, steps: int, loss: str = "ce") -> torch.Tensor:
    """Projected AMSGrad (``torch.optim.Adam(amsgrad=True)``) ascending ``loss`` on the scan's grid from the clean
    scan, each iterate projected into the whole-HU ball; its strongest iterate by Dice."""
    p = _problem(model, scan, eps_hu, loss, grid="scan")
    x = p.x0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr_hu, amsgrad=True, maximize=True, eps=1e-12)
    best = (2.0, p.x0)
    for t in range(steps):
        _, grad, score = p.loss_and_grad(x.detach())
        if t:  # the clean scan is not an iterate
            best = _better(best, score, x.detach().clone())
        x.grad = grad
        optimiser.step()
        with torch.no_grad():
            x.copy_(p.project(x))
    return _strongest(p, x.detach().clone(), best)[1]


def lowfreq(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int, factor: int) -> torch.Tensor:
    """Sign ascent of CE (scan grid) on a grid ``factor`` times coarser than the scan, upsampled trilinearly (corners
    aligned) to the perturbation, the coarse values kept within eps; its strongest iterate by Dice."""
    p = _problem(model, scan, eps_hu, grid="scan")
    shape = p.x0.shape[1:]
    u = torch.zeros((1, 1, *[max(2, -(-(s - 1) // factor) + 1) for s in shape]))
    best, x = (2.0, p.x0), p.x0
    for t in range(steps):
        u.requires_grad_(True)
        delta = F.interpolate(u, size=tuple(shape), mode="trilinear", align_corners=True)[0]
        _, grad, score = p.loss_and_grad(x)
        if t:
            best = _better(best, score, x)
        (g,) = torch.autograd.grad((delta * grad).sum(), u)
        u = (u.detach() + step_hu * g.sign()).clamp(-p.eps, p.eps)
        x = p.project(p.x0 + F.interpolate(u, size=tuple(shape), mode="trilinear", align_corners=True)[0])
    return _strongest(p, x, best)[1]


def dag(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int) -> torch.Tensor:
    """Xie et al.'s dense adversary generation, untargeted as erasing the structures: every voxel aims at the
    background; each step ascends the sum over the voxels not yet there of (background logit - predicted logit),
    scaled to an L-inf step of ``step_hu``, accumulated freely and projected into the ball; its strongest iterate."""
    p = _problem(model, scan, eps_hu, grid="scan")
    free, x = p.x0.clone(), p.x0
    best = (2.0, p.x0)
    for t in range(steps):
        x = x.clone().requires_grad_(True)
        z = model.logits(x, grid="scan")[0]
        current = z.detach().argmax(0)
        if t:
            best = _better(best, dice(current, p.reference), x.detach())
        active = current != 0
        if t == 0:
            to_erase = max(int(active.sum()), 1)
        if int(active.sum()) <= 0.01 * to_erase:  # almost every voxel that had to change has changed
            return best[1]
        gap = (z[0] - z.gather(0, current[None])[0])[active].sum()
        (g,) = torch.autograd.grad(gap, x)
        free = free + step_hu * g / g.abs().max().clamp_min(1e-12)
        x = p.project(free)
    return _strongest(p, x, best)[1]


def fmn(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int) -> torch.Tensor:
    """A minimal-norm search after Pintor et al.'s FMN in the L-inf ball: a radius that starts at eps/4 and, with
    gamma = 0.05 cosine-annealed to a tenth, grows by 4 gamma while the iterate fails (up to eps; before the first
    success at least by the factor that takes eps/4 to eps in half the steps) and shrinks by gamma below the
    iterate's own size once it succeeds (IoU with the reference <= 0.5); sign steps of max(step, eps/4)
    cosine-annealed to a hundredth, each projected into the current radius; its strongest iterate."""
    p = _problem(model, scan, eps_hu, grid="scan")
    x, radius, best, succeeded = p.x0, p.eps / 4, (2.0, p.x0), False
    for t in range(steps):
        _, grad, score = p.loss_and_grad(x)
        if t:
            best = _better(best, score, x)
        anneal = 0.5 * (1 + math.cos(math.pi * t / steps))
        gamma = 0.05 * (0.1 + 0.9 * anneal)
        if score / (2 - score) <= 0.5:  # one structure: its IoU from its Dice
            succeeded = True
            radius = min(radius, float((x - p.x0).abs().max())) * (1 - gamma)
        elif succeeded:
            radius = min(p.eps, radius * (1 + 4 * gamma))
        else:
            radius = min(p.eps, radius * max(1 + 4 * gamma, 4 ** (1 / max(1, steps // 2))))
        alpha = max(step_hu, p.eps / 4) * (0.01 + 0.99 * anneal)
        moved = x + alpha * grad.sign()
        x = p.project(torch.minimum(torch.maximum(moved, p.x0 - radius), p.x0 + radius))
    return _strongest(p, x, best)[1]


def _segpgd_weights(logits: torch.Tensor, reference: torch.Tensor, t: int, steps: int) -> torch.Tensor:
    """Gu et al.'s SegPGD: voxels still right weigh 1 - lambda, wrong ones lambda, lambda = (t - 1) / 2T for t = 1..T."""
    lam = t / (2 * steps)
    return torch.where(logits[0].argmax(0) == reference, 1 - lam, lam)


def _cospgd_weights(logits: torch.Tensor, reference: torch.Tensor, t: int, steps: int) -> torch.Tensor:
    """Agnihotri & Keuper's CosPGD: each voxel weighs the cosine of its softmax with its one-hot reference."""
    onehot = F.one_hot(reference, logits.shape[1]).movedim(-1, 0).to(logits.dtype)
    return F.cosine_similarity(logits[0].softmax(0), onehot, dim=0)


def weighted_pgd(model: PlainModel, scan: np.ndarray, eps_hu: float, step_hu: float, steps: int, weights: str,
                 seed: int = 0) -> torch.Tensor:
    """PGD (random start, sign steps) ascending the voxel CE on the scan's grid weighted by SegPGD's schedule
    (``weights="segpgd"``) or CosPGD's cosine (``"cospgd"``), weights carrying no gradient; its strongest iterate."""
    p = _problem(model, scan, eps_hu, grid="scan")
    weight = {"segpgd": _segpgd_weights, "cospgd": _cospgd_weights}[weights]
    x, best = p.random_start(seed), (2.0, p.x0)
    for t in range(steps):
        x = x.clone().requires_grad_(True)
        logits = p.logits(x)
        if t:  # the random start is not an iterate
            best = _better(best, dice(logits.detach()[0].argmax(0), p.reference), x.detach())
        ce = F.cross_entropy(logits, p.reference[None], reduction="none")[0]
        (grad,) = torch.autograd.grad((weight(logits.detach(), p.reference, t, steps) * ce).mean(), x)
        x = p.project(x.detach() + step_hu * grad.sign())
    return _strongest(p, x, best)[1]
