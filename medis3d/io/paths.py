"""Paths of the user's inputs: the files under a folder as the readers walk it, and whether an output lies inside an
input (a folder medis3d must not write into)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def walk_files(folder: Path, recursive: bool = True) -> Iterator[Path]:
    """The files under ``folder`` in a stable order, hidden ones (a part starting with ".") left out. Linked folders
    are followed, as a dataset of links to its cases is laid out, each real folder once (a link back up the tree
    is not a loop)."""
    seen = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")) if recursive else []:
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def within(path: Path | str, folder: Path | str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, links resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
