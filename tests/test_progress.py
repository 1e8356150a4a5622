"""Progress: plain lines with elapsed time and ETA in a log, throttled steps, phases of an attack, and no
progress at all before an input error."""

import io
import re

from typer.testing import CliRunner

from medis3d.cli import app
from medis3d.progress import MEMBERS, Reporter, clock_text, notify

runner = CliRunner()
LINE = re.compile(r"^medis3d: \[(\d\d:\d\d) elapsed(?:, ~(\d\d:\d\d) left)?\] (.+)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(text: str) -> list[tuple[str, str | None, str]]:
    parsed = [LINE.match(line) for line in text.splitlines()]
    assert all(parsed), text
    return [m.groups() for m in parsed]


def test_plain_lines_carry_elapsed_and_eta_and_throttle_steps():
    clock, out = FakeClock(), io.StringIO()
    reporter = Reporter(interactive=False, stream=out, clock=clock, every=10)
    reporter.count("members", 2)
    reporter.phase("loading scan.nii.gz")
    clock.now += 4
    reporter.phase("clean prediction")
    clock.now += 6
    reporter.phase(MEMBERS)
    for t in range(21):  # one step a second: at most one line every 10 s
        reporter("apgd:js", t, 20, 0.9 - t / 100)
        clock.now += 1
    reporter.member_done("apgd:js", False, 20, 0.7)
    reporter("ce", 0, 20, 0.9)
    reporter.member_done("ce", True, 0, 0.4)
    reporter.phase("writing outputs")
    reporter.close()
    lines = _lines(out.getvalue())
    texts = [text for _, _, text in lines]
    assert texts[:3] == ["loading scan.nii.gz", "clean prediction", "members: 2 to run"]
    assert [e for e, _, _ in lines[:3]] == ["00:00", "00:04", "00:10"]
    steps = [line for line in lines if " step " in line[2]]
    # 21 steps in 21 s after the phase line: lines at 10 s and 20 s only
    assert [text for _, _, text in steps] == ["member 1/2 apgd:js step 10/20 score 0.800",
                                               "member 1/2 apgd:js step 20/20 score 0.700"]
    # the ETA is the members' pace: half of member 1 of 2 in 10 s, a quarter of the work: 30 s left
    assert steps[0][0] == "00:20" and steps[0][1] == "00:30"
    assert "member 1/2 apgd:js done: no success after 20 step(s), score 0.700" in texts
    done = [line for line in lines if line[2].startswith("member 2/2 ce done")]
    assert done and done[0][1] is None  # all members done: no ETA left to give
    assert texts[-1] == "writing outputs"


def test_batch_lines_per_volume_with_eta():
    clock, out = FakeClock(), io.StringIO()
    with Reporter(interactive=False, stream=out, clock=clock) as reporter:
        reporter.count("volumes", 4, item="volume")
        reporter.info("a | failed 0")  # terminal only: no line
        clock.now += 30
        reporter.advance("a", "done")
        clock.now += 30
        reporter.advance("b", "failed: b.nii.gz: no such file")
    lines = _lines(out.getvalue())
    assert lines == [("00:30", "01:30", "volume 1/4 a done"), ("01:00", "01:00", "volume 2/4 b failed: b.nii.gz: no such file")]
    assert clock_text(3725) == "1:02:05"


def test_training_steps_are_the_count_with_an_eta_from_their_pace():
    """harden's steps are the count itself: 10 of 400 steps in 10 s leaves 390 s (it once counted them as one
    member's share of a single step and said ~80 hours)."""
    clock, out = FakeClock(), io.StringIO()
    with Reporter(interactive=False, stream=out, clock=clock, every=10) as reporter:
        reporter.count("training steps", 400, item="step")
        reporter.phase("training")
        for step in range(1, 401):
            clock.now += 1
            reporter.reach(step, f"adversarial loss {1 / step:.3f}")
    lines = _lines(out.getvalue())
    assert lines[0] == ("00:00", None, "training")
    assert lines[1] == ("00:10", "06:30", "step 10/400 adversarial loss 0.100")
    assert len(lines) == 1 + 40 and lines[-1] == ("06:40", None, "step 400/400 adversarial loss 0.003")


def test_a_bare_callback_still_serves():
    calls = []
    notify(calls.append, "phase", "clean prediction")  # a plain function has no phase(): nothing happens
    notify(None, "phase", "x")
    assert calls == []


def _terminal_run(fail: bool) -> str:
    from rich.console import Console

    from medis3d.errors import InputError

    screen = io.StringIO()
    try:
        with Reporter(interactive=True, console=Console(file=screen, force_terminal=True, width=120)) as reporter:
            reporter.count("members", 1)
            reporter.phase("loading scan.nii.gz")
            if fail:
                raise InputError("scan.nii.gz: bad label")
            reporter.phase(MEMBERS)
            reporter("ce", 1, 2, 0.5)
            reporter.member_done("ce", False, 2, 0.5)
    except InputError:
        pass
    return screen.getvalue()


def test_terminal_bars_have_phase_and_eta_and_are_erased_after_an_input_error():
    erase = "\x1b[1A\x1b[2K"
    failed = _terminal_run(fail=True)
    assert "loading scan.nii.gz" in failed
    assert failed.endswith(erase * 2)  # the cursor went back over both rows (phase, members) and cleared them
    done = _terminal_run(fail=False)
    assert not done.endswith(erase)
    last = done.rsplit(erase, 1)[-1]  # the last frame: the bars stay, the phase row goes
    assert "to run" not in last and "1/1" in last and "no success after 2 step(s)" in last
    assert last.count("0:00:00") == 4  # elapsed and ETA on both rows
    assert "members: 1 to run" in done  # the phase was shown while it ran


def test_attack_with_a_missing_or_bad_scan_shows_no_progress(tiny_bundle, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a scan")
    for scan in (tmp_path / "missing.nii.gz", bad, tmp_path / "notes.txt"):
        if scan.suffix == ".txt":
            scan.write_text("hello")
        result = runner.invoke(app, ["attack", str(scan), "--bundle", str(tiny_bundle), "--losses", "ce", "--steps", "2",
                                     "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [result.stderr.strip()]  # one line: the error
        assert result.stderr.startswith(f"medis3d: error: {scan}"), result.stderr
        assert "elapsed" not in result.output and "loading" not in result.output
        assert not (tmp_path / "out").exists()


def test_attack_in_a_log_prints_phases_and_members(tiny_bundle, scan_file, tmp_path):
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--attacks", "igsm", "--losses", "ce",
                                 "--steps", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = _lines(result.stderr)
    texts = [text for _, _, text in lines]
    assert texts[:3] == ["loading scan.nii.gz", "clean prediction", "members: 1 to run"], texts
    assert any(t.startswith("member 1/1 ce done: ") for t in texts), texts
    assert texts[-1] == "writing outputs"
    assert "medis3d:" not in result.stdout  # stdout is the summary only
    assert "MedIS members" in result.stdout


def test_terminal_labels_are_shown_as_written_not_read_as_markup():
    """Member options in brackets stay on the bar, and a name that looks like a closing tag does not crash it."""
    import io

    from rich.console import Console

    from medis3d.progress import Reporter

    buffer = io.StringIO()
    with Reporter(interactive=True, console=Console(file=buffer, force_terminal=True, width=160)) as reporter:
        reporter.phase("members")
        reporter("apgd:js[random_start=1,seed=1]", 1, 2, 0.5)
        reporter.phase("loading odd[/x]name.nii.gz")
    assert "apgd:js[random_start=1,seed=1]" in buffer.getvalue() and "odd[/x]name" in buffer.getvalue()


def test_a_count_of_volumes_counts_each_volumes_members_as_its_share():
    """evaluate and batch count volumes; a volume's members report their steps in its phase, and the ETA counts
    them as the share of the volume in progress (not as items of the count)."""
    clock, out = FakeClock(), io.StringIO()
    with Reporter(interactive=False, stream=out, clock=clock, every=10) as reporter:
        reporter.count("volumes x budgets", 2, item="volume x budget")
        reporter.phase("loading a")
        reporter.phase("a at 8/255: 2 member(s) to run", members=2)
        reporter("apgd:js", 0, 10, 0.9)  # the second member has not started: it counts as not done
        clock.now += 10
        reporter("apgd:js", 5, 10, 0.8)  # a quarter of the first volume (half of one of two members): 1/8 in 10 s
        reporter("apgd:ce", 0, 10, 0.9)
        reporter.member_done("apgd:js", False, 10, 0.7)
        reporter.member_done("apgd:ce", True, 4, 0.4)
        clock.now += 10
        reporter.advance("a")
        assert reporter.fraction() == 0.5  # the finished volume's members are not counted twice
        reporter.phase("b at 8/255: 2 member(s) to run")
    texts = [(left, text) for _, left, text in _lines(out.getvalue())]
    assert texts[:2] == [(None, "loading a"), (None, "a at 8/255: 2 member(s) to run")]
    assert ("01:10", "member apgd:js step 5/10 score 0.800") in texts, texts
    assert ("00:20", "volume x budget 1/2 a done") in texts, texts
    assert any(text == "member apgd:ce done: success after 4 step(s), score 0.400" for _, text in texts)


def _progress_only(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("medis3d: notice:"))


def test_evaluate_and_batch_in_a_log_print_each_volumes_phases_and_members(tiny_bundle, scan_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    scan_file.rename(data / "scan.nii.gz")
    result = runner.invoke(app, ["evaluate", str(data), "--out", str(tmp_path / "eval"), "--bundle", str(tiny_bundle),
                                 "--attacks", "igsm", "--losses", "ce,dice", "--eps", "8/255", "--steps", "2"])
    assert result.exit_code == 0, result.output
    texts = [text for _, _, text in _lines(_progress_only(result.stderr))]
    assert texts[:3] == ["loading scan", "clean prediction", "scan at 8/255: 2 member(s) to run"], texts
    assert any(t.startswith("member ce done: ") for t in texts) and any(t.startswith("member dice done: ") for t in texts), texts
    assert texts[-1] == "volume x budget 1/1 scan done", texts

    result = runner.invoke(app, ["batch", str(data), "--out", str(tmp_path / "batch"), "--bundle", str(tiny_bundle),
                                 "--attacks", "igsm", "--losses", "ce", "--steps", "2"])
    assert result.exit_code == 0, result.output
    texts = [text for _, _, text in _lines(_progress_only(result.stderr))]
    assert texts[0] == "loading scan" and "members" in texts and "writing outputs" in texts, texts
    assert any(t.startswith("member ce done: ") for t in texts) and texts[-1] == "volume 1/1 scan done", texts


def test_an_apgd_member_reports_its_steps_up_to_its_last(tiny_target, scan_file):
    """APGD visits its start and each iterate (``steps + 1`` for one stage): its progress runs 0..steps of steps,
    so the last report reads 2/2 for two steps (it read 2/3)."""
    from medis3d.fusion import MedIS
    from medis3d.io import read_volume

    calls: list[tuple[int, int]] = []
    MedIS(tiny_target, members_spec=["apgd:ce"], eps=8 / 255, steps=2,
          progress=lambda member, t, total, score: calls.append((t, total)))(read_volume(scan_file))
    assert calls == [(0, 2), (1, 2), (2, 2)]
