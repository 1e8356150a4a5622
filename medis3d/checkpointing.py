"""Gradient checkpointing of a network's stages, so the gradient pass keeps only stage inputs.

Stages are the repeated blocks of MONAI's networks (SegResNet's ResBlock, SegResNetDS's SegResBlock, UNet's
ResidualUnit / Convolution, UNETR's TransformerBlock and UNETR blocks, DynUNet's blocks);
SwinUNETR uses its own ``use_checkpoint``. TorchScript networks cannot be changed: they run
without checkpointing and a notice says so.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.checkpoint import checkpoint

STAGE_CLASSES = {
    "ResBlock",  # SegResNet
    "SegResBlock",  # SegResNetDS (Auto3DSeg)
    "ResidualUnit",  # UNet with residual units
    "Convolution",  # UNet without them
    "TransformerBlock",  # UNETR / ViT
    "UnetrBasicBlock",
    "UnetrUpBlock",
    "UnetrPrUpBlock",
    "UnetResBlock",  # DynUNet
    "UnetBasicBlock",
    "UnetUpBlock",
    "TwoConv",  # BasicUNet
    "Down",
    "UpCat",
}


class CheckpointedStage(torch.nn.Module):
    """Runs ``module`` under ``torch.utils.checkpoint`` (non-reentrant, any number of inputs)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(network: torch.nn.Module) -> tuple[int, str | None]:
    """Wrap the network's stages in place; returns (stages wrapped, notice or None)."""
    if isinstance(network, torch.jit.ScriptModule):
        return 0, "TorchScript network: gradient checkpointing is not possible, running without it"
    flagged = 0
    for module in network.modules():
        if hasattr(module, "use_checkpoint") and isinstance(module.use_checkpoint, bool):
            if not hasattr(module, "_medis3d_use_checkpoint"):
                module._medis3d_use_checkpoint = module.use_checkpoint  # what the bundle set, for disable_checkpointing
            module.use_checkpoint = True
            flagged += 1
    if flagged:
        return flagged, None
    wrapped = _wrap(network)
    if wrapped == 0:
        return 0, f"{type(network).__name__}: no known stages to checkpoint, running without it"
    return wrapped, None


def checkpointed_view(network: torch.nn.Module) -> tuple[torch.nn.Module, int, str | None]:
    """A checkpointed copy of ``network`` that shares its weights and buffers, leaving ``network`` as it is:
    (the view, stages wrapped, notice or None). Where nothing can be checkpointed the view is ``network`` itself."""
    if isinstance(network, torch.jit.ScriptModule):
        return network, 0, "TorchScript network: gradient checkpointing is not possible, running without it"
    view = _shallow_tree(network)
    count, notice = enable_checkpointing(view)
    return (view if count else network), count, notice


def _shallow_tree(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose every module is new but holds the same parameter and buffer tensors."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: (_shallow_tree(child) if child is not None else None) for name, child in module._modules.items()}
    for name, value in module.__dict__.items():  # hooks registered on the view stay the view's
        if "hooks" in name and isinstance(value, dict):
            new.__dict__[name] = type(value)(value)
    return new


def disable_checkpointing(network: torch.nn.Module) -> None:
    """Undo :func:`enable_checkpointing`: unwrap the stages and put back the networks' own flags."""
    for module in network.modules():
        if hasattr(module, "_medis3d_use_checkpoint"):
            module.use_checkpoint = module._medis3d_use_checkpoint
            del module._medis3d_use_checkpoint
    _unwrap(network)


def _unwrap(parent: torch.nn.Module) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, CheckpointedStage):
            parent._modules[name] = child.module
            child = child.module
        _unwrap(child)


def _has_stage(module: torch.nn.Module) -> bool:
    return any(type(m).__name__ in STAGE_CLASSES for m in module.modules())


def _wrap(parent: torch.nn.Module) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, CheckpointedStage):
            continue
        if isinstance(child, torch.nn.ModuleDict | torch.nn.ModuleList):  # containers are indexed, not called: look inside
            count += _wrap(child)
            continue
        # The items of a ModuleList (SegResNet's down/up levels, UNETR's ViT blocks) are whole
        # stages: checkpointing each item keeps fewer tensors than checkpointing their blocks.
        coarse = isinstance(parent, torch.nn.ModuleList) and any(p.numel() for p in child.parameters())
        if coarse or (type(child).__name__ in STAGE_CLASSES and any(p.numel() for p in child.parameters())):
            parent._modules[name] = CheckpointedStage(child)
            count += 1
        else:
            count += _wrap(child)
    return count
