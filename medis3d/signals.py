"""Ctrl-C (SIGINT) and SIGTERM end a run the way an input error does: cleanly, with one line.

The command line installs :func:`install`: the first signal raises :class:`Interrupted` where the
run is, so every ``finally`` on the way out removes its staging folder; the exit code is 128 +
the signal (130, 143). Later signals are ignored while that clean-up runs, so a second Ctrl-C is
neither needed nor able to cut it short. :func:`deferred` holds signals back while finished
outputs move into place, so a run ends either before its outputs appear or after all of them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A run stopped by a signal (a BaseException, so no ``except Exception`` on the way out catches it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum, frame) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (delivered when it ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
