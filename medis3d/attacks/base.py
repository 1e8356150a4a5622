"""What every attack shares: the goal (untargeted or targeted, and when it has succeeded), the
budget (L-inf ball in native units, valid intensity range, optional region), and the result."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from medis3d.io.volume import Volume
from medis3d.metrics import flipped_fraction, mean_iou, smooth_mean_iou
from medis3d.target import Target

# The paper's success criteria: untargeted when mean IoU against the reference drops to 0.5 or
# below, targeted when mean IoU against the target reaches 0.45 or above.
UNTARGETED_SUCCESS = 0.5
TARGETED_SUCCESS = 0.45

ProgressFn = Callable[[str, int, int, float], None]


@dataclass
class Request:
    """One pass an attack asks the Target for: the iterate as stored, and (with ``objective``) the gradient of
    that objective by the ``gradient`` path. Attacks are generators of requests (:meth:`Attack.iterate`), so one
    member can be run alone (:func:`drive`) or several through the network together (:func:`drive_together`)."""

    x: torch.Tensor
    objective: Callable[[torch.Tensor], torch.Tensor] | None
    gradient: str = "standard"


Steps = Generator[Request, object, "MemberResult"]


def drive(steps: Steps, target: Target, volume: Volume) -> MemberResult:
    """Run one attack's requests through ``target``, one pass at a time; its result (alone, its share of the time
    is its whole span: ``time_share_s`` is ``time_s``)."""
    try:
        request = next(steps)
        while True:
            request = steps.send(target.evaluate(request.x, volume, request.objective, gradient=request.gradient))
    except StopIteration as stop:
        result = stop.value
        result.time_share_s = result.time_s
        return result


@dataclass
class Together:
    """How members ran together: the passes taken and, for each pass, how many members shared it."""

    passes: int = 0
    sizes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"passes": self.passes, "largest": max(self.sizes, default=0),
                "mean": round(sum(self.sizes) / len(self.sizes), 2) if self.sizes else 0.0}


def drive_together(members: Sequence[Steps], target: Target, volume: Volume, group: int | None = None,
                   log: Together | None = None,
                   finished: Callable[[int, MemberResult], None] | None = None) -> list[MemberResult]:
    """Run several attacks' requests through ``target`` together: at every round, each member still running
    contributes its pending request; requests of one kind (gradient or not, and by which path) go through the
    network as one batch of up to ``group`` members (all when None). A member that has finished (its own
    early success or its last iterate) leaves the batch, and ``finished(i, result)`` is told then. Each
    member's results are those of :func:`drive`, up to float rounding of the batched network.

    A member's ``time_s`` is its wall span, from its first request to its result, which holds the passes it shared
    and those of other members' chunks: the spans of members run together overlap (two members of 19.5 s and 21.5 s
    in an attack of 25.7 s). Its ``time_share_s`` is what it cost: its own computation between passes plus an equal
    share of each pass it was in; the members' shares add up to the time they ran together."""
    results: list = [None] * len(members)
    pending: dict[int, Request] = {}
    share = [0.0] * len(members)

    def advance(i: int, answer=None, first: bool = False) -> None:
        began = time.perf_counter()
        try:
            pending[i] = next(members[i]) if first else members[i].send(answer)
        except StopIteration as stop:
            share[i] += time.perf_counter() - began
            pending.pop(i, None)
            results[i] = stop.value
            results[i].time_share_s = share[i]
            if finished is not None:
                finished(i, stop.value)
            return
        share[i] += time.perf_counter() - began

    for i in range(len(members)):
        advance(i, first=True)
    size = max(1, int(group)) if group else max(1, len(members))
    while pending:
        kinds: dict[tuple, list[int]] = {}
        for i, request in pending.items():
            kinds.setdefault((request.objective is None, request.gradient), []).append(i)
        for (_, gradient), indices in kinds.items():
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                requests = [pending[i] for i in chunk]
                began = time.perf_counter()
                answers = target.evaluate_many([r.x for r in requests], volume, [r.objective for r in requests], gradient)
                each = (time.perf_counter() - began) / len(chunk)
                for i in chunk:  # the pass's time, shared equally by the members in it
                    share[i] += each
                if log is not None:
                    log.passes += 1
                    log.sizes.append(len(chunk))
                for i, answer in zip(chunk, answers):
                    advance(i, answer)
    return results


@dataclass
class Goal:
    """What the attack aims for, scored on the scan's grid.

    Untargeted: the score is the mean IoU over the foreground classes present in ``reference``;
    success when it is <= ``threshold``. Targeted: the mean over the foreground classes of the
    smoothed IoU ``(|P & T| + 1) / (|P | T| + 1)`` against the target (defined and graded for
    empty classes, so an all-background target is reached when the prediction is empty);
    success when it is >= ``threshold``.
    """

    target: Target
    reference: np.ndarray
    aim: np.ndarray | None = None  # the target segmentation of a targeted attack
    threshold: float | None = None
    metric: str = "iou"  # untargeted: "iou" (mean IoU), or "unflipped" (the share of the structure not yet flipped)

    def __post_init__(self) -> None:
        if self.threshold is None:
            self.threshold = TARGETED_SUCCESS if self.targeted else UNTARGETED_SUCCESS
        self.loss_target = self.target.loss_target(self.aim if self.aim is not None else self.reference)

    @property
    def targeted(self) -> bool:
        return self.aim is not None

    def score(self, prediction: np.ndarray) -> float:
        if self.aim is not None:  # targeted
            return smooth_mean_iou(self.target.masks(prediction), self.target.masks(self.aim))
        if self.metric == "unflipped":
            return 1.0 - flipped_fraction(self.target, prediction, self.reference)
        return mean_iou(self.target.masks(prediction), self.target.masks(self.reference))

    def succeeded(self, score: float) -> bool:
        threshold = cast(float, self.threshold)  # set by __post_init__
        return score >= threshold if self.targeted else score <= threshold

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is closer to the goal than ``b``."""
        return a > b if self.targeted else a < b


@dataclass
class Budget:
    """Perturbation budget (L-inf or L2 ball), step size, iterations, valid range.

    ``eps`` and ``step`` are in native units, or with ``scale`` (native units per unit of eps, one per channel,
    ``(C, 1, 1, 1)``: a scan whose channels the model sees in their own units) in those units: the ball's geometry is
    that of ``delta / scale``, so an L-inf eps is ``eps * scale`` in each channel's own units, an L2 ball bounds
    ``||delta / scale||``, and steps, directions and sizes are taken there. ``low`` and ``high`` (the valid range)
    are numbers, or per channel ``(C, 1, 1, 1)``, or tensors that broadcast over the iterate (harden's training
    attack bounds each voxel)."""

    eps: float
    step: float
    steps: int
    low: float | np.ndarray | torch.Tensor = -np.inf
    high: float | np.ndarray | torch.Tensor = np.inf
    region: np.ndarray | None = None  # 0/1 mask broadcastable to (C, I, J, K): where changes may go
    norm: str = "linf"  # "linf" or "l2"
    scale: np.ndarray | None = None  # (C, 1, 1, 1) native units per unit of eps and step; None: they are native

    @classmethod
    def for_volume(cls, volume: Volume, eps: float, step: float, steps: int, **options) -> Budget:
        """A budget in ``volume``'s units whose valid range is the scan's own intensity range within
        what its stored type can hold, each channel's own for a scan of several (``options``: ``region``, ``norm``,
        ``scale``)."""
        low, high = volume.storable_range()
        if volume.channels == 1:
            return cls(eps=eps, step=step, steps=int(steps), low=float(max(volume.array.min(), np.min(low))),
                       high=float(min(volume.array.max(), np.max(high))), **options)
        flat = volume.array.reshape(volume.channels, -1)
        lows = np.maximum(flat.min(1).astype(np.float64), _per_channel(low, volume.channels, np.min))
        highs = np.minimum(flat.max(1).astype(np.float64), _per_channel(high, volume.channels, np.max))
        return cls(eps=eps, step=step, steps=int(steps), low=lows.reshape(-1, 1, 1, 1), high=highs.reshape(-1, 1, 1, 1),
                   **options)

    def _region(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.region is None:
            return None
        return torch.as_tensor(self.region, dtype=like.dtype, device=like.device)

    def _scale(self, like: torch.Tensor) -> torch.Tensor | None:
        """``scale`` as a tensor beside ``like`` (None where eps is native)."""
        if self.scale is None:
            return None
        return torch.as_tensor(self.scale, dtype=like.dtype, device=like.device)

    def _bounds(self, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """``low`` and ``high`` as :func:`torch.clamp` takes them beside ``like``."""
        if np.ndim(self.low) == 0 and np.ndim(self.high) == 0:
            return float(self.low), float(self.high)
        return (torch.as_tensor(np.broadcast_to(self.low, np.shape(self.high)) if np.ndim(self.low) == 0 else self.low,
                                dtype=like.dtype, device=like.device),
                torch.as_tensor(np.broadcast_to(self.high, np.shape(self.low)) if np.ndim(self.high) == 0 else self.high,
                                dtype=like.dtype, device=like.device))

    def native(self, value: float) -> float | np.ndarray:
        """``value`` (a size in eps's units) in native units: itself, or one per channel ``(C, 1, 1, 1)``."""
        return value if self.scale is None else value * np.asarray(self.scale, dtype=np.float64)

    def project(self, x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Nearest point of the ball around ``clean`` (inside the region), clipped to the valid range."""
        delta = x - clean
        region = self._region(delta)
        if region is not None:
            delta = delta * region
        scale = self._scale(delta)
        if scale is not None:
            delta = delta / scale
        if self.norm == "l2":
            norm = l2_length(delta)
            if norm > self.eps:
                delta = delta * (self.eps / norm)
        else:
            delta = torch.clamp(delta, -self.eps, self.eps)
        if scale is not None:
            delta = delta * scale
        low, high = self._bounds(delta)
        if isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor):  # per channel
            return torch.clamp(clean + delta, low, high)
        return torch.clamp(clean + delta, float(low), float(high))

    def usable(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` where a step may act: inside the region."""
        region = self._region(grad)
        return grad if region is None else grad * region

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size for the norm: sign (L-inf) or grad/||grad|| (L2), of the
        :meth:`usable` gradient; with ``scale``, taken for ``delta / scale`` (the gradient
        there is ``grad * scale``) and given in native units per unit of eps (times ``scale``)."""
        grad = self.usable(grad)
        scale = self._scale(grad)
        if self.norm == "l2":
            if scale is None:
                return grad / grad.norm().clamp_min(1e-12)
            grad = grad * scale
            return grad / grad.norm().clamp_min(1e-12) * scale
        return torch.sign(grad) if scale is None else torch.sign(grad) * scale

    def size(self, delta: torch.Tensor) -> float:
        """The size of ``delta`` (native) in the norm, in eps's units."""
        scale = self._scale(delta)
        if scale is not None:
            delta = delta / scale
        return float(l2_length(delta)) if self.norm == "l2" else float(delta.abs().max())

    def sizes(self, delta: torch.Tensor) -> tuple[float, float]:
        """The L-inf and L2 sizes of ``delta`` (native) in eps's units."""
        scale = self._scale(delta)
        if scale is not None:
            delta = delta / scale
        return float(delta.abs().max()), float(l2_length(delta))


def l2_length(t: torch.Tensor) -> torch.Tensor:
    """The L2 length of ``t``, its squares summed as ``sum`` sums them (pairwise): torch's float32 ``norm`` on a CPU
    accumulates otherwise, and measured a 256^3 perturbation of +-31 1.5 % long (a 182x218x182 one 0.05 % short), so
    an L2 ball was filled to 98.5 % and the reported L2 of each member was not the written file's."""
    return t.pow(2).sum().sqrt()


def _per_channel(value, channels: int, reduce) -> np.ndarray:
    """One number per channel of a bound that broadcasts over a scan (``reduce``: how a channel's values make one)."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 4 and value.shape[0] == channels:
        return np.asarray([reduce(value[c]) for c in range(channels)], dtype=np.float64)
    return np.full(channels, reduce(value), dtype=np.float64)


@dataclass
class StepRecord:
    step: int
    loss: float | None
    score: float
    success: bool
    linf_native: float
    in_budget: bool = True  # False for the wider balls of APGD's progressive radius reduction (never kept)


@dataclass
class MemberResult:
    """The outcome of one (attack, loss) member: the iterate kept and the whole trace."""

    attack: str
    loss: str
    success: bool
    steps: int  # iterations taken to reach the kept iterate
    adversarial: np.ndarray  # (C, I, J, K) native units, as it will be stored
    prediction: np.ndarray
    score: float
    linf_native: float
    trace: list[StepRecord] = field(default_factory=list)
    time_s: float = 0.0  # its wall span, first request to result (overlapping other members' under --together)
    l2_native: float = 0.0
    member: str = ""  # the member's full name, with its options
    # the sizes in the budget's units where it has one per channel (Budget.scale): L-inf and L2 of delta / scale, which
    # the selection and the reports weigh; None where the budget is in native units (the native sizes are those)
    linf_scaled: float | None = None
    l2_scaled: float | None = None
    # its share of the time: alone, time_s; run together with others (drive_together), its own computation and an
    # equal share of each pass it shared, so that the members' shares add up to the time they took together
    time_share_s: float | None = None

    @property
    def cost_s(self) -> float:
        """What the member cost: its share of the time (``time_share_s``), its span where no share was measured."""
        return self.time_s if self.time_share_s is None else self.time_share_s

    @property
    def name(self) -> str:
        return self.member or f"{self.attack}:{self.loss}"

    def __repr__(self) -> str:
        return (f"MemberResult({self.name!r}, success={self.success}, score={self.score:.4g}, steps={self.steps}, "
                f"linf_native={self.linf_native:.4g}, time_s={self.time_s:.1f})")


class Attack:
    """Base of the attacks: the target, the loss, the budget and the goal, and the iterative loop.

    The loop evaluates every iterate on the volume as it will be stored (integer types
    quantised), records its score, keeps the best iterate (the first successful one when
    ``early_stop``), and takes steps with :meth:`update`. Subclasses change :meth:`start`,
    :meth:`objective` and :meth:`update`, or the whole :meth:`run`.
    """

    name = "attack"
    early_stop = True  # stop at the first successful iterate (least perturbation)
    uses_loss = True
    minimal = False  # searches for the least successful perturbation itself (no bisection for --min-eps)

    def __init__(self, target: Target, loss: str, budget: Budget, goal: Goal, progress: ProgressFn | None = None, seed: int = 0,
                 gradient: str = "standard", transfer: float = 0.0, label: str | None = None,
                 stop_at_success: bool | None = None, random_start: bool = False):
        from medis3d.losses import get_loss

        self.target, self.loss_name, self.budget, self.goal = target, loss, budget, goal
        self.loss = get_loss(loss, target.activation) if self.uses_loss else None
        self.progress = progress
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        # the gradient path through the preprocessing ("standard", or "smooth": BPDA for the whole path),
        # and the share of the iterations that take the smooth path first (a transfer start, then white-box)
        self.gradient, self.transfer = gradient, float(transfer)
        self._gradient_now = "smooth" if self.transfer > 0 else gradient
        self._label = label
        # True: stop at the first success (MedIS's least-perturbation fusion needs no more); None: the attack's own
        # rule (``early_stop``); False: run every iteration and keep the strongest iterate, successful or not (the
        # lowest Dice the attack reaches in the budget, for robustness curves)
        self.stop_at_success = self.early_stop if stop_at_success is None else bool(stop_at_success)
        self.keep_strongest = stop_at_success is False
        self.use_random_start = bool(random_start)  # start from a random point of the ball (seeded), not the clean scan

    @property
    def label(self) -> str:
        return self.loss_name if self.uses_loss else self.name

    @property
    def member_name(self) -> str:
        """How progress and tables name this member: the loss for IGSM (the paper's), else attack:loss."""
        if self._label:
            return self._label
        if not self.uses_loss:
            return self.name
        return self.loss_name if self.name == "igsm" else f"{self.name}:{self.loss_name}"

    def objective(self, t: int, steps: int | None = None) -> Objective:
        """The function whose gradient is ascended at step ``t`` of ``steps``: the loss (untargeted) or minus it (targeted)."""
        return Objective(self.loss, self.goal, t, self.budget.steps if steps is None else steps)

    def start(self, clean: torch.Tensor) -> torch.Tensor:
        return clean.clone()

    def started_at(self, x: torch.Tensor) -> None:
        """Where a random start put the first iterate (attacks that keep their own iterate take it from here)."""

    def random_start(self, clean: torch.Tensor, budget: Budget | None = None) -> torch.Tensor:
        """A uniform random point of the L-inf ball (L2: a random direction and radius), inside the valid range."""
        budget = budget or self.budget
        noise = torch.rand(clean.shape, generator=self.generator, dtype=clean.dtype).to(clean.device) * 2 - 1
        if budget.norm == "l2":
            noise = noise / noise.norm().clamp_min(1e-12) * budget.eps * float(torch.rand(1, generator=self.generator))
        else:
            noise = noise * budget.eps
        scale = budget._scale(noise)
        if scale is not None:  # drawn in eps's units: each channel's share of the ball in its own units
            noise = noise * scale
        return budget.project(clean + noise, clean)

    def update(self, x: torch.Tensor, grad: torch.Tensor, t: int, clean: torch.Tensor) -> torch.Tensor:
        return self.budget.project(x + self.budget.step * self.budget.direction(grad), clean)

    def evaluate(self, volume: Volume, x: torch.Tensor, objective=None, clean: torch.Tensor | None = None):
        """(A generator: ``yield from``.) The iterate as stored (inside the budget's ball around ``clean``), the
        evaluation there, its prediction, score and success."""
        stored = volume.quantise(x.cpu().numpy(), None if clean is None else clean.cpu().numpy(),
                                 None if clean is None else self.budget.eps, self.budget.norm, self.budget.scale)
        written = torch.from_numpy(stored).to(self.target.device)
        evaluation = yield Request(written, objective, self._gradient_now)
        prediction = evaluation.segmentation
        score = self.goal.score(prediction)
        return written, evaluation, prediction, score, self.goal.succeeded(score)

    def visit(self, volume: Volume, x: torch.Tensor, clean: torch.Tensor, t: int, objective, keeper: BestIterate, trace: list,
              in_budget: bool = True, total: int | None = None, step: int | None = None):
        """(A generator: ``yield from``.) Evaluate iterate ``t`` as stored, record it in the trace and
        (``in_budget``) the keeper, report progress (``total``: the member's visits, where it counts more than its
        steps). ``step``: the iterations taken to reach it, where that is not ``t`` (a member whose stages each start
        with a visit of a point already reached): what the keeper reports as the member's steps.

        Returns the evaluation (its loss and gradient, when ``objective`` is given) and success."""
        if self.transfer > 0:
            self._gradient_now = "smooth" if t < self.transfer * (total or self.budget.steps) else self.gradient
        written, evaluation, prediction, score, success = yield from self.evaluate(volume, x, objective,
                                                                                   clean if in_budget else None)
        if success and self.stop_at_success and in_budget and self.target.precision.enabled:
            # a member stops at a success the float32 model confirms: a voxel near the boundary may fall the other
            # way in reduced precision, and the member would then report a failure where it could have gone on
            prediction = self.target.exact.predict(volume.with_array(written.cpu().numpy()))
            score = self.goal.score(prediction)
            success = self.goal.succeeded(score)
        trace.append(StepRecord(t, evaluation.loss, score, success, float((written - clean).abs().max()), in_budget))
        if self.progress is not None:  # ``total`` counts the visits, the start's included: the last is ``total - 1``
            self.progress(self.member_name, t, total - 1 if total else self.budget.steps, score)
        if in_budget:
            keeper.offer(t if step is None else step, written, prediction, score, success)
        self.after_visit(success, written)
        return evaluation, success

    def after_visit(self, success: bool, written: torch.Tensor) -> None:
        """What the attack learns from the iterate just evaluated (as stored), before its next step."""

    def keeper(self) -> BestIterate:
        """What the attack returns: its first success (iterative attacks whose perturbation grows step by step:
        the least perturbation), else the iterate closest to the goal (fixed-budget attacks: the strongest)."""
        return BestIterate(self.goal, first_success=self.early_stop and self.stop_at_success)

    def run(self, volume: Volume) -> MemberResult:
        """Attack ``volume`` alone, one pass through the Target at a time."""
        return drive(self.iterate(volume), self.target, volume)

    def iterate(self, volume: Volume) -> Steps:
        """The attack as a generator: yields each :class:`Request`, receives its evaluation, returns the result.
        Its time is the wall time from its first request to its result (shared passes count fully)."""
        start = time.perf_counter()
        clean = torch.from_numpy(volume.array).to(self.target.device)
        x = self.start(clean)
        if self.use_random_start:
            x = self.random_start(clean)
            self.started_at(x)
        keeper = self.keeper()
        trace: list[StepRecord] = []
        steps = self.budget.steps
        for t in range(steps + 1):
            last = t == steps
            evaluation, success = yield from self.visit(volume, x, clean, t, None if last else self.objective(t), keeper, trace)
            if last or (success and self.stop_at_success):
                break
            x = self.update(x, evaluation.grad, t, clean)
        return keeper.result(self, clean, trace, time.perf_counter() - start)


class Objective:
    """What an attack ascends at one step: ``sign * loss(logits, aim, t, steps, targeted)`` (minus for targeted
    attacks), and, for APGD's step-size control, a value to compare iterates by (``tracked``): the loss
    itself, or plain cross-entropy where the loss is masked or scheduled (SEA)."""

    def __init__(self, loss, goal: Goal, t: int, steps: int, track=None):
        self.loss, self.goal, self.t, self.steps, self.track = loss, goal, t, steps, track
        self.sign = -1.0 if goal.targeted else 1.0
        self.tracked: float | None = None
        self.raw_logits = bool(getattr(loss, "raw_logits", False))  # takes the network's logits on the scan grid

    def __call__(self, scan_logits: torch.Tensor) -> torch.Tensor:
        aim = self.goal.loss_target
        value = self.sign * self.loss(scan_logits, aim, self.t, self.steps, self.goal.targeted)
        if self.track is None:
            self.tracked = float(value.detach())
        else:
            with torch.no_grad():
                self.tracked = float(self.sign * self.track(scan_logits.detach(), aim))
        return value


class BestIterate:
    """Keeps the iterate closest to the goal; with ``first_success``, the first successful one once there is
    one (the least perturbation of an attack whose perturbation grows step by step); with ``least``, the
    successful one with the smallest perturbation (``size``), for attacks that shrink it after succeeding."""

    def __init__(self, goal: Goal, least: bool = False, size: Callable[[torch.Tensor], float] | None = None,
                 first_success: bool = True):
        if least and size is None:
            raise ValueError("a keeper of the least success needs the size of an iterate")
        self.goal, self.least, self.first_success = goal, least, first_success
        self.size: Callable[[torch.Tensor], float] = size if size is not None else (lambda written: 0.0)
        self.best: tuple | None = None

    def offer(self, t: int, written: torch.Tensor, prediction: np.ndarray, score: float, success: bool) -> None:
        if self.best is not None and self.best[4]:
            if self.least:
                if success and self.size(written) < self.size(self.best[1]):
                    self.best = (t, written, prediction, score, success)
                return
            if self.first_success:
                return  # already successful: the first success is the least perturbation
        if self.best is None or (success and not self.best[4]) or self.goal.better(score, self.best[3]):
            self.best = (t, written, prediction, score, success)

    def result(self, attack: Attack, clean: torch.Tensor, trace: list[StepRecord], time_s: float) -> MemberResult:
        assert self.best is not None
        t, written, prediction, score, success = self.best
        scaled = attack.budget.sizes(written - clean) if attack.budget.scale is not None else (None, None)
        return MemberResult(
            attack=attack.name,
            loss=attack.label,
            success=bool(success),
            steps=int(t),
            adversarial=written.cpu().numpy().astype(np.float32),
            prediction=prediction,
            score=float(score),
            linf_native=float((written - clean).abs().max()),
            trace=trace,
            time_s=time_s,
            l2_native=float(l2_length(written - clean)),
            linf_scaled=scaled[0],
            l2_scaled=scaled[1],
        )
