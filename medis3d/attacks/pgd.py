"""PGD (Madry et al. 2018): a random start inside the budget, then projected steepest-ascent
steps for a fixed number of iterations; returns the best iterate."""

from __future__ import annotations

import torch

from medis3d.attacks.base import Attack


class PGD(Attack):
    """Projected gradient descent with a uniform random start (L-inf) or a random direction (L2)."""

    name = "pgd"
    early_stop = False

    def start(self, clean: torch.Tensor) -> torch.Tensor:
        return self.random_start(clean)
