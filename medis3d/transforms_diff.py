"""Differentiable preprocessing built from a bundle's MONAI transforms, run in the scan's space.

MONAI's array transforms already pass gradients on tensors for the spatial and most intensity
steps (Orientation, Spacing, ScaleIntensityRange, ScaleIntensityRangePercentiles,
CropForeground, SpatialPad ...), so they are reused as they are. Intensity clipping is replaced
by a straight-through clamp (BPDA) so voxels outside the window still receive a gradient;
NormalizeIntensity (in-place in MONAI) gets a differentiable equivalent; steps that block the
gradient are passed straight through and listed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform

from medis3d.bpda import straight_through, straight_through_clamp

# Steps that our own I/O already does (loading, channel-first, type conversion).
IO_STEPS = {
    "LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor",
    "ToNumpy", "ToDevice", "SaveImage", "Identity", "DeleteItems", "SelectItems", "CopyItems",
}
# Dictionary-only arguments that the array transform does not take.
DICT_ONLY_ARGS = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "source_key", "overwrite", "image_key"}


@dataclass
class Step:
    """One preprocessing step: its MONAI name, the callable, and how its gradient is obtained."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    gradient: str  # "exact", "straight-through clamp", "straight-through", "differentiable equivalent"
    invertible: InvertibleTransform | None = None
    args: dict = field(default_factory=dict)


class NormalizeIntensityDiff:
    """``monai.transforms.NormalizeIntensity`` written without in-place operations."""

    def __init__(self, subtrahend=None, divisor=None, nonzero: bool = False, channel_wise: bool = False, dtype=None):
        if subtrahend is not None or divisor is not None:
            self.subtrahend = None if subtrahend is None else torch.as_tensor(subtrahend, dtype=torch.float32)
            self.divisor = None if divisor is None else torch.as_tensor(divisor, dtype=torch.float32)
        else:
            self.subtrahend = self.divisor = None
        self.nonzero, self.channel_wise = nonzero, channel_wise

    def _normalize(self, img: torch.Tensor, sub=None, div=None) -> torch.Tensor:
        mask = img != 0 if self.nonzero else torch.ones_like(img, dtype=torch.bool)
        if not mask.any():
            return img
        values = img[mask]
        mean = values.mean() if sub is None else sub
        std = values.std(unbiased=False) if div is None else div
        if not isinstance(std, torch.Tensor) or std.ndim == 0:
            std = torch.as_tensor(std, dtype=img.dtype)
            std = torch.where(std == 0, torch.ones_like(std), std)
        normalized = (img - mean) / std
        return torch.where(mask, normalized, img)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.channel_wise:
            channels = []
            for c in range(img.shape[0]):
                sub = None if self.subtrahend is None else self.subtrahend.reshape(-1)[min(c, self.subtrahend.numel() - 1)]
                div = None if self.divisor is None else self.divisor.reshape(-1)[min(c, self.divisor.numel() - 1)]
                channels.append(self._normalize(img[c], sub, div))
            out = torch.stack(channels)
        else:
            out = self._normalize(img, self.subtrahend, self.divisor)
        return out


def array_transform_class(name: str):
    """The MONAI array transform class for a (dictionary or array) transform name."""
    from monai.bundle.config_item import ComponentLocator

    short = name.rsplit(".", 1)[-1]
    candidates = [short[:-1], short] if short.endswith("d") else [short]
    locator = ComponentLocator()
    for candidate in candidates:
        module = locator.get_component_module_name(candidate)
        if isinstance(module, list):
            module = next((m for m in module if ".array" in m), module[0])
        if module and module.startswith("monai.transforms"):
            cls = getattr(importlib.import_module(module), candidate, None)
            if cls is not None:
                return candidate, cls
    return short, None


def build_step(name: str, args: dict[str, Any]) -> Step | None:
    """A differentiable step for one transform of a bundle's preprocessing (None: done by our I/O)."""
    array_name, cls = array_transform_class(name)
    base = array_name
    if base in IO_STEPS:
        return None
    kwargs = {k: v for k, v in args.items() if k not in DICT_ONLY_ARGS and not k.startswith("_")}
    if base == "NormalizeIntensity":
        kwargs.pop("dtype", None)
        return Step(base, NormalizeIntensityDiff(**kwargs), "differentiable equivalent", args=kwargs)
    if cls is None:
        raise ValueError(f"unknown transform {name!r}")
    clip = None
    if base in ("ScaleIntensityRange", "ScaleIntensityRangePercentiles") and kwargs.get("clip"):
        kwargs["clip"] = False
        b_min, b_max = kwargs.get("b_min"), kwargs.get("b_max")
        clip = (b_min, b_max)
    transform = cls(**kwargs)
    invertible = transform if isinstance(transform, InvertibleTransform) else None
    if clip is not None:
        low, high = clip

        def clipped(x, _t=transform, _low=low, _high=high):
            return straight_through_clamp(_t(x), _low, _high)

        return Step(base, clipped, "straight-through clamp", invertible, kwargs | {"clip": True})
    return Step(base, transform, "exact", invertible, kwargs)


class DifferentiablePreprocessing:
    """The bundle's preprocessing as differentiable steps, with the inverse for predictions."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        self._checked = False

    def __call__(self, x: MetaTensor) -> MetaTensor:
        for step in self.steps:
            out = step.fn(x)
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(out)
            if x.requires_grad and not out.requires_grad and step.gradient == "exact":
                # MONAI computed this step without a graph: pass its gradient straight through.
                step.gradient = "straight-through"
            if step.gradient == "straight-through" and x.requires_grad and not out.requires_grad:
                out = straight_through(x, out)
            x = out if isinstance(out, MetaTensor) else MetaTensor(out, meta=getattr(x, "meta", None))
        return x

    def invert(self, model_space: MetaTensor) -> MetaTensor:
        """Map a model-space tensor (logits, probabilities) back to the scan's grid (differentiable)."""
        out = model_space
        for step in reversed(self.steps):
            if step.invertible is not None:
                out = step.invertible.inverse(out)
        return out

    def describe(self) -> list[dict]:
        return [{"transform": s.name, "gradient": s.gradient, "args": _jsonable(s.args)} for s in self.steps]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
