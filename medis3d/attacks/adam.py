"""Projected Adam (AMSGrad) in the budget (Halmosi, Mohos & Jelasity, "Evaluating the adversarial
robustness of semantic segmentation: trying harder pays off", ECCV 2024): the search geometry
of an adaptive optimiser instead of sign steps. Each iterate moves by ``step`` (the learning
rate) times Adam's bias-corrected first moment over the root of the largest second moment seen
(AMSGrad), and is projected to the budget; it runs its full budget and keeps the best iterate."""

from __future__ import annotations

import torch

from medis3d.attacks.base import Attack

BETAS = (0.9, 0.999)


class Adam(Attack):
    """Projected AMSGrad ascent of the member's loss; ``--step`` is its learning rate (presets: 2/255)."""

    name = "adam"
    early_stop = False

    def start(self, clean: torch.Tensor) -> torch.Tensor:
        self._m = torch.zeros_like(clean)
        self._v = torch.zeros_like(clean)
        self._v_max = torch.zeros_like(clean)
        return clean.clone()

    def update(self, x: torch.Tensor, grad: torch.Tensor, t: int, clean: torch.Tensor) -> torch.Tensor:
        b1, b2 = BETAS
        grad = self.budget.usable(grad)
        units = self.budget._scale(grad)
        if units is not None:  # Adam on delta / scale (the budget's per-channel units): its gradient is grad * scale
            grad = grad * units
        self._m = b1 * self._m + (1 - b1) * grad
        self._v = b2 * self._v + (1 - b2) * grad * grad
        self._v_max = torch.maximum(self._v_max, self._v)
        m_hat = self._m / (1 - b1 ** (t + 1))
        v_hat = self._v_max / (1 - b2 ** (t + 1))
        scale = v_hat.sqrt()
        floor = 1e-8 * float(scale.max()) + 1e-30  # Adam's epsilon relative to the gradient's own scale
        direction = m_hat / (scale + floor)
        if self.budget.norm == "l2":
            direction = direction / direction.norm().clamp_min(1e-12)
        if units is not None:  # back to native units
            direction = direction * units
        return self.budget.project(x + self.budget.step * direction, clean)
