"""GPU benchmark of the attack (issue 12's CUDA half): members batched, AMP, checkpointing, full-size volumes.

    python bench/gpu.py [--scan head_t1.nii.gz] [--json-out figures.json]   # on a CUDA machine, about 6 minutes
    python bench/gpu.py --device cpu --quick                                 # a smoke run of the same code (CI)

Sections, each measured side by side in one run (times are medians after a warm-up, with the device
synchronised; memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the work):

* ``env``: the GPU, and its measured dense matrix-product rate in float32, TF32 and float16 (8192^3).
* ``exactness``: the engine's input gradient against autograd through MONAI's ``sliding_window_inference`` (96^3
  volume, 64^3 windows, SegResNet), with cuDNN's TF32 convolutions off (exact float32) and on (PyTorch's default
  for convolutions); float16 autocast's gradient against float32 (cosine, sign agreement above the median).
* ``members``: the default attack's three members and a twelve-member APGD fusion on a 2 mm head's model grid
  (91x109x91, the shipped bundle's 96^3 windows at overlap 0.25), batched (``together``) against one after another;
  the members' results compared (on CUDA also with cuDNN's TF32 off); ``--together``'s default on this device.
* ``e2e`` (with ``--scan``): ``medis3d attack`` on the scan with the shipped bundle: default members batched (the GPU
  default) and one after another (``--together 1``), ``--amp``, at ``--memory-budget 3GB``; and a strength check, one
  APGD member at 8/255 for 50 iterations in float32 and under ``--amp``, which must leave the same Dice. Also what a
  command pays before attacking (imports; the device's first convolution) and the batched run's progress lines.
* ``full_size``: one attack step of SegResNet (the shipped bundle's) and of MONAI's full-size UNETR (hidden 768,
  12 heads, feature 16) on a 256^3 volume (a 1 mm head), 96^3 windows: float32 / float16 autocast, with and without
  checkpointing, window batch 4 and 16: step time, peak memory, achieved TFLOP/s (FLOPs counted); the plain
  full-graph step at 128^3 beside it, and at 256^3 where it fits.
* ``profile`` (with ``--scan``): the default members on the scan under torch.profiler: operators and device kernels
  per member-step, and the top operators by time.

Prints a table per section and ends with one line of JSON; ``--json-out`` also writes it after every section, so a run
stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from engine import FUSION12, make_volume, sign_agreement, soft_dice_loss, step_flops

from _common import ROOT, Goal, print_table

from medis3d.engine import Precision, WindowEngine, WindowSettings

UNETR_FULL = {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}  # MONAI's BTCV UNETR
UNETR_QUICK = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 3}


class Bench:
    """Device, sizes, timing and memory helpers, and the figures measured so far."""

    def __init__(self, device: torch.device, quick: bool, json_out: str | None) -> None:
        self.device, self.quick, self.json_out = device, quick, json_out
        self.figures: dict = {"device": str(device), "torch": torch.__version__}
        self.roi = 16 if quick else 96
        self.repeats = 1 if quick else 3

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, work: Callable[[], object], repeats: int | None = None, warm_up: bool = True) -> float:
        """Median seconds of ``work``, after one warm-up run unless ``warm_up`` is False."""
        if warm_up:
            work()
        self.sync()
        times = []
        for _ in range(repeats or self.repeats):
            start = time.perf_counter()
            work()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_mb(self, work: Callable[[], object]) -> float | None:
        """Peak device memory ``work`` adds (MiB), or None off CUDA (``bench/engine.py`` measures CPU memory)."""
        if not self.cuda:
            work()
            return None
        self.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        work()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def network(self, name: str, roi: int | None = None) -> torch.nn.Module:
        """A frozen network with fixed random weights on the device, in its default layout (as medis3d lays out a
        network on a GPU)."""
        from monai.networks.nets import UNETR, SegResNet

        torch.manual_seed(0)
        if name == "segresnet":  # the shipped brain bundle's network
            net: torch.nn.Module = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8)
        else:
            net = UNETR(in_channels=1, out_channels=2, img_size=(roi or self.roi,) * 3,
                        **(UNETR_QUICK if self.quick else UNETR_FULL))
        for p in net.parameters():
            p.requires_grad_(False)
        return net.to(self.device).eval()

    def volume(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        x, label = make_volume(shape)
        return x.to(self.device), label.to(self.device)

    def release(self) -> None:
        """Hand the allocator's cached blocks back between cases, so one case's peak does not hold the next's."""
        if self.cuda:
            torch.cuda.empty_cache()

    def save(self) -> None:
        if self.json_out:
            Path(self.json_out).write_text(json.dumps(self.figures, indent=1, default=str))


def engine(net: torch.nn.Module, roi: int, overlap: float, batch: int, amp: bool = False) -> WindowEngine:
    settings = WindowSettings(roi_size=(roi,) * 3, sw_batch_size=batch, overlap=overlap, mode="gaussian")
    return WindowEngine(net, settings, Precision(enabled=amp))


def full_graph_grad(net: torch.nn.Module, x: torch.Tensor, loss, roi: int, overlap: float, batch: int) -> torch.Tensor:
    """The plain step: autograd through MONAI's sliding_window_inference, whole graph kept (no medis3d code)."""
    from monai.inferers import sliding_window_inference

    leaf = x.detach().requires_grad_(True)
    loss(sliding_window_inference(leaf, (roi,) * 3, batch, net, overlap=overlap, mode="gaussian")).backward()
    assert leaf.grad is not None
    return leaf.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


# -- sections ----------------------------------------------------------------------------------------
def section_env(b: Bench) -> dict:
    out: dict = {}
    if b.cuda:
        props = torch.cuda.get_device_properties(b.device)
        out.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), conv_tf32_default=torch.backends.cudnn.allow_tf32)
    n = 1024 if b.quick else 8192
    kinds = [("float32", torch.float32, False)]
    if b.cuda:
        kinds += [("tf32", torch.float32, True), ("float16", torch.float16, False)]
    for label, dtype, tf32 in kinds:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            g = torch.Generator(device=b.device).manual_seed(0)
            p, q = (torch.randn(n, n, device=b.device, dtype=dtype, generator=g) for _ in range(2))
            seconds = b.time(lambda: p @ q, repeats=10)  # noqa: B023  (used at once)
            out[f"gemm_tflops_{label}"] = 2 * n**3 / seconds / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def section_exactness(b: Bench) -> dict:
    shape, roi = ((48,) * 3, 32) if b.quick else ((96,) * 3, 64)
    x, label = b.volume(shape)
    loss = soft_dice_loss(label)
    out: dict = {}
    previous = torch.backends.cudnn.allow_tf32
    for tf32 in ((False, True) if b.cuda else (False,)):
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            net = b.network("segresnet")
            plain = full_graph_grad(net, x, loss, roi, 0.5, 4)
            ours = engine(net, roi, 0.5, 4).value_and_grad(x, loss)[2]
            out[f"grad_rel_err{'_tf32' if tf32 else ''}"] = rel(ours, plain)
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    for name in ("segresnet", "unetr"):
        net = b.network(name, roi)
        full = engine(net, roi, 0.5, 4).value_and_grad(x, loss)[2]
        half = engine(net, roi, 0.5, 4, amp=True).value_and_grad(x, loss)[2]
        out[f"amp_grad_cosine_{name}"] = cosine(half, full)
        out[f"amp_sign_agree_{name}"] = sign_agreement(half, full)
    return out


def _head_target(b: Bench):
    """A Target like the shipped bundle's on the device (SegResNet, 96^3 windows, batch 2, overlap 0.25) and a
    synthetic volume of a 2 mm head's model grid."""
    from medis3d.io.volume import Volume
    from medis3d.preprocessing import DifferentiablePreprocessing
    from medis3d.target import Target

    shape = (20, 24, 20) if b.quick else (91, 109, 91)
    window = WindowSettings(roi_size=(b.roi,) * 3, sw_batch_size=2, overlap=0.25, mode="gaussian")
    target = Target(network=b.network("segresnet"), preprocessing=DifferentiablePreprocessing([]), window=window,
                    activation="softmax", out_channels=2, device=b.device)
    x, _ = make_volume(shape)
    return target, Volume(array=x[0].numpy(), affine=np.eye(4)), shape


def section_members(b: Bench, fusion_steps: int) -> dict:
    from medis3d.fusion import MedIS
    from medis3d.members import PRESETS
    from medis3d.memory import auto_together

    target, volume, shape = _head_target(b)
    out: dict = {"head_shape": list(shape), "windows": target.engine.window_count(shape)}
    default = PRESETS["default"].members
    for together in (len(default), 1):  # one short warm-up of each path (cuDNN's algorithm search, the allocator)
        MedIS(target, members_spec=list(default), eps=8 / 255, step=1 / 255, steps=1, stop_at_success=False,
              together=together)(volume)
    runs = [("members", default, 2 if b.quick else 20, True), ("fusion12", FUSION12, fusion_steps, True)]
    if b.cuda:  # whether TF32 convolutions are what make a batched member's rounding differ from its solo run's
        runs.insert(1, ("members_tf32_off", default, 20, False))
    previous = torch.backends.cudnn.allow_tf32
    for key, members, steps, tf32 in runs:
        torch.backends.cudnn.allow_tf32 = previous and tf32
        results = {}

        def attack(together: int, members=members, steps=steps, results=results) -> Callable[[], None]:
            def run() -> None:  # stop_at_success=False: every member runs all its iterations
                results[together] = MedIS(target, members_spec=list(members), eps=8 / 255, step=1 / 255, steps=steps,
                                          stop_at_success=False, together=together)(volume)
            return run

        batched_s = b.time(attack(len(members)), repeats=1, warm_up=False)
        alone_s = b.time(attack(1), repeats=1, warm_up=False)
        pairs = list(zip(results[len(members)].members, results[1].members))
        out[f"{key}_batched_time_ratio"] = batched_s / alone_s
        out[f"{key}_batched_s"], out[f"{key}_alone_s"] = batched_s, alone_s
        out[f"{key}_count"], out[f"{key}_steps"] = len(members), steps
        out[f"{key}_same_success"] = all(p.success == q.success and p.steps == q.steps for p, q in pairs)
        out[f"{key}_max_score_diff"] = max(abs(p.score - q.score) for p, q in pairs)
        out[f"{key}_auto_together"] = auto_together(target, shape, len(members))
    torch.backends.cudnn.allow_tf32 = previous
    return out


def _report_figures(report: dict) -> dict:
    keep = {"time_s": report.get("time_s"), "peak_memory_mb": report.get("peak_memory_mb"),
            "success": report.get("success"), "dice": report.get("adversarial", {}).get("dice"),
            "clean_dice": report.get("clean", {}).get("dice")}
    together = report.get("attack", {}).get("together")
    if together is not None:
        keep["together"] = together
    keep["member_steps"] = [m.get("steps") for m in report.get("members", [])]
    return keep


E2E_RUNS = {
    "default_batched": [],
    "default_one_by_one": ["--together", "1"],
    "default_amp": ["--amp"],
    "default_budget_3gb": ["--memory-budget", "3GB"],
    "strength_float32": ["--members", "apgd:masked_spherical[random_start=1]", "--eps", "8/255", "--steps", "50",
                         "--select", "strongest"],
    "strength_amp": ["--members", "apgd:masked_spherical[random_start=1]", "--eps", "8/255", "--steps", "50",
                     "--select", "strongest", "--amp"],
}


STARTUP = """
import time
start = time.perf_counter()
import torch
import medis3d.cli
imported = time.perf_counter()
x = torch.zeros(1, 1, 8, 8, 8, device="{device}")
torch.nn.functional.conv3d(x, torch.zeros(1, 1, 3, 3, 3, device="{device}")).sum().item()
print(imported - start, time.perf_counter() - imported)
"""


def section_e2e(b: Bench, scan: str) -> dict:
    out: dict = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # what a command pays before any attack: imports, then the device's first convolution (CUDA and cuDNN start-up)
    done = subprocess.run([sys.executable, "-c", STARTUP.format(device=b.device)], capture_output=True, text=True, env=env)
    if done.returncode == 0:
        out["import_s"], out["first_convolution_s"] = map(float, done.stdout.split())
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name, extra in E2E_RUNS.items():
            folder = Path(tmp) / name
            command = [sys.executable, "-m", "medis3d", "attack", scan, "--out", str(folder), "--device", str(b.device),
                       "--json", *extra]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                out[name] = {"rc": done.returncode, "stderr": done.stderr[-2000:]}
                continue
            out[name] = {"wall_s": wall, **_report_figures(json.loads(done.stdout))}
            print(f"  {name}: {json.dumps(out[name], default=str)}", flush=True)
            if name == "default_batched":  # its progress lines, stamped with the elapsed time: where the wall time goes
                out[name]["progress"] = [line for line in done.stderr.splitlines() if "elapsed]" in line][-60:]
    if "time_s" in out.get("default_batched", {}) and "time_s" in out.get("default_one_by_one", {}):
        out["members_batched_time_ratio"] = out["default_batched"]["time_s"] / out["default_one_by_one"]["time_s"]
    return out


def section_profile(b: Bench, scan: str, steps: int) -> dict:
    """The default attack's members on ``scan`` with the shipped bundle, in this process under torch.profiler: how
    many operators and device kernels one member-step issues, and where the time goes besides the network."""
    from torch.profiler import ProfilerActivity, profile

    from medis3d.bundle import load_bundle
    from medis3d.fusion import MedIS
    from medis3d.io import read_volume
    from medis3d.members import PRESETS

    target = load_bundle(device=b.device)
    volume = read_volume(scan)
    members = list(PRESETS["default"].members)

    def run() -> None:
        MedIS(target, members_spec=members, eps=8 / 255, step=1 / 255, steps=steps, stop_at_success=False)(volume)

    run()  # warm-up: cuDNN's algorithm search, the allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        b.sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    member_steps = len(members) * steps
    out: dict = {"member_steps": member_steps, "wall_s": wall, "per_member_step_ms": 1000 * wall / member_steps,
                 "aten_ops_per_member_step": sum(e.count for e in events if e.key.startswith("aten::")) / member_steps}
    if b.cuda:
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        out["kernels_per_member_step"] = len(kernels) / member_steps
        out["kernel_ms_per_member_step"] = sum(e.device_time for e in kernels) / 1000 / member_steps
        out["top_device"] = events.table(sort_by="self_device_time_total", row_limit=15).splitlines()
    out["top_cpu"] = events.table(sort_by="self_cpu_time_total", row_limit=15).splitlines()
    return out


def section_full_size(b: Bench) -> dict:
    from medis3d.checkpointing import checkpointed_view

    shape = (32,) * 3 if b.quick else (256,) * 3
    overlap = 0.25
    x, label = b.volume(shape)
    loss = soft_dice_loss(label)
    out: dict = {"shape": list(shape), "roi": b.roi, "overlap": overlap}
    for name in ("segresnet", "unetr"):
        net = b.network(name)
        windows = engine(net, b.roi, overlap, 4).window_count(shape)
        flops = step_flops(net, b.roi, windows, b.device)
        out[f"{name}_windows"], out[f"{name}_step_tflop"] = windows, flops / 1e12
        reference = None  # the first case's gradient (float32, window batch 4), which every case's is compared with
        cases = [(amp, ckpt, 4) for amp in (False, True) for ckpt in (False, True)] + [(True, False, 16)]
        for amp, ckpt, batch in cases:
            label_ = f"{name}_{'amp' if amp else 'fp32'}{'_ckpt' if ckpt else ''}_wb{batch}"
            try:
                view = checkpointed_view(net)[0] if ckpt else net
                eng = engine(view, b.roi, overlap, batch, amp=amp)
                grads = {}

                def step(eng=eng, grads=grads) -> None:
                    grads["g"] = eng.value_and_grad(x, loss)[2]

                peak = b.peak_mb(step)
                seconds = b.time(step)
                if (amp, ckpt, batch) == cases[0]:
                    reference = grads["g"]
                out[label_] = {"step_s": seconds, "peak_mb": peak, "tflops": flops / seconds / 1e12,
                               "grad_cosine_vs_fp32": None if reference is None else cosine(grads["g"], reference)}
            except torch.cuda.OutOfMemoryError:
                out[label_] = "out of memory"
            print(f"  {label_}: {out[label_]}", flush=True)
            b.release()
        for side in ((24,) * 3 if b.quick else (128,) * 3, shape):
            key = f"{name}_full_graph_{side[0]}"
            xs, ls = b.volume(side)
            out[key] = {"engine_peak_mb": b.peak_mb(
                lambda net=net, xs=xs, ls=ls: engine(net, b.roi, overlap, 4).value_and_grad(xs, soft_dice_loss(ls)))}
            try:
                out[key]["full_graph_peak_mb"] = b.peak_mb(
                    lambda net=net, xs=xs, ls=ls: full_graph_grad(net, xs, soft_dice_loss(ls), b.roi, overlap, 4))
            except torch.cuda.OutOfMemoryError:
                out[key]["full_graph_peak_mb"] = "out of memory"
            print(f"  {key}: {out[key]}", flush=True)
            b.release()
    return out


GOALS = {
    "members_batched_time_ratio": Goal("<=", 0.5, "the default attack's 3 members batched / one after another, 20 "
                                                  "iterations, a 2 mm head's grid (synthetic)"),
    "fusion12_batched_time_ratio": Goal("<=", 0.4, "a 12-member APGD fusion batched / one after another"),
    "e2e_members_batched_time_ratio": Goal("<=", 0.5, "medis3d attack on --scan, default members batched / --together 1 "
                                                      "(the report's attack time)"),
    "gflops_vs_gemm": Goal(">=", 0.5, "achieved FLOP/s of a float32 attack step (SegResNet, 256^3) / dense GEMM in the "
                                      "precision PyTorch runs float32 convolutions in (TF32 unless turned off)"),
    "grad_rel_err": Goal("<=", 1e-5, "engine input gradient vs autograd through sliding_window_inference, float32 "
                                     "(TF32 off)"),
    "amp_grad_cosine": Goal(">=", 0.98, "cosine of the float16-autocast input gradient vs float32 (worse network)"),
    "amp_strength_dice_diff": Goal("<=", 0.005, "Dice left by one APGD member at 8/255 under --amp minus float32's"),
    "mem_ratio_vs_full_graph": Goal("<=", 0.2, "peak memory of a step at 256^3, engine / full autograd graph (worse "
                                               "network)"),
    "ckpt_mem_ratio": Goal("<=", 0.5, "peak memory of a float32 step at 256^3, checkpointing / none (worse network)"),
    "amp_mem_ratio": Goal("<=", 0.7, "peak memory of a step at 256^3, --amp / float32 (worse network)"),
    "amp_vs_float32_step_time_ratio": Goal("<=", 0.7, "step time at 256^3, --amp / float32 (worse network)"),
    "window_batch16_vs_4_time_ratio": Goal("<=", 0.8, "--amp step time at 256^3, window batch 16 / 4 (worse network)"),
}


def summary(figures: dict) -> dict:
    """The headline figures, derived from the sections' measurements (None where a section did not run)."""

    def get(*keys):
        value = figures
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    def worse(values, high: bool):
        values = [v for v in values if v is not None]
        return (max(values) if high else min(values)) if values else None

    nets = ("segresnet", "unetr")
    side = (get("full_size", "shape") or [0])[0]

    def step(net, case, what):
        return get("full_size", f"{net}_{case}", what)

    def graph(net, what):
        return get("full_size", f"{net}_full_graph_{side}", what)

    amp_dice = [get("e2e", run, "dice", "brain") for run in ("strength_amp", "strength_float32")]
    gemm = get("env", "gemm_tflops_tf32") or get("env", "gemm_tflops_float32")
    return {
        "members_batched_time_ratio": get("members", "members_batched_time_ratio"),
        "fusion12_batched_time_ratio": get("members", "fusion12_batched_time_ratio"),
        "e2e_members_batched_time_ratio": get("e2e", "members_batched_time_ratio"),
        "gflops_vs_gemm": ratio(step("segresnet", "fp32_wb4", "tflops"), gemm),
        "grad_rel_err": get("exactness", "grad_rel_err"),
        "amp_grad_cosine": worse([get("exactness", f"amp_grad_cosine_{n}") for n in nets], high=False),
        "amp_strength_dice_diff": amp_dice[0] - amp_dice[1] if None not in amp_dice else None,
        "mem_ratio_vs_full_graph": worse([ratio(graph(n, "engine_peak_mb"), graph(n, "full_graph_peak_mb"))
                                          for n in nets], high=True),
        "ckpt_mem_ratio": worse([ratio(step(n, "fp32_ckpt_wb4", "peak_mb"), step(n, "fp32_wb4", "peak_mb"))
                                 for n in nets], high=True),
        "amp_mem_ratio": worse([ratio(step(n, "amp_wb4", "peak_mb"), step(n, "fp32_wb4", "peak_mb")) for n in nets],
                               high=True),
        "amp_vs_float32_step_time_ratio": worse([ratio(step(n, "amp_wb4", "step_s"), step(n, "fp32_wb4", "step_s"))
                                                 for n in nets], high=True),
        "window_batch16_vs_4_time_ratio": worse([ratio(step(n, "amp_wb16", "step_s"), step(n, "amp_wb4", "step_s"))
                                                 for n in nets], high=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu (a smoke run)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check of the code, not the figures")
    parser.add_argument("--scan", default=None, help="a head T1 for the end-to-end section (skipped without)")
    parser.add_argument("--sections", default="env,exactness,members,e2e,full_size,profile")
    parser.add_argument("--profile-steps", type=int, default=5, help="iterations per member in the profile section")
    parser.add_argument("--fusion-steps", type=int, default=None, help="iterations of the 12-member fusion (default 100)")
    parser.add_argument("--json-out", default=None, help="write the figures here after every section")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    b = Bench(device, args.quick, args.json_out)
    sections: dict[str, Callable[[], dict]] = {
        "env": lambda: section_env(b),
        "exactness": lambda: section_exactness(b),
        "members": lambda: section_members(b, args.fusion_steps or (2 if args.quick else 100)),
        "e2e": lambda: section_e2e(b, args.scan),
        "profile": lambda: section_profile(b, args.scan, args.profile_steps),
        "full_size": lambda: section_full_size(b),
    }
    failed = False
    for name in args.sections.split(","):
        if name in ("e2e", "profile") and not args.scan:
            continue
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            b.figures[name] = sections[name]()
        except Exception:  # a section that breaks must not cost the others' figures
            failed = True
            b.figures[name] = {"error": traceback.format_exc()[-3000:]}
        b.figures[f"{name}_s"] = time.perf_counter() - start
        print(json.dumps(b.figures[name], indent=1, default=str), flush=True)
        b.save()
    b.figures["summary"] = summary(b.figures)
    b.save()
    print(f"\ndevice: {b.figures.get('env', {}).get('gpu', device)}; torch {torch.__version__}")
    if b.quick:
        print("quick mode: small sizes for a smoke check; the figures are not comparable with the goals")
    print_table(GOALS, b.figures["summary"], {})
    print(json.dumps(b.figures, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
