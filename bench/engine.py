"""Benchmark of the window engine (medis3d/engine.py): exactness, memory, checkpointing, AMP, speed.

Run ``python bench/engine.py`` (about 4 minutes on 2 idle CPU cores, under 15 on a loaded
machine) or ``--quick`` (small sizes, a smoke check with the same keys, about 1 minute). It prints a table of figures against their goals and ends
with one line of JSON holding the figures.

Method. Every figure is an error, or a ratio of two things measured side by side in the same
run, so the load of other jobs on the machine cancels out as far as it can.

* Memory is measured in child processes (``python bench/engine.py --child CASE``): a child builds
  the network and its inputs, restarts its peak count at its resident memory (the baseline),
  does the measured work once and prints its peak resident memory (``VmHWM``; ``ru_maxrss``
  would carry the parent's peak over, see ``bench/_common.start_peak``). "Peak" is that peak;
  "activation" is peak minus baseline, what the measured work added. A fresh process per case
  means that no allocator cache and no earlier case inflates a peak.
* Time is the median of per-pair ratios, the two sides alternating after one warm-up each
  (``bench/_common.paired_ratio``).
* Gradients computed in children are saved and compared in the parent.

The loss is soft Dice of the softmax foreground against a fixed label: it is global over the
volume, so the engine really needs its two passes. Networks: SegResNet(init_filters=8), and
UNETR with a ViT-Tiny encoder (hidden 192, MLP 768, 3 heads), feature_size 16, img_size = the
window. The window batch is 4 (``WindowSettings``' default) everywhere; network weights are
frozen, as ``Target`` freezes them, so every backward pass computes the input gradient only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from _common import (
    THREADS,
    Goal,
    available_mb,
    child_report,
    paired_ratio,
    print_table,
    run_child,
    set_threads,
    start_peak,
    timed,
)

from medis3d.engine import Precision, WindowEngine, WindowSettings, channels_last_on_cpu

SCRIPT = str(Path(__file__).resolve())
WINDOW_BATCH = 4
UNETR_CONFIG = {"feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 3}


# -- sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    roi: int
    overlap: float
    mode: str = "gaussian"

    def settings(self) -> WindowSettings:
        return WindowSettings(roi_size=(self.roi,) * 3, sw_batch_size=WINDOW_BATCH, overlap=self.overlap, mode=self.mode)


@dataclass(frozen=True)
class Sizes:
    """Volume shapes and windows of each figure."""

    grad_shape: tuple = (64, 64, 64)
    grad_window: Window = Window(32, 0.5)
    full_graph_shape: tuple = (160, 160, 160)
    full_graph_window: Window = Window(64, 0.5)
    growth_shapes: tuple = ((96, 96, 96), (192, 192, 192))
    growth_window: Window = Window(64, 0.0)  # memory does not depend on the overlap; 0 keeps 192^3 short
    pass_shape: tuple = (128, 128, 64)  # one window batch of four 64^3 windows
    pass_window: Window = Window(64, 0.0)
    step_shape: tuple = (96, 96, 96)
    step_window: Window = Window(64, 0.5)
    step_repeats: int = 5
    members_shape: tuple = (48, 48, 48)
    members_window: Window = Window(32, 0.5)
    members_steps: int = 2
    members_repeats: int = 3
    scan_shape: tuple = (256, 256, 256)  # a 1 mm head's scan grid, two classes
    scan_repeats: int = 5
    batch_shape: tuple = (128, 64, 64)  # two 64^3 windows
    batch_window: Window = Window(64, 0.0)
    batch_repeats: int = 3
    head_shape: tuple = (91, 109, 91)  # the 2 mm head T1 of the strength benchmark's brain target
    head_steps: int = 10
    head_repeats: int = 3


FULL = Sizes()
QUICK = Sizes(
    grad_shape=(32, 32, 32), grad_window=Window(16, 0.5),
    full_graph_shape=(64, 64, 64), full_graph_window=Window(32, 0.5),
    growth_shapes=((48, 48, 48), (96, 96, 96)), growth_window=Window(32, 0.0),
    pass_shape=(64, 64, 32), pass_window=Window(32, 0.0),
    step_shape=(48, 48, 48), step_window=Window(32, 0.5), step_repeats=2,
    members_shape=(32, 32, 32), members_window=Window(16, 0.5), members_steps=1, members_repeats=1,
    scan_shape=(64, 64, 64), scan_repeats=2, batch_shape=(64, 32, 32), batch_window=Window(32, 0.0), batch_repeats=1,
    head_shape=(40, 48, 40), head_steps=2, head_repeats=1,
)


# -- building blocks -----------------------------------------------------------------------------
def build_network(name: str, roi: int, channels_last: bool = True) -> torch.nn.Module:
    """A frozen network with fixed random weights (the same in every process), laid out as ``load_bundle`` lays a
    network out on a CPU (channels-last 3-D convolutions) unless ``channels_last`` is False."""
    from monai.networks.nets import UNETR, SegResNet

    torch.manual_seed(0)
    if name == "segresnet":
        net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8)
    elif name == "unetr":
        net = UNETR(in_channels=1, out_channels=2, img_size=(roi,) * 3, **UNETR_CONFIG)
    else:
        raise ValueError(name)
    for p in net.parameters():
        p.requires_grad_(False)
    if channels_last:
        channels_last_on_cpu(net, "cpu")
    return net.eval()


def make_volume(shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic image ``(1, 1, *shape)`` and its fixed label (blobs of ``create_test_image_3d``)."""
    from monai.data import create_test_image_3d

    radius = max(shape) // 6
    image, label = create_test_image_3d(*shape, num_objs=8, rad_min=radius // 3, rad_max=radius, noise_max=0.3,
                                        random_state=np.random.RandomState(0))
    return torch.from_numpy(image).float()[None, None], torch.from_numpy(label > 0).float()[None, None]


def soft_dice_loss(label: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """1 - soft Dice of the softmax foreground against ``label``: one number from every voxel."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        foreground = torch.softmax(logits, 1)[:, 1:]
        overlap = (foreground * label).sum()
        return 1 - (2 * overlap + 1) / (foreground.sum() + label.sum() + 1)

    return loss


@dataclass
class Setup:
    """A network, an engine over it, a volume and the loss: everything a case works on."""

    network: torch.nn.Module
    window: Window
    x: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    engine: WindowEngine = field(init=False)
    checkpoint: bool = False
    amp: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint:
            from medis3d.checkpointing import enable_checkpointing

            wrapped, notice = enable_checkpointing(self.network)
            assert wrapped and not notice, notice
        self.engine = WindowEngine(self.network, self.window.settings(), Precision(enabled=self.amp))


def make_setup(network: str, shape, window: Window, checkpoint: bool = False, amp: bool = False) -> Setup:
    x, label = make_volume(shape)
    return Setup(build_network(network, window.roi), window, x, soft_dice_loss(label), checkpoint=checkpoint, amp=amp)


# -- the measured work ------------------------------------------------------------------------------
def full_graph_step(setup: Setup, upstream=None) -> torch.Tensor:
    """One attack step the plain way: autograd through MONAI's sliding_window_inference, whole graph kept."""
    from monai.inferers import sliding_window_inference

    leaf = setup.x.detach().requires_grad_(True)
    w = setup.window
    stitched = sliding_window_inference(leaf, (w.roi,) * 3, WINDOW_BATCH, setup.network, overlap=w.overlap, mode=w.mode)
    setup.loss(stitched).backward()
    return leaf.grad


def engine_step(setup: Setup, upstream=None) -> torch.Tensor:
    """One attack step with the engine: pass 1, the loss and its gradient, pass 2."""
    return setup.engine.value_and_grad(setup.x, setup.loss)[2]


def gradient_pass(setup: Setup, upstream: torch.Tensor) -> torch.Tensor:
    """The engine's pass 2 alone, for a given upstream gradient of the stitched logits."""
    return setup.engine.input_gradient(setup.x, upstream)


WORK = {"full_graph": full_graph_step, "engine_step": engine_step, "gradient_pass": gradient_pass}


def floor_step(setup: Setup) -> Callable[[], None]:
    """The floor of one step: a plain forward and backward of every window, nothing else.

    Same windows (the engine's placement), same window batch, input gradient only (weights
    frozen), a fixed upstream gradient instead of the stitching and the loss.
    """
    plan = setup.engine._plan(setup.x.shape[2:], setup.x.device)  # MONAI's window placement, as the engine uses it
    batches = [plan.slices[i : i + WINDOW_BATCH] for i in range(0, len(plan.slices), WINDOW_BATCH)]
    upstream = torch.randn((WINDOW_BATCH, 2, *(setup.window.roi,) * 3), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        for batch in batches:
            windows = torch.cat([setup.x[(slice(None), slice(None), *s)] for s in batch]).requires_grad_(True)
            logits = setup.network(windows)
            torch.autograd.grad(logits, windows, grad_outputs=upstream[: len(batch)])

    return run


# -- children ----------------------------------------------------------------------------------------
def child_main(case: dict) -> None:
    """Build the case, take the baseline, do the work once, print the peak (see the module docstring)."""
    set_threads()
    setup = make_setup(case["network"], case["shape"], Window(**case["window"]), case.get("checkpoint", False),
                       case.get("amp", False))
    upstream = torch.load(case["upstream"]) if case.get("upstream") else None
    baseline = start_peak()
    holder = {}
    elapsed = timed(lambda: holder.update(grad=WORK[case["work"]](setup, upstream)))
    child_report(baseline, elapsed)
    if case.get("save"):
        torch.save(holder["grad"].detach(), case["save"])


def memory_case(work: str, shape, window: Window, network: str = "segresnet", **options) -> dict:
    case = {"work": work, "network": network, "shape": list(shape), "window": asdict(window), **options}
    return run_child(SCRIPT, case)


# -- figures ------------------------------------------------------------------------------------------
@dataclass
class Results:
    """The figures, the details printed under the table, and a folder for the children's files."""

    tmp: Path
    values: dict = field(default_factory=dict)
    details: list = field(default_factory=list)

    def detail(self, text: str) -> None:
        print(f"  {text}", flush=True)
        self.details.append(text)


def cube(shape) -> str:
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


def memory_line(label: str, m: dict) -> str:
    return f"{label}: peak {m['peak_mb']:.0f} MB, baseline {m['baseline_mb']:.0f} MB, activation {m['activation_mb']:.0f} MB, {m['time_s']:.1f} s"


def figure_gradient_error(sizes: Sizes, out: Results) -> None:
    """Engine gradient (and pass 1) against autograd through sliding_window_inference."""
    from monai.inferers import sliding_window_inference

    setup = make_setup("segresnet", sizes.grad_shape, sizes.grad_window)
    stitched, _, engine_grad = setup.engine.value_and_grad(setup.x, setup.loss)
    full_grad = full_graph_step(setup)
    w = sizes.grad_window
    with torch.no_grad():
        monai_stitched = sliding_window_inference(setup.x, (w.roi,) * 3, WINDOW_BATCH, setup.network, overlap=w.overlap, mode=w.mode)
    out.values["grad_rel_err"] = float((engine_grad - full_grad).norm() / full_grad.norm())
    out.detail(f"gradient {cube(sizes.grad_shape)}, {w.roi}^3 windows, overlap {w.overlap}, {w.mode}: relative error "
               f"{out.values['grad_rel_err']:.2e}; pass 1 vs sliding_window_inference max abs diff "
               f"{float((stitched - monai_stitched).abs().max()):.2e}")


def window_count(window: Window, shape) -> int:
    """How many windows MONAI's placement puts on ``shape`` (the engine's plan; no network needed)."""
    return WindowEngine(torch.nn.Identity(), window.settings()).window_count(shape)


def fit_full_graph_shape(shape, window: Window) -> tuple:
    """The spec's shape, or a smaller cube if the full graph would not fit in the free memory.

    The full graph's memory per window is measured (a child at a cube of two windows per axis), not estimated
    from the probe: the probe counts every layer's output, about twice what autograd keeps (SegResNet, 64^3:
    probe 239 MB a window, measured 144 MB), which made a 160^3 full graph look too big for 23 GB free."""
    probe_side = window.roi + int(window.roi * (1 - window.overlap))  # two windows per axis
    windows_probe = window_count(window, (probe_side,) * 3)
    measured = memory_case("full_graph", (probe_side,) * 3, window)
    return full_graph_side(shape, window, measured["activation_mb"] / windows_probe, measured["peak_mb"] - measured["activation_mb"],
                           available_mb())


def full_graph_side(shape, window: Window, per_window_mb: float, baseline_mb: float, free_mb: float) -> tuple:
    """The largest cube up to ``shape`` whose full graph (``per_window_mb`` a window, with a fifth more for
    slack, above ``baseline_mb``) fits in 85% of ``free_mb``; the window's own size at least."""
    side = shape[0]
    while side > window.roi:
        windows = window_count(window, (side,) * 3)
        if 1.2 * windows * per_window_mb + baseline_mb < 0.85 * free_mb:
            break
        side -= window.roi // 2
    return (side,) * 3


def figure_memory_vs_full_graph(sizes: Sizes, out: Results) -> None:
    shape = fit_full_graph_shape(sizes.full_graph_shape, sizes.full_graph_window)
    if shape != tuple(sizes.full_graph_shape):
        out.detail(f"NOTE: full graph at {cube(sizes.full_graph_shape)} would not fit in free memory; measured at {cube(shape)}")
    engine = memory_case("engine_step", shape, sizes.full_graph_window)
    full = memory_case("full_graph", shape, sizes.full_graph_window)
    out.values["mem_ratio_vs_full_graph"] = engine["peak_mb"] / full["peak_mb"]
    out.detail(memory_line(f"attack step {cube(shape)}, engine", engine))
    out.detail(memory_line(f"attack step {cube(shape)}, full graph", full))
    out.detail(f"  activation ratio engine / full graph: {engine['activation_mb'] / full['activation_mb']:.3f}")


def figure_memory_growth(sizes: Sizes, out: Results) -> None:
    small, large = (memory_case("engine_step", shape, sizes.growth_window) for shape in sizes.growth_shapes)
    out.values["mem_growth_96_to_192"] = large["peak_mb"] / small["peak_mb"]
    for shape, m in zip(sizes.growth_shapes, (small, large)):
        out.detail(memory_line(f"engine step {cube(shape)}", m))
    out.detail(f"  activation growth: {large['activation_mb'] / small['activation_mb']:.2f}")


def upstream_file(setup: Setup, path: Path) -> str:
    """Save the loss's gradient with respect to the stitched logits (float32), for the gradient-pass children."""
    stitched = setup.engine.forward(setup.x).requires_grad_(True)
    with torch.enable_grad():
        (upstream,) = torch.autograd.grad(setup.loss(stitched), stitched)
    torch.save(upstream, path)
    return str(path)


def gradient_pass_variants(network: str, sizes: Sizes, tmp: Path) -> dict:
    """Pass 2 of ``network`` as it is, with checkpointing, with AMP: memory and the gradient of each."""
    upstream = upstream_file(make_setup(network, sizes.pass_shape, sizes.pass_window), tmp / f"{network}-upstream.pt")
    variants = {}
    for name, options in (("float32", {}), ("checkpoint", {"checkpoint": True}), ("amp", {"amp": True})):
        save = tmp / f"{network}-{name}.pt"
        m = memory_case("gradient_pass", sizes.pass_shape, sizes.pass_window, network, upstream=upstream, save=str(save), **options)
        variants[name] = {**m, "grad": torch.load(save)}
    return variants


def sign_agreement(grad: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the voxels whose reference gradient magnitude is above the median where the signs agree."""
    magnitude = reference.abs().flatten()
    strong = magnitude > magnitude.median()
    return float((torch.sign(grad.flatten()[strong]) == torch.sign(reference.flatten()[strong])).float().mean())


def figures_checkpoint_and_amp(sizes: Sizes, out: Results) -> None:
    per_network = {}
    for network in ("segresnet", "unetr"):
        v = gradient_pass_variants(network, sizes, out.tmp)
        reference = v["float32"]["grad"]
        per_network[network] = {
            "ckpt_mem_ratio": v["checkpoint"]["activation_mb"] / v["float32"]["activation_mb"],
            "ckpt_grad_max_abs_diff": float((v["checkpoint"]["grad"] - reference).abs().max()),
            "amp_grad_cosine": float(torch.nn.functional.cosine_similarity(v["amp"]["grad"].flatten(), reference.flatten(), 0)),
            "amp_sign_agree": sign_agreement(v["amp"]["grad"], reference),
            "amp_mem_ratio": v["amp"]["activation_mb"] / v["float32"]["activation_mb"],
        }
        out.detail(f"gradient pass, {network}, {cube(sizes.pass_shape)}, {sizes.pass_window.roi}^3 windows, batch {WINDOW_BATCH} "
                   f"(max |grad| {float(reference.abs().max()):.2e}):")
        for name, m in v.items():
            out.detail(f"  {memory_line(name, m)}")
        out.detail("  " + ", ".join(f"{k} {val:.4g}" for k, val in per_network[network].items()))
    for key in per_network["segresnet"]:  # the worse of the two networks
        worse = max if key in ("ckpt_mem_ratio", "ckpt_grad_max_abs_diff", "amp_mem_ratio") else min
        out.values[key] = worse(p[key] for p in per_network.values())


def figure_step_time(sizes: Sizes, out: Results) -> None:
    setup = make_setup("segresnet", sizes.step_shape, sizes.step_window)
    timing = paired_ratio(lambda: engine_step(setup), floor_step(setup), sizes.step_repeats)
    out.values["step_time_ratio_vs_floor"] = timing["ratio"]
    w = sizes.step_window
    out.detail(f"step time {cube(sizes.step_shape)}, {setup.engine.window_count(sizes.step_shape)} windows of {w.roi}^3: "
               f"engine {timing['numerator_s']:.2f} s, floor {timing['denominator_s']:.2f} s, "
               f"ratios {', '.join(f'{r:.3f}' for r in timing['ratios'])}")


def members_target(sizes: Sizes):
    """The members figures' Target (SegResNet, no preprocessing) and synthetic volume."""
    from medis3d.io.volume import Volume
    from medis3d.preprocessing import DifferentiablePreprocessing
    from medis3d.target import Target

    w = sizes.members_window
    x, _ = make_volume(sizes.members_shape)
    target = Target(network=build_network("segresnet", w.roi), preprocessing=DifferentiablePreprocessing([]),
                    window=w.settings(), activation="softmax", out_channels=2)
    return target, Volume(array=x[0].numpy(), affine=np.eye(4))


def figure_members_time(sizes: Sizes, out: Results) -> None:
    """MedIS with the paper's six losses against each of them run alone, no early stop."""
    from medis3d.fusion import MedIS
    from medis3d.losses import PAPER_LOSSES

    w = sizes.members_window
    target, volume = members_target(sizes)

    def attack(losses) -> Callable[[], object]:
        return lambda: MedIS(target, losses=losses, steps=sizes.members_steps, stop_at_success=False)(volume)

    singles = [attack(loss) for loss in PAPER_LOSSES]
    timing = paired_ratio(attack(list(PAPER_LOSSES)), lambda: [run() for run in singles], sizes.members_repeats)
    out.values["members_time_ratio"] = timing["ratio"]
    out.detail(f"members {cube(sizes.members_shape)}, {w.roi}^3 windows, {sizes.members_steps} steps: fusion of "
               f"{len(PAPER_LOSSES)} {timing['numerator_s']:.2f} s, each alone {timing['denominator_s']:.2f} s in all")


# a fusion of the size of a reliable evaluation: twelve APGD members, SEA's losses and others, each its own random start
FUSION12 = tuple(f"apgd:{loss}[random_start=1,seed={k}]" for k, loss in enumerate(
    ("masked_spherical", "js", "margin", "ce", "masked_ce", "masked_ce_balanced", "cosine", "segpgd", "cospgd", "dice",
     "focal", "tversky")))


def _together_ratio(sizes: Sizes, members, steps: int, repeats: int) -> dict:
    """Members batched (``MedIS(together=len(members))``) against the same members one after another, paired;
    the two runs' members are checked to agree (success, steps kept, score within 0.002)."""
    from medis3d.fusion import MedIS

    w = sizes.members_window
    target, volume = members_target(sizes)
    results = {}

    def attack(together: int) -> Callable[[], object]:
        def run():  # stop_at_success=False: every member runs all its iterations
            results[together] = MedIS(target, members_spec=list(members), eps=8 / 255, step=1 / 255, steps=steps,
                                      stop_at_success=False, together=together)(volume)
        return run

    timing = paired_ratio(attack(len(members)), attack(1), repeats)
    batched, alone = results[len(members)], results[1]
    for a, b in zip(batched.members, alone.members):
        assert a.success == b.success and a.steps == b.steps and abs(a.score - b.score) <= 2e-3, (a.name, a.score, b.score)
    timing["windows"] = WindowEngine(target.network, w.settings()).window_count(sizes.members_shape)
    return timing


def figure_together(sizes: Sizes, out: Results) -> None:
    """The default attack's three members, and a twelve-member fusion, batched vs one after another (issue 12)."""
    from medis3d.members import PRESETS

    default = PRESETS["default"].members
    for key, members, steps in (("members_batched_time_ratio", default, sizes.members_steps),
                                ("fusion12_batched_time_ratio", FUSION12, sizes.members_steps)):
        t = _together_ratio(sizes, members, steps, sizes.members_repeats)
        out.values[key] = t["ratio"]
        out.detail(f"{len(members)} members x {steps} steps, {cube(sizes.members_shape)} ({t['windows']} windows of "
                   f"{sizes.members_window.roi}^3, window batch {WINDOW_BATCH} per member): batched {t['numerator_s']:.2f} s, "
                   f"one after another {t['denominator_s']:.2f} s; same members' results")


def figure_window_batch(sizes: Sizes, out: Results) -> None:
    """An attack step at the window batch of 2 medis3d uses on a CPU where an inferer says 1, against batch 1."""
    setup = make_setup("segresnet", sizes.batch_shape, sizes.batch_window)

    engines = {b: WindowEngine(setup.network, dataclasses.replace(sizes.batch_window.settings(), sw_batch_size=b), Precision())
               for b in (1, 2)}

    def step(batch: int) -> Callable[[], torch.Tensor]:
        return lambda: engines[batch].value_and_grad(setup.x, setup.loss)[2]

    # the same windows, grouped otherwise: the logits agree to float rounding; the gradients differ a little more,
    # as oneDNN's and the native kernels round differently and a ReLU whose input is near zero can flip
    logits = {b: e.forward(setup.x) for b, e in engines.items()}
    logits_rel = float((logits[2] - logits[1]).norm() / logits[1].norm())
    two, one = step(2)(), step(1)()
    rel = float((two - one).norm() / one.norm())
    assert logits_rel <= 1e-5 and rel <= 1e-2, (logits_rel, rel)
    timing = paired_ratio(step(2), step(1), sizes.batch_repeats)
    out.values["window_batch2_vs_1_time_ratio"] = timing["ratio"]
    out.detail(f"attack step {cube(sizes.batch_shape)}, {setup.engine.window_count(sizes.batch_shape)} windows of "
               f"{sizes.batch_window.roi}^3: window batch 2 {timing['numerator_s']:.2f} s, batch 1 {timing['denominator_s']:.2f} s; "
               f"relative difference of the logits {logits_rel:.1e}, of the gradients {rel:.1e}")


def figure_channels_last(sizes: Sizes, out: Results) -> None:
    """An attack step with the network's 3-D convolutions in channels-last layout (medis3d's CPU default) against the
    default layout: the same windows and window batch."""
    x, label = make_volume(sizes.batch_shape)
    setups = {fmt: Setup(build_network("segresnet", sizes.batch_window.roi, channels_last=fmt == "last"), sizes.batch_window,
                         x, soft_dice_loss(label)) for fmt in ("last", "default")}

    def step(fmt: str) -> Callable[[], torch.Tensor]:
        return lambda: engine_step(setups[fmt])

    last, default = step("last")(), step("default")()
    rel = float((last - default).norm() / default.norm())
    assert rel <= 1e-2, rel  # float rounding of other kernels (and ReLUs near zero), not another gradient
    timing = paired_ratio(step("last"), step("default"), sizes.batch_repeats)
    out.values["channels_last_vs_default_time_ratio"] = timing["ratio"]
    out.detail(f"attack step {cube(sizes.batch_shape)}, windows of {sizes.batch_window.roi}^3: channels-last "
               f"{timing['numerator_s']:.2f} s, default layout {timing['denominator_s']:.2f} s; relative difference of "
               f"the gradients {rel:.1e}")


def gemm_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense matrix-product rate (GFLOP/s) in ``dtype``, measured now: the best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def step_flops(network: torch.nn.Module, roi: int, windows: int, device: torch.device | str = "cpu") -> int:
    """FLOPs of one two-pass engine step over ``windows`` windows of ``roi``^3: every window's forward (pass 1), then
    its forward and input-gradient backward (pass 2). Counted by torch's FlopCounterMode on one window with
    ``.backward()`` (the counter's module hooks do not support ``autograd.grad``, which the engine uses) and multiplied:
    a window's FLOPs depend on its shape only. The loss and stitching are elementwise and not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    window = torch.randn(1, 1, roi, roi, roi, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            network(window)
        leaf = window.clone().requires_grad_(True)
        network(leaf).sum().backward()
    return counter.get_total_flops() * windows


def count_step_flops(setup: Setup) -> int:
    """:func:`step_flops` of a setup's step, on a fresh copy of its SegResNet."""
    return step_flops(build_network("segresnet", setup.window.roi), setup.window.roi,
                      setup.engine.window_count(setup.x.shape[2:]))


def figure_gflops(sizes: Sizes, out: Results) -> None:
    """Achieved GFLOP/s of one attack step (FLOPs counted by torch's FlopCounterMode) against the dense GEMM rate."""

    setup = make_setup("segresnet", sizes.step_shape, sizes.step_window)
    assert not setup.engine.fits_one_batch(setup.x)  # the step is pass 1 (a forward) + pass 2 (a forward and a backward)
    flops = count_step_flops(setup)
    engine_step(setup)
    step_s = min(timed(lambda: engine_step(setup)) for _ in range(max(1, sizes.step_repeats - 2)))
    gemm = gemm_gflops()
    out.values["gflops_vs_gemm"] = flops / step_s / 1e9 / gemm
    out.detail(f"attack step {cube(sizes.step_shape)}, {setup.engine.window_count(sizes.step_shape)} windows of "
               f"{sizes.step_window.roi}^3: {flops / 1e9:.1f} GFLOP counted in {step_s:.2f} s = {flops / step_s / 1e9:.1f} "
               f"GFLOP/s; dense GEMM 2048^2 {gemm:.1f} GFLOP/s")


def figure_amp(sizes: Sizes, out: Results) -> None:
    """An attack step with ``--amp`` (bfloat16 on a CPU) against float32: the same windows, layout and window batch.
    Measured only where the CPU has bfloat16 instructions (``amp_is_fast``); elsewhere the step takes tens of times
    float32's and medis3d says so in a notice. The step's bfloat16 GFLOP/s is set against this machine's bfloat16 GEMM."""

    from medis3d.memory import amp_is_fast

    if not amp_is_fast(torch.device("cpu")):
        out.detail("amp: this CPU has no bfloat16 instructions; not measured")
        return
    x, label = make_volume(sizes.step_shape)
    network = build_network("segresnet", sizes.step_window.roi)
    setups = {amp: Setup(network, sizes.step_window, x, soft_dice_loss(label), amp=amp) for amp in (True, False)}
    half, full = engine_step(setups[True]), engine_step(setups[False])
    cosine = float(torch.nn.functional.cosine_similarity(half.flatten(), full.flatten(), 0))
    timing = paired_ratio(lambda: engine_step(setups[True]), lambda: engine_step(setups[False]), sizes.batch_repeats)
    out.values["amp_vs_float32_step_time_ratio"] = timing["ratio"]
    flops = count_step_flops(setups[True])
    achieved, gemm = flops / timing["numerator_s"] / 1e9, gemm_gflops(dtype=torch.bfloat16)
    out.detail(f"attack step {cube(sizes.step_shape)}, {setups[True].engine.window_count(sizes.step_shape)} windows of "
               f"{sizes.step_window.roi}^3: bfloat16 {timing['numerator_s']:.2f} s ({achieved:.1f} GFLOP/s; bfloat16 GEMM "
               f"2048^2 {gemm:.1f} GFLOP/s, ratio {achieved / gemm:.3f}), float32 {timing['denominator_s']:.2f} s; gradient "
               f"cosine {cosine:.3f}, sign agreement {sign_agreement(half, full):.3f}")


def figure_scan_argmax(sizes: Sizes, out: Results) -> None:
    """The class argmax of two-class scan-grid logits (every attack step's segmentation and masked losses)."""
    from medis3d.reductions import channel_argmax

    logits = torch.randn(1, 2, *sizes.scan_shape)
    assert torch.equal(channel_argmax(logits, 1), logits.argmax(1))
    timing = paired_ratio(lambda: channel_argmax(logits, 1), lambda: logits.argmax(1), sizes.scan_repeats)
    out.values["scan_argmax_time_ratio"] = timing["ratio"]
    out.detail(f"argmax of 2 x {cube(sizes.scan_shape)} logits over the classes: channel by channel "
               f"{timing['numerator_s']:.3f} s, torch.argmax {timing['denominator_s']:.3f} s (same result)")


class _Pointwise(torch.nn.Module):
    """Two-class logits as a fixed affine map of each voxel (no convolution: on this CPU a 1x1x1 convolution took
    oneDNN's kernels at two threads, about 150 ms of a member-step against 3 ms at one), a network that costs next to nothing, leaving a step's other work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], 1) * 8.0


def synthetic_head(shape, path: Path) -> Path:
    """A head-like float32 NIfTI at 2 mm (an ellipsoid brightening to its centre over a noisy background), x flipped
    (LAS), so the shipped bundle's Orientation, Spacing and percentile scaling all do work."""
    import nibabel as nib

    g = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0))
    image = np.clip(1 - radius, 0, None) * 800 + g.normal(0, 20, shape).clip(0, None)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([-2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def figure_overhead(sizes: Sizes, out: Results) -> None:
    """A member-step's cost besides the network (issue 12: on a GPU it is most of a step): medis3d's PGD-CE member
    against the plain PGD-CE step of ``bench/reference.py`` (MONAI's transforms, full autograd through
    ``sliding_window_inference``), both with a fixed voxel-wise map for the network, on a synthetic 2 mm head through the
    shipped bundle's preprocessing; and the operators one member-step of the default attack issues."""
    import nibabel as nib

    import reference as plain

    from medis3d.bundle import default_bundle_path, load_bundle
    from medis3d.fusion import MedIS
    from medis3d.io import read_volume
    from medis3d.members import PRESETS

    path = synthetic_head(sizes.head_shape, out.tmp / "head.nii.gz")
    network = _Pointwise()
    target = dataclasses.replace(load_bundle(), network=network)
    volume = read_volume(str(path))
    bundle = plain.Bundle(default_bundle_path())
    bundle.network = network
    scan = nib.load(str(path))
    steps = sizes.head_steps
    problem = plain.scan_problem(bundle, scan, 8.0, lambda x: plain.real_preprocessing(bundle, x, scan.affine))

    def ours(members=("pgd:ce",)) -> None:
        MedIS(target, members_spec=list(members), eps=8 / 255, step=1 / 255, steps=steps, stop_at_success=False)(volume)

    def theirs() -> None:
        plain.sign_ascent(problem.loss_and_grad, problem.project, problem.random_start(0), 1.0, steps)

    timing = paired_ratio(ours, theirs, sizes.head_repeats)
    out.values["member_step_overhead_vs_plain"] = timing["ratio"]
    default = PRESETS["default"].members
    ours(default)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seconds = timed(partial(ours, default))
    member_steps = len(default) * steps
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / member_steps
    out.values["default_member_step_ms_pointwise"] = 1000 * seconds / member_steps  # under the profiler: a little slower
    out.values["default_aten_ops_per_member_step"] = ops
    out.detail(f"a member-step besides the network ({cube(sizes.head_shape)} head at 2 mm, voxel-wise network, {steps} "
               f"steps): medis3d's PGD-CE {1000 * timing['numerator_s'] / steps:.0f} ms, the plain PGD-CE "
               f"{1000 * timing['denominator_s'] / steps:.0f} ms; the default attack's members "
               f"{1000 * seconds / member_steps:.0f} ms and {ops:.0f} aten operators per member-step (profiled)")


# -- report ----------------------------------------------------------------------------------------------
GOALS = {
    "grad_rel_err": Goal("<=", 1e-5, "engine input gradient vs autograd through sliding_window_inference (float32)"),
    "mem_ratio_vs_full_graph": Goal("<=", 0.2, "peak memory of one attack step, engine / full autograd graph"),
    "mem_growth_96_to_192": Goal("<=", 1.3, "engine peak memory, 192^3 / 96^3 volume, same 64^3 windows"),
    "ckpt_mem_ratio": Goal("<=", 0.5, "gradient-pass activation memory, checkpointing / none (worse of SegResNet, UNETR)"),
    "ckpt_grad_max_abs_diff": Goal("<=", 1e-6, "max |gradient with checkpointing - without|"),
    "amp_grad_cosine": Goal(">=", 0.98, "cosine of the bfloat16-autocast input gradient vs float32 (worse network)"),
    "amp_sign_agree": Goal(">=", 0.999, "sign agreement, AMP vs float32, voxels with |float32 grad| above the median"),
    "amp_mem_ratio": Goal("<=", 0.7, "gradient-pass activation memory, AMP / float32 (worse network)"),
    "step_time_ratio_vs_floor": Goal("<=", 1.35, "attack step (pass 1 + loss + pass 2) / plain forward+backward of every window"),
    "members_time_ratio": Goal("<=", 1.05, "MedIS with 6 losses / the 6 members run one at a time"),
    "scan_argmax_time_ratio": Goal("<=", 0.25, "class argmax of 2-class scan-grid logits, medis3d's / torch.argmax's"),
    "members_batched_time_ratio": Goal("<=", 0.5, "the default attack's 3 members batched / one after another"),
    "fusion12_batched_time_ratio": Goal("<=", 0.4, "a 12-member APGD fusion batched / one after another"),
    "gflops_vs_gemm": Goal(">=", 0.5, "achieved GFLOP/s of an attack step / dense GEMM GFLOP/s, both measured now"),
    "channels_last_vs_default_time_ratio": Goal("<=", 0.9, "attack step, channels-last 3-D convolutions (medis3d's CPU "
                                                "layout) / the default layout, SegResNet"),
    "window_batch2_vs_1_time_ratio": Goal("<=", 0.8, "attack step, window batch 2 (medis3d's CPU floor) / batch 1, 64^3 windows"),
    "member_step_overhead_vs_plain": Goal("<=", 1.0, "a PGD-CE member-step with a voxel-wise network (all but the network's "
                                          "cost), medis3d / plain autograd through MONAI's transforms and inferer"),
    "amp_vs_float32_step_time_ratio": Goal("<=", 0.7, "attack step, --amp (bfloat16 on a CPU with bfloat16 instructions) / "
                                                       "float32, SegResNet, 64^3 windows"),
}

# What limits a figure when it misses its goal (printed next to a miss), as found on a 2-core CPU.
NOTES = {
    "grad_rel_err": "float32 summation order; pass 1 should equal sliding_window_inference exactly (see details)",
    "mem_ratio_vs_full_graph": "fixed memory (weights, oneDNN scratch, volume-size buffers) weighs more at small volumes",
    "mem_growth_96_to_192": "volume-size float32 buffers (input, stitched logits, upstream and its padded copy, count map, "
                            "gradient, loss intermediates) grow 8x; only the window batch's activations stay fixed",
    "ckpt_mem_ratio": "checkpointing is per stage: the peak is the backward of the largest full-resolution stage (its "
                      "recomputed activations, the gradient in flight, the kept skip tensors), plus oneDNN/allocator memory",
    "ckpt_grad_max_abs_diff": "recomputation ran different kernels than the first forward",
    "amp_grad_cosine": "bfloat16 rounding (8-bit mantissa) in every convolution, forward and backward, not one layer",
    "amp_sign_agree": "bfloat16 rounding (8-bit mantissa) in every convolution, forward and backward, not one layer",
    "amp_mem_ratio": "saved activations halve exactly; oneDNN/allocator memory and float32 volume buffers do not",
    "step_time_ratio_vs_floor": "pass 1 is a whole extra forward; with frozen weights a backward costs about 1-2 forwards, "
                                "so two passes cost 1 + F/(F+B) of the floor",
    "members_time_ratio": "members run one after another; beyond 1 is run-to-run noise of a shared machine",
    "scan_argmax_time_ratio": "three elementwise passes over the volume per extra class",
    "members_batched_time_ratio": "on a CPU a window's forward and backward cost the same per window at any batch (SegResNet "
                                  "96^3: 1.8-2.1 s per window at batch 1 to 6), so batching saves only per-pass overhead; "
                                  "the gain is a GPU's, which a small batch leaves idle",
    "fusion12_batched_time_ratio": "as for the default attack: per-window cost is flat in the batch on a CPU",
    "gflops_vs_gemm": "3D convolutions with 8-64 channels are memory-bound on a CPU: oneDNN reaches a fraction of the GEMM rate",
    "amp_vs_float32_step_time_ratio": "n/a: a CPU without bfloat16 instructions (no AVX512-BF16 or AMX), where a bfloat16 "
                                      "step takes tens of times float32's",
    "member_step_overhead_vs_plain": "the losses on the scan grid: the probabilities mapped back through the inverse "
                                     "preprocessing, in float64 (the plain step's loss is taken on the model's grid)",
    "window_batch2_vs_1_time_ratio": "batch 1 runs native kernels only where channels x depth x height <= 20480 (ATen's "
                                     "use_mkldnn): the deeper levels of small windows; at 96^3 they weigh little",
}


FIGURES = {
    "gradient": figure_gradient_error,
    "memory": figure_memory_vs_full_graph,
    "growth": figure_memory_growth,
    "checkpoint_amp": figures_checkpoint_and_amp,
    "step_time": figure_step_time,
    "members": figure_members_time,
    "scan_argmax": figure_scan_argmax,
    "together": figure_together,
    "gflops": figure_gflops,
    "window_batch": figure_window_batch,
    "channels_last": figure_channels_last,
    "amp": figure_amp,
    "overhead": figure_overhead,
}


def run_all(sizes: Sizes, only: list[str] | None = None) -> dict:
    set_threads()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        out = Results(Path(tmp))
        for name, figure in FIGURES.items():
            if only and name not in only:
                continue
            print(f"[{figure.__name__}]", flush=True)
            print(f"  ({timed(partial(figure, sizes, out)):.0f} s)", flush=True)
    print(f"\nCPU threads: {THREADS}; torch {torch.__version__}")
    if sizes is QUICK:
        print("quick mode: small sizes for a smoke check; the figures are not comparable with the goals")
    print_table(GOALS, out.values, NOTES, out.details)
    figures = {key: out.values.get(key) for key in GOALS}
    figures.update({key: value for key, value in out.values.items() if key not in figures})  # figures without a goal
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke check in a minute or two")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), help="measure only these figures")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    figures = run_all(QUICK if args.quick else FULL, args.only)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
