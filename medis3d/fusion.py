"""MedIS parallel fusion: run every (attack, loss) member and keep, per volume, the successful
member with the least perturbation (smallest size in the budget's norm, then fewest steps, then the
smaller size in the other norm, then the better score), or the strongest member when none succeeded. ``select="strongest"`` keeps the
member closest to the goal whatever its perturbation: the per-volume worst case over members at
the budget, as a robust-accuracy evaluation (SEA) reports it."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

from medis3d.attacks import ATTACKS, Attack, Budget, Goal, MemberResult
from medis3d.attacks.base import ProgressFn, Together, drive_together
from medis3d.config import check_budget, eps_or_default
from medis3d.errors import InputError
from medis3d.io.volume import Volume
from medis3d.losses import parse_losses
from medis3d.members import RADII, Member, parse_members, product
from medis3d.progress import MEMBERS, notify
from medis3d.target import IntensityScales, Target

if TYPE_CHECKING:
    from medis3d.memory import MemoryPlan

PAPER_STEP = 1 / 255
PAPER_STEPS = 10
PAPER_EPS = 10 / 255


def _sizes_its_own_success(member: Member) -> bool:
    """Whether ``member``'s first success is already the smallest budget it needs, so --min-eps and eps50 / eps90
    take its size rather than bisect: only a minimal-norm search (FMN), which shrinks its radius below each success.
    An attack whose perturbation grows step by step from the clean scan (IGSM, DAG) first succeeds at a multiple of its
    step, and the same member at a smaller budget, its step scaled with it, can succeed below that (igsm:ce at 160 HU
    in steps of 16 first flipped half the tests' structure at 160 HU, where bisection found 150); from a random
    start (``random_start=1``) its first iterate already fills the ball (igsm:margin[random_start=1] eps50 63.75/255
    at 64/255, where it succeeds at 40/255). Both are bisected below their first success (:func:`smallest_budget`)."""
    return bool(ATTACKS[member.attack].minimal)


@dataclass
class MedISResult:
    """Fusion outcome: the adversarial volume, the chosen member, and every member."""

    adversarial: Volume
    members: list[MemberResult]
    selected: int
    success: bool
    clean_prediction: np.ndarray
    reference: np.ndarray
    aim: np.ndarray | None
    eps_native: float
    step_native: float
    native_per_normalized: float
    scale_note: str
    threshold: float
    time_s: float = 0.0
    memory_plan: MemoryPlan | None = None  # when --memory-budget chose the settings
    flip_budgets: dict | None = None  # with min_eps: eps50 / eps90 (native units; None: not reached within eps)
    together: dict | None = None  # members batched: passes taken, members per pass (largest, mean); None: one by one
    source: Volume | None = None  # the attacked scan (the caller's own object, not a copy)
    norm: str = "linf"  # the budget's norm: eps_native is the radius of an L-inf or an L2 ball
    # a scan whose channels the model sees in their own units (Target.channels_apart): each channel's native units per
    # unit of its normalised range (C, 1, 1, 1), and how each was found; None where one native unit is shared
    channel_scale: np.ndarray | None = None
    channel_notes: tuple[str, ...] | None = None
    # the budget's own units (Budget.scale): eps and step in each channel's range, native per channel eps * scale;
    # None: the budget is in native units (shared by every channel). eps_native is then the largest channel's
    budget_scale: np.ndarray | None = None
    budget_eps: float | None = None  # eps and the step in the budget's units (None: eps_native, step_native)
    budget_step: float | None = None

    def per_channel(self, value: float) -> list[float]:
        """A size in the budget's units (eps, step, eps50 ...) in each channel's native units."""
        channels = self.adversarial.channels
        if self.budget_scale is None:
            return [float(value)] * channels
        return [float(value * s) for s in np.asarray(self.budget_scale, dtype=np.float64).reshape(-1)]

    @property
    def eps_native_per_channel(self) -> list[float]:
        """The budget's radius in each channel's native units (the same number in each where eps is native)."""
        return self.per_channel(self.eps_native if self.budget_eps is None else self.budget_eps)

    @property
    def native_per_normalized_per_channel(self) -> list[float]:
        """Each channel's native units per unit of the model's normalised range (one shared value where it has one)."""
        if self.channel_scale is None:
            return [float(self.native_per_normalized)] * self.adversarial.channels
        return [float(v) for v in np.asarray(self.channel_scale, dtype=np.float64).reshape(-1)]

    @property
    def normalization_per_channel(self) -> list[str]:
        """How each channel's :attr:`native_per_normalized_per_channel` was found."""
        if self.channel_notes is None:
            return [self.scale_note] * self.adversarial.channels
        return list(self.channel_notes)

    @property
    def step_native_per_channel(self) -> list[float]:
        """The step in each channel's native units."""
        return self.per_channel(self.step_native if self.budget_step is None else self.budget_step)

    def normalized_sizes(self, delta: np.ndarray) -> tuple[float, float]:
        """L-inf and L2 of a native perturbation in fractions of the model's intensity range: of each channel's own
        where the model sees the channels apart (the largest channel's L-inf share, the L2 of ``delta / scale``)."""
        from medis3d.metrics import perturbation_norms

        norms = perturbation_norms(delta, self.native_per_normalized, self.channel_scale)
        return norms["linf_normalized"], norms["l2_normalized"]

    def member_normalized(self, m: MemberResult) -> tuple[float, float]:
        """A member's L-inf and L2 in fractions of the model's intensity range (:meth:`normalized_sizes`)."""
        if self.channel_scale is None or self.source is None:
            return m.linf_native / self.native_per_normalized, m.l2_native / self.native_per_normalized
        return self.normalized_sizes(m.adversarial.astype(np.float64) - self.source.array)

    def flip_budget(self, value: float, unit: str) -> float:
        """An eps50/eps90 (found in the budget's units) as reports give it: ``native`` (the largest channel's) or
        ``normalized``."""
        natives = self.per_channel(value)
        if unit == "native":
            return max(natives)
        if self.channel_scale is None:
            return max(natives) / self.native_per_normalized
        return max(n / s for n, s in zip(natives, np.asarray(self.channel_scale, dtype=np.float64).reshape(-1)))

    @property
    def chosen(self) -> MemberResult:
        return self.members[self.selected]

    def __repr__(self) -> str:
        c = self.chosen
        return (f"MedISResult(success={self.success}, chosen={c.name!r}, score={c.score:.4g}, "
                f"threshold={self.threshold:.4g}, linf_native={c.linf_native:.4g}, eps_native={self.eps_native:.4g}, "
                f"members={len(self.members)}, shape={tuple(self.adversarial.spatial_shape)}, time_s={self.time_s:.1f})")

    def summary(self) -> dict[str, Any]:
        """The outcome in plain numbers (what :meth:`save` writes as ``result.json``): success, the chosen member
        and its score (mean IoU against the reference; against the target segmentation when targeted), the budget
        in native units, and every member's outcome."""
        c = self.chosen
        return {
            "success": bool(self.success),
            "targeted": self.aim is not None,
            "chosen": c.name,
            "score": float(c.score),
            "threshold": float(self.threshold),
            "linf_native": float(c.linf_native),
            "l2_native": float(c.l2_native),
            "eps_native": float(self.eps_native),
            "eps_native_per_channel": self.eps_native_per_channel,
            "norm": self.norm,
            "step_native": float(self.step_native),
            "native_per_normalized": float(self.native_per_normalized),
            "time_s": float(self.time_s),
            "flip_budgets": self.flip_budgets,
            "members": [
                {"member": m.name, "success": bool(m.success), "score": float(m.score), "steps": int(m.steps),
                 "linf_native": float(m.linf_native), "l2_native": float(m.l2_native), "time_s": float(m.time_s)}
                for m in self.members
            ],
        }

    def save(self, out_dir: Path | str) -> Path:
        """Write the outcome to a new folder ``out_dir`` (refused where it exists and is not empty):
        ``adversarial.nii.gz`` (stored as the source stores it; a DICOM source also gets the series
        ``adversarial/``), ``perturbation.nii.gz`` (adversarial minus clean, native units),
        ``prediction_clean.nii.gz`` and ``prediction_adversarial.nii.gz`` (label maps) and ``result.json``
        (:meth:`summary`). Everything is written beside it first and moved into place at the end, so a
        failure leaves nothing. Returns ``out_dir``."""
        import json
        import os
        import shutil

        from medis3d.errors import OutputError
        from medis3d.io import write_nifti
        from medis3d.io.atomic import staging_folder
        from medis3d.io.outputs import PERTURBATION_DESCRIPTION, adversarial_description, prediction_description

        out = Path(out_dir)
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise OutputError(f"{out}: already exists and is not an empty folder; save writes a new one (nothing is overwritten)")
        adversarial = self.adversarial
        # written from the attacked scan where it is at hand, as the CLI writes it: each voxel the source's stored value
        # plus its change (a coarse int32 or float64 file, from its own float32 values, drifted past the budget) and
        # the untouched voxels bit for bit (a scan of several channels from files of their own: as one file, as before)
        source = self.source if self.source is not None and not self.source.channel_volumes else adversarial
        stage = staging_folder(out)
        try:
            description = adversarial_description(f"{self.eps_native:.4g}", self.norm, self.chosen.name)
            write_nifti(source, stage / "adversarial.nii.gz", adversarial.array, description=description,
                        unchanged=None if source is adversarial else adversarial.array == source.array)
            if adversarial.format == "dicom" and adversarial.meta.get("dicom_headers"):
                from medis3d.io.dicom import write_dicom_series

                write_dicom_series(source, adversarial.array, stage / "adversarial",
                                   series_description=description[:64],
                                   derivation=f"medis3d MedIS adversarial attack, {self.chosen.steps} steps of {self.chosen.name}")
            if self.source is not None:
                write_nifti(adversarial, stage / "perturbation.nii.gz", adversarial.array - self.source.array, dtype=np.float32,
                            description=PERTURBATION_DESCRIPTION)
            for name, labels in (("prediction_clean", self.clean_prediction), ("prediction_adversarial", self.chosen.prediction)):
                labels = np.asarray(labels)
                write_nifti(adversarial, stage / f"{name}.nii.gz", labels,
                            dtype=np.uint16 if labels.size and labels.max() > 255 else np.uint8,
                            description=prediction_description(name))
            (stage / "result.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out




@dataclass
class Setting:
    """One volume as a fusion's members attack it: the goal, the budget (native units) and the clean prediction."""

    volume: Volume
    goal: Goal
    budget: Budget
    factor: float  # native units per unit of --eps (the intensity scale, or 1 for --eps-units native)
    scale: float  # native units per unit of the model's normalised intensity range
    note: str
    clean_prediction: np.ndarray
    scales: IntensityScales | None = None  # with each channel's own where the model sees them apart


class Outcome(Protocol):
    """What fusion selects on: a member's outcome, live (:class:`MemberResult`) or recorded (:class:`MemberOutcome`)."""

    @property
    def success(self) -> bool: ...
    @property
    def score(self) -> float: ...  # mean IoU with the reference (untargeted) or with the target (targeted)
    @property
    def steps(self) -> int: ...
    @property
    def linf_native(self) -> float: ...
    @property
    def l2_native(self) -> float: ...
    @property
    def linf_scaled(self) -> float | None: ...  # in the budget's per-channel units (Budget.scale), where it has them
    @property
    def l2_scaled(self) -> float | None: ...


@dataclass(frozen=True)
class MemberOutcome:
    """A member's outcome as a study or a benchmark recorded it, for :func:`select_member`."""

    success: bool
    score: float
    steps: int
    linf_native: float
    l2_native: float = 0.0
    linf_scaled: float | None = None
    l2_scaled: float | None = None


def select_member(members: Sequence[Outcome], goal_targeted: bool, select: str = "least", norm: str = "linf") -> int:
    """Index of the member MedIS keeps (see the module docstring); the one rule for a live fusion, a study's
    recorded members (``medis3d evaluate``) and the benchmark."""
    if not members:
        raise ValueError("no members to select from")
    better = (lambda s: -s) if goal_targeted else (lambda s: s)  # smaller key is better

    def size(m: Outcome) -> tuple[float, float]:  # in the budget's units: per channel where it has them
        return _size(m, norm), _size(m, "linf" if norm == "l2" else "l2")

    successful = [i for i, m in enumerate(members) if m.success]
    if successful and select == "least":
        return min(successful, key=lambda i: (size(members[i])[0], members[i].steps, size(members[i])[1], better(members[i].score), i))
    return min(range(len(members)), key=lambda i: (better(members[i].score), *size(members[i]), i))


def apart_note(scales: IntensityScales) -> str:
    """The normalisation a report states for a scan whose channels the model sees in their own units."""
    return "each channel's own range (the model sees the channels in their own units): " + "; ".join(scales.notes or ())


def _size(result: Outcome, norm: str) -> float:
    """A member's perturbation in the norm ``norm``, in the budget's units (per channel where the budget has them)."""
    if norm == "l2":
        return result.l2_native if result.l2_scaled is None else result.l2_scaled
    return result.linf_native if result.linf_scaled is None else result.linf_scaled


def smallest_budget(
    run: Callable[[Budget], MemberResult], budget: Budget, full: MemberResult, bisection_steps: int, norm: str = "linf"
) -> tuple[float, MemberResult]:
    """Bisect eps (the step scaled with it) below the size of ``full``, the member's successful run at ``budget``, for
    the smallest budget at which ``run`` succeeds: the size (in ``norm``, in the budget's units) of the smallest
    successful perturbation found, and its run. Every successful run is a witness that a perturbation of its own size
    succeeds, whatever budget it ran at (an attack that stops at its first success can stop well inside its ball), so
    the answer is never above ``full``'s size, nor above the smallest budget that succeeded."""
    best = full
    low, high = 0.0, min(budget.eps, _size(full, norm))
    if high <= 0:  # the clean scan already succeeds: no budget to search
        return 0.0, full
    for _ in range(bisection_steps):
        mid = (low + high) / 2
        trial = run(dataclasses.replace(budget, eps=mid, step=budget.step * mid / budget.eps))
        if trial.success:
            high = mid
            if _size(trial, norm) <= _size(best, norm):
                best = trial
        else:
            low = mid
    return _size(best, norm), best


@dataclass
class MedIS:
    """MedIS over a target: ``MedIS(target, losses="all")(volume, reference=None, target_mask=None)``.

    ``eps`` and ``step`` are sizes in ``norm`` (L-inf or L2) in fractions of the model's intensity range
    (``eps_units="normalized"``, the paper's 1/255 steps) or in the scan's units
    (``eps_units="native"``). Without ``step``, the paper's 1/255 of the model's range whatever the units (under
    an L2 budget a tenth of eps: :attr:`preset_step`).
    """

    target: Target
    losses: str | Sequence[str] = "all"
    eps: float = None  # type: ignore[assignment]  # None (not given): the paper's 10/255 under L-inf; refused under L2 or native units
    step: float = None  # type: ignore[assignment]  # None (not given): the paper's 1/255 as a preset's step (``preset_step``)
    steps: int = PAPER_STEPS
    eps_units: str = "normalized"
    attacks: Sequence[str] = ("igsm",)
    members_spec: str | Sequence | None = None  # explicit members (attack:loss[options]) instead of attacks x losses
    success_threshold: float | None = None
    progress: ProgressFn | None = None
    region: np.ndarray | None = None
    seed: int = 0
    norm: str = "linf"
    min_eps: bool = False  # find each member's smallest successful budget (bisection for fixed-budget attacks)
    select: str = "least"  # "least" perturbation among the successful (the paper's), or "strongest"
    bisection_steps: int = 4
    together: int = 1  # members that share each pass through the network (1: one after another)
    # the step is a preset's, not the user's: a fraction of the model's intensity range whatever ``eps_units`` says
    # (1/255 stays 1/255 under a native eps), and under an L2 budget a tenth of eps (an L-inf-sized step would be
    # no length at all in L2)
    preset_step: bool = False
    # None: members stop at their first success where the selection needs no more ("least"), and run every iteration
    # where it needs their strongest point ("strongest"); False: every member runs all its iterations and keeps its
    # strongest iterate (the lowest Dice it reaches: robustness curves); True: every member stops at its first success
    stop_at_success: bool | None = None
    loss_names: list[str] = field(init=False)
    together_log: Together | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.eps = eps_or_default(self.eps, self.norm, self.eps_units, PAPER_EPS)  # a float from here on
        if self.step is None:  # not given: a float from here on
            self.step, self.preset_step = PAPER_STEP, True
        try:
            self.loss_names = parse_losses(self.losses)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        check_budget(self.eps, self.step, self.steps, self.eps_units, self.norm, self.select, self.together,
                     self.success_threshold)
        if isinstance(self.attacks, str):
            self.attacks = [a.strip() for a in self.attacks.split(",") if a.strip()]
        self._members = parse_members(self.members_spec) if self.members_spec else product(self.attacks, self.loss_names)

    def prepare(self, volume: Volume, reference: np.ndarray | None = None, target_mask: np.ndarray | str | None = None,
                clean_prediction: np.ndarray | None = None) -> Setting:
        """What every member of this fusion shares on ``volume``: the goal, the budget in native units, and
        the clean prediction (computed unless given)."""
        scales = self.target.intensity_scales(volume)
        scale, note = scales.scale, scales.note
        # channels the model sees in their own units, a budget in fractions of the range: eps and step are fractions of
        # each channel's own (Budget.scale); --eps-units native applies them as given in every channel's own units
        apart = scales.array() if self.eps_units == "normalized" else None
        factor = scale if self.eps_units == "normalized" and apart is None else 1.0
        if clean_prediction is None:
            notify(self.progress, "phase", "clean prediction")
            clean_prediction = self.target.predict(volume)
        reference = clean_prediction if reference is None else reference
        aim = self._aim(target_mask, clean_prediction)
        goal = Goal(self.target, reference, aim, self.success_threshold)
        step = min(self.step, self.eps) * factor  # a step beyond the budget is a step of eps (attack, evaluate, diagnose alike)
        if self.preset_step:
            unit = scale if apart is None else 1.0  # the model's range in the budget's units
            step = self.eps * factor / 10 if self.norm == "l2" else min(self.step * unit, self.eps * factor)
        budget = Budget.for_volume(volume, self.eps * factor, step, self.steps, region=self.region, norm=self.norm, scale=apart)
        return Setting(volume, goal, budget, factor, scale, note, clean_prediction, scales)

    def __call__(
        self, volume: Volume, reference: np.ndarray | None = None, target_mask: np.ndarray | str | None = None
    ) -> MedISResult:
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        setting = self.prepare(volume, reference, target_mask)
        goal, budget = setting.goal, setting.budget
        apart = setting.scales if setting.scales is not None and setting.scales.per_channel is not None else None
        notify(self.progress, "phase", MEMBERS)
        members = self.run_members(self.members(), budget, goal, volume, setting.factor)
        selected = select_member(members, goal.targeted, self.select, self.norm)
        chosen = members[selected]
        flips = None
        if self.min_eps and not goal.targeted:
            notify(self.progress, "phase", f"eps50 and eps90 of {chosen.name}")
            flips = self.flip_budgets(self.members()[selected], setting)
        return MedISResult(
            adversarial=volume.with_array(chosen.adversarial),
            members=members,
            selected=selected,
            success=chosen.success,
            clean_prediction=setting.clean_prediction,
            reference=goal.reference,
            aim=goal.aim,
            eps_native=float(np.max(budget.native(budget.eps))),
            step_native=float(np.max(budget.native(budget.step))),
            native_per_normalized=setting.scale if apart is None else float(np.max(apart.per_channel or (setting.scale,))),
            scale_note=setting.note if apart is None else apart_note(apart),
            threshold=float(cast(float, goal.threshold)),
            time_s=time.perf_counter() - start,
            flip_budgets=flips,
            together=self.together_log.as_dict() if self.together_log else None,
            source=volume,
            norm=self.norm,
            channel_scale=None if apart is None else apart.array(),
            channel_notes=None if apart is None else apart.notes,
            budget_scale=budget.scale,
            budget_eps=budget.eps,
            budget_step=budget.step,
        )

    def flip_budgets(self, member: Member, setting: Setting) -> dict:
        """eps50 and eps90 of ``member``: the smallest budgets at which it flips half and nine tenths of the reference
        structure's voxels (the size of the smallest such perturbation found: its run at ``eps``, then a bisection
        below that run's size, :func:`smallest_budget`), in the budget's units (native, or with a budget per channel
        fractions of each channel's range: :meth:`MedISResult.flip_budget`); None where ``eps`` does not reach it.
        Each run stops at its first success whatever the selection: the strongest iterate of an attack whose
        perturbation grows step by step lies at the full budget, not where it first flipped that share. The bisection
        scales the member's own step with eps, as --min-eps's does. A minimal-norm search (FMN) is not bisected."""
        out: dict[str, float | None] = {}
        budget = self.member_budget(member, setting.budget, setting.factor)

        def run(trial: Budget, goal: Goal) -> MemberResult:  # at ``trial`` as it is: already the member's budget
            attack = self.attack(member, trial, goal, first_success=True)
            return self._done(attack, self._finish(member, trial, attack.run(setting.volume), goal, setting.volume, bisect=False))

        for name, share in (("eps50", 0.5), ("eps90", 0.9)):
            goal = Goal(self.target, setting.goal.reference, threshold=1.0 - share, metric="unflipped")
            full = run(budget, goal)
            if not full.success:
                out[name] = None
                continue
            if _sizes_its_own_success(member):  # a minimal-norm search's least success is the smallest budget it needs
                out[name] = _size(full, self.norm)  # in the budget's own norm and units
                continue
            out[name], _ = smallest_budget(functools.partial(run, goal=goal), budget, full, self.bisection_steps, self.norm)
        return out

    def run_member(self, member: Member, budget: Budget, goal: Goal, volume: Volume, factor: float = 1.0,
                   bisect: bool = True, first_success: bool = False) -> MemberResult:
        """Run one member at ``budget`` (its own ``steps`` and ``step``, in ``--eps`` units times ``factor``,
        where it sets them); with ``min_eps``, its smallest successful budget; ``first_success``: stopped at its
        first success (a minimal-norm search by its own rule), whatever the selection."""
        budget = self.member_budget(member, budget, factor)
        attack = self.attack(member, budget, goal, first_success)
        return self._done(attack, self._finish(member, budget, attack.run(volume), goal, volume, bisect))

    def run_members(self, members: Sequence[Member], budget: Budget, goal: Goal, volume: Volume,
                    factor: float = 1.0) -> list[MemberResult]:
        """:meth:`run_member` of each of ``members``; with ``together`` above 1, up to that many of them share
        each pass through the network (:func:`medis3d.attacks.base.drive_together`); ``self.together_log``
        then says how they were grouped."""
        if self.together <= 1 or len(members) < 2:
            self.together_log = None
            return [self.run_member(member, budget, goal, volume, factor) for member in members]
        budgets = [self.member_budget(member, budget, factor) for member in members]
        self.together_log = Together()
        attacks = [self.attack(m, b, goal) for m, b in zip(members, budgets)]
        done: dict[int, MemberResult] = {}

        def finish(i: int, result: MemberResult) -> MemberResult:
            return self._done(attacks[i], self._finish(members[i], budgets[i], result, goal, volume))

        def finished(i: int, result: MemberResult) -> None:
            # a member that leaves the batch is finished and reported then, as when alone (reported at the batch's end,
            # a member that stopped at its first success stayed at that step on the progress bar, its ETA too long);
            # one --min-eps may bisect is finished after the batch, which its bisection would hold up
            if not self.min_eps:
                done[i] = finish(i, result)

        results = drive_together([a.iterate(volume) for a in attacks], self.target, volume, self.together, self.together_log,
                                 finished)
        return [done[i] if i in done else finish(i, r) for i, r in enumerate(results)]

    def _done(self, attack: Attack, result: MemberResult) -> MemberResult:
        """Tell the progress a member has finished (under the name its steps were reported by)."""
        notify(self.progress, "member_done", attack.member_name, result.success, result.steps, result.score)
        return result

    @staticmethod
    def member_budget(member: Member, budget: Budget, factor: float = 1.0) -> Budget:
        """``budget`` with the member's own ``steps`` and ``step`` (in ``--eps`` units times ``factor``) where it sets them."""
        changes: dict[str, Any] = {}
        if member.option("steps") is not None:
            changes["steps"] = int(member.option("steps"))
        if member.option("step") is not None:  # capped at eps as --step is
            changes["step"] = min(float(member.option("step")) * factor, budget.eps)
        return dataclasses.replace(budget, **changes) if changes else budget

    def runs_to_the_end(self) -> bool:
        """Whether members run every iteration and keep their strongest iterate (the worst case, or
        ``stop_at_success=False``) rather than stop at their first success."""
        return self.stop_at_success is False or (self.stop_at_success is None and self.select != "least")

    def attack(self, member: Member, budget: Budget, goal: Goal, first_success: bool = False) -> Attack:
        """The attack object of ``member`` at ``budget`` (already the member's: :meth:`member_budget`);
        ``first_success``: one that stops at its first success whatever the selection."""
        cls = ATTACKS[member.attack]
        # least-perturbation fusion needs a member's first success only (a minimal-norm search its smallest, by its
        # own rule); the worst case needs every member's strongest point: no member stops at its first success, not
        # even one whose perturbation grows step by step (IGSM, DAG), which would report where it crossed the line
        if self.select == "least":
            stop = None if cls.minimal else True
        else:
            stop = False
        if self.stop_at_success is not None:
            stop = self.stop_at_success
        if first_success:
            stop = None if cls.minimal else True
        kwargs = {"gradient": member.option("gradient", "standard"), "transfer": member.option("transfer", 0.0),
                  "stop_at_success": stop, "random_start": member.option("random_start", False)}
        if member.attack == "apgd":
            kwargs.update(restarts=member.option("restarts", 1),
                          radii=RADII[member.option("radii", "none")], then=member.option("then"))
        if member.attack == "lowfreq" and member.option("factor"):
            kwargs["factor"] = member.option("factor")
        label = member.name if member.options else None
        seed = self.seed + int(member.option("seed", 0))
        return cls(self.target, member.loss, budget, goal, self.progress, seed=seed, label=label, **kwargs)

    def _finish(self, member: Member, budget: Budget, result: MemberResult, goal: Goal, volume: Volume,
                bisect: bool = True) -> MemberResult:
        """The member's result named and scored in float32; with ``min_eps``, its run at the smallest successful
        budget (bisection below its success, :func:`smallest_budget`; not a minimal-norm search's), unless members run
        to their strongest iterate (that is what they keep then)."""
        result.member = member.name
        result = self._scored(result, goal, volume)
        if not (self.min_eps and bisect) or _sizes_its_own_success(member) or not result.success or self.runs_to_the_end():
            return result  # a minimal-norm search already keeps its least success

        def run(trial: Budget) -> MemberResult:
            out = self._scored(self.attack(member, trial, goal).run(volume), goal, volume)
            out.member = member.name
            return out

        began = time.perf_counter()
        _, best = smallest_budget(run, budget, result, self.bisection_steps, self.norm)  # bisect below its success
        searched = time.perf_counter() - began
        if best is not result:  # keep the full-budget run's trace in front of the smallest successful one's
            best.trace = result.trace + best.trace
        # its time holds the bisection's runs (it reported one run's: 10 s of an attack of 33 s with one member)
        best.time_s, best.time_share_s = result.time_s + searched, result.cost_s + searched
        return best

    def _scored(self, result: MemberResult, goal: Goal, volume: Volume) -> MemberResult:
        """``result`` with its prediction, score and success those of its kept iterate in float32. With ``--amp`` the
        search (and its trace) ran in reduced precision, where a voxel near the decision boundary may fall the other
        way; what a member reports is the model's own float32 verdict on what it keeps. Without ``--amp``, as it is."""
        if not self.target.precision.enabled:
            return result
        prediction = self.target.predict(volume.with_array(result.adversarial))
        score = goal.score(prediction)
        result.prediction, result.score, result.success = prediction, score, goal.succeeded(score)
        return result

    def members(self) -> list[Member]:
        """The members fused: ``members_spec``, or every attack with every loss (attacks with their own loss once)."""
        return list(self._members)

    def _aim(self, target_mask, clean_prediction: np.ndarray) -> np.ndarray | None:
        if target_mask is None:
            return None
        if isinstance(target_mask, str):
            if target_mask == "background":
                return np.zeros_like(clean_prediction)
            if target_mask == "foreground":
                return np.ones_like(clean_prediction)
            raise InputError(f"--target must be background, foreground or a file, got {target_mask!r}")
        return np.asarray(target_mask).astype(clean_prediction.dtype)
