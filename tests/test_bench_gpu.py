"""The GPU benchmark (bench/gpu.py) runs its code on a CPU as a smoke check, and derives its headline figures right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
gpu_bench = pytest.importorskip("gpu")


def test_the_members_section_runs_batched_and_alone_with_the_same_results(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--quick", "--sections", "env,members",
                           "--fusion-steps", "1", "--json-out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(out.read_text())
    members = figures["members"]
    assert members["members_count"] == 3 and members["fusion12_count"] == 12
    # on a CPU the batched members' results are the solo runs' exactly
    assert members["members_same_success"] and members["fusion12_same_success"]
    assert members["members_max_score_diff"] <= 2e-3 and members["fusion12_max_score_diff"] <= 2e-3
    assert members["members_auto_together"] == 1  # --together's CPU default
    assert figures["summary"]["members_batched_time_ratio"] == members["members_batched_time_ratio"] > 0
    assert figures["env"]["gemm_tflops_float32"] > 0
    assert "members_batched_time_ratio" in done.stdout and "quick mode" in done.stdout


def test_the_summary_takes_the_worse_network_and_the_right_ratios():
    figures = {
        "env": {"gemm_tflops_float32": 50.0, "gemm_tflops_tf32": 400.0},
        "exactness": {"grad_rel_err": 1e-6, "amp_grad_cosine_segresnet": 0.99, "amp_grad_cosine_unetr": 0.999},
        "e2e": {"members_batched_time_ratio": 0.8, "strength_amp": {"dice": {"brain": 0.76}},
                "strength_float32": {"dice": {"brain": 0.75}}},
        "full_size": {
            "shape": [256, 256, 256],
            "segresnet_fp32_wb4": {"step_s": 1.0, "peak_mb": 100.0, "tflops": 8.0},
            "segresnet_fp32_ckpt_wb4": {"step_s": 1.2, "peak_mb": 60.0, "tflops": 6.0},
            "segresnet_amp_wb4": {"step_s": 0.5, "peak_mb": 110.0, "tflops": 16.0},
            "segresnet_amp_wb16": {"step_s": 0.4, "peak_mb": 400.0, "tflops": 20.0},
            "unetr_fp32_wb4": {"step_s": 2.0, "peak_mb": 200.0},
            "unetr_fp32_ckpt_wb4": {"step_s": 2.5, "peak_mb": 150.0},
            "unetr_amp_wb4": {"step_s": 1.8, "peak_mb": 120.0},
            "unetr_amp_wb16": {"step_s": 0.9, "peak_mb": 500.0},
            "segresnet_full_graph_256": {"engine_peak_mb": 100.0, "full_graph_peak_mb": 2000.0},
            "unetr_full_graph_256": {"engine_peak_mb": 200.0, "full_graph_peak_mb": "out of memory"},
        },
    }
    s = gpu_bench.summary(figures)
    assert s["gflops_vs_gemm"] == pytest.approx(8.0 / 400.0)  # against TF32, what PyTorch runs float32 convolutions in
    assert s["amp_grad_cosine"] == 0.99
    assert s["amp_strength_dice_diff"] == pytest.approx(0.01)
    assert s["mem_ratio_vs_full_graph"] == pytest.approx(0.05)  # the out-of-memory full graph gives no ratio
    assert s["ckpt_mem_ratio"] == pytest.approx(0.75)
    assert s["amp_mem_ratio"] == pytest.approx(1.1)
    assert s["amp_vs_float32_step_time_ratio"] == pytest.approx(0.9)
    assert s["window_batch16_vs_4_time_ratio"] == pytest.approx(0.8)
    assert s["members_batched_time_ratio"] is None and s["e2e_members_batched_time_ratio"] == 0.8
    assert set(s) == set(gpu_bench.GOALS)
