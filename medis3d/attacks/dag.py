"""DAG, dense adversary generation (Xie et al., ICCV 2017): targeted; each step follows the
gradient of (target logit - currently predicted logit) summed over the voxels not yet on
target, normalised to a step of L-inf size ``step``, until almost every voxel that had to change is on target
or the iterations end. The accumulated perturbation is projected to the budget for evaluation.
Untargeted, the target erases the structures: the reference's foreground becomes background
(background voxels are already on target, so the whole step goes to the structures)."""

from __future__ import annotations

import torch

from medis3d.attacks.base import Attack
from medis3d.reductions import channel_argmax

ON_TARGET = 0.99  # stop once this fraction of the voxels off target on the clean scan is on target


class DAG(Attack):
    """Dense adversary generation; its loss replaces the member's surrogate (members ``dag``)."""

    name = "dag"
    uses_loss = False
    early_stop = True
    _off_at_start: float | None = None  # voxels off target on the clean scan (its first iterate)

    def _aim(self) -> torch.Tensor:
        aim = self.goal.loss_target
        if self.goal.targeted:
            return aim
        return torch.zeros_like(aim)

    def objective(self, t: int, steps: int | None = None):
        aim = self._aim()
        activation = self.target.activation

        def fn(scan_logits: torch.Tensor) -> torch.Tensor:
            logits = scan_logits.float()
            if activation == "softmax":
                current = channel_argmax(logits, 1, keepdim=True)
                active = (current != aim).float()
                gap = logits.gather(1, aim.long()) - logits.gather(1, current)
                self._count_on_target(active)
                return (gap * active).sum()
            signs = aim * 2 - 1  # push each channel's logit towards the target side of 0
            active = ((logits > 0).float() != aim).float()
            self._count_on_target(active)
            return (signs * logits * active).sum()

        return fn

    def _count_on_target(self, active: torch.Tensor) -> None:
        """The share of the voxels the clean scan had off target (the first iterate's) that are on target now: a
        share of the whole volume would call a structure of under 1 % of its voxels done before DAG moved."""
        off = float(active.sum())
        if self._off_at_start is None:
            self._off_at_start = max(off, 1.0)
        self._on_target = 1.0 - off / self._off_at_start

    def start(self, clean: torch.Tensor) -> torch.Tensor:
        self._free = clean.clone()  # the unconstrained DAG iterate
        self._on_target = 0.0
        self._off_at_start = None
        return clean.clone()

    def started_at(self, x: torch.Tensor) -> None:
        self._free = x.clone()

    def update(self, x: torch.Tensor, grad: torch.Tensor, t: int, clean: torch.Tensor) -> torch.Tensor:
        if self._on_target >= ON_TARGET:
            return x
        grad = self.budget.usable(grad)  # the step's size from where it may act (a --mask region), not the whole scan
        units = self.budget._scale(grad)
        if units is not None:  # the step of L-inf size ``step`` taken for delta / scale, in native units
            grad = grad * units
        scale = grad.abs().max().clamp_min(1e-12)
        move = self.budget.step * grad / scale
        self._free = self._free + (move if units is None else move * units)
        return self.budget.project(self._free, clean)
