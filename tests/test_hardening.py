"""How a run ends when something goes wrong around it (signals, the output folder, a second run),
and inputs beyond the usual (odd paths, links, NIfTI-2, scaled integers, lying headers).

Each case ends with one line, exit 2 (130 / 143 for a signal), nothing partial, the inputs untouched.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SCAN_AFFINE, save_nifti, synthetic_scan
from test_dicom import make_series

from medis3d.cli import app
from medis3d.io.outputs import output_lock

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    """The environment of a medis3d subprocess: this checkout first, the test's thread count (set by conftest)."""
    return dict(os.environ, PYTHONPATH=str(ROOT))
FAST = ["--losses", "ce", "--steps", "2", "--eps", "16/255", "--step", "8/255", "--quiet"]


def _attack(tiny_bundle, scan: Path, out: Path, *extra: str):
    return runner.invoke(app, ["attack", str(scan), "--bundle", str(tiny_bundle), "--out", str(out), *FAST, *extra])


def _scan_folder(folder: Path, count: int) -> Path:
    """A folder of ``count`` synthetic scans, v0.nii.gz ... (the inputs of a batch or a study)."""
    folder.mkdir()
    for k in range(count):
        save_nifti(folder / f"v{k}.nii.gz", synthetic_scan(k)[0])
    return folder


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
    code = "import time; import medis3d.cli, medis3d.workflow, medis3d.bundle; print(time.process_time())"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120, check=True)
    return float(done.stdout.split()[-1])


def _medis3d(*args: str) -> list[str]:
    return [sys.executable, "-m", "medis3d", *args]


def _interrupted(cmd: list[str], signum: int, after_cpu_s: float) -> tuple[int, str]:
    """Run ``cmd``, send it ``signum`` once it has used ``after_cpu_s`` CPU seconds (it must still be running), and
    return its exit code and stderr; one signal must be enough: it has 60 s to end."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see the run's CPU time")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while _cpu_seconds(proc.pid) < after_cpu_s and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


# a run that would never end: a million steps, every one run (the worst case keeps going past a success)
NEVER = ["--losses", "ce", "--steps", "1000000", "--select", "strongest", "--quiet"]


@pytest.mark.parametrize("signum, when", [(signal.SIGINT, "attack"), (signal.SIGTERM, "attack"), (signal.SIGINT, "imports")])
def test_a_signal_ends_the_run_cleanly(tiny_bundle, scan_file, tmp_path, import_cpu_seconds, signum, when):
    out = tmp_path / "out"
    before = scan_file.read_bytes()
    # during the imports, or well into the attack (the tiny bundle loads and predicts in well under 3 CPU seconds)
    wait = 0.3 if when == "imports" else import_cpu_seconds + 3.0
    code, stderr = _interrupted(_medis3d("attack", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out), *NEVER),
                                signum, wait)
    assert code == 128 + signum, stderr
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
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["block finished", "interrupted after the block 143"], done.stdout + done.stderr


def test_output_path_that_is_a_file(tiny_bundle, scan_file, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("the user's file")
    line = _one_line_error(_attack(tiny_bundle, scan_file, taken))
    assert str(taken) in line and "is a file" in line
    assert taken.read_text() == "the user's file"
    line = _one_line_error(_attack(tiny_bundle, scan_file, taken / "sub"))  # a file where a parent folder should be
    assert "is a file" in line and taken.read_text() == "the user's file"
    # predict and diagnose write one file: under a file, refused before the network runs (diagnose's checks took
    # minutes before a bare "File exists")
    for command in (["predict"], ["diagnose", "--steps", "1", "--queries", "2"]):
        line = _one_line_error(runner.invoke(app, [*command, str(scan_file), "--bundle", str(tiny_bundle),
                                                   "--out", str(taken / "out.nii.gz"), "--quiet"]))
        assert f"{taken}: the output path is a file" in line and taken.read_text() == "the user's file"
    folder = tmp_path / "a_folder.nii.gz"
    folder.mkdir()
    line = _one_line_error(runner.invoke(app, ["predict", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(folder)]))
    assert f"{folder}: is a folder" in line and list(folder.iterdir()) == []


def test_outputs_replace_only_an_earlier_medis3d_run(tiny_bundle, scan_file, tmp_path):
    """A rerun into an output folder of ours replaces its outputs; in a folder of the user's that holds a file or
    folder named like one of them (their own DICOM series called ``adversarial``, a ``report.json``), the attack is
    refused before it runs and nothing there changes (the DICOM folder used to be deleted whole)."""
    out = tmp_path / "out"
    assert _attack(tiny_bundle, scan_file, out).exit_code == 0
    first = json.loads((out / "report.json").read_text())
    assert _attack(tiny_bundle, scan_file, out, "--seed", "1").exit_code == 0  # ours: replaced
    assert json.loads((out / "report.json").read_text())["attack"]["config"]["seed"] == 1 != first["attack"]["config"]["seed"]
    mine = tmp_path / "mine"
    (mine / "adversarial").mkdir(parents=True)
    (mine / "adversarial" / "IM0001.dcm").write_bytes(b"the user's series")
    (mine / "report.json").write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    line = _one_line_error(_attack(tiny_bundle, scan_file, mine))
    assert f"{mine / 'adversarial'}: exists and is not an output of an earlier medis3d run" in line
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before and not _leftovers(tmp_path)


def test_predict_and_diagnose_replace_only_their_own_file_and_every_output_says_what_it_is(tiny_bundle, scan_file, tmp_path):
    """predict's --out replaces a label map medis3d wrote (its header description says so), diagnose's a diagnosis
    (its JSON schema), and both refuse a user's own file there before any work (it used to be replaced); the
    attack's files name themselves in their headers, the adversarial scan as ADVERSARIAL, where they carried the
    source scan's description."""
    from medis3d.io.nifti import nifti_description

    source = nib.load(str(scan_file))
    source.header["descrip"] = b"the user's T1"
    scan = tmp_path / "scan.nii.gz"
    nib.save(source, str(scan))
    out = tmp_path / "pred.nii.gz"
    predict = ["predict", str(scan), "--bundle", str(tiny_bundle), "--out", str(out)]
    assert runner.invoke(app, predict).exit_code == 0
    assert nifti_description(out) == "medis3d prediction"
    assert runner.invoke(app, predict).exit_code == 0  # a rerun replaces ours
    mine = tmp_path / "mine.nii.gz"
    mine.write_bytes(scan.read_bytes())  # the user's scan, copied: not a prediction of ours
    before = mine.read_bytes()
    line = _one_line_error(runner.invoke(app, [*predict[:-1], str(mine)]))
    assert f"{mine}: exists and is not a prediction medis3d wrote" in line and mine.read_bytes() == before
    checks = tmp_path / "checks.json"
    diagnose = ["diagnose", str(scan), "--bundle", str(tiny_bundle), "--steps", "1", "--queries", "2", "--quiet", "--out"]
    assert runner.invoke(app, [*diagnose, str(checks)]).exit_code in (0, 1)
    assert json.loads(checks.read_text())["schema"] == "medis3d.diagnose/1"
    assert runner.invoke(app, [*diagnose, str(checks)]).exit_code in (0, 1)  # a rerun replaces ours
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    line = _one_line_error(runner.invoke(app, [*diagnose, str(notes)]))
    assert f"{notes}: exists and is not a diagnosis medis3d wrote" in line and notes.read_text() == '{"mine": true}'
    attacked = tmp_path / "attacked"
    assert _attack(tiny_bundle, scan, attacked).exit_code == 0
    assert nifti_description(attacked / "adversarial.nii.gz").startswith("ADVERSARIAL medis3d eps ")
    assert nifti_description(attacked / "perturbation.nii.gz").startswith("medis3d perturbation")
    assert nifti_description(attacked / "prediction_clean.nii.gz") == "medis3d prediction clean"
    assert nifti_description(attacked / "prediction_adversarial.nii.gz") == "medis3d prediction adversarial"
    assert nifti_description(scan) == "the user's T1"


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
    import medis3d.workflow as workflow

    def full(path, data):  # the last file written (the report): every other output is already staged
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(workflow, "write_json", full)
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
    inputs = _scan_folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    with output_lock(out, part="batch rank 0"):
        result = runner.invoke(app, ["batch", str(inputs), "--out", str(out), "--bundle", str(tiny_bundle), *FAST])
        assert "another medis3d run" in _one_line_error(result)
        assert not out.exists()


# -- inputs --------------------------------------------------------------------------------------
def _scaled_int16(path: Path) -> Path:
    hu, _ = synthetic_scan(5)
    image = nib.Nifti1Image(np.round((hu + 1024) / 2).astype(np.int16), SCAN_AFFINE)
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("case", ["spaces and non-ASCII", "symlink", "nifti2 .nii", "scaled int16"])
def test_inputs_read_and_written_as_they_are(tiny_bundle, tmp_path, case):
    folder = tmp_path / "in put" / "ünïcødé"
    folder.mkdir(parents=True)
    hu, _ = synthetic_scan(4)
    if case == "spaces and non-ASCII":
        scan = save_nifti(folder / "scän 1.nii.gz", hu)
    elif case == "symlink":
        scan = folder / "link.nii.gz"
        scan.symlink_to(save_nifti(tmp_path / "real.nii.gz", hu))
    elif case == "nifti2 .nii":
        scan = folder / "scan.nii"
        nib.save(nib.Nifti2Image(hu.astype(np.float32), SCAN_AFFINE), str(scan))
    else:
        scan = _scaled_int16(folder / "scaled.nii.gz")
    before = scan.read_bytes()
    out = tmp_path / "öut put"
    result = _attack(tiny_bundle, scan, out)
    assert result.exit_code == 0, result.output
    assert scan.read_bytes() == before and (case != "symlink" or scan.is_symlink())
    source, written = nib.load(str(scan)), nib.load(str(out / "adversarial.nii.gz"))
    assert type(written) is type(source)  # NIfTI-2 stays NIfTI-2
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.get_data_dtype() == source.get_data_dtype()
    if case == "scaled int16":  # the scaling is kept exactly and the stored values stay integers of the source type
        assert (written.dataobj.slope, written.dataobj.inter) == (2.0, -1024.0)
        raw = np.asarray(written.dataobj.get_unscaled())
        assert raw.dtype == np.int16
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["path"] == str(scan)
    assert 0 < np.abs(written.get_fdata() - source.get_fdata()).max() <= report["attack"]["eps_native"] + 1e-4


def _small_nii(path: Path) -> bytearray:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    return bytearray(path.read_bytes())


def test_headers_claiming_more_than_the_file_or_memory_holds(tmp_path):
    from medis3d.errors import InputError
    from medis3d.io import read_volume

    truncated = tmp_path / "truncated.nii"
    raw = _small_nii(truncated)
    truncated.write_bytes(bytes(raw[:-100]))
    with pytest.raises(InputError, match=r"truncated.nii: the header describes 4x4x4 float32 voxels \(256 bytes\), but the file holds"):
        read_volume(truncated)
    huge = tmp_path / "huge.nii"
    raw = _small_nii(huge)
    struct.pack_into("<4h", raw, 40, 3, 30000, 30000, 30000)  # dim[0..3]
    huge.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"30000x30000x30000 float32 voxels \(108 TB\), but the file holds 256 bytes"):
        read_volume(huge)
    compressed = tmp_path / "huge.nii.gz"  # a compressed file's size says nothing: memory is the limit
    compressed.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(InputError, match=r"huge.nii.gz: the volume \(30000x30000x30000 voxels\) needs about 216 TB of memory"):
        read_volume(compressed)


def test_the_same_command_writes_the_same_bytes(tiny_bundle, scan_file, tmp_path):
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet",
                                     "--steps", "4", "--seed", "3"])
        assert result.exit_code == 0, result.output
        time.sleep(1.1)  # a gzip header stamped with the time would differ
    for name in ("adversarial.nii.gz", "perturbation.nii.gz", "prediction_clean.nii.gz", "prediction_adversarial.nii.gz"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

    def measured_apart(report: dict) -> dict:  # times and the process's peak memory are measurements, not results
        report.pop("time_s"), report.pop("peak_memory_mb")
        for member in report["members"]:
            member.pop("time_s"), member.pop("time_share_s")
        return report

    one, two = (measured_apart(json.loads((out / "report.json").read_text())) for out in outs)
    assert one == two


# -- resource limits -------------------------------------------------------------------------------
def test_a_memory_budget_no_setting_meets_is_refused_with_the_smallest(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "out"
    line = _one_line_error(_attack(tiny_bundle, scan_file, out, "--memory-budget", "1MB"))
    assert "--memory-budget 1 MB is below what any setting needs" in line and "give at least" in line
    smallest = int(line.rsplit("give at least ", 1)[1].split()[0])
    assert not out.exists()
    result = _attack(tiny_bundle, scan_file, out, "--memory-budget", f"{smallest}MB")  # the budget it names works
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["target"]["memory_plan"]["fits"]


def test_a_volume_too_large_for_the_machine_is_refused_before_the_attack(tiny_bundle, scan_file, tmp_path, monkeypatch):
    import medis3d.fusion as fusion
    import medis3d.memory as memory

    monkeypatch.setattr(memory, "available_device_bytes", lambda device: 2e6)  # a machine with 2 MB free
    monkeypatch.setattr(fusion.MedIS, "__call__", lambda *a, **k: pytest.fail("the attack started"))
    out = tmp_path / "out"
    line = _one_line_error(_attack(tiny_bundle, scan_file, out))
    assert str(scan_file) in line and "needs at least" in line and "more than the 2 MB free" in line
    assert not out.exists()


@pytest.mark.parametrize("device, why", [("tpu", "not a device name"), ("meta", "runs on cpu, cuda or mps, not meta"),
                                         ("cuda:3", "CUDA"), ("mps", "MPS")])
def test_a_device_that_is_not_there_is_refused(tiny_bundle, scan_file, tmp_path, device, why):
    if device.startswith("cuda") and torch.cuda.device_count() > 3 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} is present here")
    line = _one_line_error(_attack(tiny_bundle, scan_file, tmp_path / "out", "--device", device))
    assert f"--device {device}" in line and why in line and not (tmp_path / "out").exists()


def test_a_signal_stops_a_batch_cleanly_and_the_rerun_resumes(tiny_bundle, tmp_path, import_cpu_seconds):
    inputs = _scan_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    base = _medis3d("batch", str(inputs), "--out", str(out), "--bundle", str(tiny_bundle))
    code, stderr = _interrupted([*base, *NEVER], signal.SIGINT, import_cpu_seconds + 3.0)
    assert code == 130, stderr
    assert "Traceback" not in stderr and not _leftovers(tmp_path)
    assert not list(out.glob("*/report.json")) and not (out / "summary.csv").exists()
    rerun = subprocess.run([*base, *FAST], env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.parent.name for p in out.glob("*/report.json")) == ["v0", "v1", "v2"]


# -- batch volumes share a target, not its state ---------------------------------------------------------
def test_one_volume_leaves_the_target_as_it_found_it(tiny_bundle, tmp_path, monkeypatch):
    import medis3d.memory as memory
    from medis3d.bundle import load_bundle
    from medis3d.checkpointing import CheckpointedStage
    from medis3d.config import AttackConfig
    from medis3d.memory import MemoryPlan
    from medis3d.report import peak_memory_mb, reset_peak_memory
    from medis3d.workflow import run_attack

    target = load_bundle(tiny_bundle)
    before = (target.window.as_dict(), target.checkpointing, target.precision, list(target.notices))
    weights = {k: v.clone() for k, v in target.network.state_dict().items()}
    # the first volume's memory plan asks for window batch 1, checkpointing and AMP; the second's budget is plenty
    plans = iter([MemoryPlan(1, True, True, 10, 2**30, True), MemoryPlan(4, False, False, 10, 2**30, True)])
    monkeypatch.setattr(memory, "plan_memory", lambda *args, **kwargs: next(plans))
    options = AttackConfig(losses="ce", steps=2, eps=16 / 255, step=8 / 255, memory_budget=2**30)
    first = run_attack(save_nifti(tmp_path / "a.nii.gz", synthetic_scan(1)[0]), target, options, tmp_path / "a")
    assert first["target"]["settings"]["checkpoint"] and first["target"]["settings"]["amp"]
    assert (target.window.as_dict(), target.checkpointing, target.precision, list(target.notices)) == before
    assert not any(isinstance(m, CheckpointedStage) for m in target.network.modules())
    assert all(torch.equal(v, weights[k]) for k, v in target.network.state_dict().items())  # the same network, unwrapped
    second = run_attack(save_nifti(tmp_path / "b.nii.gz", synthetic_scan(2)[0]), target, options, tmp_path / "b")
    assert not second["target"]["settings"]["checkpoint"] and not second["target"]["settings"]["amp"]
    assert second["target"]["inferer"]["sw_batch_size"] == 4 and second["target"]["notices"] == before[3]
    if Path("/proc/self/clear_refs").exists():  # the peak reported is the run's, not the process's
        big = np.ones(200 * 2**20 // 8)
        high = peak_memory_mb()
        del big
        reset_peak_memory()
        assert peak_memory_mb() < high - 100


def test_a_signal_stops_an_evaluate_cleanly_and_the_rerun_resumes(tiny_bundle, tmp_path, import_cpu_seconds):
    images = _scan_folder(tmp_path / "images", 2)
    out = tmp_path / "study"
    base = _medis3d("evaluate", str(images), "--out", str(out), "--bundle", str(tiny_bundle), "--members", "pgd:ce",
                    "--eps", "8/255", "--quiet")
    code, stderr = _interrupted([*base, "--steps", "1000000"], signal.SIGTERM, import_cpu_seconds + 3.0)
    assert code == 143, stderr
    assert "Traceback" not in stderr and not _leftovers(tmp_path)
    assert not (out / "summary.json").exists() and not (out / "results.csv").exists()  # no partial study
    rerun = subprocess.run([*base, "--steps", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "summary.json").read_text()) and (out / "results.csv").is_file()
