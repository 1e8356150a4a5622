"""APGD (Croce & Hein, ICML 2020): step size 2*eps at start, momentum 0.75, and at checkpoints
p0 = 0, p1 = 0.22, p(j+1) = p(j) + max(p(j) - p(j-1) - 0.03, 0.06) of the iterations the step is
halved and the search restarts from the best point when fewer than 75% of the steps since the
last checkpoint improved the loss, or when the step was not reduced and the best loss did not
change. Returns the best iterate."""

from __future__ import annotations

import math
import time

import torch

from medis3d.attacks.base import Attack, BestIterate, MemberResult, StepRecord
from medis3d.io.volume import Volume

RHO = 0.75
MOMENTUM = 0.75


def checkpoints(iterations: int) -> list[int]:
    """The iterations at which APGD checks its progress."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * iterations, 9)) for q in p if 0 < q <= 1.0})


class APGD(Attack):
    """Auto-PGD with the member's surrogate loss (the original uses CE or the DLR loss)."""

    name = "apgd"
    early_stop = False

    def run(self, volume: Volume) -> MemberResult:
        start = time.perf_counter()
        budget = self.budget
        clean = torch.from_numpy(volume.array).to(self.target.device)
        objective = self.objective(0)
        keeper = BestIterate(self.goal)
        trace: list[StepRecord] = []
        eta = 2.0 * budget.eps

        def visit(t: int, x: torch.Tensor, last: bool):
            return self.visit(volume, x, clean, t, None if last else objective, keeper, trace)[0]

        ev = visit(0, clean, budget.steps == 0)
        x, x_prev, grad, f_x = clean, clean, ev.grad, ev.loss
        x_max, grad_max, f_max = x, grad, f_x
        marks = set(checkpoints(budget.steps))
        improved, since, eta_before, f_max_before = 0, 0, eta, f_max
        for k in range(budget.steps):
            last = k == budget.steps - 1
            z = budget.project(x + eta * budget.direction(grad), clean)
            x_new = z if k == 0 else budget.project(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev), clean)
            ev = visit(k + 1, x_new, last)
            if last:
                break
            improved += int(ev.loss > f_x)
            if ev.loss > f_max:
                x_max, grad_max, f_max = x_new, ev.grad, ev.loss
            x_prev, x, grad, f_x = x, x_new, ev.grad, ev.loss
            if k + 1 in marks:
                window = k + 1 - since
                stalled = improved < RHO * window or (eta == eta_before and f_max == f_max_before)
                eta_before, f_max_before = eta, f_max
                if stalled:
                    eta /= 2.0
                    x, x_prev, grad, f_x = x_max, x_max, grad_max, f_max
                improved, since = 0, k + 1
        return keeper.result(self, clean, trace, time.perf_counter() - start)
