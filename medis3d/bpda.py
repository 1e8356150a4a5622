"""Differentiable stand-ins for non-differentiable layers (BPDA), and a gradient-flow check.

Each stand-in computes the exact forward value and, in the backward pass, the gradient of a
smooth approximation (identity for clamps; a differentiable stand-in's derivative for other steps),
so that gradients reach the input (Athalye et al., 2018).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

CLIP_GRADIENTS = ("towards", "exact")
_clip_gradient: contextvars.ContextVar[str] = contextvars.ContextVar("clip_gradient", default="towards")


@contextlib.contextmanager
def clip_gradient(mode: str) -> Iterator[None]:
    """The gradient the clips built inside this block pass back (read when each clip runs forward): ``towards``, a
    clipped voxel gets the gradient that asks it back into the window (:func:`straight_through_clamp`); ``exact``,
    the clip's own derivative, zero on every clipped voxel. An L2 step takes ``exact``: its length is shared out
    over the voxels, and a clipped voxel changes the model input only once it is back in the window, which costs
    more of the length than the few it could bring back are worth (module README's measurements)."""
    if mode not in CLIP_GRADIENTS:
        raise ValueError(f"unknown clip gradient {mode!r}; choose from {', '.join(CLIP_GRADIENTS)}")
    token = _clip_gradient.set(mode)
    try:
        yield
    finally:
        _clip_gradient.reset(token)


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


class _TowardsWindow(torch.autograd.Function):
    """``clamp(x, low, high)`` forward; backward, the gradient itself inside the window and, outside it, the
    gradient where ascending it moves the voxel back towards the window (zero where it pushes it further out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low, high) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = low, high
        return torch.clamp(x, min=low, max=high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        away = torch.zeros_like(x, dtype=torch.bool)
        if low is not None:
            away |= (x < low) & (grad < 0)
        if high is not None:
            away |= (x > high) & (grad > 0)
        return torch.where(away, 0.0, grad), None, None


def straight_through_clamp(x: torch.Tensor, low=None, high=None) -> torch.Tensor:
    """Clamp in the forward pass; backward, the identity gradient where it points back into the window, so a
    clipped voxel still feels the loss that asks for it to come back in. The components that would push a clipped
    voxel further out are left out: they change nothing however far they go, and an L2 step would spend length on
    them (every attack ascends the gradient it is handed, so its sign says which way a voxel is asked to move)."""
    if low is None and high is None:
        return x
    if _clip_gradient.get() == "exact":
        return torch.clamp(x, min=low, max=high)
    return _TowardsWindow.apply(x, low, high)


def straight_through_clip(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out``, a clip of ``inp`` (each voxel kept, or moved towards the window), forward; backward, the identity
    where the voxel was kept or where ascending the gradient moves it back the way the clip moved it
    (``towards``), or zero on every clipped voxel (``exact``: :func:`clip_gradient`)."""
    if out.shape != inp.shape:
        raise ValueError(f"a clip keeps the shape, got {tuple(inp.shape)} -> {tuple(out.shape)}")
    out = out.detach().to(inp.dtype)
    if _clip_gradient.get() == "exact":
        return torch.where(out == inp.detach(), inp, out)
    return _TowardsClip.apply(inp, out)


class _TowardsClip(torch.autograd.Function):
    """``clipped`` forward; backward, the gradient where the voxel was kept or asked back the way the clip moved it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(clipped - x)
        return clipped.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (moved,) = ctx.saved_tensors
        return torch.where(moved * grad < 0, 0.0, grad), None


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
