"""Sliding-window inference with an exact input gradient and memory bounded by one window batch.

Pass 1 stitches the windows' logits exactly as ``monai.inferers.sliding_window_inference``
does (MONAI's window placement and importance maps), without keeping a graph. A loss of the
stitched logits is differentiated with respect to them; since stitching is a fixed weighted
average, pass 2 re-runs each window batch with a graph and back-propagates that window's share
of the upstream gradient (``importance / count``), accumulating the input gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers.utils import _get_scan_interval
from monai.utils import PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option


class WindowFailure(RuntimeError):
    """The network's forward or backward pass (or the windowing around it: padding, stitching) failed on a
    window batch: a window size the network does not take, too little memory. Raised only from the engine's
    network stages, so a failure elsewhere (the loss, the inverse preprocessing) keeps its own message."""


@contextmanager
def _window_stage() -> Iterator[None]:
    """Turn a RuntimeError raised inside the block (the network running on windows) into a :class:`WindowFailure`."""
    try:
        yield
    except WindowFailure:
        raise
    except RuntimeError as exc:
        raise WindowFailure(str(exc)) from exc


# On a CPU a batch of one 3-D window runs PyTorch's native convolution, not oneDNN's, for the small feature maps of
# a network's deeper levels (ATen's use_mkldnn: batch 1 and channels x depth x height <= 20480), which is slower:
# SegResNet's gradient pass took 2.2x the time per 64^3 window at batch 1 as at batch 2, UNETR's 1.7x, SegResNet's
# (the shipped bundle's) 1.08x per 96^3 window, one thread each. So on a CPU an inferer's window batch of 1 becomes 2
# where the windows are small (up to CPU_WINDOW_BATCH_LARGEST voxels): there it pays, and a second window's
# activations cost little memory; larger windows keep 1.
CPU_WINDOW_BATCH_LARGEST = 80**3
CPU_WINDOW_BATCH_NOTICE = ("window batch 2 on CPU, not the inferer's 1: a batch of one 3-D window takes PyTorch's slower "
                           "convolution kernels for small feature maps (measured: up to 2.2x the time per window); "
                           "--sw-batch-size 1 keeps 1")


# On a CPU, 3-D convolutions whose weights are in channels-last layout take oneDNN's blocked kernels, where the
# default layout takes slower ones; PyTorch's CPU GroupNorm, though, is less exact in that layout (relative error 1e-5
# against 2e-7, from a one-pass variance), so GroupNorm layers keep the default layout on either side. Measured, an
# attack step (forward + input gradient, SegResNet init_filters 8, 2 threads): 0.73x the time on two 64^3 windows,
# 0.74x on one 96^3, 0.76x on two 96^3, with logits and gradients as exact as the default layout's against float64.
CPU_CHANNELS_LAST_NOTICE = ("3-D convolutions in channels-last layout on CPU (oneDNN's faster kernels: measured 0.73-0.76x "
                            "the time of a SegResNet attack step; GroupNorm layers keep the default layout, as exact)")


def _group_norm_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(),) + tuple(args[1:])


def _group_norm_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous(memory_format=torch.channels_last_3d) if output.dim() == 5 else output


def channels_last_on_cpu(network: object, device: torch.device | str) -> bool:
    """Put ``network``'s weights in channels-last layout where that is measured faster (a torch module with 3-D
    convolutions, on a CPU), its GroupNorm layers fed the default layout; True where it did."""
    if torch.device(device).type != "cpu" or not isinstance(network, torch.nn.Module) \
            or isinstance(network, torch.jit.ScriptModule):
        return False
    if not any(isinstance(m, torch.nn.Conv3d) for m in network.modules()):
        return False
    network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # (torch types .to without it)
    for module in network.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(_group_norm_input)
            module.register_forward_hook(_group_norm_output)
    return True


class _Windows(torch.autograd.Function):
    """The windows ``padded[s]`` of a window batch, concatenated. Its backward adds each window's gradient into one
    zero buffer; autograd's own slicing allocates and fills a full-size buffer per window and sliced axis (on the 2 mm
    T1, one thread, that was the largest part of a member-step besides the network: 20 of about 230 ms)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, slices: tuple) -> torch.Tensor:
        ctx.slices, ctx.shape = slices, padded.shape
        return torch.cat([padded[s] for s in slices])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_zeros(ctx.shape)
        for k, s in enumerate(ctx.slices):
            out[s] += grad[k : k + 1]
        return out, None


class _Paste(torch.autograd.Function):
    """Stitched logits from every window's (as sliding-window inference stitches them: each window weighted by the
    importance map, the sum divided by the count map, the padding cropped), with a backward that reads each window's
    share of the upstream gradient in one pass, where autograd's in-place slice updates clone the whole output."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, slices: tuple, plan: _Plan, batch: int) -> torch.Tensor:
        ctx.slices, ctx.plan = slices, plan
        output = logits.new_zeros((batch, logits.shape[1], *plan.padded_shape))
        for k, s in enumerate(slices):
            output[s] += logits[k : k + 1] * plan.importance
        output /= plan.count
        return output[(slice(None), slice(None)) + tuple(plan.crop)].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded = _uncrop(grad, ctx.plan)
        return torch.cat([padded[s] for s in ctx.slices]) * ctx.plan.importance, None, None, None


def _uncrop(grad: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The adjoint of stitching's last two steps (the division by the count map, the crop of the padding): the
    stitched logits' gradient on the padded grid, each voxel divided by its count."""
    padded = grad.new_zeros((grad.shape[0], grad.shape[1], *plan.padded_shape))
    padded[(slice(None), slice(None)) + tuple(plan.crop)] = grad
    return padded.div_(plan.count)


@dataclass
class WindowSettings:
    """Sliding-window inferer settings, named as MONAI's ``SlidingWindowInferer`` names them."""

    roi_size: Sequence[int] = (96, 96, 96)
    sw_batch_size: int = 4
    overlap: float | tuple[float, ...] = 0.25  # one for every axis, or one per axis
    mode: str = "constant"
    sigma_scale: float = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    def as_dict(self) -> dict:
        return {
            "roi_size": [int(v) for v in self.roi_size],
            "sw_batch_size": int(self.sw_batch_size),
            "overlap": [float(v) for v in self.overlap] if isinstance(self.overlap, (list, tuple)) else float(self.overlap),
            "mode": str(self.mode),
            "sigma_scale": self.sigma_scale,
            "padding_mode": str(self.padding_mode),
            "cval": float(self.cval),
        }


@dataclass
class _Plan:
    pad: list[int]
    padded_shape: tuple[int, ...]
    slices: list[tuple[slice, ...]]
    importance: torch.Tensor  # (1, 1, *roi)
    count: torch.Tensor  # (1, 1, *padded_shape)
    crop: tuple[slice, ...]


@dataclass
class Precision:
    """Mixed-precision settings for the network's forward and backward passes."""

    enabled: bool = False
    dtype: torch.dtype | None = None  # None: bfloat16 on CPU, float16 on CUDA
    # float16 only: the upstream gradient is scaled so that its largest entry is this (and the input gradient scaled
    # back), so small gradients survive whatever the volume's size; a fixed scale on a loss averaged over the scan's
    # voxels let them underflow on large volumes (cosine with float32 0.71 at 16.7 M voxels, 0.03 at 78 M)
    upstream_peak: float = 1.0

    def scale_for(self, upstream: torch.Tensor, dtype: torch.dtype | None) -> float:
        """The factor the upstream gradient is multiplied by before a backward pass in ``dtype`` (1 unless float16)."""
        if dtype != torch.float16:
            return 1.0
        peak = float(upstream.abs().max())
        return self.upstream_peak / peak if math.isfinite(peak) and peak > 0 else 1.0

    def scales_for(self, upstream: torch.Tensor, dtype: torch.dtype | None) -> list[float]:
        """:meth:`scale_for` of each volume of a batch ``(B, ...)`` on its own: members batched through the network
        each get the scale they get alone (one shared scale, set by the member with the largest upstream, flushed
        another's to zero: a mean loss batched with DAG's summed one had its whole gradient underflow)."""
        return [self.scale_for(upstream[b], dtype) for b in range(upstream.shape[0])]

    def resolve(self, device: torch.device) -> torch.dtype | None:
        if not self.enabled:
            return None
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass
class WindowEngine:
    """Runs a network over a volume in windows: stitched logits, and exact input gradients.

    ``network`` maps a window batch ``(N, C_in, *roi)`` to logits ``(N, C_out, *roi)``
    (a tuple or list output is reduced to its first element, as deep supervision returns).
    """

    network: Callable[[torch.Tensor], torch.Tensor]
    settings: WindowSettings = field(default_factory=WindowSettings)
    precision: Precision = field(default_factory=Precision)
    _plans: dict = field(default_factory=dict, repr=False)

    # -- planning -------------------------------------------------------------------------
    def _plan(self, spatial_shape: Sequence[int], device: torch.device) -> _Plan:
        key = (tuple(spatial_shape), str(device))
        if key in self._plans:
            return self._plans[key]
        dims = len(spatial_shape)
        roi = fall_back_tuple(self.settings.roi_size, spatial_shape)
        padded = tuple(max(spatial_shape[i], roi[i]) for i in range(dims))
        pad: list[int] = []
        for k in range(dims - 1, -1, -1):  # F.pad order: last dimension first
            diff = max(roi[k] - spatial_shape[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        overlap = ensure_tuple_rep(self.settings.overlap, dims)
        interval = _get_scan_interval(padded, roi, dims, overlap)
        slices = [tuple(s) for s in dense_patch_slices(padded, roi, interval, return_slice=True)]
        patch = get_valid_patch_size(padded, roi)
        importance = compute_importance_map(
            patch, mode=self.settings.mode, sigma_scale=self.settings.sigma_scale, device=device, dtype=torch.float32
        )
        importance = importance.reshape(1, 1, *patch).to(device=device, dtype=torch.float32)
        count = torch.zeros((1, 1, *padded), dtype=torch.float32, device=device)
        for s in slices:
            count[(slice(None), slice(None)) + tuple(s)] += importance
        crop = tuple(slice(pad[2 * (dims - 1 - d)], pad[2 * (dims - 1 - d)] + spatial_shape[d]) for d in range(dims))
        plan = _Plan(pad, padded, slices, importance, count, crop)
        self._plans = {key: plan}  # one volume shape at a time; plans hold full-size buffers
        return plan

    @contextmanager
    def shared_by(self, members: int):
        """While in the block, a pass carries ``members`` volumes (members batched): their windows share a window
        batch ``members`` times the inferer's, so each member keeps its window batch and, where one member's windows
        fit in one batch, the members' windows do too (one pass with its graph, not two)."""
        before = self.settings.sw_batch_size
        self.settings.sw_batch_size = max(1, int(before)) * max(1, int(members))
        try:
            yield self
        finally:
            self.settings.sw_batch_size = before

    def window_count(self, spatial_shape: Sequence[int]) -> int:
        return len(self._plan(spatial_shape, torch.device("cpu")).slices)

    def _pad(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if not any(plan.pad):
            return x
        mode = look_up_option(self.settings.padding_mode, PytorchPadMode)
        return F.pad(x, pad=plan.pad, mode=mode, value=self.settings.cval)

    def _window_batches(self, batch: int, plan: _Plan) -> Iterator[list[tuple]]:
        n = len(plan.slices)
        total = n * batch
        for start in range(0, total, max(1, int(self.settings.sw_batch_size))):
            stop = min(start + int(self.settings.sw_batch_size), total)
            yield [(slice(i // n, i // n + 1), slice(None), *plan.slices[i % n]) for i in range(start, stop)]

    def _autocast(self, device: torch.device):
        dtype = self.precision.resolve(device)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    @staticmethod
    def _first(output) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if isinstance(output, dict):
            output = next(iter(output.values()))
        return output

    # -- pass 1 ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stitched float32 logits of ``x`` ``(B, C, *S)``, equal to MONAI's sliding-window inference."""
        x = _plain(x).float()
        return self._stitch(x, self._plan(x.shape[2:], x.device), self.network)

    def _stitch(self, x: torch.Tensor, plan: _Plan, network: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Stitched logits, differentiable with respect to ``x`` when called with gradients enabled."""
        with _window_stage():
            return self._stitch_windows(x, plan, network)

    def _stitch_windows(self, x: torch.Tensor, plan: _Plan, network: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        padded = self._pad(x, plan)
        if torch.is_grad_enabled() and padded.requires_grad:  # with its graph: every window's logits kept, pasted once
            groups = [tuple(group) for group in self._window_batches(x.shape[0], plan)]
            logits_list = []
            for group in groups:
                with self._autocast(x.device):
                    logits_list.append(self._first(network(_Windows.apply(padded, group))).float())
            return _Paste.apply(torch.cat(logits_list), tuple(s for group in groups for s in group), plan, x.shape[0])
        output: torch.Tensor | None = None
        for window_batch in self._window_batches(x.shape[0], plan):
            windows = torch.cat([padded[s] for s in window_batch])
            with self._autocast(x.device):
                logits = self._first(network(windows))
            logits = logits.float() * plan.importance
            if output is None:
                output = torch.zeros((x.shape[0], logits.shape[1], *plan.padded_shape), device=x.device)
            for k, s in enumerate(window_batch):
                output[s] = output[s] + logits[k : k + 1]
        assert output is not None
        output = output / plan.count
        return output[(slice(None), slice(None)) + tuple(plan.crop)]

    def fits_one_batch(self, x: torch.Tensor) -> bool:
        """Whether every window of ``x`` goes into a single window batch (then one pass does it all)."""
        plan = self._plan(x.shape[2:], x.device)
        return len(plan.slices) * x.shape[0] <= max(1, int(self.settings.sw_batch_size))

    # -- pass 2 ---------------------------------------------------------------------------
    def input_gradient(self, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        """Gradient with respect to ``x`` of ``sum(upstream * forward(x))``, exact, window by window."""
        with _window_stage():
            return self._unless_overflowed(self._input_gradient(x, upstream), x, upstream)

    def _unless_overflowed(self, grad: torch.Tensor, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        """``grad``, or where float16 overflowed at the upstream's scale, the same gradient taken in float32."""
        if self.precision.resolve(x.device) != torch.float16 or bool(torch.isfinite(grad).all()):
            return grad
        saved, self.precision = self.precision, Precision()
        try:
            return self.input_gradient(x, upstream)
        finally:
            self.precision = saved

    def _input_gradient(self, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        x = _plain(x).float().detach()
        plan = self._plan(x.shape[2:], x.device)
        leaf = x.requires_grad_(True)
        with torch.enable_grad():
            padded = self._pad(leaf, plan)
        upstream_padded = _uncrop(upstream.float().to(x.device), plan)
        grad_padded = torch.zeros_like(padded)
        scales = self.precision.scales_for(upstream_padded, self.precision.resolve(x.device))  # each volume its own
        for window_batch in self._window_batches(x.shape[0], plan):
            windows = torch.cat([padded.detach()[s] for s in window_batch]).requires_grad_(True)
            share = torch.cat([upstream_padded[s] for s in window_batch]) * plan.importance
            scale = _per_window(scales, window_batch, share)
            with torch.enable_grad():
                with self._autocast(x.device):
                    logits = self._first(self.network(windows))
                (window_grad,) = torch.autograd.grad(logits.float(), windows, grad_outputs=share * scale)
            if not isinstance(scale, float):
                window_grad = window_grad / scale
            for k, s in enumerate(window_batch):
                grad_padded[s] += window_grad[k : k + 1]
        if padded is leaf:
            return grad_padded
        (grad,) = torch.autograd.grad(padded, leaf, grad_outputs=grad_padded)
        return grad

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stitched logits, ``loss_fn(stitched)`` and its exact gradient with respect to ``x``.

        When all windows fit in one window batch, the forward pass keeps its graph and one
        backward pass gives the gradient (the memory is one window batch's either way); otherwise
        pass 1 stitches without a graph and pass 2 back-propagates window batch by window batch.
        """
        x = _plain(x).float().detach()
        if self.fits_one_batch(x):
            leaf = x.requires_grad_(True)
            dtype = self.precision.resolve(x.device)
            with torch.enable_grad():
                stitched = self._stitch(leaf, self._plan(x.shape[2:], x.device), self.network)
                # the loss's gradient first, then the network's backward pass with it (the chain rule split in two,
                # the same gradient): a failure of the loss is the loss's, only the network's is a WindowFailure
                value = stitched.detach().requires_grad_(True)
                loss = loss_fn(value)
                (upstream,) = torch.autograd.grad(loss, value)
                scale = _per_volume(self.precision.scales_for(upstream, dtype), upstream)
                with _window_stage():
                    (grad,) = torch.autograd.grad(stitched, leaf, grad_outputs=upstream * scale)
            grad = grad if isinstance(scale, float) else grad / scale
            return stitched.detach(), loss.detach(), self._unless_overflowed(grad, x, upstream)
        stitched = self.forward(x).requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(stitched)
            (upstream,) = torch.autograd.grad(loss, stitched)
        return stitched.detach(), loss.detach(), self.input_gradient(x, upstream)


def _per_volume(scales: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """Each volume's upstream scale as a factor of a batch ``like`` ``(B, ...)``: 1.0 where every one is 1."""
    if all(s == 1.0 for s in scales):
        return 1.0
    return torch.tensor(scales, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def _per_window(scales: list[float], window_batch: list[tuple], like: torch.Tensor) -> float | torch.Tensor:
    """The upstream scale of each window of ``window_batch`` (its volume's, :func:`_per_volume`)."""
    return _per_volume([scales[s[0].start] for s in window_batch], like)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor view (MetaTensor operations are slow and carry metadata we do not need here)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x
