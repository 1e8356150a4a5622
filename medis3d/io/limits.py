"""What this machine can hold: a volume whose voxels would not fit is refused before they are allocated."""

from __future__ import annotations

import math
import os


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
