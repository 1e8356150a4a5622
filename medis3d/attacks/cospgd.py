"""CosPGD (Agnihotri & Keuper, ICML 2024): per-voxel cross-entropy weighted by the (detached)
cosine similarity between the softmax and the one-hot reference, so voxels that are already
wrong get less weight; the targeted form weights by ``1 - cosine`` and descends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medis3d.attacks.pgd import PGD
from medis3d.attacks.segpgd import voxel_ce


def voxel_cosine(scan_logits: torch.Tensor, aim: torch.Tensor, activation: str) -> torch.Tensor:
    """Cosine similarity per voxel between the predicted distribution and the one-hot ``aim``."""
    logits = scan_logits.float()
    if activation == "softmax":
        probs = torch.softmax(logits, 1)
        onehot = F.one_hot(aim[:, 0].long(), probs.shape[1]).movedim(-1, 1).float()
    else:
        probs = torch.sigmoid(logits)
        onehot = aim.float()
    return F.cosine_similarity(probs, onehot, dim=1, eps=1e-8)


class CosPGD(PGD):
    """CosPGD; its loss replaces the member's surrogate (members are named ``cospgd``)."""

    name = "cospgd"
    uses_loss = False

    def objective(self, t: int):
        aim = self.goal.loss_target
        activation = self.target.activation
        targeted = self.goal.targeted

        def fn(scan_logits: torch.Tensor) -> torch.Tensor:
            ce = voxel_ce(scan_logits, aim, activation)
            cosine = voxel_cosine(scan_logits, aim, activation).detach()
            if targeted:
                return -((1.0 - cosine) * ce).mean()
            return (cosine * ce).mean()

        return fn
