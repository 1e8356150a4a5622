"""The engine benchmark's own sizing: the full-graph comparison runs at the size it names when memory allows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
engine_bench = pytest.importorskip("engine")


def test_full_graph_at_160_fits_a_24gb_machine():
    """Measured on this 24 GB machine: the full graph at 160^3 (64 windows of 64^3) peaks at 9.2 GB; with 23 GB
    free the benchmark must run it there (it used to fall back to 128^3 from the probe's over-estimate)."""
    window = engine_bench.Window(64, 0.5)
    per_window = 9200 / 64
    assert engine_bench.full_graph_side((160, 160, 160), window, per_window, 400, 23000) == (160, 160, 160)
    # with a quarter of the memory it shrinks, but never below one window
    smaller = engine_bench.full_graph_side((160, 160, 160), window, per_window, 400, 6000)
    assert 64 <= smaller[0] < 160
    assert engine_bench.full_graph_side((160, 160, 160), window, per_window, 400, 10)[0] == 64


def test_window_count_is_monais_placement():
    window = engine_bench.Window(64, 0.5)
    assert engine_bench.window_count(window, (160, 160, 160)) == 64
    assert engine_bench.window_count(window, (96, 96, 96)) == 8


def test_the_window_batch_figure_checks_both_batches_agree_and_times_them(tmp_path):
    out = engine_bench.Results(tmp_path)
    engine_bench.figure_window_batch(engine_bench.QUICK, out)
    assert out.values["window_batch2_vs_1_time_ratio"] > 0
    assert "relative difference of the logits" in out.details[-1]


def test_the_channels_last_figure_times_both_layouts_on_equal_gradients(tmp_path):
    out = engine_bench.Results(tmp_path)
    engine_bench.figure_channels_last(engine_bench.QUICK, out)
    assert out.values["channels_last_vs_default_time_ratio"] > 0
    assert "channels-last" in out.details[-1] and "default layout" in out.details[-1]
    laid_out = engine_bench.build_network("segresnet", 32)
    assert any(not m.weight.is_contiguous() for m in laid_out.modules() if isinstance(m, torch.nn.Conv3d))
    assert all(m.weight.is_contiguous() for m in engine_bench.build_network("segresnet", 32, channels_last=False).modules()
               if isinstance(m, torch.nn.Conv3d))


def test_the_amp_figure_times_bfloat16_against_float32_where_the_cpu_has_it(tmp_path, monkeypatch):
    from medis3d import memory

    out = engine_bench.Results(tmp_path)
    monkeypatch.setattr(memory, "amp_is_fast", lambda device: False)
    engine_bench.figure_amp(engine_bench.QUICK, out)
    assert "amp_vs_float32_step_time_ratio" not in out.values and "not measured" in out.details[-1]
    monkeypatch.setattr(memory, "amp_is_fast", lambda device: True)  # measured whatever the CPU: the figure runs
    engine_bench.figure_amp(engine_bench.QUICK, out)
    assert out.values["amp_vs_float32_step_time_ratio"] > 0
    assert "bfloat16 GEMM" in out.details[-1] and "gradient cosine" in out.details[-1]


def test_the_overhead_figure_times_a_member_step_against_the_plain_one_and_counts_operators(tmp_path):
    """Both sides run (medis3d's member and bench/reference.py's plain step, a voxel-wise network) on the synthetic head,
    which the shipped bundle's preprocessing reorients (written LAS)."""
    import nibabel as nib

    out = engine_bench.Results(tmp_path)
    engine_bench.figure_overhead(engine_bench.QUICK, out)
    assert out.values["member_step_overhead_vs_plain"] > 0
    assert out.values["default_aten_ops_per_member_step"] > 10
    assert "plain PGD-CE" in out.details[-1] and "aten operators per member-step" in out.details[-1]
    head = nib.load(str(tmp_path / "head.nii.gz"))
    assert head.shape == engine_bench.QUICK.head_shape and nib.aff2axcodes(head.affine) == ("L", "A", "S")
