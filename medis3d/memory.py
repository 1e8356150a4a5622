"""Memory planning: estimate the gradient pass's peak from one probe window and pick the window
batch, checkpointing and mixed precision that keep it inside a budget.

The probe runs the network forward on one window with hooks that record every leaf layer's
output size (what autograd keeps for the backward pass); stages that checkpointing wraps keep
only their input, plus one stage's activations at a time during the backward pass. Volume-size
buffers (padded input, stitched logits, count map, gradients) are added from the shapes.

The budget bounds tensors, as CUDA's allocator peak counts them. On CPU, glibc's heap keeps freed blocks
resident and reuses them unevenly, so the process's resident peak can exceed the tensors' peak (measured up to
1.9x for one SegResNet step); ``MALLOC_MMAP_THRESHOLD_`` makes it follow the tensors at a cost in time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from medis3d.checkpointing import STAGE_CLASSES
from medis3d.errors import InputError

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}
SAFETY = 1.8  # allocator slack and transient copies in the backward pass (measured peak / raw estimate up to ~1.7)


def parse_size(text: str) -> int:
    """'6GB', '512M', '1.5g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower().replace("ib", "b") not in UNITS:
        raise InputError(f"--memory-budget must be a size such as 6GB or 512MB, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower().replace("ib", "b")])


@dataclass
class Probe:
    """Bytes kept for the backward pass of one window: all of it, and with checkpointing."""

    activations: int
    checkpointed: int


def probe_window(network: torch.nn.Module, window: torch.Tensor, amp_dtype: torch.dtype | None) -> Probe:
    """Run one window forward with hooks and add up what the backward pass keeps."""
    sizes: list[tuple[str, int]] = []  # (stage path or "", bytes) in call order
    stage_of: dict[torch.nn.Module, str] = {}
    for name, module in network.named_modules():
        if type(module).__name__ in STAGE_CLASSES and not any(name.startswith(s + ".") for s in stage_of.values()):
            stage_of[module] = name
    handles = []
    current: list[str] = []

    def enter(stage):
        def hook(mod, inputs):
            current.append(stage)
            first = inputs[0] if inputs else None
            if isinstance(first, torch.Tensor):
                sizes.append((f"{stage}:input", first.numel() * first.element_size()))
        return hook

    def leave(mod, inputs, output):
        current.pop()

    def record(mod, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor):
            sizes.append((current[-1] if current else "", out.numel() * out.element_size()))

    for module, stage in stage_of.items():
        handles.append(module.register_forward_pre_hook(enter(stage)))
        handles.append(module.register_forward_hook(leave))
    for module in network.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            ctx = torch.autocast(window.device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(window.device.type, enabled=False)
            with ctx:
                network(window)
    finally:
        for h in handles:
            h.remove()
    total = sum(b for _, b in sizes)
    outside = sum(b for s, b in sizes if s == "")
    stage_inputs = sum(b for s, b in sizes if s.endswith(":input"))
    per_stage: dict[str, int] = {}
    for s, b in sizes:
        if s and not s.endswith(":input"):
            per_stage[s] = per_stage.get(s, 0) + b
    largest = max(per_stage.values(), default=0)
    return Probe(activations=total, checkpointed=outside + stage_inputs + largest)


@dataclass
class MemoryPlan:
    """The settings chosen for a budget and the estimate they were chosen by."""

    sw_batch_size: int
    checkpoint: bool
    amp: bool
    estimate_bytes: int
    budget_bytes: int
    fits: bool
    together: int = 1  # members that share each pass (window batch sw_batch_size * together)

    def as_dict(self) -> dict:
        return {
            "budget_mb": round(self.budget_bytes / 2**20, 1),
            "estimate_mb": round(self.estimate_bytes / 2**20, 1),
            "sw_batch_size": self.sw_batch_size,
            "checkpoint": self.checkpoint,
            "amp": self.amp,
            "together": self.together,
            "fits": self.fits,
        }


def weight_bytes(network: torch.nn.Module) -> int:
    """Bytes of the network's parameters."""
    return sum(p.numel() * p.element_size() for p in network.parameters())


def volume_buffers(target, spatial_shape) -> int:
    """Bytes of the volume-size buffers of one attack step (float32)."""
    voxels = math.prod(int(s) for s in spatial_shape)
    # model space: input, its padded copy and gradient (x in_channels); stitched logits, the
    # upstream gradient and its padded copy (x out_channels); count map
    return 4 * voxels * (3 * target.in_channels + 3 * target.out_channels + 1)


def plan_memory(target, model_shape, budget_bytes: int, members: int = 1) -> MemoryPlan:
    """Pick (window batch, checkpointing, AMP, members together) for ``target`` on a model-space volume of
    ``model_shape``: the first setting, in order of cost, whose estimate fits. Members that share a pass each
    bring their volume-size buffers and their window batch (the shared window batch is
    ``sw_batch_size * together``); their number shrinks before anything slower is switched on. What the target
    already runs with (``--amp``, ``--checkpoint``) is kept: a plan only adds them, as it only lowers the window batch."""
    per_member = volume_buffers(target, model_shape)
    weights = weight_bytes(target.network)
    amp_dtype = torch.float16 if target.device.type == "cuda" else torch.bfloat16
    probes = _LazyProbes(target.network, _probe_window_input(target, model_shape), amp_dtype)  # AMP's only if considered
    batch_sizes = sorted({max(1, int(target.window.sw_batch_size)), 4, 2, 1}, reverse=True)
    batch_sizes = [b for b in batch_sizes if b <= max(1, int(target.window.sw_batch_size))]
    best: MemoryPlan | None = None
    settings: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
    if target.precision.enabled:  # the user's --amp: kept (a plan without it ran float32 and dropped its notice)
        settings = tuple(s for s in settings if s[1])
    elif not amp_is_fast(target.device):  # AMP would cost more time than any other setting: never chosen
        settings = settings[:2]
    if target.checkpointing:  # the user's --checkpoint: kept, and the plan's estimate is of it
        settings = tuple(s for s in settings if s[0])
    for checkpoint, amp in settings:
        probe = probes[amp]
        per_window = probe.checkpointed if checkpoint else probe.activations
        for batch in batch_sizes:
            for group in range(max(1, int(members)), 0, -1):
                estimate = int(weights + group * _member_bytes(per_member, batch, per_window))
                plan = MemoryPlan(batch, checkpoint, amp, estimate, budget_bytes, estimate <= budget_bytes, group)
                if plan.fits:
                    return plan
                if best is None or estimate < best.estimate_bytes:
                    best = plan
    assert best is not None
    return best


def _probe_window_input(target, model_shape) -> torch.Tensor:
    """One window of zeros at the target's window size (its roi, fallen back to the volume where smaller)."""
    from monai.utils import fall_back_tuple

    roi = fall_back_tuple(target.window.roi_size, model_shape)
    return torch.zeros((1, target.in_channels, *roi), device=target.device)


def _member_bytes(volume_bytes: int, batch: int, per_window: int) -> float:
    """What one member adds to a pass: its volume-size buffers and its window batch's activations (with slack)."""
    return volume_bytes + SAFETY * batch * per_window


def amp_is_fast(device: torch.device) -> bool:
    """Whether mixed precision runs at least at float32's speed on ``device``: CUDA, or a CPU with bfloat16
    instructions. Without them a bfloat16 gradient pass is far slower (measured on an AVX2 CPU: SegResNet 46x,
    UNETR 60x float32's time), so the memory plan does not choose it there."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _LazyProbes(dict):
    """Probes of one window, float32 (key False) and under autocast (key True), each run when first asked for."""

    def __init__(self, network, window, amp_dtype):
        super().__init__()
        self.network, self.window, self.amp_dtype = network, window, amp_dtype

    def __missing__(self, amp: bool) -> Probe:
        self[amp] = probe_window(self.network, self.window, self.amp_dtype if amp else None)
        return self[amp]


def members_together(target, model_shape, members: int, budget_bytes: float) -> int:
    """How many of ``members`` can share each pass within ``budget_bytes`` at the target's current settings
    (window batch, checkpointing, AMP): each brings its volume-size buffers and its window batch. At least 1."""
    if members <= 1:
        return 1
    probe = probe_window(target.network, _probe_window_input(target, model_shape), target.precision.resolve(target.device))
    per_window = probe.checkpointed if target.checkpointing else probe.activations
    each = _member_bytes(volume_buffers(target, model_shape), max(1, int(target.window.sw_batch_size)), per_window)
    room = budget_bytes - weight_bytes(target.network)
    return int(max(1, min(members, room // each)))


TOGETHER_SHARE = 0.5  # batched members may use this share of the free device memory


def auto_together(target, model_shape, members: int) -> int:
    """``--together``'s default: one member at a time on a CPU, where the network's time per window does not fall
    with the batch (measured: the default attack on the 2 mm T1 took 1.17x as long with its three members
    batched, SegResNet windows 1.8 s each at batch 2 and 2.1 s at batch 6); on a GPU as many as fit in
    :data:`TOGETHER_SHARE` of the free memory."""
    if target.device.type == "cpu":
        return 1
    return members_together(target, model_shape, members, TOGETHER_SHARE * available_device_bytes(target.device))


def available_device_bytes(device: torch.device) -> float:
    """Free memory on ``device``: the CUDA allocator's free bytes, or what the kernel says is available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    from medis3d.io.limits import available_bytes

    return available_bytes()


def check_machine_fits(target, model_shape, volume) -> None:
    """Refuse, before the attack starts, a volume whose attack cannot fit in this machine's memory at any
    setting: its volume-size buffers (model space and the scan grid) and the weights alone exceed what is free."""
    from medis3d.io.limits import human

    # scan grid: the iterate, the clean scan and the gradient (x channels); logits and their gradient (x classes)
    scan = 4 * math.prod(int(s) for s in volume.spatial_shape) * (3 * volume.channels + 2 * target.out_channels)
    need = volume_buffers(target, model_shape) + scan + weight_bytes(target.network)
    free = available_device_bytes(target.device)
    if need > free:
        raise InputError(
            f"{volume.path}: attacking this volume needs at least {human(need)} of memory on {target.device} (its volume-size "
            f"buffers at model shape {'x'.join(map(str, model_shape))} and the weights, before any window), more than the "
            f"{human(free)} free; use a machine with more memory or a coarser resampling"
        )
