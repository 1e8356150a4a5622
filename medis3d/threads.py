"""CPU threads for torch: as many as the cores this process may really use, not the machine's.

torch starts with one thread per core it sees, but a container limited to 2 CPUs by a cgroup quota still sees
every core of its host, and then runs many threads on 2 cores, which slows every convolution down. The cores a
process may use are the fewest of its CPU affinity, its cgroup's CPU quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``) and torch's own count of physical cores (hyperthreads do not add arithmetic).

``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) in the environment is the user's choice and is kept (``torchrun``
sets it to 1 for each of several processes on a node), as is ``--threads``; the choice and its reason go in
every report (:func:`choice`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from medis3d.errors import InputError

_CHOICE: dict = {}
_FIRST: dict = {}
_ENV_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs this process's cgroup may use (quota / period), the smallest over its cgroup and the ones above it;
    None where no quota is set or none can be read."""
    limits: list[float] = []
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, name = root, "cpu.max"
        elif "cpu" in controllers.split(","):  # cgroup v1: mounted as cpu (often a link) or as cpu,cpuacct
            mounts = [root / "cpu", root / controllers]
            base, name = next((m for m in mounts if m.is_dir()), mounts[0]), "cpu.cfs_quota_us"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:  # this cgroup and those above it (without a cgroup namespace the path may not exist here)
            limit = _read_limit(folder, name)
            if limit is not None:
                limits.append(limit)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    if not lines:  # no /proc (another OS, or a sandbox): the root cgroup's files where they are
        for folder, name in ((root, "cpu.max"), (root / "cpu", "cpu.cfs_quota_us")):
            limit = _read_limit(folder, name)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _read_limit(folder: Path, name: str) -> float | None:
    try:
        if name == "cpu.max":
            quota, _, period = (folder / name).read_text().strip().partition(" ")
        else:
            quota = (folder / name).read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or float(period or 0) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def available_cores() -> tuple[int, str]:
    """The cores this process may use, and how that was found (for the report)."""
    seen = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
        how = f"CPU affinity {cores} of {seen}"
    except (AttributeError, OSError):  # not on Linux
        cores, how = seen, f"{seen} CPUs"
    quota = _cgroup_quota()
    if quota is not None and math.ceil(quota) < cores:
        cores, how = max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} of {seen} CPUs"
    physical = _torch_default()
    if physical < cores:  # torch counts physical cores, not hyperthreads: one thread per core, as torch would
        cores, how = physical, f"{how}; torch's default {physical} (physical cores)"
    return cores, how


def _torch_default() -> int:
    """torch's own thread count when medis3d first looked, before it set any (torch's default is the physical
    cores, or OMP_NUM_THREADS)."""
    if "torch_default" not in _FIRST:
        import torch

        _FIRST["torch_default"] = torch.get_num_threads()
    return int(_FIRST["torch_default"])


def apply_threads(requested: int | None, device: str = "cpu") -> dict:
    """Set torch's intra-op threads: ``requested`` (``--threads``) when given, else ``OMP_NUM_THREADS`` where the
    environment sets it, else the cores available (:func:`available_cores`). Returns the choice, also kept for
    :func:`choice`."""
    import torch

    if requested is not None and requested < 1:
        raise InputError(f"--threads must be 1 or more, got {requested}")
    cores, how = available_cores()
    env = ", ".join(f"{name}={os.environ[name]}" for name in _ENV_VARIABLES if os.environ.get(name)) or None
    if requested is not None:
        threads, why = requested, "--threads"
    elif env is not None:
        threads, why = torch.get_num_threads(), f"{env} in the environment"
    else:
        threads, why = cores, f"the cores available ({how})"
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _CHOICE.clear()
    _CHOICE.update(threads=torch.get_num_threads(), why=why, cores_available=cores, cores_found_by=how)
    if threads > cores:
        _CHOICE["notice"] = (f"{threads} threads on {cores} available core(s): more threads than cores slow torch down; "
                             f"--threads {cores} runs one a core")
    if not str(device).startswith("cpu"):
        _CHOICE["note"] = "CPU threads only matter for the work done on the CPU (reading, resampling, writing)"
    return dict(_CHOICE)


def choice() -> dict:
    """The threads chosen by the last :func:`apply_threads` (or torch's own, where medis3d chose none)."""
    if _CHOICE:
        return dict(_CHOICE)
    import torch

    return {"threads": torch.get_num_threads(), "why": "torch's default"}
