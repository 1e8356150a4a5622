"""Atomic file writes: a file is either complete or absent, never half-written.

Staging files and folders come from ``tempfile`` (private: 0600 / 0700); what is moved into
place gets the modes any other tool would create it with under the user's umask (0644 / 0755
under the usual 022), so colleagues and services on a shared machine can read the results.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medis3d.errors import OutputError
from medis3d.io.outputs import reason


def umask_mode(folder: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file (``0o666``) or folder (``0o777``) under the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def staging_folder(beside: Path, suffix: str = ".partial") -> Path:
    """A new hidden folder next to ``beside`` for writing its contents before they move into place,
    with the mode of a folder created normally (it may itself become the output)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=suffix, dir=beside.parent))
    os.chmod(folder, umask_mode(folder=True))
    return folder


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    try:  # the error names the file asked for, not the staging file beside it
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({reason(exc)})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be written ({reason(exc)})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
