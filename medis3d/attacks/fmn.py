"""A minimal-norm attack (after FMN, Pintor et al., NeurIPS 2021, for the L-inf ball): the radius it
searches in adapts, growing while the iterate fails (until the first success at least fast enough to reach
the budget by half the iterations, where FMN jumps by a linear estimate of the distance to the boundary)
and shrinking below the size of each successful iterate, with sign (L-inf) or normalised (L2) steps of at
least a quarter of the budget, cosine-annealed (steps of an eighth carried the iterate to 0.7 of the budget
in ten steps, and a failure was reported at the full one); the radius never exceeds the budget. It keeps
the successful iterate with the smallest perturbation, or the best one when none succeeded, so it
measures the smallest budget that breaks the model in one run."""

from __future__ import annotations

import dataclasses
import math

import torch

from medis3d.attacks.base import Attack, BestIterate

GAMMA = 0.05  # radius change per step at the start, cosine-annealed


class FMN(Attack):
    """Minimal-norm search inside the budget; ``--min-eps`` needs no bisection for it."""

    name = "fmn"
    early_stop = False
    minimal = True

    def keeper(self) -> BestIterate:
        if self.keep_strongest:  # asked for the lowest score in the budget, not the least successful perturbation
            return BestIterate(self.goal, first_success=False)
        return BestIterate(self.goal, least=True, size=lambda written: self.budget.size(written - self._clean))

    def start(self, clean: torch.Tensor) -> torch.Tensor:
        self._clean = clean
        self._radius = self.budget.eps / 4  # start small and grow: the first success comes at a small radius
        self._success = self._found = False
        return clean.clone()

    def after_visit(self, success: bool, written: torch.Tensor) -> None:
        self._success = success
        self._size = self.budget.size(written - self._clean)

    def update(self, x: torch.Tensor, grad: torch.Tensor, t: int, clean: torch.Tensor) -> torch.Tensor:
        steps = max(1, self.budget.steps)
        anneal = 0.5 * (1 + math.cos(math.pi * t / steps))
        gamma = GAMMA * (0.1 + 0.9 * anneal)
        if self._success:
            self._found = True
            self._radius = min(self._radius, self._size) * (1 - gamma)
        else:
            growth = 1 + 4 * gamma
            if not self._found:  # reach the budget by half the iterations (FMN jumps towards the boundary here)
                growth = max(growth, 4 ** (1 / max(1, steps // 2)))
            self._radius = min(self.budget.eps, self._radius * growth)
        alpha = max(self.budget.step, self.budget.eps / 4) * (0.01 + 0.99 * anneal)
        ball = dataclasses.replace(self.budget, eps=self._radius)
        return ball.project(x + alpha * self.budget.direction(grad), clean)
