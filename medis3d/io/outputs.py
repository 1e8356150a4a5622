"""Where a run writes: checked before the work starts, held against a second run, and write failures
turned into one line that names the folder (the staging folder is removed, nothing is left half-written).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from medis3d.errors import OutputError

_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def reason(exc: OSError) -> str:
    """A short reason for an OS error: the disk full, permission denied, or the system's own words."""
    return _REASONS.get(exc.errno or 0, exc.strerror or type(exc).__name__)


PREDICTION_DESCRIPTION = "medis3d prediction"  # the header description of every label map medis3d writes starts so
PERTURBATION_DESCRIPTION = "medis3d perturbation (adversarial minus source)"


def adversarial_description(eps: str, norm: str, member: str) -> str:
    """The description of an adversarial scan (NIfTI header, DICOM series): ``ADVERSARIAL medis3d eps 8/255 (js)``,
    ``ADVERSARIAL medis3d L2 eps 1000 (apgd:ce)`` (``eps``: the budget as the user gave it)."""
    return f"ADVERSARIAL medis3d {'L2 ' if norm == 'l2' else ''}eps {eps} ({member})"


def prediction_description(name: str) -> str:
    """The description of an attack's label map ``prediction_clean`` or ``prediction_adversarial``:
    ``medis3d prediction clean``."""
    return f"{PREDICTION_DESCRIPTION} {name.removeprefix('prediction_')}"


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the output path is a file, not a folder; choose another --out")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{out}: cannot create the output folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write the output folder: permission denied on {existing}")


def check_output_file(path: Path) -> None:
    """Refuse an output file that cannot be written (a folder, or in a folder that cannot be created or written),
    before any work is done."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; --out names the output file here")
    check_output_folder(path.parent)


def check_replaceable_file(path: Path, ours: Callable[[Path], bool], what: str) -> None:
    """An output file replaces only one medis3d wrote (``ours(path)``: a mark inside it says so): a user's own file
    at ``path`` is refused before any work and never written over. ``what`` names the output, "a prediction"."""
    if (path.exists() or path.is_symlink()) and not ours(path):
        raise OutputError(f"{path}: exists and is not {what} medis3d wrote; medis3d never writes over it, choose another --out")


MARK = ".medis3d.json"  # in an output folder of evaluate or batch: which command made it


def mark_folder(out: Path, command: str) -> None:
    """Make ``out`` (where missing) and say in it that ``command`` writes there, before its first output, so that a
    rerun (a resumed study included) knows its own folder (:func:`marked_by`)."""
    from medis3d.io.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    if not marked_by(command)(out):
        write_text_atomic(out / MARK, json.dumps({"schema": f"medis3d.{command}/1"}) + "\n")


def marked_by(command: str) -> Callable[[Path], bool]:
    """Whether a folder is one that ``command`` made (:func:`mark_folder`)."""
    return lambda out: has_schema(out / MARK, f"medis3d.{command}/1")


def check_folder_replaceable(out: Path, names: Sequence[str], ours: Callable[[Path], bool], what: str) -> None:
    """Outputs replace an earlier run's in ``out`` (``ours(out)``: a mark of that run says so) and nothing else: where
    one of ``names`` is taken in a folder that run did not make (a user's own ``report.md``, or DICOM folder called
    ``adversarial``), the run is refused before any work and that file is never written over. ``what`` names the
    run, "medis3d evaluate"."""
    taken = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    if taken and not ours(out):
        raise OutputError(f"{out / taken[0]}: exists and is not an output of an earlier {what}; medis3d never writes "
                          "over it, choose another --out")


def is_our_prediction(path: Path) -> bool:
    """Whether ``path`` is a label map medis3d wrote (its NIfTI header description says so)."""
    from medis3d.io.nifti import nifti_description

    return nifti_description(path).startswith(PREDICTION_DESCRIPTION)


def has_schema(path: Path, schema: str) -> bool:
    """Whether ``path`` is a JSON object of ``schema`` (a report medis3d wrote)."""
    try:
        return json.loads(path.read_text()).get("schema") == schema
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn an OS error while writing into ``out`` into one :class:`OutputError` line."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(f"{out}: could not write the outputs{where}: {reason(exc)}; nothing was written") from exc


def _lock_path(out: Path, part: str) -> Path:
    key = hashlib.sha256(f"{out.resolve()}\0{part}".encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"medis3d-{key}.lock"


@contextlib.contextmanager
def output_lock(out: Path, part: str = "") -> Iterator[None]:
    """Hold ``out`` for this run: a second run into the same folder is refused while this one works.

    The lock is an advisory ``flock`` on a file in the temporary folder named after the output
    folder's resolved path (nothing is created beside the outputs before they are written), removed
    when the run ends; a lock file replaced while being taken is taken again, so two runs never both
    hold one. ``part`` names a share of the folder that runs may hold apart (a torchrun rank)."""
    path = _lock_path(out, part)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: a read-only descriptor locks as well
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(f"{out}: another medis3d run{f' (pid {holder})' if holder else ''} is writing into this folder; "
                              "wait for it to finish or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: take the new one
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
