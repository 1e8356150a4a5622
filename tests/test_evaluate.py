"""medis3d evaluate on a small datalist and on a folder; resumable."""

import csv
import json

import pytest
from typer.testing import CliRunner

from conftest import save_nifti, synthetic_scan

from medis3d.cli import app

runner = CliRunner()
ARGS = ["--attacks", "igsm,pgd", "--losses", "ce,dice", "--eps", "8/255,24/255", "--step", "4/255", "--steps", "2", "--quiet"]


def _dataset(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    entries = []
    for i in (1, 2):
        hu, seg = synthetic_scan(20 + i)
        save_nifti(root / "images" / f"case{i}.nii.gz", hu)
        save_nifti(root / "labels" / f"case{i}.nii.gz", seg)
        entries.append({"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "blobs", "test": entries}))
    return root


def test_evaluate_datalist_writes_tables_and_plot_and_resumes(tiny_bundle, tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), *ARGS])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    members = [r for r in rows if not r["attack"].startswith(("medis", "worst"))]
    assert len(members) == 2 * 2 * 4  # volumes x budgets x (attack x loss)
    fused = [r for r in rows if r["attack"] == "medis_full"]
    assert len(fused) == 2 * 2
    worst = [r for r in rows if r["attack"] == "worst_case"]
    assert len(worst) == 2 * 2
    for w in worst:  # the per-volume worst case: no member of that volume and budget left less Dice
        same = [float(r["adversarial_mean_iou"]) for r in members if r["volume"] == w["volume"] and r["eps"] == w["eps"]]
        assert float(w["adversarial_mean_iou"]) == min(same)
    for r in members:
        assert 0.0 <= float(r["flipped_fraction"]) <= 1.0
    for r in members:
        assert float(r["linf_normalized"]) <= float(r["eps"]) + 1e-6
        assert float(r["adversarial_dice"]) <= float(r["clean_dice"]) + 1e-6 or r["attack"] == "pgd"
    summary = json.loads((out / "summary.json").read_text())
    assert {"igsm:ce", "igsm:dice", "pgd:ce", "pgd:dice"} <= set(summary["per_member"])
    assert "medis_full" in summary["fusion"] and sum(summary["loss_wins"].values()) == 4
    # SEA's greedy dataset-level worst case is at most the dataset Dice of any single member's outcomes
    for eps, greedy in summary["greedy_dataset_dice"].items():
        assert 0.0 <= greedy <= 1.0
        for key in summary["per_member"]:
            pooled = [json.loads(r["counts"])["blob"] for r in members if f"{float(r['eps']):.6g}" == eps and r["member"] == key]
            assert len(pooled) == 2  # both volumes, [TP, FP, FN] of the blob class
            tp, fp, fn = (sum(c[i] for c in pooled) for i in range(3))
            assert greedy <= 2 * tp / (2 * tp + fp + fn) + 1e-9
    for eps, entry in summary["fusion"]["medis_full"].items():
        best_single = max(summary["per_member"][k][eps]["attack_success_rate"] for k in summary["per_member"])
        assert entry["attack_success_rate"] >= best_single  # fusion succeeds wherever any member does
    assert (out / "robustness.png").stat().st_size > 1000 and "medis_full" in (out / "report.md").read_text()
    cached = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    again = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), *ARGS])
    assert again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == cached  # nothing recomputed


def test_evaluate_folder_with_labels(tiny_bundle, tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "eval2"
    result = runner.invoke(app, ["evaluate", str(root / "images"), "--labels", str(root / "labels"), "--out", str(out),
                                 "--bundle", str(tiny_bundle), "--attacks", "igsm", "--losses", "ce", "--eps", "16/255", "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["volume"] for r in rows} == {"case1", "case2"}
    assert all(float(r["clean_dice"]) > 0.8 for r in rows)  # against the real labels


def _victim_bundle(tiny_bundle, folder, noise: float):
    """A copy of the tiny bundle; with ``noise``, its weights perturbed (another model of the same task)."""
    import shutil

    import torch

    shutil.copytree(tiny_bundle, folder)
    if noise:
        state = torch.load(folder / "models" / "model.pt")
        generator = torch.Generator().manual_seed(1)
        state = {k: v + noise * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() and v.numel() > 1 else v
                 for k, v in state.items()}
        torch.save(state, folder / "models" / "model.pt")
    return folder


def test_evaluate_transfer_scores_each_adversarial_on_every_victim(tiny_bundle, tmp_path):
    root = _dataset(tmp_path)
    twin = _victim_bundle(tiny_bundle, tmp_path / "twin", 0.0)  # the source's own weights: transfer must equal white-box
    other = _victim_bundle(tiny_bundle, tmp_path / "other", 0.3)
    out = tmp_path / "transfer"
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--source", str(tiny_bundle), "--attacks", "igsm",
            "--losses", "ce,dice", "--eps", "8/255,24/255", "--step", "4/255", "--steps", "2", "--quiet"]
    result = runner.invoke(app, [*args, "--victim", f"{twin},{other}"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * (2 + 3)  # volumes x budgets x (members + medis_igsm, medis_full, worst_case)
    for r in rows:
        transfer = json.loads(r["transfer"])
        assert set(transfer) == {"twin", "other"}
        assert abs(transfer["twin"]["adversarial_dice"] - float(r["adversarial_dice"])) < 1e-6
        assert abs(transfer["twin"]["clean_dice"] - float(r["clean_dice"])) < 1e-6  # both against the label
        assert 0.0 <= transfer["other"]["adversarial_dice"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    matrix = summary["transfer"]
    assert matrix["source"] == tiny_bundle.name and matrix["models"] == [tiny_bundle.name, "twin", "other"]
    for by_fusion in matrix["by_eps"].values():
        assert set(by_fusion) == {"medis_full", "worst_case"}
        for entry in by_fusion.values():
            assert abs(entry["twin"] - entry[tiny_bundle.name]) < 1e-6
    page = (out / "report.html").read_text()
    assert "Transfer: adversarials made on" in page and "twin" in page
    # a victim added later: the members run again for its scores; the others keep theirs
    third = _victim_bundle(tiny_bundle, tmp_path / "third", 0.3)
    again = runner.invoke(app, [*args, "--victim", f"twin,{third}".replace("twin", str(twin))])
    assert again.exit_code == 0, again.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(set(json.loads(r["transfer"])) >= {"twin", "third"} for r in rows)
    matrix = json.loads((out / "summary.json").read_text())["transfer"]
    assert matrix["models"] == [tiny_bundle.name, "twin", "third"]  # the victims asked for, not an earlier run's
    for eps, by_fusion in matrix["by_eps"].items():
        for fusion, entry in by_fusion.items():
            assert set(entry) == {tiny_bundle.name, "twin", "third"}
            scores = [json.loads(r["transfer"])["third"]["adversarial_dice"] for r in rows
                      if r["attack"] == fusion and f"{float(r['eps']):.6g}" == eps]
            assert len(scores) == 2 and abs(entry["third"] - sum(scores) / 2) < 1e-9
    summary = json.loads((out / "summary.json").read_text())
    for v in summary["volumes"]:  # the members' own time, each counted once
        member_time = sum(float(r["time_s"]) for r in rows if r["volume"] == v["volume"] and r["attack"] == "igsm")
        assert abs(v["time_s"] - member_time) < 1e-6


def test_evaluate_refuses_a_missing_victim_before_any_work(tiny_bundle, tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "nowhere"
    result = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle),
                                 "--victim", str(tmp_path / "no_such_bundle"), "--quiet"])
    assert result.exit_code != 0
    assert "no_such_bundle" in result.output and "Traceback" not in result.output
    assert not out.exists()
    same = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle),
                               "--victim", str(tiny_bundle), "--quiet"])
    assert same.exit_code != 0 and "named like the source" in same.output and not out.exists()


@pytest.mark.parametrize("bad", ["missing image", "label not a scan"])
def test_a_bad_entry_anywhere_in_the_dataset_is_one_line_before_any_work(tiny_bundle, tmp_path, bad):
    """A datalist whose last entry names a missing image, or a label that is not a scan, is refused before the first
    volume runs: one line naming the file, and no output folder (it used to run the volumes before it, or leave an
    empty folder)."""
    root = _dataset(tmp_path)
    data = json.loads((root / "dataset.json").read_text())
    if bad == "missing image":
        data["test"].append({"image": "images/nope.nii.gz"})
        named = root / "images" / "nope.nii.gz"
    else:
        named = root / "labels" / "notes.nii.gz"
        named.write_text("not a scan")
        data["test"].append({"image": "images/case1.nii.gz", "label": "labels/notes.nii.gz"})
    (root / "bad.json").write_text(json.dumps(data))
    out = tmp_path / "study"
    result = runner.invoke(app, ["evaluate", str(root / "bad.json"), "--out", str(out), "--bundle", str(tiny_bundle), *ARGS])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"medis3d: error: {named}"), result.output
    assert not out.exists()


def test_a_volume_that_fails_when_read_is_left_out_and_the_study_goes_on(tiny_bundle, tmp_path):
    """A label of another shape is found only when its volume is read: the study goes on without that volume (as
    batch does), says so in the summary, report.md and report.html, prints the error and exits 1; a study in which
    no volume can be read is one line, exit 2, and writes nothing."""
    root = _dataset(tmp_path)
    data = json.loads((root / "dataset.json").read_text())
    save_nifti(root / "images" / "case0.nii.gz", synthetic_scan(5)[0])
    save_nifti(root / "labels" / "small.nii.gz", synthetic_scan(5, shape=(30, 30, 30))[1])
    data["test"].insert(0, {"image": "images/case0.nii.gz", "label": "labels/small.nii.gz"})
    (root / "mixed.json").write_text(json.dumps(data))
    out = tmp_path / "study"
    result = runner.invoke(app, ["evaluate", str(root / "mixed.json"), "--out", str(out), "--bundle", str(tiny_bundle), *ARGS])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("medis3d: error: ")]
    assert len(errors) == 1 and str(root / "labels" / "small.nii.gz") in errors[0] and "shape" in errors[0], result.output
    assert "Traceback" not in result.output
    with open(out / "results.csv") as f:
        assert {row["volume"] for row in csv.DictReader(f)} == {"case1", "case2"}  # the two that could be read
    summary = json.loads((out / "summary.json").read_text())
    (failure,) = summary["failed_volumes"]
    assert failure["volume"] == "case0" and "small.nii.gz" in failure["error"] and len(summary["volumes"]) == 2
    report = (out / "report.md").read_text()
    assert "2 volume(s);" in report and "**1 volume(s) not evaluated**" in report and "small.nii.gz" in report
    assert 'id="failed"' in (out / "report.html").read_text()
    (root / "none.json").write_text(json.dumps({"test": data["test"][:1]}))
    nothing = tmp_path / "nothing"
    result = runner.invoke(app, ["evaluate", str(root / "none.json"), "--out", str(nothing), "--bundle", str(tiny_bundle), *ARGS])
    assert result.exit_code == 2 and result.output.count("medis3d: error: ") == 1 and "small.nii.gz" in result.output
    assert not nothing.exists()


def test_evaluate_resume_runs_only_the_members_not_cached(tiny_bundle, tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "resume"
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), "--attacks", "igsm,pgd",
            "--losses", "ce,dice", "--eps", "8/255", "--step", "4/255", "--steps", "2", "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    files = sorted(f for f in (out / "cache").rglob("*.json") if f.name != "overview.json")  # a member's outcome each
    assert len(files) == 2 * 4
    lost = [f for f in files if f.parent.name == "case1" and f.name.startswith(("igsm_dice", "pgd_ce"))]
    assert len(lost) == 2  # one member of each attack: pending are igsm:dice and pgd:ce, not the cross product
    kept = {f: f.stat().st_mtime_ns for f in files if f not in lost}
    for f in lost:
        f.unlink()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert all(f.is_file() for f in lost)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # nothing else ran again
    with open(out / "results.csv") as f:
        assert len([r for r in csv.DictReader(f) if not r["attack"].startswith(("medis", "worst"))]) == 2 * 4


def test_evaluate_resume_reuses_a_row_only_under_the_same_settings(tiny_bundle, tmp_path):
    """A rerun into the same --out with another --steps, --step, --seed or --success (the Carlini et al. checks:
    step doubling, restarts) runs its members anew; with the same settings it reuses every row."""
    root = _dataset(tmp_path)
    out = tmp_path / "study"
    base = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), "--attacks", "pgd",
            "--losses", "ce", "--eps", "8/255", "--quiet"]
    runs = {"steps 2": ["--step", "4/255", "--steps", "2"], "steps 4": ["--step", "4/255", "--steps", "4"],
            "step 2/255": ["--step", "2/255", "--steps", "4"], "seed 1": ["--step", "2/255", "--steps", "4", "--seed", "1"],
            "success 0.3": ["--step", "2/255", "--steps", "4", "--seed", "1", "--success", "0.3"]}
    seen: dict = {}
    for name, extra in runs.items():
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        files = {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*.json") if f.name != "overview.json"}
        new = {f for f in files if f not in seen}
        assert len(new) == 2, name  # both volumes' pgd:ce ran again under the new setting
        seen.update(files)
        with open(out / "results.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["member"] == "pgd:ce"]
        assert len(rows) == 2  # this run's rows only, not the earlier settings'
    again = runner.invoke(app, base + runs["success 0.3"])
    assert again.exit_code == 0
    assert {f: f.stat().st_mtime_ns for f in seen} == seen  # the same settings: every row reused


def test_evaluate_members_run_to_their_strongest_point_unless_told_to_stop_at_success(tiny_bundle, tmp_path):
    """By default a member that succeeds keeps going and its row is the lowest score it reached (a robustness curve
    that is not cut at the success threshold); --stop-at-success rows are where the member first succeeded. A cached
    row made under the other rule is run again only where the member succeeded (otherwise both rules ran alike)."""
    root = _dataset(tmp_path)
    out = tmp_path / "stop"
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), "--members", "pgd:ce",
            "--eps", "1/255,96/255", "--step", "24/255", "--steps", "6", "--quiet"]

    def rows():
        with open(out / "results.csv") as f:
            return {(r["volume"], r["eps"]): r for r in csv.DictReader(f) if r["attack"] == "pgd"}

    assert runner.invoke(app, [*args, "--stop-at-success"]).exit_code == 0
    stopped = rows()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_at_success"] is True and "--stop-at-success" in summary["settings"]["command"]
    assert "stopped at their first success" in (out / "report.md").read_text()
    # MedIS fusion's least perturbation compared where each member first succeeded, and the reports say so
    assert summary["medis_sizes"] == "first_success"
    assert "full fusion (by the sizes of the members' first successes)" in (out / "report.md").read_text()
    large = [k for k in stopped if float(k[1]) > 0.1]
    small = [k for k in stopped if float(k[1]) < 0.1]
    assert all(stopped[k]["success"] == "True" and int(stopped[k]["steps"]) < 6 for k in large)  # stopped early
    assert all(stopped[k]["success"] == "False" for k in small)
    files = {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*.json") if f.name != "overview.json"}

    result = runner.invoke(app, args)  # the default: every member runs all its iterations
    assert result.exit_code == 0, result.output
    full = rows()
    for k in large:  # rerun: the same iterates as far as the stop, then more; the row is the best of them
        assert full[k]["stop_at_success"] == "False"
        assert full[k]["success"] == "True"
        assert float(full[k]["adversarial_mean_iou"]) <= float(stopped[k]["adversarial_mean_iou"]) + 1e-9
        assert float(full[k]["linf_normalized"]) <= float(k[1]) + 1e-6
    assert any(float(full[k]["adversarial_mean_iou"]) < float(stopped[k]["adversarial_mean_iou"]) - 1e-3 for k in large)
    for f, mtime in files.items():  # the unsuccessful rows were kept, the successful ones made again
        again = f.stat().st_mtime_ns != mtime
        assert again == f.name.endswith(f"_{96 / 255:.6g}.json"), f.name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_at_success"] is False
    assert "ran all its iterations" in (out / "report.md").read_text()
    # here it compared the strongest iterates' sizes (igsm:ce at 47.8/255 where the first successes put igsm:dice at
    # 19.8/255), and the reports called it least perturbation as attack's fusion is, unsaid
    assert summary["medis_sizes"] == "strongest_iterate"
    report = (out / "report.md").read_text()
    assert "full fusion (by the sizes of the members' strongest iterates, not of their first successes)" in report
    assert "by the size of that strongest iterate, not where each first succeeded" in report
    assert "by the size of that strongest iterate, not where each first succeeded" in (out / "report.html").read_text()


def test_datalist_entries_with_channel_lists_and_missing_parts(tmp_path):
    """One reader for evaluate's and harden's datalist entries: a list of channel paths is one case named after its
    first channel, paths are relative to the datalist, and an entry without an image (or, where needed, a label)
    is one line naming the datalist."""
    import pytest

    from medis3d.errors import InputError
    from medis3d.study import datalist_cases

    datalist = tmp_path / "sub" / "dataset.json"
    cases = datalist_cases([{"image": ["t1.nii.gz", "t2.nii.gz"], "label": "seg.nii.gz"}, "solo.nii.gz"], datalist, "test")
    assert [c.name for c in cases] == ["t1", "solo"]
    assert str(cases[0].image) == f"{tmp_path / 'sub' / 't1.nii.gz'},{tmp_path / 'sub' / 't2.nii.gz'}"
    assert cases[0].label == tmp_path / "sub" / "seg.nii.gz" and cases[1].label is None
    with pytest.raises(InputError, match="dataset.json: a test entry has no image"):
        datalist_cases([{"label": "seg.nii.gz"}], datalist, "test")
    with pytest.raises(InputError, match="training entry solo.nii.gz has no label; labels needed"):
        datalist_cases(["solo.nii.gz"], datalist, "training", need_label="labels needed")


def test_evaluate_a_bare_network_under_an_l2_budget(tiny_bundle, tmp_path, monkeypatch):
    """evaluate takes --network/--transforms as attack does, and --norm l2: every row's L2 stays in the ball
    (native units), the study names the network, and a rerun under L-inf runs its members anew."""
    import torch

    from medis3d.bundle import load_bundle

    root = _dataset(tmp_path)
    scripted = tmp_path / "tiny.ts"
    torch.jit.script(load_bundle(tiny_bundle).network).save(str(scripted))
    transforms = tmp_path / "tiny_transforms.json"
    config = json.loads((tiny_bundle / "configs" / "inference.json").read_text())
    transforms.write_text(json.dumps({"image_key": "image", "preprocessing": config["preprocessing"], "inferer": config["inferer"]}))
    out = tmp_path / "study"
    eps = 2000.0  # native units: an L2 ball around the whole scan
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--network", str(scripted), "--transforms", str(transforms),
            "--members", "pgd:ce", "--eps", str(eps), "--eps-units", "native", "--step", "500", "--steps", "3", "--quiet"]
    result = runner.invoke(app, [*args, "--norm", "l2", "--checkpoint"])  # a TorchScript network cannot be checkpointed
    assert result.exit_code == 0, result.output
    assert any("TorchScript" in n for n in json.loads((out / "summary.json").read_text())["notices"])  # and the study says so
    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["member"] == "pgd:ce"]
    assert len(rows) == 2
    for r in rows:
        assert 0 < float(r["l2_native"]) <= eps * 1.001
        assert float(r["adversarial_dice"]) < float(r["clean_dice"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["options"]["norm"] == "l2" and "tiny" in json.dumps(summary)
    # the tables give the distortion in the budget's norm
    assert summary["norm"] == "l2"
    distortions = [e["mean_distortion_l2_native"] for e in summary["per_member"]["pgd:ce"].values() if e["attack_success_rate"]]
    assert all(0 < d <= eps * 1.001 for d in distortions)
    assert "| mean L2 of the successful (native units) |" in (out / "report.md").read_text()
    assert "mean L2 of the successful (native units)" in (out / "report.html").read_text()
    files = set((out / "cache").rglob("pgd_ce_*.json"))
    assert runner.invoke(app, [*args, "--norm", "linf"]).exit_code == 0
    assert len(set((out / "cache").rglob("pgd_ce_*.json")) - files) == 2  # another norm, another outcome
    bad = runner.invoke(app, [*args, "--norm", "l3"])
    assert bad.exit_code == 2 and "--norm must be linf or l2" in bad.output
    # the masking checks run in the study's ball: under L2 every check's budget is an L2 one (they once ran with the
    # L2 radius as an L-inf one, and were then refused)
    monkeypatch.setattr("medis3d.diagnose.QUERIES", 5)  # the random search's 200 forward passes are for real scans
    checked = runner.invoke(app, [*args, "--norm", "l2", "--diagnose"])
    assert checked.exit_code == 0, checked.output
    for path in sorted((out / "diagnose").glob("*.json")):
        diagnosis = json.loads(path.read_text())
        assert diagnosis["norm"] == "l2" and abs(diagnosis["eps_native"] - eps) < 1e-6 * eps
        sweep = {c["check"]: c for c in diagnosis["checks"]}["eps_sweep"]["sweep"]
        assert all("l2_native" in row and "eps_255" not in row for row in sweep)
    kept = sorted((out / "diagnose").glob("*.json"))
    assert len(kept) == 2
    # a diagnosis made by other checks (an older medis3d) is run again on resuming; one made by these is kept
    older = json.loads(kept[0].read_text())
    del older["setting"]["checks"]  # as an older medis3d kept it
    older["flagged"] = "older"
    kept[0].write_text(json.dumps(older))
    same = kept[1].read_text()
    assert runner.invoke(app, [*args, "--norm", "l2", "--diagnose"]).exit_code == 0
    assert json.loads(kept[0].read_text())["flagged"] in (True, False) and kept[1].read_text() == same


def test_evaluate_takes_the_shared_model_options_masks_and_classes(tiny_bundle, tmp_path):
    """evaluate runs on the options attack and batch share (the inferer, --classes, --amp ...) and gains --masks:
    a volume whose mask lets only a corner change keeps its segmentation, the same volume without a mask loses it."""
    import numpy as np

    root = _dataset(tmp_path)
    (root / "masks").mkdir()
    corner = np.zeros(synthetic_scan(21)[0].shape, np.uint8)
    corner[:3, :3, :3] = 1
    save_nifti(root / "masks" / "case1.nii.gz", corner)
    out = tmp_path / "masked"
    args = ["evaluate", str(root / "images"), "--labels", str(root / "labels"), "--masks", str(root / "masks"), "--out", str(out),
            "--bundle", str(tiny_bundle), "--members", "pgd:ce", "--eps", "32/255", "--step", "8/255", "--steps", "4",
            "--classes", "blob", "--overlap", "0.5", "--window-mode", "constant", "--sw-batch-size", "2", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = {r["volume"]: r for r in csv.DictReader(f) if r["member"] == "pgd:ce"}
    masked, free = rows["case1"], rows["case2"]  # measured: 0.951 -> 0.951 in the corner's mask; 0.965 -> 0.367 without one
    assert abs(float(masked["adversarial_dice"]) - float(masked["clean_dice"])) < 0.01
    assert float(free["adversarial_dice"]) < float(free["clean_dice"]) - 0.3
    options = json.loads((out / "summary.json").read_text())["settings"]["options"]
    assert options["masks"] == str(root / "masks") and options["classes"] == "blob" and options["overlap"] == 0.5
    assert "--masks" in json.loads((out / "summary.json").read_text())["settings"]["command"]
    # the inferer is part of what a cached row depends on: another overlap runs the members anew
    cached = {p.name for p in (out / "cache").rglob("pgd_ce_*.json")}
    again = runner.invoke(app, [a if a != "0.5" else "0.25" for a in args])
    assert again.exit_code == 0, again.output
    assert len({p.name for p in (out / "cache").rglob("pgd_ce_*.json")} - cached) == 2
    for dataset, bad, says in ((args[1], ["--classes", "tumour"], "--classes: 'tumour' is not an output channel"),
                               (args[1], ["--masks", str(root / "nowhere")], "--masks must be a folder"),
                               (str(root / "dataset.json"), ["--masks", str(root / "masks")], "a datalist gives each entry's own")):
        refused = runner.invoke(app, ["evaluate", dataset, "--out", str(tmp_path / "bad"), "--bundle", str(tiny_bundle), *bad, "--quiet"])
        assert refused.exit_code == 2 and says in refused.output and "Traceback" not in refused.output
        assert not (tmp_path / "bad").exists()


def test_victims_are_scored_on_the_sources_classes(tiny_bundle, tmp_path):
    from medis3d.bundle import load_bundle
    from medis3d.cli import _load_victims

    source = load_bundle(tiny_bundle).select_classes("blob")
    (victim,) = _load_victims(str(_victim_bundle(tiny_bundle, tmp_path / "other", 0.3)), source, "tiny", False, "cpu")
    assert victim.target.attacked_classes == source.attacked_classes == (1,)
    (everything,) = _load_victims(str(tmp_path / "other"), load_bundle(tiny_bundle), "tiny", False, "cpu")
    assert everything.target.attacked_classes is None


@pytest.mark.parametrize("command", ["evaluate", "evaluate --no-quiet", "batch"])
def test_a_folder_of_the_users_with_a_file_named_like_an_output_is_refused(tiny_bundle, tmp_path, command):
    """evaluate and batch write their tables into the folder named by --out: where it holds a file named like one of
    them that an earlier run of theirs did not write (a user's own report.md or summary.csv), the run is refused before
    any work and the folder is left as it was (those files used to be replaced); a rerun into its own folder goes on."""
    root = _dataset(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    name = "summary.csv" if command == "batch" else "report.md"
    (out / name).write_text("my notes")
    if command == "batch":
        args = ["batch", str(root / "images"), "--out", str(out), "--bundle", str(tiny_bundle), "--losses", "ce",
                "--steps", "1", "--eps", "8/255", "--quiet"]
    else:
        args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), *ARGS]
        args = [a for a in args if a != "--quiet"] if command.endswith("--no-quiet") else args
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == (f"medis3d: error: {out / name}: exists and is not an output of an earlier medis3d "
                         f"{command.split()[0]}; medis3d never writes over it, choose another --out"), result.output
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "my notes"
    ours = tmp_path / "ours"
    assert runner.invoke(app, [*args[:3], str(ours), *args[4:]]).exit_code in (0, 1)
    assert runner.invoke(app, [*args[:3], str(ours), *args[4:]]).exit_code in (0, 1)  # a rerun into its own folder
    assert (ours / name).is_file()


def test_the_greedy_dataset_worst_case_is_no_higher_than_each_volumes_own_worst():
    """SEA's greedy worst case, started from the first member everywhere, stopped at 0.4424 here although each
    volume's own worst outcome pools to 0.4291 (it changes one volume at a time and neither change alone helps);
    it now starts from both and takes the lower."""
    from medis3d.study import greedy_worst_case

    options = {"v0": [{"c0": [13, 12, 37], "c1": [3, 3, 2]}, {"c0": [40, 13, 10], "c1": [0, 1, 5]}],
               "v1": [{"c0": [28, 401, 472], "c1": [48, 18, 2]}, {"c0": [245, 30, 255], "c1": [7, 4, 43]}]}
    rows = [{"volume": v, "eps": 0.03, "attack": "apgd", "counts": json.dumps(o)} for v, outcomes in options.items() for o in outcomes]
    assert greedy_worst_case(rows)["0.03"] == pytest.approx(0.4291, abs=1e-4)


def test_evaluate_resume_runs_anew_where_a_file_or_the_model_changed_in_place(tiny_bundle, tmp_path):
    """Cached outcomes were matched by the files' paths and the bundle's folder and network names: a label edited in
    place, or weights retrained into the same bundle folder, reused outcomes of another label or another model. Now
    the key holds the files' contents and the model's fingerprint (weights, preprocessing, classes)."""
    import shutil

    import numpy as np
    import torch

    root = _dataset(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    out = tmp_path / "study"
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(bundle), "--attacks", "pgd",
            "--losses", "ce", "--eps", "8/255", "--step", "4/255", "--steps", "2", "--quiet"]

    def outcomes() -> dict:
        return {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*.json") if f.name != "overview.json"}

    assert runner.invoke(app, args).exit_code == 0
    first = outcomes()
    assert len(first) == 2
    _, seg = synthetic_scan(21)
    seg[:, :, : seg.shape[2] // 2] = 0  # case1's label edited in place
    save_nifti(root / "labels" / "case1.nii.gz", seg.astype(np.uint8))
    assert runner.invoke(app, args).exit_code == 0
    second = outcomes()
    assert {f.parent.name for f in second if f not in first} == {"case1"}  # case2's row reused
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, bundle / "models" / "model.pt")
    assert runner.invoke(app, args).exit_code == 0
    assert len([f for f in outcomes() if f not in second]) == 2  # retrained in place: both volumes anew


def test_the_worst_case_row_is_the_member_with_the_lowest_dice():
    """With two classes, member A erases one (mean Dice 0.500, mean IoU 0.500) and B damages both (Dice 0.571, IoU
    0.400): the worst case was chosen by mean IoU and reported B's Dice, 0.571, above A's 0.500."""
    from medis3d.study import fusion_rows

    rows = [{"volume": "v", "eps": 0.03, "attack": "apgd", "loss": name, "member": f"apgd:{name}", "success": iou <= 0.5,
             "adversarial_mean_iou": iou, "adversarial_dice": dice, "steps": 10, "linf_native": 8.0, "l2_native": 100.0}
            for name, dice, iou in (("A", 0.5, 0.5), ("B", 4 / 7, 0.4))]
    worst = next(r for r in fusion_rows(rows, None) if r["attack"] == "worst_case")
    assert worst["loss"] == "apgd:A" and worst["adversarial_dice"] == 0.5


def test_the_worst_case_counts_a_volume_broken_when_any_member_broke_it():
    """The lowest-Dice member need not be a successful one (success is decided on mean IoU): JS leaves Dice 0.550
    (IoU 0.526, not broken), margin 0.620 (IoU 0.449, broken). The worst case reported a success rate of 0 where the
    MedIS fusion reported 1."""
    from medis3d.study import fusion_rows

    rows = [{"volume": "v", "eps": 0.03, "attack": "apgd", "loss": name, "member": f"apgd:{name}", "success": iou <= 0.5,
             "adversarial_mean_iou": iou, "adversarial_dice": dice, "steps": 10, "linf_native": 8.0, "l2_native": 100.0}
            for name, dice, iou in (("js", 0.55, 0.526), ("margin", 0.62, 0.449))]
    fused = {r["attack"]: r for r in fusion_rows(rows, None)}
    assert fused["worst_case"]["loss"] == "apgd:js" and fused["worst_case"]["adversarial_dice"] == 0.55
    assert fused["worst_case"]["success"] and fused["medis_full"]["success"]


def test_a_class_absent_from_the_reference_is_not_a_class_the_model_got_right():
    """Three foreground classes, only the first in the reference: a member that erases it left 'Dice 0.667' (the
    two absent classes counted 1 each) in the member's row, the worst case and the greedy dataset figure. Dice is
    now averaged over the classes present in the reference, as mean IoU is."""
    from types import SimpleNamespace

    import numpy as np

    from medis3d.metrics import mean_dice
    from medis3d.study import fusion_rows, greedy_worst_case, member_row

    class Three:
        foreground_classes = [1, 2, 3]

        def class_name(self, c):
            return f"class_{c}"

        def masks(self, seg):
            return np.stack([seg == c for c in self.foreground_classes])

    ref = np.zeros((16, 16, 16), np.uint8)
    ref[4:10, 4:10, 4:10] = 1
    half = ref.copy()
    half[4:10, 4:10, 4:7] = 0
    volume = SimpleNamespace(array=np.zeros((1, 16, 16, 16), np.float32), spacing=(1.0, 1.0, 1.0))
    rows = [member_row(Three(), SimpleNamespace(name="v"), SimpleNamespace(name=name, attack="apgd", loss=name), 0.03,
                       SimpleNamespace(prediction=pred, adversarial=volume.array, success=True, steps=5, time_s=0.0, cost_s=0.0),
                       ref, ref, volume, 1.0)
            for name, pred in (("erased", np.zeros_like(ref)), ("half", half))]
    assert [r["adversarial_dice"] for r in rows] == [0.0, pytest.approx(2 / 3)] and rows[0]["clean_dice"] == 1.0
    assert next(r for r in fusion_rows(rows, None) if r["attack"] == "worst_case")["adversarial_dice"] == 0.0
    assert greedy_worst_case(rows)["0.03"] == 0.0
    masks = Three().masks
    assert mean_dice(masks(np.zeros_like(ref)), masks(np.zeros_like(ref))) == 1.0  # nothing to find, nothing found
    assert mean_dice(masks(ref), masks(np.zeros_like(ref))) == 0.0


def test_a_rerun_that_writes_the_budget_another_way_fuses_each_volume_once(tiny_bundle, tmp_path):
    """The cache keys a budget by 6 digits, so 0.188235 reuses the rows of 48/255; the reused rows kept their own
    eps and the fusions grouped by the exact float: two worst cases per volume, each over part of the members (the
    reviewer's study: 4 volumes of 2, robust Dice 0.588 where the worst case was 0.242)."""
    root = _dataset(tmp_path)
    out = tmp_path / "study"
    base = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle), "--step", "4/255",
            "--steps", "2", "--quiet"]
    assert runner.invoke(app, [*base, "--members", "pgd:ce", "--eps", "48/255"]).exit_code == 0
    assert runner.invoke(app, [*base, "--members", "pgd:ce,igsm:ce", "--eps", "0.188235"]).exit_code == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    worst = [r for r in rows if r["attack"] == "worst_case"]
    assert len(worst) == 2 and len({r["eps"] for r in rows}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fusion"]["worst_case"]["0.188235"]["volumes"] == 2


def test_a_victim_of_the_same_name_with_other_weights_is_scored_anew(tiny_bundle, tmp_path):
    """Cached transfer scores were matched by the victim's name: a rerun whose victim `v` held other weights (here
    the source's own, where transfer must equal white-box) reported the earlier `v`'s scores. Each score now
    records the victim's model fingerprint and a row is reused only for the same model."""
    root = _dataset(tmp_path)
    out = tmp_path / "study"
    args = ["evaluate", str(root / "dataset.json"), "--out", str(out), "--source", str(tiny_bundle), "--attacks", "igsm",
            "--losses", "ce", "--eps", "24/255", "--step", "8/255", "--steps", "2", "--quiet"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert runner.invoke(app, [*args, "--victim", str(_victim_bundle(tiny_bundle, tmp_path / "a" / "v", 0.3))]).exit_code == 0
    assert runner.invoke(app, [*args, "--victim", str(_victim_bundle(tiny_bundle, tmp_path / "b" / "v", 0.0))]).exit_code == 0
    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["attack"] == "igsm"]
    assert len(rows) == 2
    for r in rows:
        assert abs(json.loads(r["transfer"])["v"]["adversarial_dice"] - float(r["adversarial_dice"])) < 1e-6


def test_the_worst_case_keeps_a_smaller_budgets_adversarial_and_flags_members_that_stop_short(tmp_path):
    """A member that leaves Dice 0.40 at 8/255 and 0.70 at 16/255 stopped short at 16/255: its 8/255 adversarial lies
    inside the 16/255 ball. The worst case at 16/255 reported 0.60 (the other member's); it now reports 0.40, found
    at 8/255, never above the smaller budget's. The greedy dataset figure likewise, and the rise is flagged."""
    from medis3d.study import fusion_rows, greedy_worst_case, rises_with_budget

    def row(loss, eps, dice, iou, counts):
        return {"volume": "v", "eps": eps, "attack": "apgd", "loss": loss, "member": f"apgd:{loss}", "success": iou <= 0.3,
                "clean_dice": 1.0, "linf_normalized": eps, "adversarial_mean_iou": iou, "adversarial_dice": dice, "steps": 10, "linf_native": 8.0, "l2_native": 100.0,
                "counts": json.dumps({"c1": counts})}

    small, large = 8 / 255, 16 / 255
    rows = [row("ce", small, 0.40, 0.25, [20, 0, 60]), row("js", small, 0.80, 0.67, [80, 20, 20]),
            row("ce", large, 0.70, 0.54, [70, 30, 30]), row("js", large, 0.60, 0.43, [60, 20, 60])]
    worst = {f"{r['eps']:.6g}": r for r in fusion_rows(rows, None) if r["attack"] == "worst_case"}
    assert worst[f"{small:.6g}"]["adversarial_dice"] == 0.40 and worst[f"{small:.6g}"]["found_at_eps"] == small
    assert worst[f"{large:.6g}"]["adversarial_dice"] == 0.40 and worst[f"{large:.6g}"]["eps"] == large
    assert worst[f"{large:.6g}"]["found_at_eps"] == small and worst[f"{large:.6g}"]["success"]
    greedy = greedy_worst_case(rows)
    assert greedy[f"{large:.6g}"] == greedy[f"{small:.6g}"] == pytest.approx(0.40)
    assert rises_with_budget(rows) == [{"volume": "v", "member": "apgd:ce", "eps": f"{large:.6g}", "dice": 0.70,
                                        "smaller_eps": f"{small:.6g}", "smaller_dice": 0.40}]
    within_noise = [row("ce", small, 0.40, 0.25, [20, 0, 60]), row("ce", large, 0.41, 0.26, [20, 1, 60])]
    assert rises_with_budget(within_noise) == []
    from medis3d.html_report import evaluation_page
    from medis3d.study import markdown_report, summarise

    summary = summarise(rows + fusion_rows(rows, None))
    assert summary["fusion"]["worst_case"][f"{large:.6g}"]["mean_robust_dice"] == 0.40
    assert "stopped short" in markdown_report(summary, 1) and "v, apgd:ce: Dice 0.700 at 16/255, 0.400 at 8/255" in markdown_report(summary, 1)
    assert 'id="rises-warning"' in evaluation_page({**summary, "volumes": []}, tmp_path)


def test_evaluate_diagnose_takes_the_studys_success_threshold(tiny_bundle, tmp_path, monkeypatch):
    """evaluate --success X --diagnose: the checks' sweep counts a success by X, as the study does (it ran at 0.5
    whatever --success said: on the tests' model its smallest success was 32/255, mean IoU 0.20, where 0.1 needs 64/255)."""
    import medis3d.diagnose

    given: list[dict] = []

    class Recorded(medis3d.diagnose.Diagnose):
        def __init__(self, *args, **kwargs):
            given.append(kwargs)
            super().__init__(*args, **kwargs)

        def __call__(self, volume, reference=None):
            return medis3d.diagnose.Diagnosis("scan", self.member.name, self.eps)

    monkeypatch.setattr(medis3d.diagnose, "Diagnose", Recorded)
    root = _dataset(tmp_path)
    result = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(tmp_path / "study"), "--bundle",
                                 str(tiny_bundle), "--members", "pgd:ce", "--eps", "8/255", "--steps", "1",
                                 "--success", "0.2", "--diagnose", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [kwargs.get("success") for kwargs in given] == [0.2, 0.2]


def test_an_overview_drawn_under_other_settings_is_not_shown(tiny_bundle, tmp_path):
    """The overview was matched by member and budget only: a rerun with --steps 2 after one with --steps 4 reused its
    cached rows (Dice 0.939 in the table) and showed the --steps 4 run's picture of the same member (0.923 in its
    title). It is shown only where it was drawn from the outcome this run reports."""
    import hashlib

    root = _dataset(tmp_path)
    data = json.loads((root / "dataset.json").read_text())
    (root / "one.json").write_text(json.dumps({"test": data["test"][:1]}))
    out = tmp_path / "study"
    base = ["evaluate", str(root / "one.json"), "--out", str(out), "--bundle", str(tiny_bundle), "--members", "pgd:ce",
            "--eps", "32/255", "--quiet"]

    def run(steps: str) -> tuple[dict, str | None]:
        result = runner.invoke(app, base + ["--steps", steps])
        assert result.exit_code == 0, result.output
        volume = json.loads((out / "summary.json").read_text())["volumes"][0]
        shown = volume["overview"] and hashlib.sha1((out / volume["overview"]).read_bytes()).hexdigest()
        return volume, shown

    _, first = run("2")
    assert first  # drawn by this run
    assert run("2")[1] == first  # an unchanged rerun reuses the rows and still shows their overview
    _, other = run("4")
    assert other and other != first
    volume, shown = run("2")
    assert shown != other  # not the --steps 4 run's picture beside this run's Dice


def test_evaluate_diagnose_flags_reach_report_md_and_stderr(tiny_bundle, tmp_path, monkeypatch):
    """evaluate --diagnose once kept its flags to summary.json and report.html: report.md had no word of them and
    nothing was printed. Now report.md has a section (each volume, each flag and its likely cause) and a flag is a
    warning on stderr, as a budget that leaves more Dice is."""
    import medis3d.study as study

    real = study._diagnose_case
    flagged_cases = []

    def diagnose_case(target, case, *args, **kwargs):
        result = real(target, case, *args, **kwargs)
        if case.name == "case2":  # the real checks, and one flag of the kind a masked model raises
            result = {**result, "flagged": True, "checks": [*result["checks"], {"check": "finite_differences", "flagged": True,
                                                                                  "cause": "a layer zeroes it"}]}
            flagged_cases.append(case.name)
        return result

    monkeypatch.setattr("medis3d.diagnose.QUERIES", 5)
    monkeypatch.setattr(study, "_diagnose_case", diagnose_case)
    root = _dataset(tmp_path)
    out = tmp_path / "study"
    result = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle),
                                 "--members", "apgd:ce", "--eps", "8/255", "--steps", "2", "--diagnose"])
    assert result.exit_code == 0, result.output
    assert flagged_cases == ["case2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnose"]["case2"]["causes"]["finite_differences"] == "a layer zeroes it"
    report = (out / "report.md").read_text()
    section = report.split("## Gradient-masking checks")[1]
    assert "**finite_differences**: a layer zeroes it (`diagnose/case2.json`)" in section
    case1 = summary["diagnose"]["case1"]
    assert ("- case1: no flag" in section) == (not case1["flagged"])
    assert "medis3d: warning: the gradient-masking checks flag" in result.output and "case2: " in result.output
    quiet = study.diagnose_lines({"a": {"flagged": False, "flags": []}})
    assert "No check flags any volume." in "\n".join(quiet) and study.diagnose_words({"a": {"flagged": False, "flags": []}}) is None


def test_evaluate_and_attack_name_a_ct_series_units_alike(tiny_bundle, tmp_path, monkeypatch):
    """evaluate's overview of a CT series had its perturbation's colour bar in "intensity units" where attack's
    overview of the same series said "HU": evaluate passed no units. Both now name them by one rule."""
    import numpy as np

    from test_dicom import make_series

    import medis3d.report

    hu, _ = synthetic_scan(3)
    make_series(tmp_path / "ct", (hu.astype(np.int32) + 1024).astype(np.int16), spacing=(1.2, 1.2, 1.2))
    (tmp_path / "one.json").write_text(json.dumps({"test": [{"image": "ct"}]}))
    seen: list[str] = []
    real = medis3d.report.render_overview
    monkeypatch.setattr(medis3d.report, "render_overview", lambda *a, **k: seen.append(k["units"]) or real(*a, **k))
    fast = ["--bundle", str(tiny_bundle), "--members", "pgd:ce", "--eps", "16/255", "--steps", "2", "--quiet"]
    assert runner.invoke(app, ["evaluate", str(tmp_path / "one.json"), "--out", str(tmp_path / "study"), *fast]).exit_code == 0
    assert runner.invoke(app, ["attack", str(tmp_path / "ct"), "--out", str(tmp_path / "attack"), *fast]).exit_code == 0
    assert seen == ["HU", "HU"]


def test_a_volumes_time_adds_the_members_shares_not_their_overlapping_spans(tmp_path):
    """Under --together the members' spans (time_s) overlap: a volume's time, their sum, said 41.0 s for members that
    ran 25.7 s together. It adds their shares (time_share_s); a row cached before there were shares adds its time_s."""
    from medis3d.study import per_volume

    def row(member, time_s, share=None):
        r = {"volume": "v", "clean_dice": 1.0, "eps": 0.1, "attack": member.split(":")[0], "member": member,
             "loss": "ce", "adversarial_dice": 0.5, "success": True, "time_s": time_s}
        return r if share is None else {**r, "time_share_s": share}

    rows = [row("apgd:ce", 19.5, 12.0), row("pgd:ce", 21.5, 13.0)]
    assert per_volume(rows, tmp_path, {})[0]["time_s"] == pytest.approx(25.0)
    assert per_volume([row("pgd:ce", 21.5)], tmp_path, {})[0]["time_s"] == pytest.approx(21.5)
