"""The channel reductions agree with torch's: argmax (ties and NaN included) and cosine similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medis3d.reductions import channel_argmax, channel_cosine


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


@pytest.mark.parametrize("dim", [0, 1, 4])
def test_channel_cosine_matches_torch(dim):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 5, 4, 6, generator=g, dtype=torch.float64)
    b[0, 0] = 0  # zero vectors: torch holds the norms' product at eps
    assert torch.allclose(channel_cosine(a, b, dim), F.cosine_similarity(a, b, dim))
    ours = torch.autograd.grad(channel_cosine(a, b, dim).sum(), a)[0]
    theirs = torch.autograd.grad(F.cosine_similarity(a, b, dim).sum(), a)[0]
    assert torch.allclose(ours, theirs)
