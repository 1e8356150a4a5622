"""Batch throughput, one process against two (torchrun), side by side in one run.

Builds N synthetic CT-like volumes and a small SegResNet bundle in a temporary folder, runs
``medis3d batch`` on them once in one process (all cores) and once under
``torchrun --nproc_per_node 2`` (cores split between the ranks), and prints volumes per minute
for each and their ratio, ending with one JSON line. CPU only; a few minutes.

    python bench/batch.py [--volumes 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(work: Path, volumes: int) -> tuple[Path, Path]:
    from monai.data import create_test_image_3d
    from monai.networks.nets import SegResNet

    data = work / "in"
    data.mkdir(parents=True)
    for i in range(volumes):
        img, _ = create_test_image_3d(80, 80, 64, num_objs=8, rad_max=10, noise_max=0.1, random_state=np.random.RandomState(i))
        nib.save(nib.Nifti1Image((img * 300 - 100).astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(data / f"ct{i:02d}.nii.gz"))
    bundle = work / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {
        "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 200, "b_min": 0, "b_max": 1, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    torch.save(SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8).state_dict(), bundle / "models" / "model.pt")
    return data, bundle


def run(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="medis3d-bench-batch-"))
    try:
        data, bundle = make_inputs(work, args.volumes)
        attack = ["--bundle", str(bundle), "--losses", "ce,dice", "--steps", str(args.steps), "--select", "strongest", "--quiet"]
        one = run([sys.executable, "-m", "medis3d", "batch", str(data), "--out", str(work / "one"), *attack], cores)
        torchrun = shutil.which("torchrun") or "torchrun"
        two = run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "medis3d", "batch", str(data), "--out", str(work / "two"), *attack],
                  max(1, cores // 2))
        same = (work / "one" / "summary.csv").read_text().count("\n") == (work / "two" / "summary.csv").read_text().count("\n")
        result = {
            "volumes": args.volumes,
            "cores": cores,
            "one_process_volumes_per_min": round(args.volumes / one * 60, 3),
            "two_processes_volumes_per_min": round(args.volumes / two * 60, 3),
            "speedup_two_vs_one": round(one / two, 3),
            "same_rows": same,
        }
        print(f"{'setting':<22}{'seconds':>10}{'volumes/min':>14}")
        print(f"{'1 process':<22}{one:>10.1f}{result['one_process_volumes_per_min']:>14.2f}")
        print(f"{'2 processes (torchrun)':<22}{two:>10.1f}{result['two_processes_volumes_per_min']:>14.2f}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
