"""User-facing errors: one clear line naming the file and the problem (CLI exit code 2)."""

from __future__ import annotations


class Medis3dError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits with 2."""


class InputError(Medis3dError):
    """A scan, label, mask or option that cannot be used as given."""


class BundleError(Medis3dError):
    """A bundle that cannot be loaded, or one refused by the safe loader."""


class OutputError(Medis3dError):
    """An output location that cannot be written: not a folder, no permission, the disk full, or in use."""


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
