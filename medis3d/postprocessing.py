"""A bundle's label-map postprocessing: the steps that change the discrete prediction after its ``AsDiscreted``
(``KeepLargestConnectedComponentd``, ``RemoveSmallObjectsd``, ``FillHolesd``, ``LabelFilterd``).

medis3d applies each with MONAI's own transform to every prediction it scores (the clean one, each iterate a member
keeps, the written file), in the space the bundle applies it: the model's grid where it comes before the bundle's
``Invertd`` or the bundle has none, the scan's grid after it. They are not differentiable and the attacks' losses
take the probabilities before them, so the gradient passes around them (BPDA with the identity): a member steers the
network's output, and the step decides, as in the bundle, what that output is scored as.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# the label-map steps medis3d applies, with the optional package MONAI needs for each
LABEL_MAP_STEPS = {
    "KeepLargestConnectedComponent": "skimage.measure",
    "RemoveSmallObjects": "skimage.morphology",
    "FillHoles": "scipy.ndimage",
    "LabelFilter": None,
}


def step_name(target: str) -> str | None:
    """The label-map step a ``_target_`` names (``KeepLargestConnectedComponentd`` -> ``KeepLargestConnectedComponent``),
    None for any other."""
    short = target.rsplit(".", 1)[-1]
    for name in (short, short[:-1] if short[-1:] in ("d", "D") else short):
        if name in LABEL_MAP_STEPS:
            return name
    return None


@dataclass(frozen=True)
class LabelStep:
    """One label-map step as the bundle runs it: MONAI's array transform ``name`` with ``args``, in ``space``
    (``"model"`` or ``"scan"``), on a one-hot map of ``onehot`` classes where the bundle's ``AsDiscreted`` made one
    (``to_onehot``), else on the label map (softmax) or the 0/1 channels (sigmoid)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    space: str = "scan"
    onehot: int | None = None

    @functools.cached_property
    def transform(self):
        """MONAI's array transform, made once (a step runs on every prediction an attack scores); a ``TypeError`` for
        an argument it does not take, a ``RuntimeError`` when the package it needs is missing."""
        import monai.transforms as mt
        from monai.utils import optional_import

        cls = getattr(mt, self.name)
        unknown = sorted(set(self.args) - set(inspect.signature(cls).parameters))
        if unknown:
            raise TypeError(f"{self.name} takes no argument {', '.join(unknown)}")
        needs = LABEL_MAP_STEPS[self.name]
        if needs is not None and not optional_import(needs)[1]:
            package = "scikit-image" if needs.startswith("skimage") else needs.split(".")[0]
            raise RuntimeError(f"MONAI's {self.name} needs {package} (pip install {package})")
        return cls(**self.args)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.args.items()))
        return f"{self.name}d({args}) on the {self.space}'s grid"


def apply(steps: tuple[LabelStep, ...], labels: torch.Tensor, affine: torch.Tensor | np.ndarray,
          activation: str) -> torch.Tensor:
    """``labels`` ``(1, *S)`` class indices (softmax) or ``(C, *S)`` 0/1 channels (sigmoid) after ``steps``, in the
    same form. A run of steps on a one-hot map is applied to one one-hot conversion, as in the bundle."""
    if not steps:
        return labels
    from monai.data import MetaTensor

    onehot = steps[0].onehot if activation == "softmax" else None
    x = labels.float()
    if onehot:
        x = torch.nn.functional.one_hot(x[0].long().clamp(0, onehot - 1), onehot).movedim(-1, 0).float()
    out = MetaTensor(x, affine=torch.as_tensor(np.asarray(affine), dtype=torch.float64))
    for step in steps:
        out = step.transform(out)
    result = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
    if onehot:  # a voxel no channel keeps (its class's component dropped) is background, as a one-hot Dice counts it
        result = result.float().argmax(0, keepdim=True)
    return result.to(labels.dtype)
