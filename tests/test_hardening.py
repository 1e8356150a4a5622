"""How a run ends when something goes wrong around it: signals, the output folder, a second run.

Each case ends with one line, exit 2 (130 / 143 for a signal), nothing partial, the inputs untouched.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import save_nifti, synthetic_scan
from medis3d.cli import app
from medis3d.io.outputs import output_lock
from test_dicom import make_series

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--losses", "ce", "--steps", "2", "--eps", "16/255", "--step", "8/255", "--quiet"]


def _attack(tiny_bundle, scan: Path, out: Path, *extra: str):
    return runner.invoke(app, ["attack", str(scan), "--bundle", str(tiny_bundle), "--out", str(out), *FAST, *extra])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medis3d: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tiny_bundle, tmp_path, umask):
    hu, _ = synthetic_scan(3)
    series = tmp_path / "series"
    make_series(series, (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2))
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        result = _attack(tiny_bundle, series, out, "--output-format", "both")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (out / "adversarial").is_dir() and (out / "adversarial.nii.gz").is_file() and (out / "report.json").is_file()
    assert _modes(out) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def import_cpu_seconds() -> float:
    """CPU seconds the command line's imports take here (torch and MONAI: several on a slow machine)."""
    code = "import time; import medis3d.cli, medis3d.pipeline, medis3d.bundle; print(time.process_time())"
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=120, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the run's CPU time")
@pytest.mark.parametrize("signum, when", [(signal.SIGINT, "attack"), (signal.SIGTERM, "attack"), (signal.SIGINT, "imports")])
def test_a_signal_ends_the_run_cleanly(tiny_bundle, scan_file, tmp_path, import_cpu_seconds, signum, when):
    out = tmp_path / "out"
    before = scan_file.read_bytes()
    # a run that would never end: it cannot succeed (mean IoU <= -1) and has a million steps
    cmd = [sys.executable, "-m", "medis3d", "attack", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out),
           "--losses", "ce", "--steps", "1000000", "--success", "-1", "--quiet"]
    # during the imports, or well into the attack (the tiny bundle loads and predicts in well under 3 CPU seconds)
    wait = 0.3 if when == "imports" else import_cpu_seconds + 3.0
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while _cpu_seconds(proc.pid) < wait and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)  # one signal is enough
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
    assert lines[-1] == f"medis3d: interrupted by {signal.Signals(signum).name}; nothing partial was left behind", stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not _leftovers(tmp_path)
    assert scan_file.read_bytes() == before


def test_signals_wait_while_outputs_move_into_place():
    code = (
        "import os, signal, time\n"
        "from medis3d.signals import Interrupted, deferred, install\n"
        "install()\n"
        "try:\n"
        "    with deferred():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "        print('block finished', flush=True)\n"
        "    print('not reached', flush=True)\n"
        "except Interrupted as exc:\n"
        "    print('interrupted after the block', exc.exit_code, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["block finished", "interrupted after the block 143"], done.stdout + done.stderr


def test_output_path_that_is_a_file(tiny_bundle, scan_file, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("the user's file")
    line = _one_line_error(_attack(tiny_bundle, scan_file, taken))
    assert str(taken) in line and "is a file" in line
    assert taken.read_text() == "the user's file"
    line = _one_line_error(_attack(tiny_bundle, scan_file, taken / "sub"))  # a file where a parent folder should be
    assert "is a file" in line and taken.read_text() == "the user's file"


def test_output_folder_without_permission(tiny_bundle, scan_file, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the check see what another user would
        import medis3d.io.outputs as outputs

        real = os.access
        monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    else:
        parent.chmod(0o500)
    try:
        line = _one_line_error(_attack(tiny_bundle, scan_file, parent / "out"))
    finally:
        parent.chmod(0o755)
    assert str(parent / "out") in line and "permission denied" in line
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_leaves_nothing(tiny_bundle, scan_file, tmp_path, monkeypatch, err):
    import medis3d.pipeline as pipeline

    def full(path, data):  # the last file written (the report): every other output is already staged
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(pipeline, "write_json", full)
    before = scan_file.read_bytes()
    out = tmp_path / "out"
    line = _one_line_error(_attack(tiny_bundle, scan_file, out))
    assert str(out) in line and ("the disk is full" if err == errno.ENOSPC else "permission denied") in line
    assert not out.exists() and not _leftovers(tmp_path)
    assert scan_file.read_bytes() == before


def test_a_second_run_into_the_same_folder_is_refused(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        line = _one_line_error(_attack(tiny_bundle, scan_file, out))
        assert f"another medis3d run (pid {os.getpid()}) is writing into this folder" in line
        assert not out.exists()
    assert _attack(tiny_bundle, scan_file, out).exit_code == 0  # released: the folder is free again
    assert (out / "report.json").is_file()


def test_a_second_batch_into_the_same_folder_is_refused(tiny_bundle, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    save_nifti(inputs / "a.nii.gz", synthetic_scan(1)[0])
    out = tmp_path / "out"
    with output_lock(out, part="batch rank 0"):
        result = runner.invoke(app, ["batch", str(inputs), "--out", str(out), "--bundle", str(tiny_bundle), *FAST])
        assert "another medis3d run" in _one_line_error(result)
        assert not out.exists()
