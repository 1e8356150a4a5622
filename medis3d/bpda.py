"""Differentiable stand-ins for non-differentiable layers (BPDA), and a gradient-flow check.

Each stand-in computes the exact forward value and, in the backward pass, the gradient of a
smooth approximation (identity for clamps; a differentiable stand-in's derivative for other steps),
so that gradients reach the input (Athalye et al., 2018).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def straight_through(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in the forward pass, identity gradient to ``inp`` (shapes must match)."""
    if out.shape != inp.shape:
        raise ValueError(f"straight-through needs equal shapes, got {tuple(inp.shape)} -> {tuple(out.shape)}")
    return inp + (out - inp).detach()


class _ValueOf(torch.autograd.Function):
    """``value`` forward, the gradient to ``stand_in`` backward."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def value_with_gradient_of(value: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """BPDA: exactly ``value`` in the forward pass, the derivative of ``stand_in`` (same shape) backward."""
    if value.shape != stand_in.shape:
        raise ValueError(f"a stand-in needs the value's shape, got {tuple(stand_in.shape)} for {tuple(value.shape)}")
    return _ValueOf.apply(value, stand_in)


def straight_through_clamp(x: torch.Tensor, low=None, high=None) -> torch.Tensor:
    """Clamp in the forward pass; identity gradient, so clipped voxels still receive one."""
    if low is None and high is None:
        return x
    return x + (torch.clamp(x, min=low, max=high) - x).detach()


def gradient_flow(module: torch.nn.Module, sample: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Run one backward pass and name the leaf layers whose input receives no (or an all-zero) gradient.

    Returns ``{"input_grad_norm": float, "blocked": [layer names], "zero": [layer names]}``; a layer
    is *blocked* when its output is not connected to the graph (``argmax``, ``round``, detached
    ops inside it), *zero* when the gradient reaching its input is identically zero.
    """
    grads: dict[str, float] = {}
    blocked: list[str] = []
    handles = []

    def hook(name):
        def _hook(mod, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and torch.is_floating_point(out):
                if not out.requires_grad:
                    blocked.append(name)
                else:
                    out.register_hook(lambda g, n=name: grads.__setitem__(n, float(g.abs().sum())))
        return _hook

    for name, sub in module.named_modules():
        if name and not list(sub.children()):
            handles.append(sub.register_forward_hook(hook(name)))
    x = sample.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = module(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            value = loss(out) if loss is not None else out.float().square().mean()
            if value.requires_grad:
                value.backward()
    finally:
        for h in handles:
            h.remove()
    input_norm = 0.0 if x.grad is None else float(x.grad.abs().sum())
    zero = [n for n, v in grads.items() if v == 0.0]
    return {"input_grad_norm": input_norm, "blocked": blocked, "zero": zero}
