"""MedIS parallel fusion: run every (attack, loss) member and keep, per volume, the successful
member with the least perturbation (smallest size in the budget's norm, then fewest steps, then
the better score), or the strongest member when none succeeded. ``select="strongest"`` keeps the
member closest to the goal whatever its perturbation: the per-volume worst case over members at
the budget, as a robust-accuracy evaluation (SEA) reports it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from medis3d.attacks import ATTACKS, OWN_LOSS, Budget, Goal, MemberResult
from medis3d.attacks.base import ProgressFn
from medis3d.errors import InputError
from medis3d.io.volume import Volume
from medis3d.losses import parse_losses
from medis3d.target import Target

PAPER_STEP = 1 / 255
PAPER_STEPS = 10
PAPER_EPS = 10 / 255


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
    memory_plan: object | None = None  # medis3d.memory.MemoryPlan when --memory-budget chose the settings

    @property
    def chosen(self) -> MemberResult:
        return self.members[self.selected]


SELECTIONS = ("least", "strongest")


def select_member(members: Sequence[MemberResult], goal_targeted: bool, select: str = "least", norm: str = "linf") -> int:
    """Index of the member MedIS keeps (see the module docstring)."""
    if not members:
        raise ValueError("no members to select from")
    better = (lambda s: -s) if goal_targeted else (lambda s: s)  # smaller key is better

    def size(m: MemberResult) -> tuple[float, float]:
        return (m.l2_native, m.linf_native) if norm == "l2" else (m.linf_native, m.l2_native)

    successful = [i for i, m in enumerate(members) if m.success]
    if successful and select == "least":
        return min(successful, key=lambda i: (size(members[i])[0], members[i].steps, size(members[i])[1], better(members[i].score), i))
    return min(range(len(members)), key=lambda i: (better(members[i].score), *size(members[i]), i))


def smallest_budget(
    run: Callable[[Budget], MemberResult], budget: Budget, full: MemberResult, bisection_steps: int
) -> tuple[float, MemberResult]:
    """Bisect eps (the step scaled with it) for the smallest budget at which ``run`` succeeds, given
    ``full``, its successful run at ``budget``: that eps and the run there."""
    low, high, best = 0.0, budget.eps, full
    for _ in range(bisection_steps):
        mid = (low + high) / 2
        trial = run(dataclasses.replace(budget, eps=mid, step=budget.step * mid / budget.eps))
        if trial.success:
            high, best = mid, trial
        else:
            low = mid
    return high, best


@dataclass
class MedIS:
    """MedIS over a target: ``MedIS(target, losses="all")(volume, reference=None, target_mask=None)``.

    ``eps`` and ``step`` are L-inf sizes in fractions of the model's intensity range
    (``eps_units="normalized"``, the paper's 1/255 steps) or in the scan's units
    (``eps_units="native"``).
    """

    target: Target
    losses: str | Sequence[str] = "all"
    eps: float = PAPER_EPS
    step: float = PAPER_STEP
    steps: int = PAPER_STEPS
    eps_units: str = "normalized"
    attacks: Sequence[str] = ("igsm",)
    success_threshold: float | None = None
    progress: ProgressFn | None = None
    region: np.ndarray | None = None
    seed: int = 0
    norm: str = "linf"
    min_eps: bool = False  # find each member's smallest successful budget (bisection for fixed-budget attacks)
    select: str = "least"  # "least" perturbation among the successful (the paper's), or "strongest"
    bisection_steps: int = 4
    loss_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.loss_names = parse_losses(self.losses)
        except ValueError as exc:
            raise InputError(str(exc))
        if not self.eps > 0:
            raise InputError(f"--eps must be positive, got {self.eps}")
        if not self.step > 0:
            raise InputError(f"--step must be positive, got {self.step}")
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.eps_units not in ("normalized", "native"):
            raise InputError(f"--eps-units must be 'normalized' or 'native', got {self.eps_units!r}")
        if self.norm not in ("linf", "l2"):
            raise InputError(f"--norm must be linf or l2, got {self.norm!r}")
        if self.select not in SELECTIONS:
            raise InputError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if isinstance(self.attacks, str):
            self.attacks = [a.strip() for a in self.attacks.split(",") if a.strip()]
        for a in self.attacks:
            if a not in ATTACKS:
                raise InputError(f"unknown attack {a!r}; choose from: {', '.join(sorted(ATTACKS))}")

    def __call__(
        self, volume: Volume, reference: np.ndarray | None = None, target_mask: np.ndarray | str | None = None
    ) -> MedISResult:
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        scale, note = self.target.intensity_scale(volume)
        factor = scale if self.eps_units == "normalized" else 1.0
        eps_native, step_native = self.eps * factor, self.step * factor
        clean_prediction = self.target.predict(volume)
        reference = clean_prediction if reference is None else reference
        aim = self._aim(target_mask, clean_prediction)
        goal = Goal(self.target, reference, aim, self.success_threshold)
        budget = Budget.for_volume(volume, eps_native, step_native, self.steps, region=self.region, norm=self.norm)
        members: list[MemberResult] = []
        for attack_name, loss in self.members():
            members.append(self._run_member(attack_name, loss, budget, goal, volume))
        selected = select_member(members, goal.targeted, self.select, self.norm)
        chosen = members[selected]
        return MedISResult(
            adversarial=volume.with_array(chosen.adversarial),
            members=members,
            selected=selected,
            success=chosen.success,
            clean_prediction=clean_prediction,
            reference=reference,
            aim=aim,
            eps_native=eps_native,
            step_native=step_native,
            native_per_normalized=scale,
            scale_note=note,
            threshold=float(goal.threshold),
            time_s=time.perf_counter() - start,
        )

    def _run_member(self, attack_name: str, loss: str, budget: Budget, goal: Goal, volume: Volume) -> MemberResult:
        cls = ATTACKS[attack_name]
        result = cls(self.target, loss, budget, goal, self.progress, seed=self.seed).run(volume)
        if not self.min_eps or cls.early_stop or not result.success:
            return result  # iterative attacks already stop at their first success: their L-inf is the distortion
        _, best = smallest_budget(  # fixed-budget attacks: bisect the budget
            lambda trial: cls(self.target, loss, trial, goal, self.progress, seed=self.seed).run(volume), budget, result,
            self.bisection_steps)
        if best is not result:  # keep the full-budget run's trace in front of the smallest successful one's
            best.trace = result.trace + best.trace
        return best

    def members(self) -> list[tuple[str, str]]:
        """The (attack, loss) pairs fused; attacks with their own loss are one member each."""
        pairs: list[tuple[str, str]] = []
        for attack_name in self.attacks:
            if attack_name in OWN_LOSS:
                pairs.append((attack_name, attack_name))
            else:
                pairs.extend((attack_name, loss) for loss in self.loss_names)
        return pairs

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
