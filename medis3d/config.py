"""One attack's configuration, end to end: :class:`AttackConfig` is built once (from the command line's shared
options by :meth:`AttackConfig.from_options`, or by a caller), validated here, handed to fusion
(:meth:`AttackConfig.fusion`) and written into the report as it is (:meth:`AttackConfig.as_dict`).

A new attack option is one field here (with its check in ``__post_init__`` and its reading in ``from_options``)
and one typer option in ``cli.ATTACK_OPTIONS``; fusion, the workflow and the report take the config whole."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medis3d.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from medis3d.attacks.base import ProgressFn
    from medis3d.fusion import MedIS
    from medis3d.io.volume import Volume
    from medis3d.target import Target

EPS_UNITS = ("normalized", "native")
NORMS = ("linf", "l2")
SELECTIONS = ("least", "strongest")
OUTPUT_FORMATS = ("auto", "nifti", "dicom", "both")
SEG_FORMATS = ("nifti", "dicom")
DEFAULT_EPS = "10/255"  # attack's and batch's --eps under L-inf in fractions of the range (given_eps)


def parse_fraction(text: str, option: str) -> float:
    """A number such as 0.03 or a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise InputError(f"{option} must be a number or a fraction such as 8/255, got {text!r}") from exc


def given_eps(eps: str | None, norm: str, eps_units: str, default: str) -> str:
    """``--eps`` as given, else ``default``: a size in fractions of the model's range under L-inf, which as an L2
    radius or in scan units would be another, tiny budget (10/255 as the L2 length of the whole perturbation, or
    0.04 HU), so there ``--eps`` is required (one line, as diagnose's)."""
    if eps is not None:
        return eps
    if norm == "l2" or eps_units == "native":
        what = "an L2 radius" if norm == "l2" else "a budget in the scan's units"
        raise InputError(f"--{'norm l2' if norm == 'l2' else 'eps-units native'} needs --eps, {what} "
                         "(e.g. --eps 2000 --eps-units native: 2000 in the scan's units)")
    return default


def eps_or_default(eps: float | None, norm: str, eps_units: str, default: float) -> float:
    """``eps`` where given, else ``default`` (an L-inf size in fractions of the model's range), refused in one line
    under L2 or native units, where it would be another, tiny budget (as :func:`given_eps` refuses a missing ``--eps``)."""
    if eps is not None:
        return eps
    given_eps(None, norm, eps_units, "")
    return default


def check_budget(eps: float, step: float, steps: int, eps_units: str = "normalized", norm: str = "linf",
                 select: str = "least", together: int | None = 1, success: float | None = None) -> None:
    """The checks every attack's budget and selection pass, wherever they come from (one place: the config,
    fusion and the study call it)."""
    if not eps > 0:
        raise InputError(f"--eps must be positive, got {eps}")
    if not step > 0:
        raise InputError(f"--step must be positive, got {step}")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if eps_units not in EPS_UNITS:
        raise InputError(f"--eps-units must be 'normalized' or 'native', got {eps_units!r}")
    if norm not in NORMS:
        raise InputError(f"--norm must be linf or l2, got {norm!r}")
    if select not in SELECTIONS:
        raise InputError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if together is not None and int(together) < 1:
        raise InputError(f"--together must be at least 1, got {together}")
    if success is not None and not 0 <= success <= 1:  # 50 (a percentage) made every first step a success
        raise InputError(f"--success is a mean IoU from 0 to 1, got {success}")


def resolve_members(p: dict) -> tuple[str, list, float, int, str]:
    """The preset, members, step, steps and selection from a command's parameters: ``--members``, or
    ``--attacks`` x ``--losses`` where either is given, else the preset's members; ``--restarts`` for every APGD
    member; ``--step``, ``--steps`` and ``--select`` override the preset's."""
    from medis3d.members import DEFAULT_PRESET, PRESETS, check_seeds, parse_members, product, with_restarts

    name = p.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    if p.get("members"):
        members = parse_members(p["members"])
    elif p.get("attacks") or p.get("losses"):
        members = product(p.get("attacks") or "igsm", p.get("losses") or "all")
    else:
        members = preset.parsed()
    members = with_restarts(members, p.get("restarts"))
    check_seeds(members)
    step = parse_fraction(p["step"], "--step") if p.get("step") else preset.step
    steps = int(p["steps"]) if p.get("steps") is not None else preset.steps
    return name, members, step, steps, p.get("select") or preset.select


@dataclass(frozen=True)
class AttackConfig:
    """Everything one attack of one scan takes besides the scan and the model: the members (names, as
    ``attack:loss[options]``; or ``attacks`` x ``losses`` where none are given), the budget, the selection, the
    goal's files and the outputs. Frozen: built and checked once, then passed whole."""

    members: tuple[str, ...] = ()
    eps: float = None  # type: ignore[assignment]  # None (not given): 10/255 under L-inf; refused under L2 or native units
    step: float = 1 / 255
    steps: int = 10
    preset: str = ""  # the preset the members came from ("": given explicitly)
    select: str = "least"  # least perturbation among the successful (MedIS's), or strongest (the worst case)
    eps_units: str = "normalized"
    success: float | None = None  # threshold on mean IoU (None: 0.5 untargeted, 0.45 targeted)
    seed: int = 0
    norm: str = "linf"
    mask: Path | None = None  # region the perturbation may touch
    min_eps: bool = False  # eps50 / eps90 and each member's smallest successful budget
    together: int | None = None  # members sharing each pass; None: memory.auto_together
    preset_step: bool = False  # the step is the preset's (no --step): see MedIS.preset_step
    memory_budget: int | None = None  # bytes; picks window batch, checkpointing and AMP
    label: Path | None = None  # reference segmentation (None: the clean prediction)
    target_mask: str | None = None  # targeted: "background", "foreground" or a mask file
    output_format: str = "auto"  # auto (the input's), nifti, dicom, both
    seg_format: str = "nifti"  # nifti, or also DICOM SEG (DICOM inputs)
    anonymize: bool = False
    attacks: tuple[str, ...] = field(default=("igsm",), repr=False)  # with losses: members when none are given
    losses: str | tuple[str, ...] = field(default="all", repr=False)

    def __post_init__(self) -> None:
        from medis3d.members import parse_members, product

        object.__setattr__(self, "eps", eps_or_default(self.eps, self.norm, self.eps_units, parse_fraction(DEFAULT_EPS, "--eps")))
        members = parse_members(list(self.members)) if self.members else product(self.attacks, self.losses)
        object.__setattr__(self, "members", tuple(m.name for m in members))
        check_budget(self.eps, self.step, self.steps, self.eps_units, self.norm, self.select, self.together, self.success)
        if self.output_format not in OUTPUT_FORMATS:
            raise InputError(f"--output-format must be nifti, dicom or both, got {self.output_format!r}")
        if self.seg_format not in SEG_FORMATS:
            raise InputError(f"--seg-format must be nifti or dicom, got {self.seg_format!r}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise InputError(f"--memory-budget must be positive, got {self.memory_budget}")
        if self.target_mask is not None:
            object.__setattr__(self, "target_mask", str(self.target_mask))

    @classmethod
    def from_options(cls, p: dict) -> AttackConfig:
        """The config from a command's parameters (``cli.ATTACK_OPTIONS`` and the command's own ``label`` and
        ``target``), with the preset's members, step, steps and selection where the options leave them."""
        preset, members, step, steps, select = resolve_members(p)
        budget = None
        if p.get("memory_budget"):
            from medis3d.memory import parse_size

            budget = parse_size(p["memory_budget"])
        eps = given_eps(p.get("eps"), p["norm"], p["eps_units"], DEFAULT_EPS)
        return cls(
            members=tuple(m.name for m in members), preset=preset, eps=parse_fraction(eps, "--eps"), step=step,
            steps=steps, select=select, eps_units=p["eps_units"], success=p["success"], seed=p["seed"], norm=p["norm"],
            mask=p.get("mask"), min_eps=p["min_eps"], together=p.get("together"), memory_budget=budget, preset_step=not p.get("step"),
            label=p.get("label"), target_mask=p.get("target"), output_format=p["output_format"],
            seg_format=p["seg_format"], anonymize=p["anonymize"],
        )

    def formats(self, volume: Volume) -> tuple[str, ...]:
        """The formats the adversarial scan of ``volume`` is written in, the first one measured: where an option asks
        for what cannot be written, the one-line error comes here, before any attack. Channels given as several files
        (DICOM series among them) are written as one NIfTI file per channel: a DICOM series holds one channel."""
        if volume.channel_volumes:
            if self.output_format in ("dicom", "both") or self.seg_format == "dicom":
                option = f"--output-format {self.output_format}" if self.output_format in ("dicom", "both") else "--seg-format dicom"
                names = ",".join(str(v.path) for v in volume.channel_volumes)
                raise InputError(f"{names}: {option} cannot be written for channels given as {len(volume.channel_volumes)} "
                                 "files (a DICOM series holds one channel); their adversarial channels are written as NIfTI, "
                                 "one file each: leave out " + option)
            return ("nifti",)
        is_dicom = volume.format == "dicom"
        if (self.output_format in ("dicom", "both") or self.seg_format == "dicom") and not is_dicom:
            raise InputError(f"{volume.path}: DICOM output needs a DICOM input series (this scan is {volume.format})")
        if self.seg_format == "dicom" and self.output_format == "nifti":
            raise InputError(f"{volume.path}: --seg-format dicom writes the adversarial prediction as a SEG of the adversarial "
                             "DICOM series, which --output-format nifti does not write; use --output-format dicom or both")
        if self.output_format == "auto":
            return ("dicom",) if is_dicom else ("nifti",)
        if self.output_format == "both":
            return ("dicom", "nifti")
        return (self.output_format,)

    def fusion(self, target: Target, progress: ProgressFn | None = None, region: np.ndarray | None = None) -> MedIS:
        """MedIS over this config's members on ``target`` (``region``: the mask file's region, read by the caller)."""
        from medis3d.fusion import MedIS

        return MedIS(target, members_spec=list(self.members), eps=self.eps, step=self.step, steps=self.steps,
                     eps_units=self.eps_units, success_threshold=self.success, progress=progress, seed=self.seed,
                     norm=self.norm, region=region, min_eps=self.min_eps, select=self.select, together=self.together or 1,
                     preset_step=self.preset_step)

    def as_dict(self) -> dict[str, Any]:
        """The config as the report holds it (JSON: paths as text)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

