"""Batch over a folder: NIfTI and DICOM inputs, one failure does not stop it, resumable, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import save_nifti, synthetic_scan
from test_dicom import make_series, structured_report

from medis3d.cli import app

runner = CliRunner()
FAST = ["--losses", "ce", "--steps", "2", "--eps", "16/255", "--step", "8/255", "--quiet"]


@pytest.fixture()
def batch_input(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    save_nifti(root / "a.nii.gz", synthetic_scan(1)[0])
    save_nifti(root / "sub" / "b.nii.gz", synthetic_scan(2)[0])
    hu, _ = synthetic_scan(3)
    make_series(root / "dicom", (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2), description="CT test")
    return root


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_batch_nifti_and_dicom_with_one_corrupt_input(tiny_bundle, batch_input, tmp_path):
    (batch_input / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(batch_input), "--out", str(out), "--bundle", str(tiny_bundle), *FAST])
    assert result.exit_code == 1, result.output  # some failed
    rows = _rows(out)
    assert len(rows) == 4
    assert rows["broken"]["status"] == "failed" and "broken.nii.gz" in rows["broken"]["error"]
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == 3
    dicom_row = next(r for n, r in rows.items() if n.startswith("CT_test"))
    # which series of its folder (a folder may hold several), as its report says; none for a file
    report = json.loads((out / dicom_row["name"] / "report.json").read_text())
    assert dicom_row["series_instance_uid"] == report["input"]["series_instance_uid"] != ""
    assert rows["broken"]["series_instance_uid"] == ""
    folder = out / dicom_row["name"]
    assert (folder / "adversarial").is_dir() and len(list((folder / "adversarial").iterdir())) == 32
    assert (out / "sub__b" / "adversarial.nii.gz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 1
    for r in done:
        assert float(r["clean_dice"]) == pytest.approx(1.0)  # reference = clean prediction
        assert float(r["linf_normalized"]) <= 16 / 255 + 1e-6


def test_a_batch_rerun_under_other_settings_attacks_every_volume_again(tiny_bundle, tmp_path):
    """A volume done under other settings (here another --eps) was counted as done and its old figures reported as
    this run's in summary.csv; it is attacked again. Under the same settings nothing runs again."""
    root = tmp_path / "in"
    root.mkdir()
    for i in (1, 2):
        save_nifti(root / f"s{i}.nii.gz", synthetic_scan(i)[0])
    out = tmp_path / "out"
    base = ["batch", str(root), "--out", str(out), "--bundle", str(tiny_bundle), "--losses", "ce", "--steps", "2", "--quiet"]
    assert runner.invoke(app, [*base, "--eps", "16/255", "--step", "8/255"]).exit_code == 0
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/status.json")}
    assert runner.invoke(app, [*base, "--eps", "4/255", "--step", "2/255"]).exit_code == 0
    second = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/status.json")}
    assert all(second[name] != mtime for name, mtime in first.items())  # both attacked again
    for row in _rows(out).values():
        assert row["status"] == "done" and float(row["linf_normalized"]) <= 4 / 255 + 1e-6  # this run's budget
    assert runner.invoke(app, [*base, "--eps", "4/255", "--step", "2/255"]).exit_code == 0
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/status.json")} == second


def test_a_batch_rerun_never_gives_a_volume_another_ones_figures(tiny_bundle, tmp_path):
    """A file added later whose safe name collides ('scan 1' beside 'scan_1') took the name 'scan_1' (it sorts first),
    and the resume counted it done from scan_1.nii.gz's folder, so its row showed the other volume's figures. Now the
    name stays with the file it names unchanged, the newcomer gets its own, and status.json records the input (path
    and contents digest): a file whose contents changed is attacked again, its folder replaced."""
    root = tmp_path / "in"
    root.mkdir()
    save_nifti(root / "scan_1.nii.gz", synthetic_scan(1)[0])
    out = tmp_path / "out"
    base = ["batch", str(root), "--out", str(out), "--bundle", str(tiny_bundle), *FAST]
    assert runner.invoke(app, base).exit_code == 0
    first = (out / "scan_1" / "status.json").stat().st_mtime_ns
    save_nifti(root / "scan 1.nii.gz", synthetic_scan(11, shape=(36, 36, 36))[0])  # sorts before scan_1
    assert runner.invoke(app, base).exit_code == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
    for name, row in rows.items():  # each row's figures come from its own input
        assert json.loads((out / name / "report.json").read_text())["input"]["path"] == row["input"]
    assert rows["scan_1"]["input"] == str(root / "scan_1.nii.gz")
    assert (out / "scan_1" / "status.json").stat().st_mtime_ns == first  # not attacked again
    status = json.loads((out / "scan_1" / "status.json").read_text())
    assert status["input"]["path"] == "scan_1.nii.gz" and len(status["input"]["digest"]) == 12
    save_nifti(root / "scan_1.nii.gz", synthetic_scan(12, shape=(32, 32, 32))[0])  # same name, other contents
    assert runner.invoke(app, base).exit_code == 0
    assert json.loads((out / "scan_1" / "report.json").read_text())["input"]["shape"] == [32, 32, 32]
    assert not list(out.glob(".*stale*"))


def test_colliding_batch_names_do_not_depend_on_the_other_files():
    from medis3d.batch import BatchItem
    from medis3d.io.volume import make_names_unique

    def names(*files: str) -> dict[str, str]:
        safe = {f: f.replace(" ", "_").replace("?", "_") for f in files}
        items = [BatchItem(safe[f], "nifti", Path(f), relative=f, own_name=safe[f] == f) for f in files]
        return {i.relative: i.name for i in make_names_unique(items, key=lambda i: i.relative, owns=lambda i: i.own_name)}

    alone, beside = names("scan_1"), names("scan 1", "scan_1", "scan?1")
    assert alone["scan_1"] == beside["scan_1"] == "scan_1"
    assert names("scan 1", "scan_1")["scan 1"] == beside["scan 1"] != "scan_1"
    assert len(set(beside.values())) == 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medis3d", *args]


def test_batch_killed_part_way_and_rerun(tiny_bundle, batch_input, tmp_path):
    out = tmp_path / "out"
    cmd = _cli("batch", str(batch_input), "--out", str(out), "--bundle", str(tiny_bundle), *FAST)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("*/status.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/status.json")}
    assert finished, "the batch did not finish any volume before it was killed"
    assert len(finished) < 3, "the batch finished before it could be killed; the test proves nothing"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = _rows(out)
    assert all(r["status"] == "done" for r in rows.values()) and len(rows) == 3
    for name, mtime in finished.items():  # volumes done before the kill were not redone
        assert (out / name / "status.json").stat().st_mtime_ns == mtime
    assert not list(out.glob(".*partial*"))  # no staging folder was left behind... or it was cleaned


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_processes_same_summary(tiny_bundle, batch_input, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    single, double = tmp_path / "one", tmp_path / "two"
    args = ["batch", str(batch_input), "--bundle", str(tiny_bundle), *FAST]
    one = subprocess.run(_cli(*args, "--out", str(single)), env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "medis3d", *args, "--out", str(double)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _rows(single), _rows(double)
    assert a.keys() == b.keys()
    for name in a:
        for column in ("status", "clean_dice", "adversarial_dice", "success", "selected_loss", "linf_native"):
            assert a[name][column] == b[name][column], (name, column)


def test_attack_dicom_series_both_formats_seg_and_anonymize(tiny_bundle, tmp_path):
    import pydicom

    from medis3d.io import read_volume

    hu, _ = synthetic_scan(5)
    files, native, _ = make_series(tmp_path / "series", (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2))
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(files[0]), "--bundle", str(tiny_bundle), "--losses", "ce", "--steps", "2",
                                 "--eps", "16/255", "--step", "8/255", "--output-format", "both", "--seg-format", "dicom",
                                 "--anonymize", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["input"]["format"] == "dicom" and report["outputs"]["measured_on"] == "dicom"
    series = read_volume(out / "adversarial")
    nifti = read_volume(out / "adversarial.nii.gz")
    assert np.allclose(series.affine, nifti.affine, atol=1e-4)
    assert np.abs(series.array - nifti.array).max() <= 0.5 + 1e-4  # within quantisation
    assert np.abs(series.array - native[None]).max() <= 16 / 255 * 400 + 1e-3  # budget holds in the series
    first = pydicom.dcmread(next((out / "adversarial").iterdir()))
    assert "ADVERSARIAL" in first.SeriesDescription and list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert str(first.PatientName) != "Doe^Jane" and first.PatientID != "PAT-001"
    seg = pydicom.dcmread(out / "prediction_adversarial.dcm")
    assert seg.Modality == "SEG"
    assert not any(p.name == "adversarial" for p in (tmp_path / "series").iterdir())  # source untouched
    # --anonymize reaches the SEGs: they kept the patient's name, ID, birth date, accession and every source UID
    source = [pydicom.dcmread(f) for f in files]
    private = {str(el.value) for ds in source for el in ds.iterall()
               if el.keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
                                 "InstitutionName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}
    for name in ("prediction_clean.dcm", "prediction_adversarial.dcm"):
        seg = pydicom.dcmread(out / name)
        assert not private & {str(el.value) for el in seg.iterall() if el.VR != "SQ"}, name
        assert (seg.PatientName, seg.PatientID, seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (
            first.PatientName, first.PatientID, first.StudyInstanceUID, first.FrameOfReferenceUID)  # one anonymised study
    # the adversarial SEG segments the adversarial series and references it, not the source series
    referenced = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in referenced] == [first.SeriesInstanceUID]
    written = {pydicom.dcmread(f).SOPInstanceUID for f in (out / "adversarial").iterdir()}
    assert {i.ReferencedSOPInstanceUID for i in referenced[0].ReferencedInstanceSequence} == written


def test_batch_keeps_the_dicom_skip_notices(tiny_bundle, tmp_path):
    """What `attack` of a DICOM folder reports as skipped is kept by batch: in that volume's status.json and its
    summary row (csv and json); every skip of the search, also beside no series, in summary.json's notices."""
    root = tmp_path / "in"
    hu, _ = synthetic_scan(3)
    make_series(root / "dicom", (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2), description="CT test")
    structured_report(root / "dicom" / "report.dcm")
    structured_report(root / "elsewhere" / "lonely.dcm")  # beside no series: no volume to report it
    save_nifti(root / "a.nii.gz", synthetic_scan(1)[0])
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(root), "--out", str(out), "--bundle", str(tiny_bundle), *FAST])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    dicom = next(r for n, r in rows.items() if n.startswith("CT_test"))
    assert dicom["status"] == "done"
    assert "skipped 1 DICOM file(s)" in dicom["notices"] and "report.dcm: Basic Text SR" in dicom["notices"]
    assert "lonely.dcm" not in dicom["notices"] and rows["a"]["notices"] == ""
    status = json.loads((out / dicom["name"] / "status.json").read_text())
    assert status["notices"] == [dicom["notices"]]
    summary = json.loads((out / "summary.json").read_text())
    assert next(r for r in summary["rows"] if r["name"] == dicom["name"])["notices"] == dicom["notices"]
    assert any("report.dcm" in n and "lonely.dcm" in n for n in summary["notices"])


def test_batch_follows_linked_case_folders_once_each(tmp_path):
    """A dataset laid out as links to its cases' folders (``in/case -> /data/case``) lost every linked folder: batch
    found only the NIfTI files linked one by one (1 of 3 volumes here, with no word). Linked folders are followed now,
    NIfTI and DICOM alike, each real folder once, and a link back up the tree is not a loop."""
    from medis3d.batch import discover

    data, root = tmp_path / "data", tmp_path / "in"
    (data / "case1").mkdir(parents=True)
    save_nifti(data / "case1" / "t1.nii.gz", synthetic_scan(1)[0])
    save_nifti(data / "case2.nii.gz", synthetic_scan(2)[0])
    hu, _ = synthetic_scan(3)
    make_series(data / "ct", (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2), description="CT test")
    root.mkdir()
    for name, target in (("case1", data / "case1"), ("case1_again", data / "case1"), ("case2.nii.gz", data / "case2.nii.gz"),
                         ("ct", data / "ct"), ("loop", root)):
        (root / name).symlink_to(target)
    items = discover(root)
    assert sorted((i.kind, i.relative.split("#")[0]) for i in items) == [
        ("dicom", "ct"), ("nifti", "case1/t1.nii.gz"), ("nifti", "case2.nii.gz")]


def test_a_rank_waits_for_the_others_longer_than_torchs_default(monkeypatch):
    """The ranks meet at a barrier when their shares are done: under torch's default process-group timeout (30
    minutes for gloo, 10 for NCCL) a rank that waited longer for another (one rank's volumes took that much longer,
    or a resumed batch's done volumes were its own) ended the batch with a RuntimeError and no summary."""
    from datetime import timedelta

    import torch.distributed as dist

    from medis3d.batch import Shard

    calls: list[dict] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    shard = Shard.from_env()
    assert (shard.rank, shard.world, shard.local_rank) == (1, 2, 1)
    assert calls and calls[0].get("timeout", timedelta(minutes=30)) >= timedelta(days=1)
    assert calls[0].get("backend") == "gloo"  # only barriers travel: no GPU, no NCCL watchdog


def test_the_summary_names_the_member_that_won_and_both_sizes_under_either_norm(tiny_bundle, tmp_path):
    """A row said only the winner's loss ('ce' for apgd:ce as for pgd:ce) and only the perturbation's L-inf, which under
    --norm l2 stood beside an L2 eps (0.185 of the range beside eps 2.0). Now it names the member, its attack, the norm,
    and the L2 beside the L-inf, as report.json has them."""
    root = tmp_path / "in"
    root.mkdir()
    save_nifti(root / "a.nii.gz", synthetic_scan(1)[0])
    for norm, eps in (("l2", "2"), ("linf", "16/255")):
        out = tmp_path / norm
        result = runner.invoke(app, ["batch", str(root), "--out", str(out), "--bundle", str(tiny_bundle), "--members",
                                     "pgd:ce,apgd:ce", "--steps", "2", "--eps", eps, "--norm", norm, "--quiet"])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "a" / "report.json").read_text())
        rows = [_rows(out)["a"], json.loads((out / "summary.json").read_text())["rows"][0]]
        for row in rows:
            assert row["selected_member"] == report["selected"]["member"] in ("pgd:ce", "apgd:ce")
            assert row["selected_attack"] == report["selected"]["attack"] and row["selected_loss"] == "ce"
            assert row["norm"] == norm
            for key in ("linf_normalized", "linf_native", "l2_normalized", "l2_native"):
                assert float(row[key]) == pytest.approx(report["perturbation"][key], rel=1e-5), key
        assert float(rows[0]["l2_normalized" if norm == "l2" else "linf_normalized"]) <= float(rows[0]["eps"]) + 1e-6
