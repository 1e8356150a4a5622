"""A small multi-class segmentation task for benchmarks: synthetic abdominal CT with organs of
several sizes and contrasts, a held-out split, and SegResNet / UNETR bundles trained on it.

Each volume is a CT-like int16 scan in HU (air, a body of soft tissue with a fat rim, noise and
a smooth bias) with three structures: a large low-contrast "liver", two medium bright "kidneys"
and a few small "nodules". Shapes, positions and
intensities vary per seed. The bundles hold a HU window preprocessing (as ``transforms/ct_abdomen``
does) and a sliding-window inferer of 32^3 windows, so a volume takes several windows.
Trained weights are cached in a folder the caller gives, keyed by the recipe.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

SHAPE = (48, 48, 32)
SPACING = 2.0
AFFINE = np.diag([-SPACING, -SPACING, SPACING, 1.0])  # LPS-like: the bundle's Orientation has work to do
CLASSES = {0: "background", 1: "liver", 2: "kidney", 3: "nodule"}
ROI = 32
WINDOW = (-160, 240)
TRAIN_SEEDS = range(1000, 1024)
TEST_SEEDS = range(2000, 2003)
NETWORKS = {
    "segresnet": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": len(CLASSES),
                  "init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]},
    "unetr": {"_target_": "UNETR", "in_channels": 1, "out_channels": len(CLASSES), "img_size": [ROI] * 3,
              "feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4},
}
TRAIN_STEPS = {"segresnet": 500, "unetr": 700}
TRAIN_LR = {"segresnet": 3e-3, "unetr": 1e-3}
BATCH = 4


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume (HU) and its labels (0..3), both of shape ``SHAPE``."""
    rng = np.random.RandomState(seed)
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in SHAPE), indexing="ij")
    centre = np.array(SHAPE, np.float32) / 2
    body_r = np.array([SHAPE[0] * 0.46, SHAPE[1] * 0.40, SHAPE[2] * 0.70]) * rng.uniform(0.9, 1.05, 3)
    body = _ellipsoid(grid, centre, body_r)
    inner = _ellipsoid(grid, centre, body_r - 2.5)
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[body] = -100.0  # fat rim
    tissue = rng.uniform(25, 45)
    hu[inner] = tissue
    label = np.zeros(SHAPE, np.uint8)

    def place(cls: int, c, r, value: float) -> None:
        mask = _ellipsoid(grid, c, r) & inner
        hu[mask] = value
        label[mask] = cls

    liver_c = centre + np.array([-SHAPE[0] * 0.14, -SHAPE[1] * 0.05, 0]) + rng.uniform(-2, 2, 3)
    place(1, liver_c, np.array([11, 13, 10]) * rng.uniform(0.85, 1.15, 3), tissue + rng.uniform(20, 35))
    for side in (-1, 1):
        kidney_c = centre + np.array([side * SHAPE[0] * 0.16, SHAPE[1] * 0.2, rng.uniform(-3, 3)])
        place(2, kidney_c, np.array([3.5, 3.5, 6]) * rng.uniform(0.85, 1.2, 3), rng.uniform(140, 190))
    for _ in range(rng.randint(3, 6)):
        nodule_c = centre + rng.uniform(-0.3, 0.3, 3) * np.array(SHAPE)
        place(3, nodule_c, np.full(3, rng.uniform(2.2, 3.2)), rng.uniform(110, 150))
    hu = ndimage.gaussian_filter(hu, 0.7)
    bias = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 8) * 150
    hu = hu + np.where(body, bias, 0) + rng.standard_normal(SHAPE).astype(np.float32) * rng.uniform(10, 18)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label


def inference_config(network: str) -> dict:
    """The bundle's ``inference.json``: HU window preprocessing, 32^3 sliding windows, softmax + argmax."""
    return {
        "image_key": "image",
        "network_def": NETWORKS[network],
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [SPACING] * 3, "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": WINDOW[0], "a_max": WINDOW[1],
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [ROI] * 3, "sw_batch_size": 8, "overlap": 0.25, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }


def _model_space(hu: np.ndarray) -> np.ndarray:
    """The network's input for a case: RAS (flip the first two axes of ``AFFINE``) and the HU window."""
    ras = hu[::-1, ::-1].astype(np.float32)
    return np.clip((ras - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def code_key() -> str:
    """Changes whenever this file (the data, the recipe) changes: cached volumes and weights follow it."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _recipe_key(network: str) -> str:
    recipe = {"net": NETWORKS[network], "steps": TRAIN_STEPS[network], "lr": TRAIN_LR[network], "code": code_key()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def train(network: str, weights: Path, log=print) -> dict:
    """Train ``network`` on the training split from scratch; save its state dict; return the log."""
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    net = ConfigParser({"net": NETWORKS[network]}).get_parsed_content("net")
    cases = [make_case(s) for s in TRAIN_SEEDS]
    images = [torch.from_numpy(_model_space(hu).copy()) for hu, _ in cases]
    labels = [torch.from_numpy(lab[::-1, ::-1].astype(np.int64).copy()) for _, lab in cases]
    opt = torch.optim.AdamW(net.parameters(), lr=TRAIN_LR[network], weight_decay=1e-5)
    steps = TRAIN_STEPS[network]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN_LR[network], total_steps=steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        xs, ys = [], []
        for _ in range(BATCH):
            i = rng.randint(len(images))
            if rng.rand() < 0.5:  # half the crops centred on a voxel of a random structure, so small ones are seen
                cls = rng.randint(1, len(CLASSES))
                where = torch.nonzero(labels[i] == cls)
                centre = where[rng.randint(len(where))].numpy() if len(where) else np.array(images[i].shape) // 2
                o = [int(np.clip(c - ROI // 2 + rng.randint(-6, 7), 0, s - ROI)) for c, s in zip(centre, images[i].shape)]
            else:
                o = [rng.randint(0, s - ROI + 1) for s in images[i].shape]
            window = tuple(slice(a, a + ROI) for a in o)
            x, y = images[i][window], labels[i][window]
            xs.append(x[None])
            ys.append(y[None])
        opt.zero_grad()
        loss = loss_fn(net(torch.stack(xs)), torch.stack(ys))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % 100 == 0:
            log(f"  organs {network}: step {step + 1}/{steps}, loss {np.mean(losses[-100:]):.3f}")
    net.eval()
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), weights)
    return {"steps": steps, "train_s": time.perf_counter() - start, "final_loss": float(np.mean(losses[-50:]))}


def bundle(network: str, cache: Path, log=print) -> Path:
    """A bundle folder for ``network`` trained on the task (trained on first use, then cached)."""
    folder = cache / f"organs_{network}_{_recipe_key(network)}"
    weights = folder / "models" / "model.pt"
    if not weights.exists():
        log(f"training the organs {network} (cached in {folder}) ...")
        (folder / "configs").mkdir(parents=True, exist_ok=True)
        (folder / "configs" / "inference.json").write_text(json.dumps(inference_config(network), indent=1))
        channel_def = {str(k): v for k, v in CLASSES.items()}
        (folder / "configs" / "metadata.json").write_text(
            json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": channel_def}}}}))
        info = train(network, weights.with_suffix(".tmp"), log)
        weights.with_suffix(".tmp").rename(weights)
        (folder / "train_log.json").write_text(json.dumps(info))
    return folder


def test_cases(cache: Path) -> list[tuple[Path, Path]]:
    """The held-out scans and labels as NIfTI files under ``cache`` (written once per version of the task)."""
    folder = cache / f"organs_test_{code_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed in TEST_SEEDS:
        scan, label = folder / f"organs_{seed}.nii.gz", folder / f"organs_{seed}_label.nii.gz"
        if not label.exists():
            hu, lab = make_case(seed)
            nib.save(nib.Nifti1Image(hu, AFFINE), str(scan))
            nib.save(nib.Nifti1Image(lab, AFFINE), str(label))
        cases.append((scan, label))
    return cases
