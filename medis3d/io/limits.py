"""What this machine can hold: a volume whose voxels would not fit is refused before they are allocated."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from medis3d.errors import InputError

# reading makes the float32 voxels and a contiguous channel-first copy of them
READ_COPIES = 2


def available_bytes() -> float:
    """Memory the kernel says can be had without swapping (``MemAvailable``), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def human(nbytes: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 KB``, ``7 bytes``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...) in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def check_readable(where: object, shape: Sequence[int]) -> None:
    """Refuse, before allocating, a volume of ``shape`` voxels whose reading would not fit in free memory."""
    need = math.prod(int(n) for n in shape) * 4 * READ_COPIES
    free = available_bytes()
    if need > free:
        raise InputError(f"{where}: the volume ({'x'.join(map(str, shape))} voxels) needs about {human(need)} of memory to "
                         f"read, more than the {human(free)} available")
