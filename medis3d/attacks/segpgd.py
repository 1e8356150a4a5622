"""SegPGD (Gu et al., ECCV 2022): per-voxel cross-entropy split into correctly and wrongly
classified voxels, weighted ``1 - lambda(t)`` and ``lambda(t)`` with ``lambda(t) = (t-1)/(2T)``,
so early steps push voxels that are still right and later ones keep the wrong ones wrong."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medis3d.attacks.pgd import PGD


def voxel_ce(scan_logits: torch.Tensor, aim: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-voxel cross-entropy ``(1, *S)`` (softmax) or BCE summed over channels (sigmoid)."""
    logits = scan_logits.float()
    if activation == "softmax":
        return F.cross_entropy(logits, aim[:, 0].long(), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, aim.float(), reduction="none").sum(1)


def voxel_correct(scan_logits: torch.Tensor, aim: torch.Tensor, activation: str) -> torch.Tensor:
    """Which voxels the prediction already gets right against ``aim`` ``(1, *S)``."""
    if activation == "softmax":
        return scan_logits.argmax(1) == aim[:, 0].long()
    return ((scan_logits > 0) == (aim > 0.5)).all(1)


class SegPGD(PGD):
    """SegPGD; its loss replaces the member's surrogate (members are named ``segpgd``)."""

    name = "segpgd"
    uses_loss = False

    def objective(self, t: int):
        steps = max(1, self.budget.steps)
        lam = t / (2.0 * steps)  # the paper's (t-1)/(2T) with t counted from 1
        aim = self.goal.loss_target
        activation = self.target.activation
        targeted = self.goal.targeted

        def fn(scan_logits: torch.Tensor) -> torch.Tensor:
            ce = voxel_ce(scan_logits, aim, activation)
            correct = voxel_correct(scan_logits.detach(), aim, activation)
            if targeted:  # descend the CE to the target: weight the voxels not yet on target first
                weights = torch.where(correct, lam, 1.0 - lam)
                return -(weights * ce).mean()
            weights = torch.where(correct, 1.0 - lam, lam)
            return (weights * ce).mean()

        return fn
