"""Dice of a brain-extraction bundle against reference brain masks, through its configs/inference.json.

For each (image, mask) pair it reports
  * dice_2mm: the config's preprocessing, network and inferer, argmax at 2 mm, against the
    reference mask taken through the same orientation + 2 mm resampling (bilinear, > 0.5);
  * dice_native: the mask the bundle writes (its postprocessing: softmax, Invertd back to the
    scan's own grid, argmax, SaveImaged) against the reference mask on that grid.

Generic over the bundle: the network, preprocessing, inferer and postprocessing are the bundle's
own. Each bundle's ``scripts/evaluate.py`` calls this script with ``--bundle`` set to itself.

Usage (SupervisedEvaluator needs pytorch-ignite):
    python bundles/scripts/evaluate_brain_t1.py --bundle bundles/brain_t1_unetr IMAGE:MASK [IMAGE:MASK ...] [--json out.json]
    python scripts/evaluate.py IMAGE:MASK [IMAGE:MASK ...] [--json out.json]   # from a bundle folder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

SPATIAL = ("LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(2 * (pred & ref).sum() / max(1, pred.sum() + ref.sum()))


def parser_for(bundle: Path, image: str, output_dir: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = output_dir
    parser["datalist"] = [image]
    return parser


def evaluate(bundle: Path, image: str, mask: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        parser = parser_for(bundle, image, out)
        net = parser.get_parsed_content("network")
        state = torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval()
        pre = parser.get_parsed_content("preprocessing")
        inferer = parser.get_parsed_content("inferer")
        # reference mask through the spatial part of the same preprocessing
        spatial = Compose([t for t in pre.transforms if type(t).__name__ in SPATIAL])  # Load, channel-first, RAS, 2 mm
        ref_2mm = spatial({"image": mask})["image"][0].numpy() > 0.5
        data = pre({"image": image})
        with torch.no_grad():
            logits = inferer(data["image"][None].to(next(net.parameters()).device), net)
        dice_2mm = dice(logits[0].argmax(0).cpu().numpy() > 0, ref_2mm)

        # the whole bundle, as `monai.bundle run` executes it
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
        written = sorted(Path(out).rglob("*.nii*"))
        assert len(written) == 1, written
        pred_img = nib.load(str(written[0]))
        ref_img = nib.load(mask)
        pred = np.asarray(pred_img.dataobj).reshape(pred_img.shape[:3]) > 0
        ref = np.asarray(ref_img.dataobj).reshape(ref_img.shape[:3]) > 0.5
        assert pred.shape == ref.shape and np.allclose(pred_img.affine, ref_img.affine, atol=1e-3), "grid mismatch"
        return {
            "image": image,
            "mask": mask,
            "dice_2mm": round(dice_2mm, 4),
            "dice_native": round(dice(pred, ref), 4),
            "native_shape": list(pred.shape),
            "pred_volume_ml": round(float(pred.sum() * np.prod(pred_img.header.get_zooms()[:3]) / 1000), 1),
            "ref_volume_ml": round(float(ref.sum() * np.prod(ref_img.header.get_zooms()[:3]) / 1000), 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="the bundle folder")
    ap.add_argument("pairs", nargs="+", help="IMAGE:MASK")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = args.bundle.resolve()
    results = [{"bundle": bundle.name, **evaluate(bundle, *pair.split(":", 1))} for pair in args.pairs]
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
