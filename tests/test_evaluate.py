"""medis3d evaluate on a small datalist and on a folder; resumable."""

import csv
import json

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
