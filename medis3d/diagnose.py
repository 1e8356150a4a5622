"""Gradient-masking checks on one scan (``medis3d diagnose``), after Carlini et al., "On Evaluating
Adversarial Robustness" (2019): an attack result is an upper bound on robustness only if the attack
did not stop short, and these checks look for the signs that it did.

* **eps sweep**: the member at doubling budgets until it succeeds; flagged when nothing succeeds by
  64/255, or when a larger budget leaves more Dice than a smaller one; not applicable at a success threshold of 0
  (every voxel flipped) or where the clean scan already counts as a success. Above the diagnosed budget its step grows in
  proportion to the budget (a fixed step of 1/255 for 20 iterations could not leave the 20/255 ball). Under an L2
  budget (``norm="l2"``) the sweep's budgets are the L2 balls whose root-mean-square per voxel the attack may change is 2/255 ... 64/255
  of the model's range: each holds the L-inf ball of that size, so the same limit applies.
* **step doubling**: twice the iterations; flagged when that still lowers Dice by more than 0.02
  (the attack had not converged).
* **restarts**: the member from random starts; flagged when the best restart lowers Dice by more than
  0.02 below the single run.
* **random search**: a gradient-free search (Square-attack style: random +-eps cubes, kept when the
  loss rises; under L2 each cube takes half the budget's length and the whole is scaled back onto the ball)
  with forward passes only; flagged when it beats the white-box member at the same budget.
* **gradient vs finite differences**: the Target's gradient through the real forward (no stand-ins:
  the ``exact`` path) against central differences of the loss along directions on a sample of voxels;
  flagged when they disagree (a model whose loss differs between two passes of the same scan is named random).
* **layers**: for each preprocessing step, how much of the scan its gradient reaches and how well its
  first-order change predicts the real change at the attack's scale (a step of eps along the norm's steepest
  direction, inside the region the attacks may change); each flag names the step (or the network) that is the
  likely cause.

Every check runs in the budget's norm (``norm``: ``linf``, or ``l2`` as ``attack --norm l2``); ``eps`` is in
``eps_units``, by default the model's intensity range (an L2 radius too: ``eps * scale`` in the scan's units).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from medis3d.attacks import Budget
from medis3d.attacks.base import UNTARGETED_SUCCESS
from medis3d.config import eps_or_default
from medis3d.errors import InputError
from medis3d.fusion import PAPER_STEP, MedIS
from medis3d.io.volume import Volume
from medis3d.losses import get_loss
from medis3d.members import Member, parse_members
from medis3d.metrics import mean_dice, mean_iou
from medis3d.target import Target

SWEEP = (2, 4, 8, 16, 32, 64)  # in 1/255 of the model's normalised intensity range (L2: the rms per voxel)
SWEEP_LIMIT = 64
DOUBLING_TOLERANCE = 0.02
RESTART_TOLERANCE = 0.02
RESTART_SEED = 1000  # added to the run's seed for the restarts: apart from any member's own seed offset
FD_TOLERANCE = 0.1  # relative error of the directional derivative
# how far a network's gradient must miss its own differences at 1/1020 and 1/4080 of its range for finite_differences
# to name the network (a stand-in gradient): rounding its input to 1/8 and 1/64 of the range behind a straight-through
# gradient misses by 1.0 and 0.48; the tests' honest tiny network on an all-zero scan, every ReLU bending at once,
# by 0.065 in one run of the suite and 0.11 in another (under pytest-xdist; FD_TOLERANCE, 0.1, then named it)
STAND_IN_MISS = 0.3
# the finer steps (in fractions 1/N of the intensity range) at which a direction's differences are taken where those of
# 1/255 and 4/255 disagree and miss the gradient: a curved loss's close in on it (the tests' honest network on an
# all-zero scan: 0.26, 0.12, 0.034, 0.009 at 4/255, 1/255, 1/1020, 1/4080), a hidden or stand-in gradient's do not
FINER_STEPS = (1020, 4080)
HIDDEN_TOLERANCE = 0.05  # share of the model input's change from voxels the attack's gradient does not reach
DEFAULT_MEMBER = "apgd:masked_ce_balanced"
QUERIES = 200  # the random search's forward passes where none are given (evaluate --diagnose gives none)
# the checks' own version, in the settings a study keeps each diagnosis under: a diagnosis made by other checks is
# run again (2: strongest iterates in the doubling, restarts and random search; finite differences with two steps;
# 3: restarts from random starts the member's own run did not draw; the layer check moves the unreached voxels;
# 4: the sweep's step grows with its budget above the diagnosed one; 5: finite differences name a random model, and
# a network whose input gradient is zero though no layer zeroes its own; 6: evaluate's --success is the sweep's;
# 7: the random search's start counts as one of its queries; 8: finite differences name a network that is not smooth
# at one step's scale where the preprocessing's gradient matches its own; 9: finite differences along a random direction
# that close in on the gradient at finer steps do not flag; the eps sweep is not applicable where no success can be
# measured)
CHECKS_VERSION = 9


@dataclass
class Check:
    """One check's outcome: what was measured, and a flag with its likely cause where it found masking."""

    name: str
    measured: dict
    flagged: bool = False
    cause: str = ""

    def as_dict(self) -> dict:
        return {"check": self.name, "flagged": self.flagged, "cause": self.cause or None, **self.measured}


SCHEMA = "medis3d.diagnose/1"  # diagnose.json's; a rerun replaces only a file that carries it


@dataclass
class Diagnosis:
    """Every check on one scan."""

    scan: str
    member: str
    eps: float
    norm: str = "linf"
    eps_native: float | None = None  # the budget in the scan's units (the largest channel's)
    checks: list[Check] = field(default_factory=list)
    time_s: float = 0.0
    eps_native_per_channel: list[float] | None = None  # each channel's, in its own units

    @property
    def flagged(self) -> bool:
        return any(c.flagged for c in self.checks)

    def as_dict(self) -> dict:
        return {"schema": SCHEMA, "scan": self.scan, "member": self.member, "eps": self.eps, "norm": self.norm,
                "eps_native": self.eps_native, "eps_native_per_channel": self.eps_native_per_channel, "flagged": self.flagged,
                "checks": [c.as_dict() for c in self.checks], "time_s": self.time_s}


def _mean_dice(target: Target, prediction: np.ndarray, reference: np.ndarray) -> float:
    return mean_dice(target.masks(prediction), target.masks(reference))


def relative_difference(a: float, b: float) -> float:
    """``|a - b|`` relative to the larger of the two (a gradient against a central difference, or two differences)."""
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def signed_sample(shape: torch.Size, voxels: int, gen: torch.Generator) -> torch.Tensor:
    """A direction of ``shape``: +-1 at ``voxels`` voxels drawn at random (all where there are fewer), 0 elsewhere."""
    n = math.prod(shape)
    direction = torch.zeros(n)
    sample = torch.randperm(n, generator=gen)[: min(voxels, n)]
    direction[sample] = (torch.randint(0, 2, (len(sample),), generator=gen) * 2 - 1).float()
    return direction.reshape(shape)


def misprediction(ratio: float) -> str:
    """How a first-order change misses the real one, ``ratio`` being real / predicted (the layer check's flag)."""
    if ratio <= 0:
        return "its first-order change has the wrong sign against the real change"
    if ratio > 1:
        return f"its first-order change is {ratio:.3g}x smaller than the real change"
    return f"its first-order change is {1 / ratio:.3g}x larger than the real change"


def finite_difference_verdict(rows: list[dict]) -> tuple[bool, str]:
    """Whether the finite-difference rows flag (and why), or a note where they do not.

    A direction flags when the gradient misses the central difference by more than :data:`FD_TOLERANCE`, unless the
    difference itself is not a measurement at that scale: along a random direction, differences taken with steps of
    1/255 and 4/255 that disagree with each other by more than the tolerance, a gradient that lies between them (the
    span widened by the tolerance) or that the differences close in on as the step shrinks (:func:`converges`), while
    the gradient predicts the attack's own direction (its sign). That is the signature of a loss that is not smooth
    at the scale of one step along many voxels at once (percentile scaling moves with the whole intensity
    distribution; the float32 sum over a whole scan resolves changes of about 1e-8; on a constant scan every instance
    norm divides by a near-zero spread, so the network curves within a step), not of a gradient an attack cannot
    follow. A zero or a partly zeroed gradient, one of the wrong sign (outside
    the span), or a wrong one along the attack's direction, always flags."""
    bad = [r for r in rows if r["relative_error"] > FD_TOLERANCE]
    if not bad:
        return False, ""
    sign_ok = all(r["relative_error"] <= FD_TOLERANCE for r in rows if r["direction"] == "gradient sign")
    for row in bad:
        zero = abs(row["gradient"]) < 1e-3 * abs(row["finite_difference"])
        if zero:
            return True, "the gradient is (near) zero where the loss changes: a layer zeroes it"
        differences = (row["finite_difference"], row.get("finite_difference_4x", row["finite_difference"]))
        widen = FD_TOLERANCE * max(abs(d) for d in differences)
        between = min(differences) - widen <= row["gradient"] <= max(differences) + widen
        rough = row["direction"] == "random" and row.get("step_disagreement", 0.0) > FD_TOLERANCE and sign_ok
        if not (rough and (between or converges(row))):
            return True, "the gradient disagrees with the loss's real change"
    row = bad[0]
    if converges(row):
        finer = ", ".join(f"{e:.2g} at 1/{f}" for e, f in zip(row["relative_error_finer"], FINER_STEPS))
        return False, (f"not flagged: along a random direction the gradient misses the central difference of 1/255 by "
                       f"{row['relative_error']:.2g} (4/255: {relative_difference(row['gradient'], row['finite_difference_4x']):.2g}), "
                       f"but the differences close in on it as the step shrinks ({finer}): the loss is curved at one "
                       "step's scale (on a constant scan every instance norm divides by a near-zero spread), and the "
                       "gradient is its derivative")
    return False, (f"not flagged: along a random direction the gradient misses the central difference by "
                   f"{row['relative_error']:.2g}, but the differences of steps 1/255 and 4/255 disagree with each other "
                   f"by {row['step_disagreement']:.2g} (the loss is not smooth at that scale, e.g. percentile scaling, or "
                   "below float32's resolution) while the attack's own direction is predicted")


def converges(row: dict) -> bool:
    """Whether a direction's differences close in on the gradient as the step shrinks (4/255, 1/255, then
    :data:`FINER_STEPS`), to within :data:`FD_TOLERANCE` at a finer step: the gradient is the derivative of a loss
    curved at one step's scale. A gradient that hides or bends part of the change misses the finer differences too."""
    finer = row.get("relative_error_finer")
    if not finer:
        return False
    misses = [relative_difference(row["gradient"], row["finite_difference_4x"]), row["relative_error"], finer[0]]
    return misses[0] > misses[1] > misses[2] and min(finer) <= FD_TOLERANCE


class Diagnose:
    """The checks of the module docstring for ``target`` on one volume, with one white-box member."""

    def __init__(self, target: Target, member: str = DEFAULT_MEMBER, eps: float | None = None, steps: int = 20,
                 step: float | None = None, queries: int | None = None, restarts: int = 2, fd_voxels: int = 2000, seed: int = 0,
                 progress: Callable[[str], None] | None = None, region: np.ndarray | None = None, norm: str = "linf",
                 eps_units: str = "normalized", success: float | None = None):
        # step None: the preset's (1/255 of the model's range; under L2 a tenth of eps), as attack without --step
        self.target, self.steps, self.seed = target, int(steps), seed
        # ``eps``, ``step`` and a member's own [step=X] are in ``eps_units`` (as MedIS takes them); the checks run their
        # budgets normalised: ``self.eps`` and ``self.step`` are the given ones in the model's range, per volume
        self.eps_units = eps_units
        eps = eps_or_default(eps, norm, eps_units, 8 / 255)
        self.given = (float(eps), None if step is None else float(step))
        self.eps, self.step = self.given
        self.norm = norm
        self.region = region  # where the attacks may perturb (every check's budget), as --mask in attack
        self.success = success  # the threshold on mean IoU a success is (None: MedIS's, 0.5), as --success in attack
        self.scale = 1.0  # the model's intensity range in the scan's units, set per volume
        # where the model sees a scan's channels in their own units and eps is a fraction of the range: each channel's
        # range (C, 1, 1, 1), as the attacks' budget takes it (MedIS.prepare); None: one unit for every channel
        self.apart: np.ndarray | None = None
        members = parse_members(member)
        if len(members) > 1:  # the checks run one white-box attack: the rest would be dropped unsaid
            raise InputError(f"--member takes one member (the checks run one white-box attack), got {len(members)}: "
                             f"{', '.join(m.name for m in members)}")
        self.member = members[0]
        self.queries, self.restarts, self.fd_voxels = int(queries or QUERIES), int(restarts), int(fd_voxels)
        self.progress = progress or (lambda message: None)

    # -- running a member ---------------------------------------------------------------------
    def _medis(self, eps: float, steps: int | None = None, member: Member | None = None, seed: int | None = None,
               strongest: bool = True, stretch: float = 1.0) -> MedIS:
        """The member at ``eps``: run to its strongest iterate (``strongest``; the doubling, restarts and random search
        compare Dice, which an attack stopped at its first success does not reach), or to its first success (the sweep).
        ``stretch``: its step (and a member's own ``[step=X]``) that many times the one it takes at the diagnosed
        budget (the sweep above it, where a fixed step could not reach the larger ball's edge in its iterations)."""
        member = member or self.member
        if stretch != 1.0 and member.option("step") is not None:
            options = dict(member.options) | {"step": float(member.option("step")) * stretch}
            member = Member(member.attack, member.loss, tuple(sorted(options.items())))
        if self.step is None and (stretch == 1.0 or self.norm == "l2"):  # the preset's (MedIS.preset_step; L2: eps / 10)
            step, preset = PAPER_STEP, True
        elif self.norm == "l2":
            step, preset = cast(float, self.step) * stretch, False
        else:  # the step the member takes at the diagnosed budget, stretched (MedIS caps it at ``eps``)
            given = PAPER_STEP if self.step is None else self.step
            step, preset = min(given, self.eps) * stretch, False
        factor = self.scale if self.eps_units == "native" else 1.0  # MedIS reads [step=X] in its eps units
        return MedIS(self.target, members_spec=[member], eps=eps * factor,
                     step=step if preset else step * factor, preset_step=preset, eps_units=self.eps_units,
                     steps=steps or self.steps, seed=self.seed if seed is None else seed, region=self.region,
                     norm=self.norm, stop_at_success=False if strongest else None, success_threshold=self.success)

    def _size(self, eps: float) -> str:
        """A budget as the outputs state it: ``8/255``, or ``L2 4940`` (in the scan's units; with a budget per channel
        ``L2 4 (fractions of each channel's range)``)."""
        if self.norm == "l2" and self.apart is not None:
            return f"L2 {eps:.4g} (fractions of each channel's range)"
        return f"L2 {eps * self.scale:.4g}" if self.norm == "l2" else f"{eps * 255:.3g}/255"

    def _l2_native(self, eps: float) -> float:
        """An L2 radius in the model's range in native units (with a budget per channel, the largest channel's)."""
        return eps * (self.scale if self.apart is None else float(self.apart.max()))

    def _voxels(self, volume: Volume) -> int:
        """How many values the attacks may change (the region's, over every channel)."""
        if self.region is None:
            return int(volume.array.size)
        return int(np.count_nonzero(np.broadcast_to(np.asarray(self.region) != 0, volume.array.shape)))

    def _run(self, volume: Volume, reference: np.ndarray, eps: float, steps: int | None = None, member: Member | None = None,
             strongest: bool = True, seed: int | None = None, stretch: float = 1.0):
        medis = self._medis(eps, steps, member, seed=seed, strongest=strongest, stretch=stretch)
        setting = medis.prepare(volume, reference, clean_prediction=reference)
        result = medis.run_member(medis.members()[0], setting.budget, setting.goal, volume, setting.factor)
        return result, _mean_dice(self.target, result.prediction, reference), setting

    # -- the checks ---------------------------------------------------------------------------
    def __call__(self, volume: Volume, reference: np.ndarray | None = None) -> Diagnosis:
        start = time.perf_counter()
        reference = self.target.predict(volume) if reference is None else reference
        scales = self.target.intensity_scales(volume)
        self.scale = scales.scale
        self.apart = scales.array() if self.eps_units == "normalized" else None
        if self.eps_units == "native":  # the checks' budgets in the model's range
            eps, step = self.given
            self.eps, self.step = eps / self.scale, None if step is None else step / self.scale
        base, base_dice, setting = self._run(volume, reference, self.eps)
        natives = np.broadcast_to(np.asarray(setting.budget.native(setting.budget.eps)).reshape(-1), (volume.channels,))
        diagnosis = Diagnosis(str(volume.path or volume.name), self.member.name, self.eps, self.norm, float(natives.max()),
                              eps_native_per_channel=[float(v) for v in natives])
        self.progress(f"white-box {self.member.name} at {self._size(self.eps)}: Dice {base_dice:.3f}")
        diagnosis.checks.append(self.eps_sweep(volume, reference))
        diagnosis.checks.append(self.step_doubling(volume, reference, base_dice))
        diagnosis.checks.append(self.restart_check(volume, reference, base_dice))
        diagnosis.checks.append(self.random_search(volume, reference, base_dice, setting))
        diagnosis.checks.append(self.finite_differences(volume, reference))
        diagnosis.checks.append(self.layers(volume, reference, setting.budget))
        diagnosis.time_s = time.perf_counter() - start
        return diagnosis

    def eps_sweep(self, volume: Volume, reference: np.ndarray) -> Check:
        """The member at each budget of :data:`SWEEP` until it succeeds. L-inf rows carry ``eps_255``; L2 rows
        ``rms_255`` (the rms per changeable voxel, in 1/255 of the model's range) and ``l2_native`` (the radius)."""
        l2 = self.norm == "l2"
        key = "rms_255" if l2 else "eps_255"
        unmeasurable = self.sweep_not_applicable(volume, reference)
        if unmeasurable:
            self.progress(f"eps sweep: {unmeasurable}")
            return Check("eps_sweep", {"sweep": [], f"smallest_successful_{key}": None, "success_threshold": self.threshold,
                                       "applicable": False}, False, unmeasurable)
        root_n = float(np.sqrt(self._voxels(volume)))
        rows = []
        for e in SWEEP:
            eps = e / 255 * root_n if l2 else e / 255
            # success is all it needs; above the diagnosed budget its step grows with the ball (a fixed step of 1/255
            # for 20 iterations reaches 20/255 at most, and 32/255 and 64/255 ran the 20/255 attack again)
            result, dice, setting = self._run(volume, reference, eps, strongest=False, stretch=max(1.0, eps / self.eps))
            threshold = setting.goal.threshold
            size: dict[str, Any] = {"rms_255": e, "l2_native": self._l2_native(eps)} if l2 else {"eps_255": e}
            rows.append({**size, "dice": dice, "mean_iou": result.score, "success": result.success})
            label = f"{self._size(eps)} (rms {e}/255)" if l2 else f"{e}/255"
            self.progress(f"eps sweep {label}: Dice {dice:.3f}{' (success)' if result.success else ''}")
            if result.success:
                break
        broken = next((r for r in rows if r["success"]), None)
        worse = [(a, b) for a, b in zip(rows, rows[1:]) if b["dice"] > a["dice"] + 0.01]
        measured: dict[str, Any] = {"sweep": rows, f"smallest_successful_{key}": broken[key] if broken else None,
                                    "success_threshold": threshold}
        if l2:
            measured["smallest_successful_l2_native"] = broken["l2_native"] if broken else None

        def named(row: dict) -> str:
            return f"L2 {row['l2_native']:.4g}" if l2 else f"{row['eps_255']}/255"

        if broken is None:
            limit = (f"{self._size(SWEEP_LIMIT / 255 * root_n)} (the L2 ball holding the {SWEEP_LIMIT}/255 L-inf one)"
                     if l2 else f"{SWEEP_LIMIT}/255")
            return Check("eps_sweep", measured, True, f"no success by {limit}: the attack stops short, or the "
                         "model's preprocessing or a layer masks the gradient (see the layer and finite-difference checks)")
        if worse:
            return Check("eps_sweep", measured, True, f"a larger budget left more Dice ({named(worse[0][1])} vs {named(worse[0][0])}): "
                         "the optimiser does not converge at the larger budget (step size, iterations)")
        return Check("eps_sweep", measured)

    @property
    def threshold(self) -> float:
        """The mean IoU at or below which an (untargeted) attack succeeds: ``success``, else MedIS's."""
        return UNTARGETED_SUCCESS if self.success is None else self.success

    def sweep_not_applicable(self, volume: Volume, reference: np.ndarray) -> str:
        """Why the eps sweep measures nothing about masking at this success threshold, or "" where it does: at 0 a
        success is a mean IoU of 0, every voxel of the structure flipped, which its 64/255 limit is not sized for (a
        miss is no sign of masking: the tests' model fell from mean IoU 0.95 to 0.05 over the sweep and was flagged);
        where the clean scan already counts as a success (``--success 1``) every budget succeeds at its first iterate
        and the sweep could flag nothing."""
        threshold = self.threshold
        if threshold <= 0:
            return (f"not applicable at --success {threshold:g}: a success is then a mean IoU of 0, every voxel of the "
                    f"structure flipped, which the sweep's {SWEEP_LIMIT}/255 limit is not sized for (missing it is no "
                    "sign of masking); rerun with a threshold above 0 for this check")
        clean = mean_iou(self.target.masks(self.target.predict(volume)), self.target.masks(reference))
        if clean <= threshold:
            return (f"not applicable at --success {threshold:g}: the clean scan already counts as a success (mean IoU "
                    f"{clean:.3g}), so every budget would succeed without an attack and the sweep could flag nothing")
        return ""

    def step_doubling(self, volume: Volume, reference: np.ndarray, base_dice: float) -> Check:
        steps = int(self.member.option("steps") or self.steps)  # a member's own [steps=N] is what it ran
        options = dict(self.member.options) | {"steps": 2 * steps}
        doubled_member = Member(self.member.attack, self.member.loss, tuple(sorted(options.items())))
        _, doubled, _ = self._run(volume, reference, self.eps, member=doubled_member)
        gain = base_dice - doubled
        self.progress(f"step doubling: {steps} -> {2 * steps} steps, Dice {base_dice:.3f} -> {doubled:.3f}")
        measured = {"steps": steps, "dice": base_dice, "doubled_steps": 2 * steps, "doubled_dice": doubled, "gain": gain}
        if gain > DOUBLING_TOLERANCE:
            return Check("step_doubling", measured, True, f"twice the iterations lowered Dice by {gain:.3f}: not converged; "
                         "use more --steps (or the reliable preset)")
        return Check("step_doubling", measured)

    def restart_check(self, volume: Volume, reference: np.ndarray, base_dice: float) -> Check:
        """The member from random starts its own run did not draw: APGD with as many restarts as it has (at least
        ``restarts``), any other attack once from each of ``restarts`` random points (from the clean scan, which
        most start at, a rerun with another seed repeated the run exactly and this check could not fire)."""
        options = dict(self.member.options) | ({} if self.member.attack == "pgd" else {"random_start": True})  # PGD always starts so
        if self.member.attack == "apgd":  # one run of its restarts
            restarts = options["restarts"] = max(self.restarts, int(self.member.option("restarts") or 1))
            runs = [RESTART_SEED]
        else:  # one run a start
            restarts, runs = self.restarts, [RESTART_SEED + k for k in range(self.restarts)]
        member = Member(self.member.attack, self.member.loss, tuple(sorted(options.items())))
        # seeds apart from the white-box run's (self.seed + the member's own): its random start is not drawn again
        dices = [self._run(volume, reference, self.eps, member=member, seed=self.seed + seed)[1] for seed in runs]
        best = min(dices)
        gain = base_dice - best
        self.progress(f"restarts ({restarts} random starts): Dice {base_dice:.3f} -> {best:.3f}")
        measured = {"restarts": restarts, "dice": base_dice, "best_restart_dice": best, "gain": gain}
        if gain > RESTART_TOLERANCE:
            return Check("restarts", measured, True, f"random restarts lowered Dice by {gain:.3f}: the single run is "
                         "stuck in a poor local optimum; use --restarts")
        return Check("restarts", measured)

    def random_search(self, volume: Volume, reference: np.ndarray, white_box_dice: float, setting) -> Check:
        budget = setting.budget
        loss = get_loss("ce", self.target.activation)
        aim = setting.goal.loss_target
        clean = torch.from_numpy(volume.array).to(self.target.device)
        gen = torch.Generator().manual_seed(self.seed)

        def value(x: torch.Tensor) -> tuple[float, np.ndarray]:
            written = torch.from_numpy(volume.quantise(x.cpu().numpy(), volume.array, budget.eps, budget.norm,
                                                       budget.scale)).to(self.target.device)
            ev = self.target.exact.evaluate(written, volume)  # the model in float32, whatever --amp says
            return float(loss(ev.scan_logits, aim)), ev.segmentation

        l2 = budget.norm == "l2"
        signs = (torch.randint(0, 2, (clean.shape[0], 1, 1, clean.shape[-1]), generator=gen) * 2 - 1).to(clean)
        amplitude = budget.eps / float(np.sqrt(self._voxels(volume))) if l2 else budget.eps  # L2: the stripes fill the ball
        units = budget._scale(clean)  # a budget per channel: its sizes are each channel's own times its scale
        stripes = amplitude * signs.expand_as(clean)
        x = budget.project(clean + (stripes if units is None else stripes * units), clean)  # vertical stripes, as Square attack starts
        best, segmentation = value(x)  # the first of its ``queries`` forward passes
        shape = clean.shape[1:]
        for q in range(self.queries - 1):
            fraction = 0.1 * (0.5 ** int(8 * q / max(1, self.queries)))  # the cube's share of the volume, halving
            side = [max(1, int(round(s * fraction ** (1 / 3)))) for s in shape]
            corner = [int(torch.randint(0, s - w + 1, (1,), generator=gen)) for s, w in zip(shape, side)]
            window = (slice(None), *(slice(c, c + w) for c, w in zip(corner, side)))
            trial = x.clone()
            sign = float(torch.randint(0, 2, (1,), generator=gen) * 2 - 1)
            if l2:  # the cube takes half the ball's length; project() scales the whole back onto the ball
                cube = int(np.prod(side)) * clean.shape[0]
                size = sign * budget.eps * float(np.sqrt(0.5 / cube))
            else:
                size = sign * budget.eps
            trial[window] = clean[window] + (size if units is None else size * units)
            trial = budget.project(trial, clean)
            v, seg = value(trial)
            if v > best:
                x, best, segmentation = trial, v, seg
        dice = _mean_dice(self.target, segmentation, reference)
        self.progress(f"random search ({self.queries} queries): Dice {dice:.3f} (white-box {white_box_dice:.3f})")
        measured = {"queries": self.queries, "dice": dice, "white_box_dice": white_box_dice}
        if dice < white_box_dice - 0.01:
            return Check("random_search", measured, True, "a gradient-free search beat the white-box attack: the gradient "
                         "misleads it (masked or shattered); see the layer and finite-difference checks")
        return Check("random_search", measured)

    def finite_differences(self, volume: Volume, reference: np.ndarray) -> Check:
        """Directional derivatives along +-1 on a random sample of voxels (and along the gradient's sign there),
        the Target's exact gradient against central differences through the real forward, each taken with steps of
        1/255 and 4/255 of the intensity range (:func:`finite_difference_verdict` weighs them)."""
        loss = get_loss("ce", self.target.activation)
        aim = self.target.loss_target(reference)
        x = torch.from_numpy(volume.array).to(self.target.device).double().float()
        exact = self.target.exact  # the model's own gradient in float32: --amp's rounding is not the model's
        ev = exact.evaluate(x, volume, lambda logits: loss(logits, aim), gradient="exact")
        grad = ev.gradient()
        gen = torch.Generator().manual_seed(self.seed)
        n = grad.numel()
        sample = torch.randperm(n, generator=gen)[: min(self.fd_voxels, n)]
        reached = grad.reshape(-1)[sample] != 0
        scales = self.target.intensity_scales(volume)
        h = scales.scale / 255  # one step of 1/255 of the intensity range
        apart = scales.array()  # the channels the model sees in their own units: of each channel's own range
        unit = None if apart is None else torch.as_tensor(apart / scales.scale, dtype=grad.dtype, device=grad.device)
        rows: list[dict[str, Any]] = []
        for kind in ("random", "gradient sign"):
            direction = torch.zeros(n)
            if kind == "random":
                direction[sample] = (torch.randint(0, 2, (len(sample),), generator=gen) * 2 - 1).float()
            else:
                direction[sample] = torch.sign(grad.reshape(-1)[sample].cpu())
            direction = direction.reshape(grad.shape).to(grad)
            if unit is not None:  # each channel's step 1/255 (4/255) of its own range
                direction = direction * unit
            predicted = float((grad * direction).sum())

            def central(step: float, along: torch.Tensor) -> float:
                plus = exact.evaluate(x + step * along, volume).scan_logits
                minus = exact.evaluate(x - step * along, volume).scan_logits
                return (float(loss(plus, aim)) - float(loss(minus, aim))) / (2 * step)

            measured_fd, coarse = central(h, direction), central(4 * h, direction)
            row: dict[str, Any] = {"direction": kind, "gradient": predicted, "finite_difference": measured_fd,
                   "relative_error": relative_difference(predicted, measured_fd), "finite_difference_4x": coarse,
                   "step_disagreement": relative_difference(measured_fd, coarse)}
            if row["relative_error"] > FD_TOLERANCE and row["step_disagreement"] > FD_TOLERANCE:
                # the loss bends within one step: do the differences close in on the gradient as the step shrinks?
                finer = [central(h * 255 / f, direction) for f in FINER_STEPS]
                row["finite_difference_finer"] = finer
                row["relative_error_finer"] = [relative_difference(predicted, d) for d in finer]
            rows.append(row)
        self.progress("finite differences: " + ", ".join(f"{r['direction']} {r['relative_error']:.2g}" for r in rows))
        measured = {"voxels": int(len(sample)), "fraction_reached": float(reached.float().mean()), "step_native": h, "directions": rows}
        if apart is not None:
            measured["step_native_per_channel"] = [float(v) / 255 for v in apart.reshape(-1)]
        flagged, cause = finite_difference_verdict(rows)
        if flagged:
            # a model that draws anew on each pass: the differences measure its draws, not a layer (two more passes)
            again = [float(loss(exact.evaluate(x, volume).scan_logits, aim)) for _ in range(2)]
            spread = abs(again[0] - again[1])
            change = min(abs(r["finite_difference"]) * 2 * h for r in rows if r["relative_error"] > FD_TOLERANCE)
            measured["repeat_spread"] = spread
            if spread > FD_TOLERANCE * change:
                return Check("finite_differences", measured, True, (
                    f"the model is random: two passes of the same scan give losses {spread:.2g} apart, "
                    f"{spread / max(change, 1e-30):.2g}x the change a difference measures (a randomised layer or "
                    "transform: one draw's gradient does not predict another's, Athalye et al.'s stochastic gradients; "
                    "its robustness needs an attack on the expectation over draws, which no member makes)"))
            return Check("finite_differences", measured, True, cause + "; " + self._culprit(volume, reference))
        return Check("finite_differences", measured, False, cause)

    def _culprit(self, volume: Volume, reference: np.ndarray) -> str:
        """Where a gradient that disagrees with finite differences goes wrong: network layers that block or zero it,
        else a network whose input gets no gradient (an operation outside its layers, e.g. rounding), else the
        network's own gradient checked the same way on one window in model space (a layer that hides part of it, e.g.
        a custom backward), else, where that network's differences disagree with each other, its gradient misses
        them at smaller steps too and the preprocessing's exact gradient matches its own, a network layer with a
        stand-in gradient (a rounding passed straight through), else the preprocessing."""
        from medis3d.bpda import gradient_flow

        with torch.no_grad():
            model_in = self.target.model_input(torch.from_numpy(volume.array).to(self.target.device), volume)
        roi = [min(int(r), int(s)) if int(r) > 0 else int(s) for r, s in zip(self.target.window.roi_size, model_in.shape[1:])]
        window = model_in.as_tensor()[(None, slice(None)) + tuple(slice(0, r) for r in roi)].float()
        try:
            flow = gradient_flow(self.target.network, window)
        except RuntimeError:
            flow = {"blocked": [], "zero": []}
        if flow["blocked"] or flow["zero"]:
            return f"network layers that block or zero the gradient: {', '.join((flow['blocked'] + flow['zero'])[:5])}"
        if flow.get("input_grad_norm") == 0:  # every layer passes some gradient, yet none reaches the network's input
            return ("the network: its gradient at its input is zero on one window in model space, though no layer of it "
                    "zeroes its own (an operation outside its layers blocks it: rounding, a detach, an argmax, a custom backward)")
        error = self._network_fd_error(window)
        if error is not None and error > FD_TOLERANCE:
            return (f"the network's own gradient misses finite differences on one window in model space by {error:.2g} "
                    "(a layer hides part of it, e.g. a custom backward or a detached branch)")
        if error is None:  # the network's own differences disagree with each other: not smooth at one step's scale
            # a gradient that meets the differences as the step shrinks is a curved network's (a flat scan's ReLUs
            # all bend at once); one that misses them at 1/1020 and 1/4080 of the range too is not the network's own
            predicted, finer = self._network_differences(window, (1 / 1020, 1 / 4080))
            miss = min(relative_difference(predicted, d) for d in finer)
            if miss > STAND_IN_MISS:
                preprocessing = self._preprocessing_fd_error(volume)
                if preprocessing <= FD_TOLERANCE:
                    return (f"the network: on one window in model space its gradient misses finite differences by {miss:.2g} "
                            "or more at steps of 1/1020 and 1/4080 of its input's range (and its differences of 1/255 "
                            "and 4/255 disagree), while the exact preprocessing's gradient matches its own finite "
                            f"differences to {preprocessing:.2g}: a layer with a stand-in gradient, e.g. a rounding "
                            "passed straight through")
        return "the network passes gradients; look at the preprocessing steps (layer check)"

    def _preprocessing_fd_error(self, volume: Volume) -> float:
        """The exact preprocessing's gradient of a random signed weighting of the model input, along +-1 on a random
        sample of the scan's voxels, against central differences of the real preprocessing with steps of 1/255 and
        4/255 of the intensity range: the larger of the gradient's miss and the two differences' disagreement."""
        x = torch.from_numpy(volume.array).to(self.target.device).float()
        gen = torch.Generator().manual_seed(self.seed + 2)
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            model_in = self.target.model_input(leaf, volume, "exact")
            weights = (torch.rand(model_in.shape, generator=gen) * 2 - 1).to(model_in)
            (grad,) = torch.autograd.grad((model_in * weights).sum(), leaf)
        direction = signed_sample(x.shape, self.fd_voxels, gen).to(x)
        scales = self.target.intensity_scales(volume)
        apart = scales.array()
        if apart is not None:  # each channel's step of its own range
            direction = direction * torch.as_tensor(apart / scales.scale, dtype=x.dtype, device=x.device)
        h = scales.scale / 255

        def central(step: float) -> float:
            with torch.no_grad():
                plus = self.target.model_input(x + step * direction, volume).as_tensor().double()
                minus = self.target.model_input(x - step * direction, volume).as_tensor().double()
            return float(((plus - minus) * weights.detach().double()).sum()) / (2 * step)

        fine, coarse = central(h), central(4 * h)
        return max(relative_difference(float((grad.double() * direction.double()).sum()), fine),
                   relative_difference(fine, coarse))

    def _network_fd_error(self, window: torch.Tensor) -> float | None:
        """The network's gradient of a random signed weighting of its output, along +-1 on a random sample of the
        window's voxels, against the central difference with steps of 1/255 of the model's input range (None where
        the differences of steps 1/255 and 4/255 disagree: not a measurement at that scale)."""
        predicted, (fine, coarse) = self._network_differences(window, (1 / 255, 4 / 255))
        if relative_difference(fine, coarse) > FD_TOLERANCE:
            return None
        return relative_difference(predicted, fine)

    def _network_differences(self, window: torch.Tensor, fractions: tuple[float, ...]) -> tuple[float, list[float]]:
        """The network's gradient of a random signed weighting of its output along +-1 on a random sample of the
        window's voxels, and the central differences along it with steps of ``fractions`` of the window's range."""
        def logits(x: torch.Tensor) -> torch.Tensor:
            out = self.target.network(x)
            return (out[0] if isinstance(out, (tuple, list)) else out).float()

        gen = torch.Generator().manual_seed(self.seed + 1)
        leaf = window.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = logits(leaf)
            weights = (torch.rand(out.shape, generator=gen) * 2 - 1).to(out)
            (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        direction = signed_sample(window.shape, self.fd_voxels, gen).to(window)
        span = float(window.max() - window.min()) or 1.0

        def central(step: float) -> float:
            with torch.no_grad():
                return float(((logits(window + step * direction) - logits(window - step * direction)) * weights).sum()) / (2 * step)

        return float((grad * direction).sum()), [central(span * f) for f in fractions]

    def layers(self, volume: Volume, reference: np.ndarray, budget: Budget) -> Check:
        """Per preprocessing step: the share of the scan its gradient reaches, and how well the gradient of the
        model input predicts the real change of the model input under a step of the attack's size, along a random
        signed weighting of the model input (signed as a loss gradient is: an all-positive one asks for a uniform
        brightening, which percentile scaling undoes by design)."""
        x = torch.from_numpy(volume.array).to(self.target.device)
        steps: list[dict[str, Any]] = []
        gen = torch.Generator().manual_seed(self.seed)
        attack_path: tuple[torch.Tensor, torch.Tensor] | None = None  # the standard path's model input and gradient
        for path in ("exact", "standard", "smooth"):
            leaf = x.clone().requires_grad_(True)
            with torch.enable_grad():
                model_in = self.target.model_input(leaf, volume, path)
                weights = (torch.rand(model_in.shape, generator=gen) * 2 - 1).to(model_in)  # signed, as a loss gradient is
                (grad,) = torch.autograd.grad((model_in * weights).sum(), leaf)
            if path == "standard":
                attack_path = model_in.detach(), grad
            move = budget.eps * budget.direction(grad)  # the attack's step: eps along the norm's steepest direction
            with torch.no_grad():
                moved = self.target.model_input(x + move, volume)
                real = float(((moved - model_in.detach()) * weights).sum())
            predicted = float((grad * move).sum())
            steps.append({"path": path, "fraction_of_scan_reached": float((grad != 0).float().mean()),
                          "first_order_change": predicted, "real_change_at_eps": real,
                          "ratio": real / predicted if predicted else None})
        assert attack_path is not None
        hidden = self._hidden_share(x, volume, budget, gen, *attack_path)
        per_step = []
        for step in self.target.preprocessing.steps:
            per_step.append({"transform": step.name, "gradient": step.gradient, "smooth_stand_in": step.smooth or None})
        measured = {"paths": steps, "steps": per_step, "hidden_share": hidden}
        exact = steps[0]
        causes = []
        if exact["fraction_of_scan_reached"] < 0.5:
            spacing = [s for s in self.target.preprocessing.steps if s.name == "Spacing"]
            clamps = [s for s in self.target.preprocessing.steps if "clamp" in s.gradient]
            if spacing and steps[1]["fraction_of_scan_reached"] < 0.5:
                causes.append(f"Spacing: the model reads {steps[1]['fraction_of_scan_reached']:.0%} of the scan's voxels "
                              "(the rest cannot change its prediction; the smooth path spreads the gradient over them)")
            elif clamps:
                causes.append(f"{clamps[0].name}: its clamp zeroes the exact gradient of "
                              f"{1 - exact['fraction_of_scan_reached']:.0%} of the voxels (medis3d passes it straight through)")
        ratio = steps[1]["ratio"]
        if ratio is not None and not 0.5 <= ratio <= 2.0:
            intensity = [s.name for s in self.target.preprocessing.steps if "Intensity" in s.name or "Normalize" in s.name]
            causes.append(f"{', '.join(intensity) or 'the preprocessing'}: {misprediction(ratio)} at the attack's "
                          "budget (the attacker's gradient misleads it); try members with gradient=smooth")
        masked = hidden is not None and hidden > HIDDEN_TOLERANCE
        if masked:
            causes.append(f"the attack's gradient is zero on voxels that make {hidden:.0%} of the model input's change under a "
                          "random step: a preprocessing step masks it there (gradient treatments: "
                          f"{', '.join(f'{s.name} {s.gradient}' for s in self.target.preprocessing.steps)})")
        self.progress("layers: " + ", ".join(f"{s['path']} reaches {s['fraction_of_scan_reached']:.0%}" for s in steps))
        misleads = ratio is not None and not 0.5 <= ratio <= 2.0
        return Check("layers", measured, bool(causes) and (misleads or masked), "; ".join(causes))

    def _hidden_share(self, x: torch.Tensor, volume: Volume, budget: Budget, gen: torch.Generator, model_in: torch.Tensor,
                      grad: torch.Tensor) -> float | None:
        """The share of the model input's change under a random step of the attack's size per voxel that comes from
        the voxels the attack's gradient (``grad``, the standard path's at ``model_in``) does not reach: near 0 where
        those voxels do not move the input (a resampling skips them), large where a step masks their gradient. The
        first-order check moves only the voxels the gradient reaches, so it cannot see them. None where every voxel
        is reached."""
        region = budget._region(grad)
        inside = torch.ones_like(grad, dtype=torch.bool) if region is None else region != 0
        unseen = (grad == 0) & inside
        if not bool(unseen.any()):
            return None
        n = int(inside.sum())
        size = budget.eps if budget.norm == "linf" else budget.eps / max(n, 1) ** 0.5  # per voxel
        signs = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x) * size * inside.to(x)
        units = budget._scale(x)
        if units is not None:  # a budget per channel: each channel's size in its own units
            signs = signs * units
        with torch.no_grad():
            every = float((self.target.model_input(budget.project(x + signs, x), volume) - model_in).abs().sum())
            hidden = float((self.target.model_input(budget.project(x + signs * unseen.to(x), x), volume) - model_in).abs().sum())
        return hidden / every if every > 0 else None
