"""Differentiable preprocessing built from a bundle's MONAI transforms, run in the scan's space.

MONAI's array transforms already pass gradients on tensors for the spatial and most intensity
steps (Orientation, Spacing, ScaleIntensityRange, CropForeground, SpatialPad ...), so they are
reused as they are. Intensity clipping is replaced by a straight-through clamp (BPDA) so voxels
outside the window still receive a gradient; NormalizeIntensity (in-place in MONAI) gets a
differentiable equivalent; ScaleIntensityRangePercentiles is computed by medis3d (MONAI switches
to numpy above a million voxels and then passes no gradient through its percentiles); steps that
block the gradient are passed straight through and listed.

Three gradient paths, one forward (every path computes exactly the bundle's values):

* ``"standard"``: each step's own derivative, except that clamps are straight-through and percentiles are held
  constant (the attack's default). A percentile's own derivative reaches only the one or two voxels it lands on,
  and is large there (the whole volume's sensitivity to the scaling), yet moving them moves the percentile only
  as far as the next voxel in sorted order: on the 2 mm T1 the two took 47 % of the squared length of the CE
  gradient, so an L2 step spent about half of itself on them, and APGD-CE in an L2 ball of 1000 left mean IoU
  0.822 with that derivative against 0.800 with the percentiles held constant (as with the smooth path's).
* ``"smooth"``: BPDA for the whole path: the forward value of each step, the derivative of a smooth
  stand-in: a downsampling ``Spacing`` takes its gradient through a box average over the voxels
  each output voxel stands for (not just the ones its interpolation reads), and a percentile through
  a kernel-smoothed quantile (every voxel near it moves it, not just the one or two it lands on).
* ``"exact"``: the real forward's own derivative, clamps included (zero outside the window), for
  checking gradients against finite differences.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform

from medis3d.bpda import straight_through, straight_through_clamp, value_with_gradient_of

# Steps that our own I/O already does (loading, channel-first, type conversion).
IO_STEPS = {
    "LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor",
    "ToNumpy", "ToDevice", "SaveImage", "Identity", "DeleteItems", "SelectItems", "CopyItems",
}
# Dictionary-only arguments that the array transform does not take.
DICT_ONLY_ARGS = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "source_key", "overwrite", "image_key"}


GRADIENT_PATHS = ("standard", "smooth", "exact")


@dataclass
class Step:
    """One preprocessing step: its MONAI name, the callable, and how its gradient is obtained.

    ``exact_fn`` computes the same values with the step's true derivative (where ``fn`` uses a
    straight-through stand-in); ``smooth_fn`` computes a smooth stand-in whose derivative the
    ``"smooth"`` path takes (its values are replaced by ``fn``'s)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    gradient: str  # "exact", "straight-through clamp", "straight-through", "differentiable equivalent"
    invertible: InvertibleTransform | None = None
    args: dict = field(default_factory=dict)
    exact_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    smooth_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    smooth: str = ""  # what the smooth stand-in is, for reports


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_value(name: str, value: Any) -> None:
    """Refuse an intensity argument (a window bound, a target bound) that is given but is not a number (a string, a
    list: MONAI takes it and fails on the first scan) or is NaN (every voxel would become NaN); None is not given."""
    if value is None:
        return
    if not _number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if np.isnan(float(value)):
        raise ValueError(f"{name} is NaN: every voxel would become NaN")


def check_clip_bounds(low: Any, high: Any, names: tuple[str, str] = ("b_min", "b_max")) -> None:
    """Refuse bounds a clip cannot use, with a ValueError naming the problem: one that is not a number or is NaN
    (:func:`check_value`), or a lower bound above the upper one (every voxel would become the upper bound: the model
    would see a constant image). None is no bound."""
    for name, value in zip(names, (low, high)):
        check_value(name, value)
    if low is not None and high is not None and float(low) > float(high):
        raise ValueError(f"clip=True with {names[0]} {low} > {names[1]} {high} would make every voxel {high} "
                         "(the model would see a constant image)")


def _clamp(x: torch.Tensor, low, high, exact: bool) -> torch.Tensor:
    """The clip: its own derivative (``exact``) or straight-through; no bound at all is no clip."""
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high) if exact else straight_through_clamp(x, low, high)


def quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``np.percentile(flat, 100 q)`` (linear interpolation) for any size, differentiable like ``torch.quantile``
    (which refuses large inputs; MONAI's percentile goes through numpy above a million elements)."""
    n = flat.numel()
    pos = q * (n - 1)
    below = int(np.floor(pos))
    frac = pos - below
    low = torch.kthvalue(flat, below + 1).values
    if frac == 0 or below + 1 >= n:
        return low
    # the next order statistic without a second selection (each costs a copy and a pass over the volume): ``low``
    # again where ties at it reach past it, else the least value above it
    if int((flat <= low).sum()) >= below + 2:
        return low
    high = torch.where(flat > low, flat, torch.inf).min()
    return low + frac * (high - low)


def smoothed(flat: torch.Tensor, value: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``value`` in the forward pass; backward, the first-order change of a quantile under a perturbation:
    the Gaussian-kernel-weighted mean of the voxels' changes near it (a kernel-smoothed quantile)."""
    with torch.no_grad():
        weights = torch.exp(-0.5 * ((flat - value) / bandwidth) ** 2)
        weights = weights / weights.sum().clamp_min(1e-12)
    return value.detach() + (weights * (flat - flat.detach())).sum()


def _like(img: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` carrying ``img``'s metadata and applied operations where ``img`` is a MetaTensor, else as they are."""
    return MetaTensor(values, meta=img.meta, applied_operations=list(img.applied_operations)) if isinstance(img, MetaTensor) else values


class PercentileScaling:
    """``monai.transforms.ScaleIntensityRangePercentiles`` computed on tensors of any size, with its three
    gradients: the percentiles' own (``exact``), none (``standard``: held constant) or a kernel-smoothed
    quantile's (``smooth``); the clip straight-through (``standard``, ``smooth``) or exact."""

    def __init__(self, lower: float, upper: float, b_min=None, b_max=None, clip: bool = False, relative: bool = False,
                 channel_wise: bool = False, dtype=None):
        if not 0 <= lower <= 100 or not 0 <= upper <= 100 or lower > upper:
            raise ValueError(f"percentiles must satisfy 0 <= lower <= upper <= 100, got {lower}, {upper}")
        if relative and (b_min is None or b_max is None):  # found when the step is built, not on the first scan
            raise ValueError("relative=True needs both b_min and b_max")
        self.lower, self.upper, self.b_min, self.b_max = float(lower), float(upper), b_min, b_max
        self.clip, self.relative, self.channel_wise = bool(clip), bool(relative), bool(channel_wise)
        check_value("b_min", b_min)
        check_value("b_max", b_max)
        if self.clip:
            check_clip_bounds(*self._targets())

    def _targets(self) -> tuple:
        b_min, b_max = self.b_min, self.b_max
        if self.relative:
            if b_min is None or b_max is None:
                raise ValueError("If it is relative, b_min and b_max should not be None.")
            b_min, b_max = (b_max - b_min) * (self.lower / 100.0) + b_min, (b_max - b_min) * (self.upper / 100.0) + b_min
        return b_min, b_max

    def _bounds(self, flat: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = quantile(flat, self.lower / 100), quantile(flat, self.upper / 100)
        if mode == "exact":
            return low, high
        if mode == "standard":  # held constant: their own derivative lands on one or two voxels (module docstring)
            return low.detach(), high.detach()
        with torch.no_grad():
            spread = float(high - low) or 1.0
            out = []
            for q in (self.lower, self.upper):
                near = quantile(flat.detach(), min(q + 1, 100) / 100) - quantile(flat.detach(), max(q - 1, 0) / 100)
                out.append(max(0.5 * float(near), 0.01 * spread))
        return smoothed(flat, low, out[0]), smoothed(flat, high, out[1])

    def _scale(self, img: torch.Tensor, mode: str) -> torch.Tensor:
        a_min, a_max = self._bounds(img.reshape(-1), mode)
        b_min, b_max = self._targets()
        if float((a_max - a_min).detach()) == 0.0:
            return img - a_min if b_min is None else img - a_min + b_min
        out = (img - a_min) / (a_max - a_min)
        if b_min is not None and b_max is not None:
            out = out * (b_max - b_min) + b_min
        if self.clip:
            out = _clamp(out, b_min, b_max, exact=mode == "exact")
        return out

    def __call__(self, img: torch.Tensor, mode: str = "standard") -> torch.Tensor:
        plain = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        plain = plain.float()
        if self.channel_wise:
            out = torch.stack([self._scale(plain[c], mode) for c in range(plain.shape[0])])
        else:
            out = self._scale(plain, mode)
        return _like(img, out)


def cast_dtype(value: Any) -> torch.dtype | None:
    """The torch dtype a ``CastToType`` step names (a torch or numpy dtype, or its name); None where it names none."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.lstrip("$").split(".")[-1]
        if isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    try:
        return torch.from_numpy(np.zeros(0, dtype=np.dtype(value))).dtype
    except (TypeError, ValueError):
        return None


class _CastThrough:
    """``CastToType`` to an integer dtype or to half precision: the values MONAI's cast gives (truncated towards zero;
    rounded to float16 or bfloat16; back in float32 for the steps after it), with the identity gradient; left as they
    are where the dtype cannot hold them (they would wrap or become infinite, and MONAI's following steps would compute
    in the integer dtype, which ours do not)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        plain = img.as_tensor() if isinstance(img, MetaTensor) else img
        info = torch.finfo(self.dtype) if self.dtype.is_floating_point else torch.iinfo(self.dtype)
        if float(plain.detach().min()) < info.min or float(plain.detach().max()) > info.max:
            return img  # values the dtype cannot hold wrap, and MONAI's steps after it then compute in that dtype too
        out = straight_through(plain, plain.to(self.dtype).to(plain.dtype))
        return _like(img, out)


def _box_before_spacing(transform, pixdim) -> Callable[[torch.Tensor], torch.Tensor]:
    """The smooth stand-in of a downsampling ``Spacing``: a box average over the input voxels each output
    voxel stands for, then the resampling; its gradient reaches every voxel the output covers."""
    import torch.nn.functional as F

    def fn(img: torch.Tensor) -> torch.Tensor:
        spacing = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(0)) if isinstance(img, MetaTensor) else np.ones(3)
        target = np.resize(np.asarray(pixdim, dtype=np.float64).reshape(-1), 3)
        kernel = [max(1, int(round(t / s))) if t > 0 else 1 for t, s in zip(target, spacing)]
        kernel = [k if k % 2 == 1 else k + 1 for k in kernel]  # odd, centred on the voxel it averages around
        if max(kernel) == 1:
            return transform(img)
        pad = [p for k in reversed(kernel) for p in (k // 2, k // 2)]
        if not isinstance(img, MetaTensor):
            return transform(F.avg_pool3d(F.pad(img[None].float(), pad, mode="replicate"), kernel, stride=1)[0])
        blurred = F.avg_pool3d(F.pad(img.as_tensor()[None].float(), pad, mode="replicate"), kernel, stride=1)[0]
        return transform(MetaTensor(blurred, meta=img.meta, applied_operations=list(img.applied_operations)))

    return fn


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


# MONAI steps that clip or threshold intensities, whose own derivative is zero on the voxels they change: the
# attack's gradient passes them straight through (BPDA); the label is what bundle check shows
CLIPPING_STEPS = {"ClipIntensityPercentiles": "straight-through clip (percentiles held constant)",
                  "ThresholdIntensity": "straight-through threshold"}


# half-precision casts, done as MONAI does them (rounded), and what bundle check says of them
HALF_PRECISION = {dtype: f"rounded to {str(dtype)[6:]} as MONAI's cast rounds (the steps after it in float32, where MONAI "
                         f"computes them in {str(dtype)[6:]}; the network is given float32)"
                  for dtype in (torch.float16, torch.bfloat16)}


def build_step(name: str, args: dict[str, Any]) -> Step | None:
    """A differentiable step for one transform of a bundle's preprocessing (None: done by our I/O)."""
    array_name, cls = array_transform_class(name)
    base = array_name
    if base == "CastToType":
        dtype = cast_dtype(args.get("dtype"))
        if dtype is not None and not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool:
            # a cast to an integer truncates the model's input (e.g. after a resampling): done as MONAI does it, its
            # gradient passed straight through (BPDA for rounding)
            return Step(base, _CastThrough(dtype), "straight-through", args={"dtype": str(dtype)})
        if dtype in HALF_PRECISION:
            # a cast to half precision rounds the model's input: rounded as MONAI rounds it (taken for I/O, the model
            # input differed from MONAI's by up to 2.3e-4 of the range on the tests' tiny bundle), its gradient passed
            # straight through; MONAI computes the steps after it in half precision, ours in float32
            return Step(base, _CastThrough(dtype), f"straight-through, {HALF_PRECISION[dtype]}", args={"dtype": str(dtype)})
    if base in IO_STEPS:
        return None
    kwargs = {k: v for k, v in args.items() if k not in DICT_ONLY_ARGS and not k.startswith("_")}
    if base == "NormalizeIntensity":
        kwargs.pop("dtype", None)
        return Step(base, NormalizeIntensityDiff(**kwargs), "differentiable equivalent", args=kwargs)
    if base == "ScaleIntensityRangePercentiles":
        scaling = PercentileScaling(**kwargs)
        gradient = "percentiles held constant, straight-through clamp" if scaling.clip else "percentiles held constant"
        return Step(base, scaling, gradient, None, kwargs, exact_fn=lambda x: scaling(x, "exact"),
                    smooth_fn=lambda x: scaling(x, "smooth"), smooth="kernel-smoothed percentiles")
    if cls is None:
        raise ValueError(f"unknown transform {name!r}")
    clip = None
    if base == "ScaleIntensityRange":
        for arg in ("a_min", "a_max", "b_min", "b_max"):  # MONAI takes any value here and fails (or gives NaN) later
            check_value(arg, kwargs.get(arg))
    if base == "ScaleIntensityRange" and kwargs.get("clip"):
        kwargs["clip"] = False
        b_min, b_max = kwargs.get("b_min"), kwargs.get("b_max")
        check_clip_bounds(b_min, b_max)
        clip = (b_min, b_max)
    with warnings.catch_warnings():  # MONAI's notices of its own future defaults (Orientation's labels) are not the user's
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="monai")
        transform = cls(**kwargs)
    invertible = transform if isinstance(transform, InvertibleTransform) else None
    if clip is not None:
        low, high = clip

        def clipped(x, _t=transform, _low=low, _high=high):
            return straight_through_clamp(_t(x), _low, _high)

        def exact_clipped(x, _t=transform, _low=low, _high=high):
            return _clamp(_t(x), _low, _high, exact=True)

        return Step(base, clipped, "straight-through clamp", invertible, kwargs | {"clip": True}, exact_fn=exact_clipped)
    if base in CLIPPING_STEPS and not kwargs.get("sharpness_factor"):
        # a hard clip or threshold (ClipIntensityPercentiles computes its percentiles in numpy above 1,000,000
        # voxels, which cuts their gradient as well): straight-through, as ScaleIntensityRange's clip is, so a voxel
        # clipped or replaced still feels the loss; its own derivative on the exact path
        def passed(x, _t=transform):
            out = _t(x)
            value = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
            through = straight_through(x.as_tensor() if isinstance(x, MetaTensor) else x, value.to(x.dtype))
            return _like(out, through)

        return Step(base, passed, CLIPPING_STEPS[base], invertible, kwargs, exact_fn=transform)
    if base == "Spacing" and "pixdim" in kwargs:
        return Step(base, transform, "exact", invertible, kwargs, smooth_fn=_box_before_spacing(transform, kwargs["pixdim"]),
                    smooth="box average over the voxels each model voxel stands for")
    return Step(base, transform, "exact", invertible, kwargs)


class DifferentiablePreprocessing:
    """The bundle's preprocessing as differentiable steps, with the inverse for predictions."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        self._checked = False

    def __call__(self, x: MetaTensor, gradient: str = "standard") -> MetaTensor:
        """The model-space input; its gradient by the ``gradient`` path (module docstring)."""
        if gradient not in GRADIENT_PATHS:
            raise ValueError(f"unknown gradient path {gradient!r}; choose from {', '.join(GRADIENT_PATHS)}")
        for step in self.steps:
            fn = step.exact_fn if gradient == "exact" and step.exact_fn is not None else step.fn
            out = fn(x)
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(out)
            if x.requires_grad and not out.requires_grad and step.gradient == "exact":
                # MONAI computed this step without a graph: pass its gradient straight through.
                step.gradient = "straight-through"
            if step.gradient == "straight-through" and x.requires_grad and not out.requires_grad:
                out = straight_through(x, out)
            if gradient == "smooth" and step.smooth_fn is not None and x.requires_grad:
                stand_in = step.smooth_fn(x)
                stand_in = stand_in.as_tensor() if isinstance(stand_in, MetaTensor) else stand_in
                value = out.as_tensor() if isinstance(out, MetaTensor) else out
                bpda = value_with_gradient_of(value, stand_in)  # the step's value, the stand-in's derivative
                out = _like(out, bpda)
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
        return [{"transform": s.name, "gradient": s.gradient, "smooth_stand_in": s.smooth or None, "args": _jsonable(s.args)}
                for s in self.steps]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
