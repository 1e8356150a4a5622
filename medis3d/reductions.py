"""A reduction over the channel axis of large logit volumes.

PyTorch reduces ``argmax`` and ``norm`` over a non-innermost axis of a contiguous tensor on a slow
strided path: on CPU, for ``(1, 2, 256, 256, 256)`` logits (a 1 mm head), ``argmax(1)`` takes
about 2.4 s against 0.26 s for the same result computed channel by channel. The masked losses and
the segmentation take it at every attack step. (``norm(dim=1)`` is as slow, 1.9 s, but summing
channel by channel rounds differently in the last bit, so ``masked_spherical`` keeps torch's.)
"""

from __future__ import annotations

import torch


def channel_argmax(x: torch.Tensor, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """``x.argmax(dim)``, ties to the first maximal channel as torch does, computed channel by channel."""
    channels = x.unbind(dim)
    best, index = channels[0], torch.zeros(channels[0].shape, dtype=torch.long, device=x.device)
    for c, value in enumerate(channels[1:], start=1):
        # NaN wins as in torch.argmax, where NaN counts as the maximum (the first NaN is kept)
        better = (value > best) | (value.isnan() & ~best.isnan())
        best = torch.where(better, value, best)
        index = index.masked_fill(better, c)
    return index.unsqueeze(dim) if keepdim else index

