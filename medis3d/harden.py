"""``medis3d harden``: adversarial fine-tuning of a MONAI bundle's network into a new, more robust bundle.

The network is fine-tuned on random crops of the training volumes in model space (the bundle's own
inference preprocessing, exactly as :class:`~medis3d.target.Target` runs it; labels resampled onto
the same grid), each step on a mix of the clean crops and adversarial ones made by a few steps of
PGD (Madry et al. 2018) or APGD (Croce & Hein 2020, each crop its own step size and best iterate) with a
random start inside an L-inf ball whose radius grows over a warm-up; the radius is a budget in the unit of
``attack`` and ``evaluate``, taken into each volume's model space (:func:`eps_units`).
The adversarial crops ascend a loss from medis3d's registry (:mod:`medis3d.losses`) and are kept in
the ball and the model's intensity range (or no farther outside it than an augmented or padded crop's voxel
lies: :func:`crop_bounds`) by :class:`~medis3d.attacks.base.Budget`. The training
loss is the bundle's own (``loss`` in its train config, MONAI and torch classes only) or DiceCE;
augmentation is the random transforms of the train config's preprocessing, where there is one.

Everything the run needs to continue sits in ``<out>/.harden/`` (the last checkpoint, the
settings); a second run with the same ``--out`` continues from there. The bundle itself (the
source's configs with inference unchanged, the new weights, ``metadata.json`` with a new version
and the robustness figures, ``docs/README.md`` with the recipe and a before/after table) is staged
and only moved into ``<out>`` when everything, the closing evaluation included, has finished.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medis3d.errors import BundleError, InputError, OutputError, first_line
from medis3d.html_report import eps50_label, harden_page, number
from medis3d.io import read_volume
from medis3d.io.atomic import atomic_path, write_text_atomic
from medis3d.io.outputs import check_output_folder, output_lock, writing
from medis3d.io.paths import within
from medis3d.io.volume import Volume, make_names_unique
from medis3d.study import Case, datalist_cases, eps_key, read_datalist, read_dataset
from medis3d.target import Target

STATE_DIR = ".harden"
TRAIN_CONFIG_NAMES = ("train.json", "train.yaml", "train.yml")
# crops are made here, on tensors already in model space: a config's own crops, pads, loading and type
# conversions are left out of the augmentation
_LEFT_OUT = ("Crop", "Pad", "Load", "EnsureType", "ToTensor", "ToNumpy", "EnsureChannelFirst", "Save", "CopyItems")
_SETTINGS_THAT_MAY_CHANGE = ("steps", "save_every", "eval_eps", "eval_preset", "eval_members", "eval_steps", "evaluate",
                             "calibrate")
# the logit shifts calibrate() tries (the foreground's against the background's; a sigmoid channel's against its
# threshold's logit, 0 at 0.5)
CALIBRATION_SHIFTS = tuple(k / 4 for k in range(-8, 17))


TRAINING_ATTACKS = ("pgd", "apgd")
# the comparison warns where the source's adversarials leave the hardened model lower than its own attacks by more than
# this much Dice on a volume (smaller gaps are the two searches' noise: 0.004 at 8/255 on the tiny model)
TRANSFER_MARGIN = 0.01


@dataclass(frozen=True)
class HardenOptions:
    """How the network is fine-tuned, and how source and result are compared at the end."""

    eps: float = 8 / 255  # the training attack's L-inf radius in attack's and evaluate's units (eps_units: per volume)
    attack: str = "pgd"  # the training attack: pgd (Madry et al.) or apgd (Auto-PGD's step control, per crop)
    attack_steps: int = 2  # attack steps per training batch
    attack_step: float | None = None  # PGD step size; default 2.5 eps / steps (Madry et al.); APGD chooses its own
    attack_loss: str = "ce"  # the loss the training attack ascends (medis3d.losses)
    adv_weight: float = 0.5  # training loss = (1 - w) clean + w adversarial
    warmup: float = 0.3  # share of the steps over which eps grows linearly from 0
    steps: int = 200  # optimiser steps
    batch: int = 2  # crops per step
    crop: tuple[int, ...] | None = None  # crop size (model-space voxels); default: the inferer's window
    lr: float = 1e-4
    weight_decay: float = 1e-5
    seed: int = 0
    amp: bool = False
    checkpoint: bool = False  # gradient checkpointing of the network's stages
    save_every: int = 20  # steps between checkpoints
    val_split: float = 0.2  # share of a folder dataset (or of training entries without validation ones) held out
    evaluate: bool = True
    eval_eps: tuple[float, ...] = (4 / 255, 8 / 255)
    eval_preset: str = "reliable"
    eval_members: tuple[str, ...] | None = None
    eval_steps: int | None = None
    calibrate: bool = True  # after training, the decision threshold chosen on the training volumes (calibrate())

    def attack_step_size(self) -> float:
        return self.attack_step if self.attack_step is not None else 2.5 * self.eps / max(1, self.attack_steps)

    def eps_at(self, step: int) -> float:
        """The training radius at optimiser step ``step`` (0-based): linear from eps / warm-up steps up to eps."""
        ramp = max(1, int(round(self.warmup * self.steps)))
        return self.eps * min(1.0, (step + 1) / ramp)

    def check(self) -> None:
        problems = [
            (self.eps > 0, f"--eps must be positive, got {self.eps}"),
            (self.attack in TRAINING_ATTACKS, f"--attack must be one of {', '.join(TRAINING_ATTACKS)}, got {self.attack!r}"),
            (self.attack_steps >= 1, f"--attack-steps must be at least 1, got {self.attack_steps}"),
            (self.attack != "apgd" or self.attack_step is None, "--attack-step is PGD's: APGD chooses its own step size"),
            (0 <= self.adv_weight <= 1, f"--adv-weight must lie in [0, 1], got {self.adv_weight}"),
            (0 <= self.warmup <= 1, f"--warmup must lie in [0, 1], got {self.warmup}"),
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.batch >= 1, f"--batch must be at least 1, got {self.batch}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.save_every >= 1, f"--save-every must be at least 1, got {self.save_every}"),
            (0 < self.val_split < 1, f"--val-split must lie strictly between 0 and 1, got {self.val_split}"),
            ((bool(self.eval_eps) or not self.evaluate) and all(e > 0 for e in self.eval_eps),
             f"--eval-eps must be positive budgets, got {', '.join(f'{e:g}' for e in self.eval_eps) or 'none'}"),
            (self.eval_steps is None or self.eval_steps >= 1, f"--eval-steps must be at least 1, got {self.eval_steps}"),
        ]
        for ok, message in problems:
            if not ok:
                raise InputError(message)
        from medis3d.losses import LOSSES

        if self.attack_loss not in LOSSES:
            raise InputError(f"--attack-loss must be one of {', '.join(sorted(LOSSES))}, got {self.attack_loss!r}")


# -- data -----------------------------------------------------------------------------------------


def _entries(data: dict, key: str, dataset: Path) -> list[Case]:
    return datalist_cases(data.get(key) or [], dataset, key, need_label="hardening trains on labelled volumes")


def _split(cases: list[Case], share: float, where: Path) -> tuple[list[Case], list[Case]]:
    """The last ``share`` of ``cases`` (by name, at least one) held out for validation."""
    if len(cases) < 2:
        raise InputError(f"{where}: needs at least two labelled volumes (one to train on, one to validate), has {len(cases)}")
    held = min(len(cases) - 1, max(1, int(round(share * len(cases)))))
    return cases[:-held], cases[-held:]


def read_training_dataset(dataset: Path, labels: Path | None = None, val_split: float = 0.2) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: a Decathlon-style datalist's ``training`` entries and its
    ``validation`` (else ``test`` / ``testing``) entries with labels, or a folder of images with ``labels``
    named alike; where nothing is set aside for validation, the last ``val_split`` of the training cases."""
    dataset = Path(dataset)
    if dataset.is_file():
        data = read_datalist(dataset)
        if not isinstance(data, dict) or not data.get("training"):
            raise InputError(f"{dataset}: no 'training' entries")
        train = make_names_unique(_entries(data, "training", dataset))
        for key in ("validation", "test", "testing"):
            if data.get(key):
                return train, make_names_unique(_entries(data, key, dataset))
        return _split(train, val_split, dataset)
    if dataset.is_dir():
        if labels is None:
            raise InputError(f"{dataset}: a folder dataset needs --labels DIR (labels named like the images)")
        cases = read_dataset(dataset, labels)
        missing = [c.image.name for c in cases if c.label is None]
        if missing:
            raise InputError(f"{labels}: no label for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return _split(cases, val_split, dataset)
    raise InputError(f"{dataset}: no such datalist or folder")


@dataclass
class ModelSpaceCase:
    """One training volume in model space: the preprocessed image ``(C, *S)``, its label on the same grid
    (``(1, *S)`` class indices for softmax, ``(C, *S)`` 0/1 channels for sigmoid), the image's range, and per
    channel the model-space units one unit of eps makes for this volume (:func:`eps_units`)."""

    name: str
    image: torch.Tensor
    label: torch.Tensor
    low: float
    high: float
    units: tuple[float, ...]


def label_to_model_space(target: Target, segmentation: np.ndarray, scan_affine: np.ndarray, model_input) -> torch.Tensor:
    """A label on the scan's grid (as :meth:`Target.segment` gives it) on the model-space grid of
    ``model_input``: each class's mask resampled linearly through the affines, then the most likely class
    (softmax) or a threshold at 0.5 (sigmoid), as a bundle's training preprocessing resamples masks."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    seg = np.asarray(segmentation)
    if target.activation == "softmax":
        masks = np.stack([seg == c for c in range(target.out_channels)]).astype(np.float32)
    else:
        masks = seg.astype(np.float32)
    source = MetaTensor(torch.from_numpy(masks), affine=torch.as_tensor(np.asarray(scan_affine), dtype=torch.float64))
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        source, dst_affine=torch.as_tensor(np.asarray(model_input.affine), dtype=torch.float64),
        spatial_size=tuple(model_input.shape[1:]))
    values = torch.as_tensor(np.asarray(resampled), dtype=torch.float32)
    if target.activation == "softmax":
        return values.argmax(0, keepdim=True).to(torch.uint8)
    return (values > 0.5).to(torch.uint8)


def model_space_case(target: Target, case: Case) -> ModelSpaceCase:
    """Read ``case`` (image and label, checked as ``attack --label`` checks them) into model space."""
    from medis3d.workflow import read_segmentation

    if case.label is None:
        raise InputError(f"{case.image}: no label to train on")
    volume = read_volume(case.image)
    segmentation = read_segmentation(case.label, volume, target, "label")
    with torch.no_grad():
        model_input = target.model_input(torch.from_numpy(volume.array), volume)
    image = torch.as_tensor(np.asarray(model_input.as_tensor()), dtype=torch.float32).clone()
    label = label_to_model_space(target, segmentation, volume.affine, model_input)
    if not (label > 0).any():
        raise InputError(f"{case.label}: the label marks no structure in the model's field of view")
    return ModelSpaceCase(case.name, image, label, float(image.min()), float(image.max()), eps_units(target, volume))


def eps_units(target: Target, volume: Volume) -> tuple[float, ...]:
    """Model-space units per unit of eps for ``volume``, one per input channel: the native units that ``attack`` and
    ``evaluate`` make of one unit of a budget (:meth:`Target.intensity_scales`: a fixed window's span, else the scan's
    0.5-99.5 percentile range, each channel's own where the model normalises them apart) times the preprocessing's
    model-space units per native unit (:func:`intensity_gain`). 1 for a fixed ScaleIntensityRange window; for a
    z-scored bundle the scan's percentile range over its standard deviation (6.3 on the tests' synthetic scans)."""
    scales = target.intensity_scales(volume)
    native = scales.per_channel or (scales.scale,) * volume.channels
    return tuple(float(n * g) for n, g in zip(native, intensity_gain(target, volume)))


def intensity_gain(target: Target, volume: Volume, points: int = 5) -> tuple[float, ...]:
    """Model-space units per native unit of intensity, per input channel, as the preprocessing maps ``volume``: the
    derivative of a model-space voxel with respect to the native voxels of the box around the point it samples,
    summed (the resampling's weights sum to 1 there; statistics taken over the whole volume, a z-score's mean and
    deviation, move the sum by a share of the order of the box's size over the volume's). Measured at ``points``
    voxels of each channel, at evenly spaced quantiles of its values that are not 0 (a NormalizeIntensity over the
    nonzero voxels passes zeros through) and whose box lies inside the scan; the median of them, 1.0 where no voxel
    qualifies. The gradient is the attacks' own (a clip's is passed straight through: a window's slope)."""
    x = torch.as_tensor(volume.array, dtype=torch.float32, device=target.device).clone().requires_grad_(True)
    model_input = target.model_input(x, volume)
    m = model_input.as_tensor()
    to_native = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ np.asarray(model_input.affine, dtype=np.float64)
    half = np.maximum(1, np.ceil(np.abs(to_native[:3, :3]).max(axis=1))).astype(int)  # a model voxel's reach, in native voxels
    shape = np.asarray(volume.array.shape[1:])
    gains = []
    for c in range(min(m.shape[0], x.shape[0])):
        values = m[c].detach().flatten()
        nonzero = torch.nonzero(values != 0).flatten()
        found = []
        if nonzero.numel():
            kept = values[nonzero]
            ranked = kept.sort().values
            for q in ((k + 0.5) / points for k in range(points)):
                near = torch.topk((kept - ranked[int(q * (ranked.numel() - 1))]).abs(), min(64, kept.numel()), largest=False).indices
                for flat in nonzero[near].tolist():  # the voxels nearest the quantile, nearest first
                    index = tuple(int(i) for i in np.unravel_index(flat, tuple(m.shape[1:])))
                    centre = np.rint((to_native @ np.asarray(index + (1,), dtype=np.float64))[:3]).astype(int)
                    if np.all(centre - half >= 0) and np.all(centre + half < shape):
                        grad, = torch.autograd.grad(m[c][index], x, retain_graph=True)
                        box = tuple(slice(int(a - h), int(a + h + 1)) for a, h in zip(centre, half))
                        found.append(float(grad[c][box].sum()))
                        break
        usable = [g for g in found if math.isfinite(g) and g > 0]
        gains.append(float(np.median(usable)) if usable else 1.0)
    return tuple(gains)


# -- the bundle's training pieces ----------------------------------------------------------------


def find_train_config(bundle: Path) -> Path | None:
    for name in TRAIN_CONFIG_NAMES:
        path = bundle / "configs" / name
        if path.is_file():
            return path
    return None


def training_loss(cfg, activation: str, notices: list[str]) -> tuple[torch.nn.Module, str]:
    """The train config's ``loss`` (MONAI or torch, through the safe loader), else DiceCE for the activation."""
    from monai.losses import DiceCELoss

    if cfg is not None and cfg.has("loss"):
        try:
            cls, args = cfg.instantiate("loss")
            return cls(**args), f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in args.items())}) from {cfg.source.name}"
        except (BundleError, TypeError, ValueError) as exc:
            notices.append(f"the train config's loss cannot be used ({first_line(exc)}); trained with DiceCE")
    if activation == "softmax":
        return DiceCELoss(to_onehot_y=True, softmax=True), "DiceCELoss(to_onehot_y=True, softmax=True)"
    return DiceCELoss(sigmoid=True), "DiceCELoss(sigmoid=True)"


def _transform_list(cfg) -> tuple[str | None, list]:
    for key in ("train#random_transforms", "train#preprocessing#transforms", "train#preprocessing", "train_preprocessing#transforms"):
        node = cfg.raw(key)
        if isinstance(node, list):
            return key, node
    return None, []


def augmentation(cfg, notices: list[str]) -> tuple[list, list[str]]:
    """The train config's preprocessing from its first random transform on: its augmentation, and what it does
    between and after (a label threshold, an intensity rescaling after the intensity augmentation), on
    ``image`` / ``label`` only. Crops, pads and type conversions are left out (crops are made here); each
    transform is built through the safe loader, and one that cannot be built is left out with a notice."""
    if cfg is None:
        return [], []
    key, nodes = _transform_list(cfg)
    names_in_order = [str(n.get("_target_", "")).rpartition(".")[2] if isinstance(n, dict) else "" for n in nodes]
    first = next((i for i, n in enumerate(names_in_order) if n.startswith("Rand")), len(nodes))
    transforms, names = [], []
    for i in range(first, len(nodes)):
        short = names_in_order[i]
        if not short or any(part in short for part in _LEFT_OUT):
            continue
        try:
            from medis3d.safe_config import resolve_component

            name, args = cfg.component_args(f"{key}#{i}")
            keys = args.get("keys")
            keys = [keys] if isinstance(keys, str) else list(keys or [])
            if not keys or not set(keys) <= {"image", "label"}:
                notices.append(f"augmentation {short} acts on {keys}, not image / label; left out")
                continue
            cls = resolve_component(str(name), cfg.source, allow_any=cfg.trust)
            transforms.append(cls(**args))
            names.append(short)
        except Exception as exc:  # a transform this MONAI cannot build is not worth stopping the run for
            notices.append(f"augmentation {short} cannot be built ({first_line(exc)[:120]}); left out")
    return transforms, names


# -- the training attack -------------------------------------------------------------------------


def crop_bounds(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid range of each voxel of the crops ``x``: the training volumes' model-space range ``[low, high]``,
    widened to the voxel's own value where it lies outside (an intensity augmentation scales and shifts the crops
    beyond it, and SpatialPadd pads with 0), so a voxel may move towards the range by eps but is never pulled back
    into it by more: a clip to ``[low, high]`` alone moved such voxels by up to 88.8/255 under an 8/255 budget."""
    return torch.clamp(x, max=low), torch.clamp(x, min=high)


def _training_budget(x: torch.Tensor, eps: float, step: float, steps: int, low: float, high: float,
                     units: torch.Tensor | None):
    """The training attack's :class:`~medis3d.attacks.base.Budget` for the crops ``x`` (model space), and its radius
    in model-space units: eps times ``units`` (model-space units per unit of eps, per crop and channel, broadcasting
    over ``x``: :func:`eps_units`; None: eps is in model-space units), the range :func:`crop_bounds`."""
    from medis3d.attacks.base import Budget

    below, above = crop_bounds(x, low, high)
    scale = None if units is None else units.detach().double().cpu().numpy()
    radius = eps if units is None else eps * units.to(device=x.device, dtype=x.dtype)
    return Budget(eps=eps, step=step, steps=steps, low=below, high=above, scale=scale), radius


def adversarial_batch(network: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, eps: float, step: float,
                      steps: int, low: float, high: float, generator: torch.Generator, autocast=None,
                      units: torch.Tensor | None = None) -> torch.Tensor:
    """PGD with a uniform random start in the L-inf ball of radius ``eps`` around ``x`` (clipped to
    ``[low, high]``, widened to each voxel's own value where ``x`` lies outside: :func:`crop_bounds`): ``steps``
    signed-gradient steps of size ``step`` ascending ``loss_fn(logits, y)``. ``eps`` and ``step`` are in units of
    ``units`` model-space units (per crop and channel: :func:`eps_units`), or in model-space units without it."""
    budget, radius = _training_budget(x, eps, step, steps, low, high, units)
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * radius
    adv = budget.project(x + noise, x).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = network(adv)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        grad, = torch.autograd.grad(loss_fn(logits.float(), y), adv)
        adv = budget.project(adv.detach() + step * budget.direction(grad), x).detach()
    return adv


def apgd_batch(network: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, eps: float, steps: int, low: float,
               high: float, generator: torch.Generator, autocast=None, units: torch.Tensor | None = None) -> torch.Tensor:
    """APGD (Croce & Hein 2020) on a batch of crops, each crop with its own step size and best iterate: from a
    uniform random start in the L-inf ball, step 2 eps, momentum, and at APGD's checkpoints the step halved and
    the search sent back to the crop's best iterate where too few steps raised its loss (medis3d.attacks.apgd's
    schedule), kept in the range :func:`adversarial_batch` keeps, ``eps`` in its units. Returns each crop's iterate of
    the highest ``loss_fn`` (steps + 1 passes with a gradient)."""
    from medis3d.attacks.apgd import MOMENTUM, RHO, checkpoints

    budget, radius = _training_budget(x, eps, 2 * eps, steps, low, high, units)
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)

    def evaluate(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        point = point.detach().requires_grad_(True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = network(point)
        logits = (logits[0] if isinstance(logits, (tuple, list)) else logits).float()
        losses = torch.stack([loss_fn(logits[i : i + 1], y[i : i + 1]) for i in range(n)])
        grad, = torch.autograd.grad(losses.sum(), point)
        return losses.detach(), grad

    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * radius
    current = budget.project(x + noise, x).detach()
    f_x, grad = evaluate(current)
    previous, best, f_best, grad_best = current, current, f_x, grad
    eta = torch.full(shape, 2.0 * eps, device=x.device)
    eta_before, f_best_before = eta.clone(), f_best.clone()
    improved, since, marks = torch.zeros(n, device=x.device), 0, set(checkpoints(steps))
    for k in range(steps):
        z = budget.project(current + eta * budget.direction(grad), x)
        new = z if k == 0 else budget.project(current + MOMENTUM * (z - current) + (1 - MOMENTUM) * (current - previous), x)
        f_new, grad_new = evaluate(new)
        improved += (f_new > f_x).float()
        better = (f_new > f_best).view(shape)
        best, grad_best, f_best = torch.where(better, new, best), torch.where(better, grad_new, grad_best), torch.maximum(f_new, f_best)
        previous, current, grad, f_x = current, new, grad_new, f_new
        if k + 1 in marks:
            stalled = (improved < RHO * (k + 1 - since)) | ((eta.view(n) == eta_before.view(n)) & (f_best == f_best_before))
            eta_before, f_best_before = eta.clone(), f_best.clone()
            back = stalled.view(shape)
            eta = torch.where(back, eta / 2, eta)
            current, previous = torch.where(back, best, current), torch.where(back, best, previous)
            grad, f_x = torch.where(back, grad_best, grad), torch.where(stalled, f_best, f_x)
            improved, since = torch.zeros_like(improved), k + 1
    return best.detach()


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class HardenResult:
    """What a finished run wrote: the bundle folder and the comparison of source and hardened model."""

    out: Path
    comparison: dict | None
    train_minutes: float
    notices: list[str] = field(default_factory=list)


# what a checkpoint's digest covers, in words for the refusal of a run whose source or data changed
_DIGESTED = {"source": "source model (its weights or configs)", "dataset": "dataset (its volumes or labels)"}


def _digest(cases: Sequence[Case], source: Path, target: Target) -> dict[str, str]:
    """What a run continues only with: the source model by its content (:meth:`Target.fingerprint`: weights,
    preprocessing, classes; and every file of its ``configs/``, the train config's augmentation and loss among them),
    and the dataset by its cases' paths and the contents of every image and label (:func:`files_digest`). A path
    alone let a run continue after the weights at it were replaced, and publish source and hardened figures of
    different models."""
    from medis3d.study import files_digest

    model = "\n".join([target.fingerprint(), files_digest(str(source / "configs"))])
    data = "\n".join(f"{c.image}|{c.label}|{files_digest(str(c.image))}|{files_digest(str(c.label)) if c.label else ''}"
                     for c in cases)
    return {"source": hashlib.sha1(model.encode()).hexdigest()[:16], "dataset": hashlib.sha1(data.encode()).hexdigest()[:16]}


def _settings(options: HardenOptions) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}


def _crop_size(options: HardenOptions, target: Target, spatial_dims: int) -> tuple[int, ...]:
    if options.crop:
        crop = tuple(int(c) for c in options.crop)
        return crop * spatial_dims if len(crop) == 1 else crop
    roi = [int(r) for r in target.window.roi_size]
    return tuple(r if r > 0 else 96 for r in roi)


def _schedule(optimizer, steps: int):
    warm = max(1, min(20, steps // 10))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast_for(device: torch.device, enabled: bool):
    if not enabled:
        return None
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _Sampler:
    """Crops for optimiser step ``i``: the same ones on every run (random state from the seed and ``i``), their labels,
    and each crop's volume's model-space units per unit of eps ``(batch, C, 1, ...)`` (:func:`eps_units`)."""

    def __init__(self, cases: list[ModelSpaceCase], transforms: list, crop: tuple[int, ...], batch: int, seed: int,
                 activation: str, classes: int):
        from monai.transforms import Compose, RandSpatialCropd, SpatialPadd

        self.cases, self.batch, self.seed, self.activation, self.classes = cases, batch, seed, activation, classes
        self.compose = Compose([*transforms, SpatialPadd(keys=["image", "label"], spatial_size=list(crop)),
                                RandSpatialCropd(keys=["image", "label"], roi_size=list(crop), random_size=False)])

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        images, labels, units = [], [], []
        for _ in range(self.batch):
            case = self.cases[int(rng.integers(len(self.cases)))]
            self.compose.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = self.compose({"image": case.image.clone(), "label": case.label.float()})
            image = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32)
            label = torch.as_tensor(np.asarray(out["label"]), dtype=torch.float32)
            if self.activation == "softmax":  # an interpolating augmentation leaves fractions: back to classes
                label = label.round().clamp(0, self.classes - 1)
            else:
                label = (label > 0.5).float()
            images.append(image)
            labels.append(label)
            units.append(torch.tensor(case.units, dtype=torch.float32).view((-1,) + (1,) * (image.dim() - 1)))
        return torch.stack(images), torch.stack(labels), torch.stack(units)


def _prepare_out(out: Path, state: Path) -> None:
    """``out`` must be new, empty, or a run of ours to continue: a finished bundle or a user's folder is never
    written over."""
    check_output_folder(out)
    if out.exists() and any(out.iterdir()) and not state.is_dir():
        what = "already holds a bundle" if (out / "configs").exists() else "is not empty"
        raise OutputError(f"{out}: {what}; harden writes a new bundle into a new or empty folder, choose another --out")


def harden(source: str | Path | None, dataset: Path, out: Path, options: HardenOptions = HardenOptions(), *,
           labels: Path | None = None, trust: bool = False, device: str = "cpu", name: str | None = None,
           progress: Callable[[str, dict], None] | None = None) -> HardenResult:
    """Fine-tune ``source`` (a bundle folder, .zip or shipped name) on ``dataset`` and write the hardened bundle
    to ``out``; at the end, with ``options.evaluate``, compare both on the validation cases with the same
    attacks and budgets. ``progress(kind, info)`` hears of each phase and optimiser step."""
    from medis3d.bundle import _unpack_zip, bundle_name, load_bundle, resolve_bundle_path
    from medis3d.safe_config import SafeConfig, read_config

    options.check()
    out = Path(out)
    state = out / STATE_DIR
    bundle = resolve_bundle_path(source)
    if bundle.is_dir() and within(out, bundle):
        # the hardened bundle would be copied into itself, and a later harden of the source would copy it in again
        raise InputError(f"{out}: --out lies inside the source bundle {bundle}; give a folder outside it")
    _prepare_out(out, state)
    with tempfile.TemporaryDirectory(prefix="medis3d-harden-") as tmp:
        if bundle.is_file() and bundle.suffix == ".zip":
            bundle = _unpack_zip(bundle, Path(tmp))
        if not (bundle / "configs").is_dir():
            raise BundleError(f"{bundle}: a bundle is a directory (or .zip) with configs/ and models/")
        target = load_bundle(bundle, trust=trust, device=device)
        if isinstance(target.network, torch.jit.ScriptModule) or not (bundle / "models" / "model.pt").is_file():
            raise BundleError(f"{bundle}: harden needs a network_def and models/model.pt (a TorchScript-only bundle cannot be "
                              "fine-tuned and written back)")
        train, validation = read_training_dataset(dataset, labels, options.val_split)
        note = _emit(progress)
        note("phase", {"text": f"reading {len(train)} training and {len(validation)} validation volume(s)"})
        train_cases = [model_space_case(target, c) for c in train]
        for case in validation:  # checked before anything is written, like the training volumes
            from medis3d.workflow import read_segmentation

            if case.label is not None:  # validation entries all have labels (need_label)
                read_segmentation(case.label, read_volume(case.image), target, "label")
        train_path = find_train_config(bundle)
        train_cfg = SafeConfig(read_config(train_path), train_path, trust=trust) if train_path else None
        with output_lock(out), writing(out):
            return _run(target, bundle, train_cases, validation, out, state, options, train_cfg, trust, device,
                        name or bundle_name(source), note, _digest(train + validation, bundle, target))


def _emit(progress):
    def note(kind: str, info: dict) -> None:
        if progress is not None:
            progress(kind, info)
    return note


def _run(target: Target, bundle: Path, train_cases: list[ModelSpaceCase], validation: list[Case], out: Path, state: Path,
         options: HardenOptions, train_cfg, trust: bool, device: str, source_name: str, note, digest: dict) -> HardenResult:
    from medis3d.checkpointing import disable_checkpointing, enable_checkpointing
    from medis3d.losses import get_loss
    from medis3d.memory import amp_is_fast

    notices: list[str] = []
    dev = torch.device(device)
    network = copy.deepcopy(target.network).to(dev)
    for parameter in network.parameters():  # a Target's network is frozen: only inputs get gradients there
        parameter.requires_grad_(True)
    loss_fn, loss_name = training_loss(train_cfg, target.activation, notices)
    transforms, aug_names = augmentation(train_cfg, notices)
    attack_loss = get_loss(options.attack_loss, target.activation)
    crop = _crop_size(options, target, train_cases[0].image.dim() - 1)
    sampler = _Sampler(train_cases, transforms, crop, options.batch, options.seed, target.activation, target.out_channels)
    if options.amp and not amp_is_fast(dev):
        notices.append("--amp on a CPU without bfloat16 instructions: much slower than float32 here")
    autocast = _autocast_for(dev, options.amp)
    scaler = torch.amp.GradScaler("cuda") if options.amp and dev.type == "cuda" else None
    if options.checkpoint:
        _, notice = enable_checkpointing(network)
        if notice:
            notices.append(notice)
    low = min(c.low for c in train_cases)
    high = max(c.high for c in train_cases)
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = _schedule(optimizer, options.steps)
    checkpoint_file = state / "checkpoint.pt"
    settings = _settings(options)
    start, log, train_s = 0, [], 0.0
    if checkpoint_file.is_file():
        saved = torch.load(str(checkpoint_file), map_location=dev, weights_only=False)
        fixed = {k: v for k, v in settings.items() if k not in _SETTINGS_THAT_MAY_CHANGE}
        were = {"attack": "pgd", **{k: v for k, v in saved["settings"].items() if k not in _SETTINGS_THAT_MAY_CHANGE}}
        if were != fixed:
            changed = sorted(k for k in fixed if fixed[k] != were.get(k))
            raise OutputError(f"{out}: holds a hardening run with other settings ({', '.join(changed)}); continue it with "
                              "the same ones or choose another --out")
        before = saved.get("digest")
        moved = [_DIGESTED[k] for k in digest if not isinstance(before, dict) or before.get(k) != digest[k]]
        if moved:
            raise OutputError(f"{out}: holds a hardening run begun with another {' and another '.join(moved)}; continue it "
                              "with the same ones or choose another --out")
        if options.steps < saved["step"]:
            raise OutputError(f"{out}: its run has done {saved['step']} steps already, more than --steps {options.steps}")
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start, log, train_s = saved["step"], saved["log"], saved["train_s"]
        note("phase", {"text": f"continuing from step {start} of {options.steps} ({checkpoint_file})"})
    per_eps = [u for c in train_cases for u in c.units]
    recipe = {"loss": loss_name, "augmentation": aug_names, "crop": list(crop), "model_range": [low, high],
              "model_units_per_eps": [min(per_eps), max(per_eps)],
              "train_minutes": 0.0, "device": str(dev), "notices": notices,
              "training_volumes": [c.name for c in train_cases], "validation_volumes": [c.name for c in validation],
              "calibration": None}
    _rehearse(bundle, network, source_name, options, recipe)

    def save(step: int) -> None:
        state.mkdir(parents=True, exist_ok=True)
        payload = {"step": step, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "log": log,
                   "train_s": train_s, "settings": settings, "digest": digest}
        with atomic_path(checkpoint_file) as tmp:
            torch.save(payload, str(tmp))

    state.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state / "settings.json", json.dumps({"source": str(bundle), "settings": settings}, indent=2) + "\n")
    note("train", {"total": options.steps, "done": start})
    for i in range(start, options.steps):
        began = time.perf_counter()
        torch.manual_seed(options.seed * 1_000_003 + i)
        x, y, units = sampler(i)
        x, y = x.to(dev), y.to(dev)
        eps = options.eps_at(i)
        network.eval()
        generator = torch.Generator().manual_seed(options.seed * 7919 + i)
        reference = y.long() if target.activation == "softmax" else y
        if options.attack == "apgd":
            adv = apgd_batch(network, x, reference, attack_loss, eps, options.attack_steps, low, high, generator, autocast, units)
        else:
            adv = adversarial_batch(network, x, reference, attack_loss, eps, options.attack_step_size() * eps / options.eps,
                                    options.attack_steps, low, high, generator, autocast, units)
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = network(torch.cat([x, adv]))
        logits = (logits[0] if isinstance(logits, (tuple, list)) else logits).float()
        n = x.shape[0]
        clean_loss, adv_loss = loss_fn(logits[:n], y), loss_fn(logits[n:], y)
        loss = (1 - options.adv_weight) * clean_loss + options.adv_weight * adv_loss
        if not torch.isfinite(loss):
            raise InputError(f"step {i + 1}: the training loss is not finite ({float(loss)}); try a smaller --lr")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        train_s += time.perf_counter() - began
        log.append({"step": i + 1, "eps": eps, "clean_loss": float(clean_loss.detach()), "adversarial_loss": float(adv_loss.detach()),
                    "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - began, 3)})
        note("step", log[-1])
        if (i + 1) % options.save_every == 0 or i + 1 == options.steps:
            save(i + 1)
    if options.checkpoint:
        disable_checkpointing(network)
    network.eval()
    calibration = calibrate(network, train_cases, target, dev, notices) if options.calibrate else None
    staged = state / "bundle"
    _stage_bundle(bundle, staged, network)
    comparison = None
    if options.evaluate:
        comparison = compare(bundle, staged, source_name, validation, state / "evaluation", options, trust, device, note)
    recipe.update(train_minutes=round(train_s / 60, 2), calibration=calibration)
    _write_docs(bundle, staged, source_name, options, recipe, comparison, log)
    _publish(state, staged, out)
    return HardenResult(out, comparison, round(train_s / 60, 2), notices)


def _rehearse(bundle: Path, network: torch.nn.Module, source_name: str, options: HardenOptions, recipe: dict) -> None:
    """Make the new bundle's files once, in a temporary folder, before the first training step (the weights as they
    are, no study): a source that cannot become a bundle (a file that cannot be copied, a broken metadata.json) fails
    in seconds instead of after the training, and nothing is written to ``--out``."""
    with tempfile.TemporaryDirectory(prefix="medis3d-harden-rehearsal-") as tmp:
        staged = Path(tmp) / "bundle"
        _stage_bundle(bundle, staged, network)
        _write_docs(bundle, staged, source_name, options, recipe, None, [])


def _stage_bundle(source: Path, staged: Path, network: torch.nn.Module) -> None:
    """The source bundle's files (configs unchanged) with the new weights. The source's docs are kept under
    docs/source/, and so is the evaluation/ of a source that harden made (its studies are of the source's weights):
    a bundle hardened again keeps each generation's docs one folder deeper (docs/source/source/)."""
    if staged.exists():
        shutil.rmtree(staged)
    ignore = shutil.ignore_patterns("models", "eval", "__pycache__", ".harden")
    try:
        shutil.copytree(source, staged, ignore=ignore, symlinks=False)
    except shutil.Error as exc:  # every file that could not be copied, as (source, destination, why): name the first
        name, _, why = exc.args[0][0]
        raise BundleError(f"{name}: cannot be copied into the hardened bundle ({str(why).strip().splitlines()[0]})") from exc
    dropped = sorted((staged / "scripts").glob("train*.py")) if (staged / "scripts").is_dir() else []
    for script in dropped:  # it would train the source from scratch into this folder, overwriting the hardened weights
        script.unlink()
    docs, evaluation = staged / "docs", staged / "evaluation"
    if evaluation.is_dir():  # a source that harden made: its studies (of its own weights) become documentation
        docs.mkdir(exist_ok=True)
        evaluation.rename(docs / "evaluation")
        page = docs / "report.html"
        if page.is_file():  # its comparison page links those studies, which now lie beside it
            page.write_text(page.read_text().replace('href="../evaluation/', 'href="evaluation/'))
    if docs.is_dir():
        kept = staged / ".source_docs"
        docs.rename(kept)
        docs.mkdir()
        kept.rename(docs / "source")
    (staged / "models").mkdir()
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    torch.save(state, str(staged / "models" / "model.pt"))


# -- the decision threshold ---------------------------------------------------------------------------


def _logit_offset(activation: str, channels: int, shift: float, device=None) -> torch.Tensor:
    """What lowering the foreground logits by ``shift`` adds to each channel: the background's raised (softmax, where
    only differences count), or every channel's lowered against its threshold 0 (sigmoid)."""
    if activation == "softmax":
        offset = torch.zeros(channels, device=device)
        offset[0] = shift
        return offset
    return torch.full((channels,), -float(shift), device=device)


def _shift_dice(logits: torch.Tensor, label: torch.Tensor, activation: str, shift: float, cut: float = 0.0) -> float:
    """Mean foreground Dice of ``logits`` ``(C, *S)`` against ``label`` with the foreground logits lowered by ``shift``
    (softmax: against the background's; sigmoid: each channel's threshold raised from ``cut``, the logit of the
    bundle's own threshold, to ``cut + shift``)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    shifted = logits + _logit_offset(activation, logits.shape[0], shift, logits.device).view(shape)
    if activation == "softmax":
        prediction = shifted.argmax(0)
        pairs = [(prediction == k, label[0] == k) for k in range(1, logits.shape[0])]
    else:
        pairs = [(shifted[k] > cut, label[k] > 0) for k in range(logits.shape[0])]
    scores = [2 * float((p & r).sum()) / float(p.sum() + r.sum()) for p, r in pairs if bool(r.any() or p.any())]
    return sum(scores) / len(scores) if scores else 1.0


def _last_output_layer(network: torch.nn.Module, sample: torch.Tensor, channels: int) -> tuple[str, torch.nn.Module] | None:
    """The layer that ran last on ``sample`` among the convolutions and linear layers with ``channels`` outputs and
    a bias: the one whose bias sets the logits' offsets, where nothing after it changes them."""
    candidates: dict[torch.nn.Module, str] = {m: name for name, m in network.named_modules()
                  if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and m.bias is not None
                  and getattr(m, "out_channels", getattr(m, "out_features", None)) == channels}
    order: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in candidates]
    try:
        with torch.no_grad():
            network(sample)
    finally:
        for h in hooks:
            h.remove()
    return (candidates[order[-1]], order[-1]) if order else None


def calibrate(network: torch.nn.Module, cases: Sequence[ModelSpaceCase], target: Target, device: torch.device,
              notices: list[str]) -> dict | None:
    """Choose the decision threshold on the training volumes and write it into the output layer's bias.

    Adversarial fine-tuning at large radii moves the boundary: the hardened SegResNet grew the held-out brains by
    14-22% and lost up to 0.1 clean Dice there. The fix is a shift of the foreground logits against the background
    (for sigmoid channels, of each logit against 0), chosen from ``CALIBRATION_SHIFTS`` for the highest mean Dice on
    the whole training volumes (float32, the inferer's windows), the smallest shift among equals; it is added to the
    bias of the layer that makes the logits, and checked by running the network: where no such layer exists, or
    the logits do not move by the shift, the weights stay as trained and a notice says so. Returns what was done."""
    from medis3d.engine import Precision, WindowEngine

    if not cases:
        return None
    engine = WindowEngine(network, target.window, Precision())
    dice = torch.zeros(len(CALIBRATION_SHIFTS), dtype=torch.float64)
    for case in cases:
        logits = engine.forward(case.image[None].to(device))[0]
        label = case.label.to(device)
        cut = target.threshold_logit()  # a sigmoid bundle's own threshold (its AsDiscreted's), not 0.5 whatever it says
        dice += torch.tensor([_shift_dice(logits, label, target.activation, s, cut) for s in CALIBRATION_SHIFTS],
                             dtype=torch.float64)
    dice /= len(cases)
    zero = CALIBRATION_SHIFTS.index(0.0)
    best = max(range(len(CALIBRATION_SHIFTS)), key=lambda i: (round(float(dice[i]), 6), -abs(CALIBRATION_SHIFTS[i])))
    shift = CALIBRATION_SHIFTS[best]
    done = {"shift": shift, "training_dice_before": round(float(dice[zero]), 4), "training_dice_after": round(float(dice[best]), 4),
            "layer": None}
    if shift == 0.0:
        return done
    if shift in (CALIBRATION_SHIFTS[0], CALIBRATION_SHIFTS[-1]):
        notices.append(f"calibration: the training volumes favour a shift at the edge of those tried ({shift:g}, of "
                       f"{CALIBRATION_SHIFTS[0]:g} to {CALIBRATION_SHIFTS[-1]:g}), so one beyond it might serve them better: "
                       "the training moved the model's boundary far (too few steps, or a radius too large?); check its "
                       "clean Dice in the comparison")
    roi = [int(r) if int(r) > 0 else 32 for r in target.window.roi_size]
    window = cases[0].image[(slice(None),) + tuple(slice(0, r) for r in roi)]
    pad = [v for r, w in zip(reversed(roi), reversed(window.shape[1:])) for v in (0, r - w)]
    sample = torch.nn.functional.pad(window, pad)[None].to(device)  # one window of the inferer's size
    found = _last_output_layer(network, sample, target.out_channels)
    if found is None:
        notices.append(f"calibration: no layer with {target.out_channels} outputs and a bias makes the logits; the threshold "
                       f"the training volumes favour (shift {shift:g}) is not applied")
        return {**done, "shift": 0.0, "training_dice_after": done["training_dice_before"], "not_applied": shift}
    name, layer = found
    bias = layer.bias
    assert isinstance(bias, torch.Tensor)  # _last_output_layer takes layers with a bias only
    trained = bias.detach().clone()
    offset = _logit_offset(target.activation, target.out_channels, shift, bias.device)
    with torch.no_grad():
        before = WindowEngine._first(network(sample))
        bias += offset
        after = WindowEngine._first(network(sample))
    expected = before + offset.view((1, -1) + (1,) * (before.dim() - 2))
    if not torch.allclose(after, expected, atol=1e-4 * max(1.0, float(before.abs().max()))):
        with torch.no_grad():  # something after the layer changes the offsets: leave the weights as trained
            bias.copy_(trained)
        notices.append(f"calibration: the logits do not move with {name}'s bias; the threshold the training volumes "
                       f"favour (shift {shift:g}) is not applied")
        return {**done, "shift": 0.0, "training_dice_after": done["training_dice_before"], "not_applied": shift}
    return {**done, "layer": name}


# -- the comparison ---------------------------------------------------------------------------------


def compare(source: Path, hardened: Path, source_name: str, cases: Sequence[Case], folder: Path, options: HardenOptions,
            trust: bool, device: str, note) -> dict:
    """Run ``evaluate`` on ``cases`` for the source and the hardened bundle at the same budgets with the same
    members, and tabulate clean Dice, Dice under the per-volume worst case, the attack success rate and eps50. The
    source's study also scores each of its adversarials on the hardened model (transfer, a victim named by the hardened
    weights' fingerprint, so a study continued after they changed scores them again); the hardened model's figure is
    per volume the lower of its own worst case and the source's adversarials' (:func:`comparison_table`)."""
    from medis3d.bundle import load_bundle
    from medis3d.members import PRESETS, parse_members
    from medis3d.study import Victim, evaluate_dataset

    preset = PRESETS[options.eval_preset]
    members = parse_members(list(options.eval_members)) if options.eval_members else preset.parsed()
    steps = options.eval_steps or preset.steps
    targets = {"source": load_bundle(source, trust=trust, device=device), "hardened": load_bundle(hardened, trust=trust, device=device)}
    victim = Victim(f"{source_name}_robust_{targets['hardened'].fingerprint()[:8]}", targets["hardened"])
    # the members' random draws (PGD's start, random_start=1, restarts) follow --seed, as evaluate's do; the studies say so
    settings = {"by": "medis3d harden", "members": [m.name for m in members], "eps": list(options.eval_eps),
                "step": preset.step, "steps": steps, "seed": options.seed}
    studies = {}
    for role, target in targets.items():
        note("phase", {"text": f"evaluating the {role} model on {len(cases)} volume(s) at {len(options.eval_eps)} budget(s)"})
        studies[role] = evaluate_dataset(target, cases, folder / role, members=[m.name for m in members],
                                         eps_list=list(options.eval_eps), step=preset.step, steps=steps, seed=options.seed,
                                         source=source_name if role == "source" else f"{source_name}_robust",
                                         victims=[victim] if role == "source" else (), settings=settings,
                                         progress=lambda name: note("eval", {"volume": name}))
    return {**comparison_table(studies, [m.name for m in members], steps,
                               transfer_dice(folder / "source" / "results.csv", victim.name)), "seed": options.seed}


def transfer_dice(results: Path, victim: str) -> dict[tuple[str, str], float]:
    """Per volume and budget (``study.eps_key``), the lowest Dice any member's adversarial of a study's ``results.csv``
    at that budget or a smaller one leaves on the victim ``victim`` (its ``transfer`` column): the study's own rule for
    its worst case (``study._within``: a smaller ball lies inside the larger one)."""
    from medis3d.study import _within

    scored: dict[str, list[dict]] = {}
    with open(results, newline="") as f:
        for row in csv.DictReader(f):
            if row["attack"].startswith(("medis", "worst")):  # the fusions repeat a member's row
                continue
            score = json.loads(row.get("transfer") or "{}").get(victim)
            if score is None or score.get("adversarial_dice") is None:
                continue
            scored.setdefault(row["volume"], []).append({"eps": float(row["eps"]), "dice": float(score["adversarial_dice"])})
    return {(volume, key): min(r["dice"] for r in _within(rows, key))
            for volume, rows in scored.items() for key in {eps_key(r["eps"]) for r in rows}}


def _halving(curve: Sequence[tuple[float, float]], clean: float) -> tuple[float, float, float] | None:
    """Where the Dice curve first falls to half the clean Dice: the budget before (0 for the clean scan), the first
    budget at or below half, and the share of the way between them (linear in Dice); None where it stays above."""
    half = clean / 2
    e0, d0 = 0.0, clean
    for eps, dice in sorted(curve):
        if dice <= half:
            return e0, eps, (d0 - half) / (d0 - dice) if d0 > dice else 1.0
        e0, d0 = eps, dice
    return None


def eps50(curve: Sequence[tuple[float, float]], clean: float) -> float | None:
    """The smallest budget at which the Dice curve ``[(eps, dice), ...]`` (eps > 0) falls to half the clean Dice,
    interpolated between the budgets measured (linearly from eps 0, where Dice is the clean Dice, to the first
    budget; linearly in log eps between two budgets); None where it stays above."""
    found = _halving(curve, clean)
    if found is None:
        return None
    e0, e1, w = found
    if e0 <= 0:
        return float(w * e1)
    return float(math.exp(math.log(e0) + w * (math.log(e1) - math.log(e0))))


def eps50_between(curve: Sequence[tuple[float, float]], clean: float) -> tuple[float, float] | None:
    """The two budgets measured that :func:`eps50` lies between (the first 0 when the first budget already halves
    the Dice): how far the interpolated figure can be trusted; None where the curve stays above half."""
    found = _halving(curve, clean)
    return None if found is None else (found[0], found[1])


def comparison_table(studies: dict, members: list[str], steps: int, transfer: dict[tuple[str, str], float] | None = None) -> dict:
    """Per model and budget: mean clean Dice, mean Dice under the worst case over the members, success rate (the
    white-box attacks'). With ``transfer`` (:func:`transfer_dice`: the source's adversarials on the hardened model,
    per volume and budget), the hardened model's worst case is per volume the lower of its own white-box worst case
    and the transfer's: a model that gradient masking shields from its own gradients is still broken by another
    model's adversarials, and its white-box figure alone would overstate it (on a tiny model at 48/255 the source's
    adversarials left 0.2134 where its own attacks left 0.2462). ``white_box_dice`` and ``transfer_dice`` keep both
    figures, and ``transfer_lower`` names the volumes where the transfer was lower by more than ``TRANSFER_MARGIN``,
    a warning sign."""
    rows, models = [], {}
    for role, summary in studies.items():
        worst = summary["fusion"].get("worst_case", {})
        volumes = summary.get("volumes", [])
        curve, lower = [], {}
        clean = None
        for key, entry in sorted(worst.items(), key=lambda kv: float(kv[0])):
            clean = entry["mean_clean_dice"]
            white, moved, dice = entry["mean_robust_dice"], None, entry["mean_robust_dice"]
            if role == "hardened" and transfer is not None:
                pairs = [(v["volume"], v["worst_case"][key], transfer.get((v["volume"], key))) for v in volumes if key in v["worst_case"]]
                found = [t for _, _, t in pairs if t is not None]
                moved = sum(found) / len(found) if found else None
                dice = sum(w if t is None else min(w, t) for _, w, t in pairs) / len(pairs) if pairs else white
                lower[key] = [{"volume": name, "transfer_dice": t, "white_box_dice": w} for name, w, t in pairs
                              if t is not None and t < w - TRANSFER_MARGIN]
            curve.append((float(key), dice))
            rows.append({"model": role, "eps": float(key), "eps_255": round(float(key) * 255, 3), "clean_dice": clean,
                         "worst_case_dice": dice, "white_box_dice": white, "transfer_dice": moved,
                         "attack_success_rate": entry["attack_success_rate"], "volumes": entry["volumes"]})
        models[role] = {"clean_dice": clean, "curve": curve, "eps50": eps50(curve, clean) if clean is not None else None,
                        "eps50_between": eps50_between(curve, clean) if clean is not None else None}
        if role == "hardened" and transfer is not None:
            models[role]["transfer_lower"] = lower
    return {"rows": rows, "models": models, "members": members, "steps": steps}


def comparison_plot(comparison: dict) -> bytes:
    """Dice under the worst case against eps, one curve per model (the clean Dice at eps 0). PNG bytes."""
    from medis3d.report import figure_png, new_figure

    fig = new_figure((6, 4))
    ax = fig.subplots()
    for role, style in (("source", "o-"), ("hardened", "s-")):
        model = comparison["models"].get(role)
        if not model or model["clean_dice"] is None:
            continue
        xs = [0.0] + [e * 255 for e, _ in model["curve"]]
        ys = [model["clean_dice"]] + [d for _, d in model["curve"]]
        ax.plot(xs, ys, style, label=role)
    ax.set_xlabel("eps (x 1/255 of the model's intensity range)")
    ax.set_ylabel("mean Dice, worst case over the members")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Robustness before and after hardening")
    return figure_png(fig)


def _table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _bump(version: str) -> str:
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return "0.1.0"
    return f"{major}.{minor + 1}.0"


def _per255(eps: float) -> str:
    """A budget in 1/255 steps as a short number: 4, 8, 12.5."""
    return f"{round(eps * 255, 2):g}"


HARDENED_SUFFIX = " (adversarially hardened)"  # what a hardened bundle's metadata name ends with


def _write_docs(source: Path, staged: Path, source_name: str, options: HardenOptions, recipe: dict, comparison: dict | None,
                log: list[dict]) -> None:
    docs = staged / "docs"
    docs.mkdir(exist_ok=True)
    write_text_atomic(docs / "hardening_log.json", json.dumps({"recipe": recipe, "settings": _settings(options), "steps": log},
                                                            indent=1) + "\n")
    if comparison is not None:
        write_text_atomic(docs / "robustness.json", json.dumps(comparison, indent=2) + "\n")
        write_text_atomic(docs / "robustness.csv", _table_csv(comparison["rows"]))
        plot = comparison_plot(comparison)
        with atomic_path(docs / "robustness.png") as tmp:
            tmp.write_bytes(plot)
        write_text_atomic(docs / "report.html", harden_page(comparison, plot, recipe, _settings(options), source_name))
    meta_path = staged / "configs" / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise BundleError(f"{source / 'configs' / 'metadata.json'}: not valid JSON ({first_line(exc)}); harden "
                              "writes the hardened bundle's version and changelog into it") from exc
        if not isinstance(meta, dict):
            raise BundleError(f"{source / 'configs' / 'metadata.json'}: not a JSON object; harden writes the hardened "
                              "bundle's version and changelog into it")
        previous = str(meta.get("version", "0.0.0"))
        version = _bump(previous)
        meta["version"] = version
        meta["changelog"] = {version: _changelog_entry(source_name, previous, options, recipe.get("calibration")),
                             **(meta.get("changelog") or {})}
        if meta.get("name") and not str(meta["name"]).endswith(HARDENED_SUFFIX):  # once, also when hardened again
            meta["name"] = f"{meta['name']}{HARDENED_SUFFIX}"
        hardening = {"source_bundle": source_name, "source_version": previous, "settings": _settings(options), "recipe": recipe,
                     "source_eval_metrics": meta.get("eval_metrics") or {}}
        metrics = {}  # the source's figures are of the source's weights: they move to medis3d_hardening
        if comparison is not None:
            hardening["robustness"] = comparison["models"]
            for role, model in comparison["models"].items():
                metrics[f"{role}_validation_clean_dice"] = model["clean_dice"]
                for eps, dice in model["curve"]:
                    metrics[f"{role}_validation_worst_case_dice_eps_{_per255(eps)}_255"] = dice
        meta["eval_metrics"] = metrics
        meta["medis3d_hardening"] = hardening
        write_text_atomic(meta_path, json.dumps(meta, indent=4) + "\n")
    write_text_atomic(docs / "README.md", readme(source_name, options, recipe, comparison))


def _changelog_entry(source_name: str, previous: str, options: HardenOptions, calibration: dict | None) -> str:
    entry = (f"adversarially fine-tuned from {source_name} {previous} by medis3d harden "
             f"({options.attack.upper()}-{options.attack_steps}, eps {_per255(options.eps)}/255, {options.steps} steps")
    if calibration and calibration.get("shift"):
        entry += f"; foreground logits {_moved(calibration['shift'])}, the threshold the training volumes favour"
    return entry + ")"


def _moved(shift: float) -> str:
    """A shift of the foreground logits in words: a positive shift lowers them, a negative one raises them."""
    return f"{'lowered' if shift > 0 else 'raised'} by {abs(shift):g}"


def _calibration_words(calibration: dict | None) -> str:
    if calibration is None:
        return "* Decision threshold: as trained (`--no-calibrate`)."
    if calibration.get("not_applied"):
        return (f"* Decision threshold: as trained; the training volumes favour the foreground logits "
                f"{_moved(calibration['not_applied'])}, which the network's output layer cannot carry (see the notices).")
    if not calibration["shift"]:
        return (f"* Decision threshold: as trained (no shift of the foreground logits raised the training volumes' mean Dice, "
                f"{calibration['training_dice_before']:.4f}).")
    return (f"* Decision threshold: the foreground logits {_moved(calibration['shift'])} against the background's "
            f"(written into `{calibration['layer']}`'s bias), chosen on the training volumes, whose mean Dice it raised from "
            f"{calibration['training_dice_before']:.4f} to {calibration['training_dice_after']:.4f}.")


def _attack_words(options: HardenOptions) -> str:
    if options.attack == "apgd":
        return (f"APGD, {options.attack_steps} step(s) (its own step size from 2 eps, halved where a crop's loss stalls; "
                "each crop's strongest iterate)")
    return f"PGD, {options.attack_steps} step(s) of {options.attack_step_size() * 255:.3g}/255"


def _eps_words(eps: float, recipe: dict) -> str:
    """What the training radius is: a budget in the unit of ``attack`` and the evaluation, and in model-space units."""
    low, high = recipe["model_units_per_eps"]
    same = math.isclose(low, high, rel_tol=1e-3)
    each = f"{low:.3g} model-space units" if same else f"{low:.3g} to {high:.3g} model-space units, by volume"
    radius = f"{eps * low:.3g}" if same else f"{eps * low:.3g} to {eps * high:.3g}"
    return (f"of the model's normalised intensity range, the unit of `medis3d attack` and `evaluate` budgets "
            f"(one unit of it is {each}: a radius of {radius} in model space)")


def _transfer_warnings(comparison: dict) -> list[str]:
    """A line for each budget at which the source's adversarials left the hardened model lower than its own attacks."""
    hardened = comparison["models"].get("hardened") or {}
    rows = {eps_key(r["eps"]): r for r in comparison["rows"] if r["model"] == "hardened"}
    lines = []
    for key, lows in sorted((hardened.get("transfer_lower") or {}).items(), key=lambda kv: float(kv[0])):
        if lows and key in rows:
            which = ", ".join(f"{v['volume']} {v['transfer_dice']:.4f} against {v['white_box_dice']:.4f}" for v in lows)
            lines.append(f"* Warning: at {_per255(float(key))}/255 the source's adversarials (transfer) left the hardened model "
                         f"lower than its own white-box attacks on {len(lows)} of {rows[key]['volumes']} volume(s) ({which}): "
                         "a sign of gradient masking, which `medis3d diagnose` checks for; the table takes the lower.")
    return [""] + lines if lines else []


def _seed_words(comparison: dict) -> str:
    """The seed of the members' random draws (their starts), which the evaluation takes from ``--seed``."""
    return f"; seed {comparison['seed']}" if comparison.get("seed") is not None else ""


def readme(source_name: str, options: HardenOptions, recipe: dict, comparison: dict | None) -> str:
    """The hardened bundle's docs/README.md: what it is, the recipe, the before/after table."""
    lines = [f"# {source_name}, adversarially hardened by medis3d", "",
             f"The network of `{source_name}`, fine-tuned by `medis3d harden` on adversarial examples. Configs are the "
             "source's (inference unchanged); `models/model.pt` holds the new weights. The source's own documentation is "
             "kept in `docs/source/`.", "",
             "## Recipe", "",
             f"* Training volumes: {', '.join(recipe['training_volumes'])}; validation volumes: "
             f"{', '.join(recipe['validation_volumes']) or '-'}.",
             f"* {options.steps} AdamW steps (lr {options.lr:g}, weight decay {options.weight_decay:g}, warm-up then cosine), "
             f"{options.batch} crop(s) of {'x'.join(map(str, recipe['crop']))} model-space voxels per step, seed {options.seed}.",
             f"* Adversarial crops: {_attack_words(options)} from a uniform random start, L-inf eps {_per255(options.eps)}/255 "
             f"{_eps_words(options.eps, recipe)}, growing linearly over the first {options.warmup:.0%} of the steps; "
             f"the attack ascends `{options.attack_loss}`; each voxel kept inside the training volumes' model-space range "
             f"({recipe['model_range'][0]:.3g} to {recipe['model_range'][1]:.3g}), or no farther outside it than an augmented or "
             "padded crop's voxel lies.",
             f"* Loss: (1 - {options.adv_weight:g}) x clean + {options.adv_weight:g} x adversarial, each {recipe['loss']}.",
             f"* Augmentation: {', '.join(recipe['augmentation']) or 'random crops only'}.",
             _calibration_words(recipe.get("calibration")),
             f"* Training time: {recipe['train_minutes']:.1f} min on {recipe['device']}.", ""]
    if recipe["notices"]:
        lines += ["Notices:", ""] + [f"* {n}" for n in recipe["notices"]] + [""]
    if comparison is not None:
        lines += ["## Robustness before and after (validation volumes)", "",
                  f"`medis3d evaluate` with the same members ({', '.join(comparison['members'])}; {comparison['steps']} "
                  f"iterations each{_seed_words(comparison)}) on both models; Dice against the labels, the per-volume worst case over the members, each run to its last iteration (its lowest Dice in the budget). "
                  "The hardened model's is also over the source's adversarials scored on it (transfer): per volume the lower of the two.", "",
                  "| model | clean Dice | " + " | ".join(f"Dice at {_per255(e)}/255" for e in options.eval_eps) + " | eps50 |",
                  "|---|---|" + "---|" * len(options.eval_eps) + "---|"]
        for role in ("source", "hardened"):
            model = comparison["models"].get(role)
            if not model:
                continue
            by_eps = {eps_key(e): d for e, d in model["curve"]}
            lines.append(f"| {role} | {number(model['clean_dice'])} | "
                         + " | ".join(number(by_eps.get(eps_key(e))) for e in options.eval_eps)
                         + f" | {eps50_label(model, options.eval_eps)} |")
        lines += _transfer_warnings(comparison)
        lines += ["", "eps50: the smallest budget at which the mean Dice falls to half the clean Dice (interpolated between "
                      "the two budgets measured that it names: linearly from eps 0 to the first, in log eps between two; "
                      "the farther apart they lie, the rougher the figure). `robustness.csv`, `robustness.json` and `robustness.png` beside "
                      "this file hold the figures.", ""]
    lines += ["## Limits", "",
              "* Robust to the attacks and budgets above on the validation volumes, not certified: a stronger or different "
              "attack, or a larger budget, may still break it.",
              "* Adversarial training trades some clean accuracy for robustness; compare the clean Dice above before use.", ""]
    return "\n".join(lines)


def _publish(state: Path, staged: Path, out: Path) -> None:
    """Move the staged bundle (and the evaluation studies) into ``out``, then drop the training state."""
    for item in sorted(staged.iterdir()):
        destination = out / item.name
        if destination.exists():
            raise OutputError(f"{destination}: exists; harden never writes over files")
        shutil.move(str(item), str(destination))
    evaluation = state / "evaluation"
    if evaluation.is_dir():
        shutil.move(str(evaluation), str(out / "evaluation"))
    shutil.rmtree(state)


__all__ = ["HardenOptions", "HardenResult", "harden", "read_training_dataset", "model_space_case", "label_to_model_space",
           "adversarial_batch", "apgd_batch", "crop_bounds", "eps_units", "intensity_gain", "eps50", "comparison_table",
           "transfer_dice"]
