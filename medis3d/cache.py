"""Member outcomes kept between runs: one JSON file per outcome, named by a digest of everything the outcome
depends on, so a rerun with any of it changed runs the member anew instead of reusing a row made otherwise.

One store for ``evaluate``'s resumable studies and the strength benchmark (``bench/strength.py``), and one rule for
running only the members a store lacks (:func:`cached_outcomes`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from medis3d.io.atomic import write_text_atomic

M = TypeVar("M")
R = TypeVar("R")


def sha1_digest(key: dict) -> str:
    """The first 12 hex digits of the SHA-1 of ``key`` as sorted JSON (values that are not JSON as text)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


class OutcomeCache:
    """A folder of JSON outcomes: ``folder/[where/][label_]<digest>[_tail].json``, written atomically (``where``: a
    sub-folder; ``label`` and ``tail``: readable parts of the name, such as the member and the budget)."""

    def __init__(self, folder: Path | str, digest: Callable[[dict], str] = sha1_digest):
        self.folder = Path(folder)
        self.digest = digest

    def path(self, key: dict, where: str = "", label: str = "", tail: str = "") -> Path:
        """Where the outcome of ``key`` is kept."""
        name = "_".join(part for part in (label, self.digest(key), tail) if part)
        return (self.folder / where if where else self.folder) / f"{name}.json"

    def get(self, key: dict, where: str = "", label: str = "", tail: str = "") -> dict | None:
        """The outcome kept for ``key``, or None."""
        path = self.path(key, where, label, tail)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: dict, outcome: dict, where: str = "", label: str = "", tail: str = "") -> dict:
        """Keep ``outcome`` for ``key``; returns it as a later run reads it back (JSON's types)."""
        text = json.dumps(outcome, default=float)
        write_text_atomic(self.path(key, where, label, tail), text)
        return json.loads(text)


def cached_outcomes(
    members: Sequence[M],
    name: Callable[[M], str],
    lookup: Callable[[M], dict | None],
    run: Callable[[list[M]], Sequence[R]],
    keep: Callable[[M, R], dict],
) -> dict[str, dict]:
    """Every member's outcome by name: ``lookup`` (the store's, or None where it lacks one or holds one that no
    longer serves), else ``keep(member, result)`` of ``run`` on the members missing, all run together (so their
    passes can be batched). ``keep`` stores the outcome and returns it as stored."""
    outcomes: dict[str, Any] = {name(m): lookup(m) for m in members}
    missing = [m for m in members if outcomes[name(m)] is None]
    if missing:
        for member, result in zip(missing, run(missing)):
            outcomes[name(member)] = keep(member, result)
    return outcomes
