"""Target: the model as it is run, from a scan in its own space to logits on the scan's grid.

A Target chains the bundle's differentiable preprocessing (original space -> model space), the
sliding-window engine and the network, and maps the stitched logits back to the scan's grid
through the inverse of the preprocessing. Losses and success are evaluated there, on the
scan's own grid, so what is optimised is what is written and measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medis3d import postprocessing
from medis3d.engine import CPU_WINDOW_BATCH_NOTICE, Precision, WindowEngine, WindowFailure, WindowSettings, _plain
from medis3d.errors import InputError, first_line
from medis3d.io.volume import Volume
from medis3d.postprocessing import LabelStep
from medis3d.preprocessing import DifferentiablePreprocessing
from medis3d.reductions import channel_argmax

# The losses see the probabilities mapped back to the scan's grid as logs (logits for sigmoid). MONAI's inverse
# resamples in float32, where a probability within 6e-8 of 1 is 1: a clamp at 1 - 1e-6 made every logit margin
# beyond 13.8 flat, so the most confident voxels gave no gradient (a margin attack on the shipped SegResNet at
# 8/255 left 0.811 Dice through that clamp against 0.800 through the raw logits). So no upper clamp: a softmax
# probability that is 1 has log 0 and still its exact gradient (the softmax and the logs are taken in float64), and a
# sigmoid channel goes back with its complement, its logit taken as log p - log (1 - p) from the two maps, each
# precise where it is small. Probabilities are floored at _TINY only (a margin of 69) so that no log is -inf.
_TINY = 1e-30
AMP_NOTICES = ("mixed precision:", "--amp on a CPU without bfloat16")  # how the notices on the precision begin


@dataclass
class Evaluation:
    """One forward (and optionally backward) pass through the Target."""

    scan_logits: torch.Tensor  # (1, K, I, J, K) on the scan's grid, float32, detached
    segmentation: np.ndarray  # the label map on the scan's grid, as the bundle's postprocessing gives it
    loss: float | None = None
    grad: torch.Tensor | None = None  # (C, I, J, K) gradient in native units

    def gradient(self) -> torch.Tensor:
        """The gradient, which an evaluation with an objective always has."""
        if self.grad is None:
            raise RuntimeError("this evaluation had no objective, so it has no gradient")
        return self.grad


@dataclass(frozen=True)
class IntensityScales:
    """Native units per unit of the model's normalised intensity range: ``scale`` over the whole scan (``note``: how
    it was found), and ``per_channel`` (with ``notes``, ``names``) where the model sees each channel in its own
    units (:meth:`Target.channels_apart`); None where one native unit is shared by every channel."""

    scale: float
    note: str
    per_channel: tuple[float, ...] | None = None
    notes: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None

    def array(self) -> np.ndarray | None:
        """``per_channel`` as a ``(C, 1, 1, 1)`` array that broadcasts over a scan (None where one unit is shared)."""
        return None if self.per_channel is None else np.asarray(self.per_channel, dtype=np.float64).reshape(-1, 1, 1, 1)


def channel_names(volume: Volume) -> list[str]:
    """How outputs name ``volume``'s channels: each channel file's name, else ``channel 0``, ``channel 1`` ..."""
    if volume.channel_volumes:
        return [v.name for v in volume.channel_volumes]
    return [f"channel {c}" for c in range(volume.channels)]


@dataclass(frozen=True, eq=False)
class Target:
    """A segmentation model as medis3d attacks it, with the settings of one run. Immutable: the model (network,
    preprocessing, activation, classes) is shared, and every change of settings (:meth:`configure`,
    :meth:`select_classes`) gives a new Target, so a batch's later volume never sees what an earlier one chose
    (a memory plan's window batch, checkpointing, precision, notices), and the network itself is never changed:
    checkpointing runs a view of it that shares its weights (:func:`medis3d.checkpointing.checkpointed_view`)."""

    network: torch.nn.Module
    preprocessing: DifferentiablePreprocessing
    window: WindowSettings = field(default_factory=WindowSettings)
    activation: str = "softmax"  # "softmax" (argmax) or "sigmoid" (threshold 0.5)
    invert: str = "probabilities"  # bundle postprocessing order: "probabilities" (Invertd, then argmax) or "labels"
    invert_nearest: bool = False  # the bundle's Invertd maps the probabilities back with nearest interpolation
    threshold: float = 0.5  # sigmoid: the probability at which the bundle's AsDiscreted makes a voxel foreground
    invert_logits: bool = False  # the bundle's Invertd maps the network's logits back (no activation before it)
    label_steps: tuple[LabelStep, ...] = ()  # the bundle's label-map postprocessing (KeepLargestConnectedComponentd ...)
    out_channels: int = 2
    in_channels: int = 1
    class_names: dict[int, str] = field(default_factory=dict)
    name: str = "network"
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = field(default_factory=Precision)
    notices: tuple[str, ...] = ()
    checkpointing: bool = False
    attacked_classes: tuple[int, ...] | None = None
    _engine: WindowEngine | None = field(default=None, init=False, repr=False)  # made on first use
    _exact: Target | None = field(default=None, init=False, repr=False)  # the float32 view, made on first use

    def __post_init__(self) -> None:
        network = self.network.to(self.device).eval()
        for p in network.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "network", network)
        object.__setattr__(self, "window", dataclasses.replace(self.window))  # this target's own copy
        object.__setattr__(self, "notices", tuple(self.notices))
        if self.attacked_classes is not None:
            object.__setattr__(self, "attacked_classes", tuple(self.attacked_classes))

    # -- pieces -----------------------------------------------------------------------------
    @property
    def engine(self) -> WindowEngine:
        if self._engine is None:
            object.__setattr__(self, "_engine", WindowEngine(self.network, self.window, self.precision))
        assert self._engine is not None
        return self._engine

    @property
    def exact(self) -> Target:
        """This target with the network in float32: itself without ``--amp``, else a view sharing the network (and
        the window settings). Predictions that are reported, the clean one and a member's kept iterate's, are made
        here, so mixed precision speeds up the search and never changes what a figure says about the model."""
        if not self.precision.enabled:
            return self
        if self._exact is None:
            object.__setattr__(self, "_exact", dataclasses.replace(self, precision=Precision()))
        assert self._exact is not None
        return self._exact

    def configure(
        self,
        *,
        roi_size: Sequence[int] | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        mode: str | None = None,
        checkpoint: bool | None = None,
        amp: bool | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> Target:
        """A target with the bundle's inferer settings overridden and checkpointing and mixed precision switched;
        this one is left as it is. ``checkpoint=False`` leaves checkpointing as it is (a plan only ever adds it)."""
        window = dataclasses.replace(self.window)
        if roi_size is not None:
            window.roi_size = tuple(int(v) for v in roi_size)
        if overlap is not None:
            if not 0 <= overlap < 1:
                raise InputError(f"--overlap must be in [0, 1), got {overlap}")
            window.overlap = float(overlap)
        if sw_batch_size is not None:
            if sw_batch_size < 1:
                raise InputError(f"--sw-batch-size must be at least 1, got {sw_batch_size}")
            window.sw_batch_size = int(sw_batch_size)
        if mode is not None:
            if mode not in ("constant", "gaussian"):
                raise InputError(f"--window-mode must be constant or gaussian, got {mode!r}")
            window.mode = mode
        changes: dict[str, Any] = {"window": window}
        notices = list(self.notices)
        if sw_batch_size is not None:  # the window batch is chosen now: the loader's CPU default no longer holds
            notices = [n for n in notices if n != CPU_WINDOW_BATCH_NOTICE]
        if checkpoint and not self.checkpointing:
            from medis3d.checkpointing import checkpointed_view

            view, count, notice = checkpointed_view(self.network)
            changes.update(network=view, checkpointing=count > 0)
            if notice:
                notices.append(notice)
        if amp is not None:
            precision = Precision(enabled=bool(amp), dtype=amp_dtype)
            changes["precision"] = precision
            from medis3d.memory import amp_is_fast

            notices = [n for n in notices if not n.startswith(AMP_NOTICES)]  # the precision is chosen anew
            if amp:
                notices.append(f"mixed precision: the search runs the network in {str(precision.resolve(self.device))[6:]}; "
                               "the clean prediction and every member's kept iterate are scored in float32, but the search can be weaker "
                               "(measured: a masked spherical member 0.781 in bfloat16 against 0.748 in float32 on the 2 mm T1)")
            if amp and not amp_is_fast(self.device):
                notices.append("--amp on a CPU without bfloat16 instructions: the network runs many times slower than in "
                               "float32 (measured 46x for SegResNet's gradient pass); AMP saves memory here, not time")
        return dataclasses.replace(self, **changes, notices=tuple(dict.fromkeys(notices)))  # each notice once

    @property
    def foreground_classes(self) -> list[int]:
        """The output channels that count as the attacked structures (``--classes``; default all foreground)."""
        return list(self.attacked_classes) if self.attacked_classes else self._all_foreground()

    def _all_foreground(self) -> list[int]:
        return list(range(1, self.out_channels)) if self.activation == "softmax" else list(range(self.out_channels))

    def select_classes(self, spec: str | Sequence | None) -> Target:
        """A target whose attacked structures are some output channels, by index or by name (``None``: all)."""
        if spec is None or spec == "":
            return dataclasses.replace(self, attacked_classes=None)
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        by_name = {v.lower(): k for k, v in self.class_names.items()}
        chosen = []
        valid = self._all_foreground()
        for item in items:
            index = int(item) if str(item).isdigit() else by_name.get(str(item).lower())
            if index is None or index not in valid:
                names = ", ".join(f"{c} ({self.class_name(c)})" for c in valid)
                hint = ""
                if "/" in str(item) or "\\" in str(item) or Path(str(item)).exists():  # a label file or folder meant
                    hint = ("; --labels is the older name of --classes (the structures to attack), not label files: "
                            "attack takes one scan's labels with --label FILE, evaluate a dataset's with --labels FOLDER")
                raise InputError(f"--classes: {item!r} is not an output channel of this model; choose from {names}{hint}")
            chosen.append(index)
        return dataclasses.replace(self, attacked_classes=tuple(sorted(set(chosen))))

    @property
    def label_dtype(self) -> type:
        """The integer type of this model's label maps."""
        return np.uint16 if self.out_channels > 255 else np.uint8

    def class_name(self, index: int) -> str:
        return self.class_names.get(index, f"class_{index}")

    # -- geometry ---------------------------------------------------------------------------
    def _meta_tensor(self, x_native: torch.Tensor, volume: Volume) -> MetaTensor:
        affine = torch.as_tensor(volume.affine, dtype=torch.float64)
        meta = {"affine": affine, "original_affine": affine.clone(), "spatial_shape": np.array(volume.spatial_shape)}
        return MetaTensor(x_native, meta=meta)

    def model_input(self, x_native: torch.Tensor, volume: Volume, gradient: str = "standard") -> MetaTensor:
        """The preprocessed, model-space input ``(C, *S)``; differentiable in ``x_native`` by the ``gradient``
        path (``standard``, ``smooth`` or ``exact``: :mod:`medis3d.preprocessing`)."""
        if x_native.shape[0] != self.in_channels:
            raise InputError(
                f"{volume.path}: the model takes {self.in_channels} channel(s), the scan has {x_native.shape[0]}"
            )
        return self.preprocessing(self._meta_tensor(x_native, volume), gradient=gradient)

    def to_scan_grid(self, stitched: torch.Tensor, model_input: MetaTensor, raw: bool = False) -> torch.Tensor:
        """Map stitched logits ``(1, K, *S_model)`` to logits on the scan's grid ``(1, K, I, J, K)``.

        As a bundle's ``Invertd`` does, the probabilities (softmax or sigmoid) are mapped back
        through the inverse preprocessing; they are returned as logits whose activation gives
        exactly those probabilities (log for softmax, logit for sigmoid), so the losses and the
        argmax see what the bundle's own inference sees. Differentiable, with no clamp near 1 (``_TINY``).

        ``raw``: the network's own logits mapped back through the same inverse instead, for the losses that are
        not invariant to a shift of a voxel's logits (``losses.RAW_LOGITS``: SEA's masked spherical loss).

        Sigmoid logits are taken relative to the bundle's threshold (less its logit, :meth:`threshold_logit`), so that a
        positive logit is a foreground voxel everywhere medis3d decides one, as the bundle's ``AsDiscreted`` does.
        """
        meta = dict(model_input.meta)
        ops = [dict(op) for op in model_input.applied_operations]
        if self.invert_nearest:  # as the bundle's Invertd(nearest_interp=True) does
            from monai.transforms.utils import convert_applied_interp_mode

            ops = convert_applied_interp_mode(ops, mode="nearest")
        if raw or self.invert_logits:  # the logits themselves, as the bundle's Invertd takes them where nothing activates them first
            inverted: torch.Tensor = self.preprocessing.invert(MetaTensor(stitched[0].float(), meta=meta, applied_operations=ops))
            return ((inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted).float() - self.threshold_logit())[None]
        logits = stitched[0].double()
        if self.activation == "softmax":
            activated = torch.softmax(logits, 0)
        else:  # each channel with its complement (see _TINY), and ones: how much of a scan voxel the model's grid covers
            activated = torch.cat([torch.sigmoid(logits), torch.sigmoid(-logits), torch.ones_like(logits[:1])])
        probs: torch.Tensor = self.preprocessing.invert(MetaTensor(activated, meta=meta, applied_operations=ops))
        probs = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
        if self.activation == "softmax":
            return torch.log(probs.double().clamp_min(_TINY)).float()[None]
        channels = logits.shape[0]
        # where the inverse pads (a crop undone) the bundle's probability is padded with 0 and its complement is 1 - p, not
        # the padded complement: the part the ones lost is added back (nothing inside the model's grid, to the float's last bit)
        covered = probs[2 * channels:].double()
        complement = probs[channels:2 * channels].double() + torch.where(covered > 1 - 1e-6, 0.0, 1 - covered)
        logs = torch.log(probs[:channels].double().clamp_min(_TINY)) - torch.log(complement.clamp_min(_TINY))
        return (logs - self.threshold_logit()).float()[None]

    def threshold_logit(self) -> float:
        """The logit of the sigmoid threshold (0 at 0.5; 0 for softmax, which takes the argmax)."""
        if self.activation != "sigmoid" or self.threshold == 0.5:
            return 0.0
        return math.log(self.threshold / (1.0 - self.threshold))

    def model_shape(self, volume: Volume) -> tuple[int, ...]:
        """The spatial shape of ``volume`` in model space (after the preprocessing)."""
        with torch.no_grad():
            return tuple(self.model_input(torch.from_numpy(volume.array).to(self.device), volume).shape[1:])

    def model_spacing(self, volume: Volume) -> tuple[float, float, float]:
        """The model's voxel size (mm, after the preprocessing's resampling) along each of ``volume``'s own array axes,
        in the scan's axis order: the reorientation may permute the axes (a scan stored S, A, L is R, A, S to a model
        that reorients to RAS), so model axis ``i`` is not the scan's axis ``i``."""
        with torch.no_grad():
            model_in = self.model_input(torch.from_numpy(volume.array).to(self.device), volume)
        model = np.asarray(model_in.affine, dtype=np.float64)[:3, :3]
        scan = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
        directions = scan / np.linalg.norm(scan, axis=0)  # each scan axis as a unit vector in world space
        # a step of one length unit along a direction moves ||model^-1 u|| model voxels: one voxel is 1 / that long
        return tuple(float(1.0 / np.linalg.norm(np.linalg.solve(model, directions[:, i]))) for i in range(3))  # type: ignore[return-value]

    def settings(self) -> dict:
        """What the engine runs with, for reports."""
        return {
            "inferer": self.window.as_dict(),
            "checkpoint": self.checkpointing,
            "amp": self.precision.enabled,
            "amp_dtype": str(self.precision.resolve(self.device)) if self.precision.enabled else None,
            "device": str(self.device),
        }

    # -- passes -----------------------------------------------------------------------------
    def evaluate(
        self,
        x_native: torch.Tensor,
        volume: Volume,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gradient: str = "standard",
    ) -> Evaluation:
        """Logits on the scan's grid for ``x_native`` and, with ``loss_fn``, the loss's native gradient
        (exact through the network and the windows; through the preprocessing by the ``gradient`` path).

        A network that cannot run on the windows (a window size it does not take, too little
        memory) is an :class:`InputError` naming the scan and the window, not a traceback; a run-time error of
        the preprocessing, of its inverse or of ``loss_fn`` is one naming those, with its own message."""
        return self.evaluate_many([x_native], volume, [loss_fn], gradient)[0]

    def _network_failure(self, volume: Volume, exc: WindowFailure, iterates: int = 1) -> InputError:
        """The one-line error for a network that failed on this volume's windows (``iterates`` of them batched)."""
        reason = first_line(exc)
        roi = "x".join(map(str, self.window.roi_size))
        if iterates == 1:
            return InputError(f"{volume.path}: the network failed on its {roi} windows "
                              f"(window batch {self.window.sw_batch_size}): {reason}")
        return InputError(f"{volume.path}: the network failed on {iterates} iterates' {roi} windows together "
                          f"(window batch {self.window.sw_batch_size} x {iterates}): {reason}")

    def evaluate_many(
        self,
        xs: Sequence[torch.Tensor],
        volume: Volume,
        loss_fns: Sequence[Callable[[torch.Tensor], torch.Tensor] | None],
        gradient: str = "standard",
    ) -> list[Evaluation]:
        """:meth:`evaluate` of several iterates of ``volume`` in one pass: their windows go through the network
        together, in window batches of the inferer's ``sw_batch_size`` times the number of iterates. Either every
        ``loss_fns`` entry is a loss (each iterate gets the gradient of its own loss) or none is."""
        with_loss = [fn is not None for fn in loss_fns]
        if any(with_loss) and not all(with_loss):
            raise ValueError("evaluate_many: give a loss for every iterate or for none")
        try:
            with self.engine.shared_by(len(xs)):
                return self._evaluate_many([x.to(self.device, torch.float32) for x in xs], volume,
                                           list(loss_fns) if all(with_loss) else None, gradient)
        except WindowFailure as exc:  # only the network on its windows: the loss's or the inverse's errors are their own
            raise self._network_failure(volume, exc, len(xs)) from exc.__cause__
        except RuntimeError as exc:  # the preprocessing, its inverse or the loss: one line naming them, not the network
            raise InputError(f"{volume.path}: the preprocessing, its inverse or the attack's loss failed (not the network): "
                             f"{first_line(exc)}") from exc

    def _evaluate_many(self, xs: list[torch.Tensor], volume: Volume, loss_fns, gradient: str) -> list[Evaluation]:
        if loss_fns is None:
            with torch.no_grad():
                model_ins = [self.model_input(x, volume) for x in xs]
                stitched = self.engine.forward(torch.stack([_plain(m) for m in model_ins]))
                out = []
                for i, model_in in enumerate(model_ins):
                    scan_logits = self.to_scan_grid(stitched[i:i + 1], model_in).detach()
                    out.append(Evaluation(scan_logits, self._segmentation(stitched[i:i + 1], model_in, scan_logits)))
                return out
        leaves = [x.detach().requires_grad_(True) for x in xs]
        with torch.enable_grad():
            model_ins = [self.model_input(leaf, volume, gradient) for leaf in leaves]
        on_scan: list[torch.Tensor] = []
        losses: list[float] = []

        def stitched_loss(stitched: torch.Tensor) -> torch.Tensor:
            total = stitched.new_zeros(())
            for i, (model_in, loss_fn) in enumerate(zip(model_ins, loss_fns)):
                if getattr(loss_fn, "raw_logits", False):  # the loss takes the network's logits, the prediction the probabilities
                    with torch.no_grad():
                        on_scan.append(self.to_scan_grid(stitched[i:i + 1].detach(), model_in))
                    loss = loss_fn(self.to_scan_grid(stitched[i:i + 1], model_in, raw=True))
                else:
                    scan_logits = self.to_scan_grid(stitched[i:i + 1], model_in)
                    on_scan.append(scan_logits.detach())
                    loss = loss_fn(scan_logits)
                losses.append(float(loss.detach()))
                total = total + loss  # the members' losses are independent: each input's gradient is its own loss's
            return total

        batch = torch.stack([_plain(m.detach()) for m in model_ins])
        stitched, _, model_grads = self.engine.value_and_grad(batch, stitched_loss)
        out = []
        for i, (leaf, model_in) in enumerate(zip(leaves, model_ins)):
            segmentation = self._segmentation(stitched[i:i + 1], model_in, on_scan[i])
            if model_in.requires_grad:
                (grad,) = torch.autograd.grad(model_in, leaf, grad_outputs=model_grads[i].to(model_in.dtype))
            else:  # preprocessing built no graph at all: treat it as identity
                grad = model_grads[i]
            out.append(Evaluation(on_scan[i], segmentation, losses[i], grad.detach()))
        return out

    def _segmentation(self, stitched: torch.Tensor, model_input: MetaTensor, scan_logits: torch.Tensor) -> np.ndarray:
        """The label map as the bundle's postprocessing makes it: from the inverted probabilities, or
        (``invert == "labels"``) discretised in model space and inverted with nearest interpolation; with its
        label-map steps (:mod:`medis3d.postprocessing`) where it applies them."""
        model_steps = tuple(s for s in self.label_steps if s.space == "model")
        scan_steps = tuple(s for s in self.label_steps if s.space == "scan")
        if self.invert != "labels":
            segmentation = self.segment(scan_logits)
        else:
            from monai.transforms.utils import convert_applied_interp_mode

            with torch.no_grad():
                if self.activation == "softmax":
                    labels = channel_argmax(stitched[0], 0, keepdim=True).float()
                else:
                    labels = (stitched[0] > self.threshold_logit()).float()
                if model_steps:
                    labels = postprocessing.apply(model_steps, labels.cpu(), model_input.affine, self.activation).to(labels.device)
                ops = convert_applied_interp_mode([dict(op) for op in model_input.applied_operations], mode="nearest")
                inverted: torch.Tensor = self.preprocessing.invert(MetaTensor(labels, meta=dict(model_input.meta), applied_operations=ops))
                inverted = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
            if self.activation == "softmax":
                segmentation = inverted[0].round().cpu().numpy().astype(self.label_dtype)
            else:
                segmentation = inverted.round().cpu().numpy().astype(np.uint8)
        if not scan_steps:
            return segmentation
        labels = torch.from_numpy(segmentation[None] if self.activation == "softmax" else segmentation)
        out = postprocessing.apply(scan_steps, labels, model_input.meta["original_affine"], self.activation)
        return (out[0] if self.activation == "softmax" else out).numpy().astype(segmentation.dtype)

    # -- predictions --------------------------------------------------------------------------
    def segment(self, scan_logits: torch.Tensor) -> np.ndarray:
        """Label map from scan-grid logits: ``(I,J,K)`` class indices (softmax) or ``(C,I,J,K)`` 0/1 (sigmoid)."""
        if self.activation == "softmax":
            return channel_argmax(scan_logits[0], 0).cpu().numpy().astype(self.label_dtype)
        return (scan_logits[0] > 0).cpu().numpy().astype(np.uint8)

    def predict(self, volume: Volume) -> np.ndarray:
        """The model's segmentation of ``volume`` on the scan's grid, in float32 whatever ``--amp`` says (:attr:`exact`)."""
        return self.exact.evaluate(torch.from_numpy(volume.array), volume).segmentation

    def loss_target(self, segmentation: np.ndarray) -> torch.Tensor:
        """A segmentation as the losses take it: labels ``(1,1,...)`` (softmax) or channels ``(1,C,...)``."""
        tensor = torch.as_tensor(np.asarray(segmentation).astype(np.int64), device=self.device)
        if self.activation == "softmax":
            return tensor[None, None]
        return tensor[None].float()

    def masks(self, segmentation: np.ndarray, background: bool = False) -> np.ndarray:
        """Boolean masks ``(N, I, J, K)``: one per foreground class, background first if asked."""
        seg = np.asarray(segmentation)
        if self.activation == "softmax":
            classes = ([0] if background else []) + self.foreground_classes
            return np.stack([seg == c for c in classes])
        fg = seg.astype(bool)[self.foreground_classes]  # one channel per label; --labels picks some
        if background:
            return np.concatenate([~fg.any(0, keepdims=True), fg])
        return fg

    # -- budgets --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of what the model computes: its weights, its preprocessing steps and their arguments, its
        activation, inversion and classes (a study's cached outcomes are matched by it, so another config of the
        same bundle, or retrained weights at the same path, are not taken for this model)."""
        digest = hashlib.sha1()
        for name, tensor in self.network.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().flatten().clone().view(torch.uint8).numpy().tobytes())
        about = {"steps": [[step.name, step.args] for step in self.preprocessing.steps], "activation": self.activation,
                 "invert": self.invert, "out_channels": self.out_channels, "class_names": self.class_names}
        if self.invert_nearest:
            about["invert_nearest"] = True
        if self.activation == "sigmoid" and self.threshold != 0.5:
            about["threshold"] = self.threshold
        if self.invert_logits:
            about["invert_logits"] = True
        if self.label_steps:
            about["label_steps"] = [[s.name, s.args, s.space, s.onehot] for s in self.label_steps]
        digest.update(json.dumps(about, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def intensity_scale(self, volume: Volume) -> tuple[float, str]:
        """Native units that make 1.0 of the model's normalised intensity range, and how it was found (over every
        channel together: :meth:`intensity_scales` gives one per channel where the model normalises them apart)."""
        return self._intensity_scale(volume.array)

    def channels_apart(self, volume: Volume) -> bool:
        """Whether the model sees each of ``volume``'s channels in its own units: a scan of several channels whose
        first intensity step normalises each channel by its own statistics (``channel_wise``: NormalizeIntensity,
        ScaleIntensityRangePercentiles, ScaleIntensity), or that has no intensity step (the network takes each
        channel as its file holds it). A fixed ScaleIntensityRange window, or a step that pools its statistics over
        the channels, maps every channel by one map: one native unit is shared."""
        if volume.channels < 2:
            return False
        for step in self.preprocessing.steps:
            a = step.args
            if step.name == "ScaleIntensityRange" and a.get("a_max") is not None and a.get("a_min") is not None:
                return False
            if step.name in ("ScaleIntensityRangePercentiles", "NormalizeIntensity", "ScaleIntensity"):
                return bool(a.get("channel_wise"))
        return True

    def intensity_scales(self, volume: Volume) -> IntensityScales:
        """:meth:`intensity_scale`, and where the model sees the channels in their own units (:meth:`channels_apart`)
        each channel's own, found the same way on that channel alone."""
        scale, note = self._intensity_scale(volume.array)
        if not self.channels_apart(volume):
            return IntensityScales(scale, note)
        names = channel_names(volume)
        found = [self._intensity_scale(volume.array[c : c + 1], "the channel's") for c in range(volume.channels)]
        return IntensityScales(scale, note, tuple(s for s, _ in found),
                               tuple(f"{name}: {n}" for name, (_, n) in zip(names, found)), tuple(names))

    def _intensity_scale(self, array: np.ndarray, whose: str = "the scan's") -> tuple[float, str]:
        """:meth:`intensity_scale` of the voxels ``array`` (a scan, or one channel of it: ``whose``, in the note)."""
        for step in self.preprocessing.steps:
            a = step.args
            # the output range the window maps to; MONAI rescales to b_min..b_max only when both are given (None is
            # its default, 0..1), and 0 is a bound like any other (b_min=-1, b_max=0 spans 1, not 2)
            b_min, b_max = a.get("b_min"), a.get("b_max")
            span_b = 1.0 if b_min is None or b_max is None else float(b_max) - float(b_min)
            if step.name == "ScaleIntensityRange" and a.get("a_max") is not None and a.get("a_min") is not None:
                span = (float(a["a_max"]) - float(a["a_min"])) / (span_b or 1.0)
                return abs(span), f"ScaleIntensityRange window {a['a_min']}..{a['a_max']} -> {a.get('b_min', 0)}..{a.get('b_max', 1)}"
            if step.name == "ScaleIntensityRangePercentiles":
                lo, hi = float(a.get("lower", 0.5)), float(a.get("upper", 99.5))
                p_lo, p_hi = np.percentile(array, [lo, hi])
                if a.get("relative") and b_min is not None and b_max is not None:
                    span_b *= (hi - lo) / 100.0  # relative: the percentiles map to that share of b_min..b_max
                span = abs(p_hi - p_lo) / (abs(span_b) or 1.0)
                return float(max(span, 1e-6)), f"{whose} {lo}-{hi} percentile range {p_lo:.4g}..{p_hi:.4g} (ScaleIntensityRangePercentiles)"
        p_lo, p_hi = np.percentile(array, [0.5, 99.5])
        return float(max(p_hi - p_lo, 1e-6)), f"{whose} 0.5-99.5 percentile range {p_lo:.4g}..{p_hi:.4g} (no fixed intensity window)"
