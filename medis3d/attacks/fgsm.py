"""FGSM (Goodfellow et al. 2015): one step of the full budget along the gradient's sign."""

from __future__ import annotations

from medis3d.attacks.base import Attack


class FGSM(Attack):
    """Single-step attack: ``x + eps * sign(grad)`` (``eps * grad / ||grad||`` for L2)."""

    name = "fgsm"
    early_stop = False

    def iterate(self, volume):
        self.budget = type(self.budget)(**{**self.budget.__dict__, "steps": 1, "step": self.budget.eps})
        return (yield from super().iterate(volume))
