"""channel_argmax agrees with torch.argmax, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from medis3d.reductions import channel_argmax


@pytest.mark.parametrize("shape", [(1, 2, 9, 8, 7), (2, 5, 6, 4, 3), (3, 4)])
def test_channel_argmax_matches_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, shape, generator=g).float()  # small integers: many ties
    if len(shape) == 5:
        x[0, 1, 0, 0, 0] = float("nan")
        x[0, 0, 1, 0, 0] = x[0, -1, 1, 0, 0] = float("nan")
    for dim in range(x.ndim):
        assert torch.equal(channel_argmax(x, dim), x.argmax(dim))
        assert torch.equal(channel_argmax(x, dim, keepdim=True), x.argmax(dim, keepdim=True))

