"""APGD (Croce & Hein, ICML 2020), as SEA runs it for segmentation (Croce, Singh & Hein, ECCV 2024).

Step size 2*eps at start, momentum 0.75, and at checkpoints p0 = 0, p1 = 0.22,
p(j+1) = p(j) + max(p(j) - p(j-1) - 0.03, 0.06) of the iterations the step is halved and the
search restarts from the best point when fewer than 75% of the steps since the last checkpoint
improved the loss, or when the step was not reduced and the best loss did not change. Where the
ascended loss is masked or scheduled (its value not comparable between iterates), the checks
compare iterates by plain cross-entropy (``losses.TRACKED_BY_CE``), as SEA does for its masked CE.

Options: a random start (``random_start``), ``restarts`` (each from a new random point, the
best over all kept), and progressive radius reduction (``radii``: SEA's 2 eps, 1.5 eps, eps over
3:3:4 of the iterations; each stage starts from the best iterate of the last, projected onto the
smaller ball, with the step reset to 2 eps of the stage), and a second loss (``then``): the member's
iterations split in two, the first half ascending its loss, the second half (``steps // 2``) ascending
``then``'s from the strongest iterate so far (a chain: on the shipped brain model a plain APGD with SEA's
spherical loss, then Jensen-Shannon, left less Dice than either loss alone for as many iterations). Only iterates inside the budget are kept; the iterate returned is the one whose prediction is
closest to the goal.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Generator
from typing import Any

import torch

from medis3d.attacks.base import Attack, BestIterate, Budget, Objective, StepRecord
from medis3d.io.volume import Volume

RHO = 0.75
MOMENTUM = 0.75
SEA_RADII = ((2.0, 3), (1.5, 3), (1.0, 4))  # (radius in eps, share of the iterations)


def checkpoints(iterations: int) -> list[int]:
    """The iterations at which APGD checks its progress."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * iterations, 9)) for q in p if 0 < q <= 1.0})


def stage_iterations(total: int, radii) -> list[int]:
    """Iterations of each radius stage: ``total`` split by the stages' shares, the last stage taking the rest."""
    shares = [share for _, share in radii]
    counts = [int(total * share / sum(shares)) for share in shares[:-1]]
    return counts + [total - sum(counts)]


class APGD(Attack):
    """Auto-PGD with the member's surrogate loss (the original uses CE or the DLR loss)."""

    name = "apgd"
    early_stop = False

    def __init__(self, *args, random_start: bool = False, restarts: int = 1, radii=None, then: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_random_start = bool(random_start)
        self.restarts = max(1, int(restarts))
        self.radii = tuple(radii) if radii else ((1.0, 1),)
        self.track = self._tracker(self.loss_name)
        self.then = then

    def _tracker(self, loss_name: str):
        """What APGD's step-size control compares iterates by: plain CE where ``loss_name`` is masked or scheduled."""
        from medis3d.losses import TRACKED_BY_CE, get_loss

        return get_loss("ce", self.target.activation) if loss_name in TRACKED_BY_CE else None

    def objective(self, t: int, steps: int | None = None) -> Objective:
        return Objective(self.loss, self.goal, t, self.budget.steps if steps is None else steps, self.track)

    def iterate(self, volume: Volume):
        start = time.perf_counter()
        clean = torch.from_numpy(volume.array).to(self.target.device)
        keeper = self.keeper()
        trace: list[StepRecord] = []
        second = self.budget.steps // 2 if self.then else 0  # a chain's iterations ascending ``then``
        counts = stage_iterations(self.budget.steps - second, self.radii)
        total = self.restarts * (sum(counts) + len(counts)) + (second + 1 if second else 0)
        self._visits = 0
        self._iterations = 0  # the steps taken, which the member reports for its kept iterate (each stage's start is none)
        for restart in range(self.restarts):
            x = self.random_start(clean) if (self.use_random_start or restart > 0) else clean
            for (factor, _), iterations in zip(self.radii, counts):
                stage = dataclasses.replace(self.budget, eps=self.budget.eps * factor, steps=iterations)
                x = stage.project(x, clean)
                x = yield from self._stage(volume, clean, x, stage, keeper, trace, in_budget=factor <= 1.0, total=total)
                if self._stopped(keeper):
                    break
            if self._stopped(keeper):
                break
        if second and not self._stopped(keeper):
            yield from self._chain(volume, clean, keeper, trace, total, second)
        return keeper.result(self, clean, trace, time.perf_counter() - start)

    def _chain(self, volume: Volume, clean: torch.Tensor, keeper: BestIterate, trace: list, total: int, steps: int):
        """(A generator.) The second loss: APGD of ``steps`` iterations over the whole budget from the strongest
        iterate so far."""
        from medis3d.losses import get_loss

        assert keeper.best is not None and self.then is not None
        self.loss, self.track = get_loss(self.then, self.target.activation), self._tracker(self.then)
        budget = dataclasses.replace(self.budget, steps=steps)
        yield from self._stage(volume, clean, keeper.best[1].to(clean), budget, keeper, trace, in_budget=True, total=total)

    def _stopped(self, keeper: BestIterate) -> bool:
        return self.stop_at_success and keeper.best is not None and bool(keeper.best[4])

    def _stage(self, volume: Volume, clean: torch.Tensor, x: torch.Tensor, budget: Budget, keeper: BestIterate,
               trace: list, in_budget: bool, total: int) -> Generator[Any, Any, torch.Tensor]:
        """(A generator: ``yield from``.) One APGD run of ``budget.steps`` iterations from ``x`` inside ``budget``; the best iterate by the tracked loss."""
        steps = budget.steps
        eta = 2.0 * budget.eps

        def visit(k: int, point: torch.Tensor, last: bool):
            objective = None if last else self.objective(k, steps)
            self._iterations += int(k > 0)  # a stage's start (k = 0) is the point it was handed, no step taken
            ev = (yield from self.visit(volume, point, clean, self._visits, objective, keeper, trace, in_budget=in_budget,
                                        total=total, step=self._iterations))[0]
            self._visits += 1
            return ev, (objective.tracked if objective is not None else None)

        ev, f_x = yield from visit(0, x, steps == 0 and in_budget)
        if steps == 0:
            return x
        x_prev, grad = x, ev.grad
        x_max, grad_max, f_max = x, grad, f_x
        marks = set(checkpoints(steps))
        improved, since, eta_before, f_max_before = 0, 0, eta, f_max
        for k in range(steps):
            last = k == steps - 1 and in_budget  # the final stage's last iterate needs no gradient
            z = budget.project(x + eta * budget.direction(grad), clean)
            x_new = z if k == 0 else budget.project(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev), clean)
            ev, f_new = yield from visit(k + 1, x_new, last)
            if last or self._stopped(keeper):
                break
            improved += int(f_new > f_x)
            if f_new > f_max:
                x_max, grad_max, f_max = x_new, ev.grad, f_new
            x_prev, x, grad, f_x = x, x_new, ev.grad, f_new
            if k + 1 in marks:
                window = k + 1 - since
                stalled = improved < RHO * window or (eta == eta_before and f_max == f_max_before)
                eta_before, f_max_before = eta, f_max
                if stalled:
                    eta /= 2.0
                    x, x_prev, grad, f_x = x_max, x_max, grad_max, f_max
                improved, since = 0, k + 1
        return x_max
