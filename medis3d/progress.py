"""Progress of the long commands (attack, batch, evaluate): one reporter, two displays.

On a terminal (stderr a TTY) the reporter draws rich bars on stderr: the current phase (loading the scan,
the clean prediction, the members, writing the outputs), the overall count (members, volumes, volumes x
budgets) and, in an attack, a bar per member, each with its elapsed time and ETA. Anywhere else (a log file,
CI, a pipe) it writes plain lines on stderr instead, one per meaningful event: always one at a phase change,
at each member's end and at each counted item's end (a volume of a batch), and for the steps in between at
most one every ``every`` seconds; each line carries the elapsed time and, where known, the ETA::

    medis3d: [00:42 elapsed, ~01:10 left] member 2/3 apgd:js step 10/20 score 0.512

stdout is left to the command's result. Nothing is shown before the first event, so an input error found
before it prints only its own line; on a terminal the bars of a run that ends in an input error are erased.

The code that does the work sees the callback the attacks always called, ``progress(member, t, total,
score)`` once per step, which may also have ``phase(name)`` and ``member_done(member, success, steps,
score)``; :func:`notify` calls those where the object has them, so a bare function still serves.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from medis3d.errors import Medis3dError

MEMBERS = "members"  # the phase in which the members run: the members counted there make an attack's ETA
PREFIX = "medis3d:"


def notify(progress: Any, event: str, *args: Any) -> None:
    """Call ``progress.<event>(*args)`` where ``progress`` has that method (a bare step callback has none)."""
    method = getattr(progress, event, None) if progress is not None else None
    if callable(method):
        method(*args)


def clock_text(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on."""
    minutes, secs = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


@dataclass
class _Count:
    """What the ETA is measured on: ``total`` items (members, volumes, ...), ``done`` of them finished."""

    label: str  # "members", "volumes", "volumes x budgets"
    item: str  # one of them: "member", "volume", "volume x budget"
    total: int
    started: float
    done: int = 0
    info: str = ""


@dataclass
class _Member:
    name: str
    index: int  # 1-based, in the order the members started; 0: not counted (a phase after the members)
    t: int = 0
    total: int = 1
    score: float = float("nan")
    finished: bool = False
    row: int | None = None  # its rich task

    @property
    def fraction(self) -> float:
        return 1.0 if self.finished else min(max(self.t / max(self.total, 1), 0.0), 1.0)


class Reporter:
    """Progress of one command; use as a context manager and pass it as the ``progress`` callback.

    ``interactive`` (default: ``sys.stderr.isatty()``) picks rich bars or plain lines; ``stream`` is where
    plain lines go (default: ``sys.stderr`` at the time of writing); ``clock`` gives seconds (a fake one in
    tests); ``every`` is the least time between two step lines."""

    def __init__(self, *, interactive: bool | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = 10.0, console: Any = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else bool(interactive)
        self.stream, self.clock, self.every, self.console = stream, clock, float(every), console
        self.started = clock()
        self.phase_name: str | None = None
        self._count: _Count | None = None
        self._members: dict[str, _Member] = {}  # the current phase's members, by name
        self._counted = False  # the current phase is MEMBERS: its members make the count
        self._expected = 0  # members the current phase will run (0: not said)
        self._last_line = float("-inf")
        self._progress: Any = None  # rich Progress, once shown
        self._phase_row: int | None = None
        self._count_row: int | None = None

    # -- the context manager ------------------------------------------------------------------------------

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(erase=isinstance(exc, Medis3dError))

    def close(self, erase: bool = False) -> None:
        """Stop the display; ``erase``: remove the bars (a run that ended in an input error shows only the error)."""
        if self._progress is None:
            return
        progress, self._progress = self._progress, None
        if erase:
            progress.live.transient = True
        elif self._phase_row is not None:
            progress.remove_task(self._phase_row)
        progress.stop()

    # -- events -------------------------------------------------------------------------------------------

    def count(self, label: str, total: int, item: str | None = None, info: str = "") -> None:
        """The overall count the ETA is measured on (shown from the first event on; this alone shows nothing)."""
        self._count = _Count(label, item or label.rstrip("s"), int(total), self.clock(), info=info)

    def info(self, text: str) -> None:
        """What the count's bar says beside it (terminal only); starts the terminal display."""
        if self._count is not None:
            self._count.info = text
        if self.interactive:
            self._show()
            if self._count_row is not None:
                self._progress.update(self._count_row, info=text)

    def phase(self, name: str, members: int = 0) -> None:
        """A new phase: its label on the terminal, a line in a log; ``members``: how many run in it (where they are
        a volume's, so the ETA counts the ones not started yet)."""
        self.phase_name = name
        self._drop_members()
        self._expected = int(members)
        self._counted = name == MEMBERS and self._members_are_counted()
        if self._count is not None and self._counted:
            self._count.started = self.clock()  # an attack's ETA covers its members, not the loading before them
        label = self._phase_label()
        if self.interactive:
            self._show()
            if self._phase_row is None:
                self._phase_row = self._progress.add_task(label, total=None, info="")
            else:
                self._progress.reset(self._phase_row, description=label)
        else:
            self._line(label)

    def __call__(self, member: str, t: int, total: int, score: float) -> None:
        """One step of a member (the attacks' callback)."""
        m = self._members.get(member)
        if m is None or m.finished:  # a new member, or one run again (a bisection of its budget)
            index = (m.index if m else len(self._members) + 1) if self._counted else 0
            m = self._members[member] = _Member(member, index, row=m.row if m else None)
        m.t, m.total, m.score = int(t), max(int(total), 1), float(score)
        if self.interactive:
            self._show()
            if m.row is None:
                m.row = self._progress.add_task(f"  {member}", total=m.total, info="")
            self._progress.update(m.row, total=m.total, completed=m.t, info=f"score {m.score:.3f}")
            self._update_count()
        elif self.clock() - self._last_line >= self.every:
            self._line(f"{self._member_label(m)} step {m.t}/{m.total} score {m.score:.3f}")

    step = __call__

    def member_done(self, member: str, success: bool, steps: int, score: float) -> None:
        """A member finished (its first success, or its last step)."""
        m = self._members.get(member)
        if m is None:
            m = self._members[member] = _Member(member, len(self._members) + 1 if self._counted else 0)
        if self._counted and self._count is not None and not m.finished:
            self._count.done = min(self._count.done + 1, self._count.total)
        m.finished, m.score = True, float(score)
        outcome = f"{'success' if success else 'no success'} after {steps} step(s), score {m.score:.3f}"
        if self.interactive:
            self._show()
            if m.row is None:
                m.row = self._progress.add_task(f"  {member}", total=1, info="")
            if success and 0 < m.t < m.total:  # stopped at its first success: the steps it took, not its most
                m.total = m.t
            self._progress.update(m.row, total=m.total, completed=m.total, info=outcome)
            self._update_count()
        else:
            self._line(f"{self._member_label(m)} done: {outcome}")

    def reach(self, done: int, text: str = "") -> None:
        """The count stands at ``done`` (a training's steps, which are the count itself, not a member's): the bar
        moves with ``text`` beside it; a log gets a line at most every ``every`` seconds, and at the last."""
        c = self._count
        if c is not None:
            c.done = min(max(int(done), 0), c.total)
        if self.interactive:
            self.info(text)
            self._update_count()
        elif c is None or c.done >= c.total or self.clock() - self._last_line >= self.every:
            where = f"{c.item} {c.done}/{c.total} " if c is not None else ""
            self._line(f"{where}{text}".rstrip())

    def advance(self, name: str, outcome: str = "done") -> None:
        """One item of the count finished (a volume of a batch, a volume x budget of an evaluation)."""
        c = self._count
        if c is not None:
            c.done = min(c.done + 1, c.total)
        if not self._members_are_counted():
            self._drop_members()  # the item's members are done with it
        if self.interactive:
            self._show()
            self._update_count()
        else:
            where = f"{c.item} {c.done}/{c.total} " if c is not None else ""
            self._line(f"{where}{name} {outcome}".rstrip())

    # -- plain lines --------------------------------------------------------------------------------------

    def _drop_members(self) -> None:
        """Forget the current phase's members; where they are a volume's (not the count), remove their bars."""
        if self.interactive and self._progress is not None and not self._members_are_counted():
            for m in self._members.values():
                if m.row is not None:
                    self._progress.remove_task(m.row)
        self._members = {}

    def _members_are_counted(self) -> bool:
        """Whether the count is of members (an attack); else of volumes, whose members run in each one's phase."""
        return self._count is not None and self._count.item == "member"

    def fraction(self) -> float | None:
        """How much of the count is done, counting the members' steps; None without a count. Where the count is of
        larger items (volumes), the members of the current phase count as that share of the item in progress."""
        c = self._count
        if c is None or c.total <= 0:
            return None
        if self._counted:
            running = sum(m.fraction for m in self._members.values() if m.index and not m.finished)
            return min((c.done + running) / c.total, 1.0)
        if self._members and not self._members_are_counted() and c.done < c.total:
            share = sum(m.fraction for m in self._members.values()) / max(len(self._members), self._expected)
            return min((c.done + share) / c.total, 1.0)
        return c.done / c.total

    def eta(self) -> float | None:
        """Seconds left of the count, from its pace so far; None where unknown (nothing done yet, or all done)."""
        f = self.fraction()
        if f is None or f <= 0.0 or f >= 1.0 or self._count is None:
            return None
        return (self.clock() - self._count.started) * (1.0 - f) / f

    def _line(self, text: str) -> None:
        now = self.clock()
        left = self.eta()
        stamp = f"{clock_text(now - self.started)} elapsed" + (f", ~{clock_text(left)} left" if left is not None else "")
        stream = self.stream or sys.stderr
        stream.write(f"{PREFIX} [{stamp}] {text}\n")
        stream.flush()
        self._last_line = now

    def _phase_label(self) -> str:
        if self.phase_name == MEMBERS and self._count is not None and self._members_are_counted():
            return f"members: {self._count.total} to run"
        return self.phase_name or ""

    def _member_label(self, m: _Member) -> str:
        if m.index and self._count is not None:
            return f"member {m.index}/{self._count.total} {m.name}"
        return f"member {m.name}"

    # -- rich bars ----------------------------------------------------------------------------------------

    def _show(self) -> None:
        """Start the terminal display (at the first event, so nothing is drawn before it)."""
        if self._progress is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        class Counted(MofNCompleteColumn):
            """``done/total``, and nothing on the phase's row (it has no total)."""

            def render(self, task):
                return Text("") if task.total is None else super().render(task)

        console = self.console or Console(stderr=True)
        self._progress = Progress(
            # markup off: member names carry options in brackets (apgd:js[seed=1]) that rich would read as tags
            TextColumn("{task.description}", style="bold", markup=False), BarColumn(), Counted(),
            TextColumn("{task.fields[info]}", markup=False),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, get_time=self.clock,
        )
        self._progress.start()
        if self.phase_name is not None:
            self._phase_row = self._progress.add_task(self._phase_label(), total=None, info="")
        if self._count is not None:
            self._count_row = self._progress.add_task(self._count.label, total=self._count.total, info=self._count.info)
            self._update_count()

    def _update_count(self) -> None:
        if self._count_row is None or self._count is None:
            return
        f = self.fraction()
        self._progress.update(self._count_row, completed=(f or 0.0) * self._count.total)
