"""Members of a MedIS fusion and the presets that choose them.

A member is an optimiser (an attack) ascending a loss, with options, written
``attack:loss[option=value,...]``, e.g. ``apgd:masked_ce[radii=sea,random_start=1]``. Any attack runs
with any loss (DAG brings its own). Options:

* ``steps``, ``step``: this member's iterations and step size (``step`` in the units of ``--eps``; not APGD's,
  which sets its own step, nor FGSM's, one step of eps);
* ``random_start``: any attack starts from a random point of the ball (seeded), not the clean scan (PGD always
  does, and takes no ``random_start=``; the low-frequency attack's point is smooth like its steps);
* ``restarts``, ``radii`` (``sea``: 2, 1.5, 1 eps over 3:3:4 of the iterations): APGD's;
* ``then``: APGD's second loss: the member's iterations split in two, the second half ascending that loss from
  the member's strongest iterate so far (a chain, e.g. ``apgd:masked_spherical[then=js]``: 100 iterations are
  50 + 50, as many passes as one loss);
* ``gradient`` (``standard`` or ``smooth``: BPDA for the whole preprocessing path), ``transfer`` (the
  share of the iterations taken through the smooth path before finishing white-box);
* ``factor``: the low-frequency attack's scan voxels per coarse cell;
* ``seed``: added to the run's ``--seed`` for this member's random draws, so members (and restarts) that
  start at random start from different points (refused on a member that draws nothing at random).

Presets (``--preset``, :data:`PRESETS`): ``default`` (what ``medis3d attack`` runs) is MedIS's fusion over
three APGD members with SEA's losses, each from its own random start (on the shipped model a random start
breaks more than the clean one), at no more network passes than the paper's; ``paper`` is MedIS as
published (IGSM with the paper's six losses, 10/255, steps of 1/255, 10 iterations); ``reliable`` is
the measured-best ensemble, reported as the per-volume worst case over its members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medis3d.attacks import ALIASES, ATTACKS, OWN_LOSS
from medis3d.errors import InputError
from medis3d.losses import LOSSES, parse_losses

OPTIONS: dict[str, type] = {"steps": int, "step": float, "random_start": bool, "restarts": int, "radii": str,
                            "then": str, "gradient": str, "transfer": float, "factor": int, "seed": int}
RADII = {"sea": ((2.0, 3), (1.5, 3), (1.0, 4)), "none": ((1.0, 1),)}
GRADIENTS = ("standard", "smooth")
# options only some attacks take (elsewhere they would show in the member's name and change nothing), and one APGD
# does not (its step is 2 eps, halved as it goes)
ONLY_FOR = {"restarts": ("apgd",), "radii": ("apgd",), "then": ("apgd",), "factor": ("lowfreq",)}
NOT_FOR = {"step": ("apgd", "fgsm"), "steps": ("fgsm",), "random_start": ("pgd",)}
# what those attacks take instead (the message that refuses the option)
OWN_SETTING = {"apgd": "2 eps, halved as it goes", "fgsm": "one step of eps", "pgd": "always a random start"}
# the values an option takes (what check_budget asks of --step and --steps)
RANGES: dict[str, tuple[str, Any]] = {
    "steps": ("at least 1", lambda v: v >= 1), "step": ("above 0", lambda v: v > 0),
    "restarts": ("at least 1", lambda v: v >= 1), "transfer": ("from 0 to 1", lambda v: 0 <= v <= 1),
    "factor": ("at least 1", lambda v: v >= 1),
}


def _value(key: str, text: str) -> Any:
    kind = OPTIONS[key]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} takes 0 or 1, got {text!r}")
    if kind is float and "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return kind(text)


@dataclass(frozen=True)
class Member:
    """One fusion member: ``attack`` ascending ``loss`` with ``options`` (sorted ``(key, value)`` pairs)."""

    attack: str
    loss: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if not self.options:
            return f"{self.attack}:{self.loss}"
        shown = ",".join(f"{k}={_shown(v)}" for k, v in self.options)
        return f"{self.attack}:{self.loss}[{shown}]"

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @classmethod
    def parse(cls, text: str) -> Member:
        """``attack:loss[k=v,...]``, ``attack`` (an attack with its own loss, or an alias such as ``segpgd``)."""
        text = given = text.strip()
        options: dict[str, Any] = {}
        if "[" in text:
            if not text.endswith("]"):
                raise InputError(f"member {text!r}: options go in brackets at the end, e.g. apgd:ce[restarts=2]")
            text, inner = text[:-1].split("[", 1)
            for item in filter(None, (i.strip() for i in inner.split(","))):
                key, _, value = item.partition("=")
                key = key.strip()
                if key not in OPTIONS or not value:
                    raise InputError(f"member option {item!r}: choose from {', '.join(f'{k}=...' for k in OPTIONS)}")
                try:
                    options[key] = _value(key, value.strip())
                except ValueError as exc:
                    raise InputError(f"member option {item!r}: {exc}") from exc
        attack, _, loss = text.partition(":")
        attack, loss = attack.strip(), loss.strip()
        if attack in ALIASES and not loss:
            attack, loss = ALIASES[attack]
        elif attack in OWN_LOSS and not loss:
            loss = attack
        if attack not in ATTACKS:
            raise InputError(f"unknown attack {attack!r}; choose from: {', '.join(sorted(ATTACKS))} (or {', '.join(ALIASES)})")
        if attack not in OWN_LOSS and loss not in LOSSES:
            raise InputError(f"member {text!r}: unknown loss {loss!r}; choose from: {', '.join(LOSSES)}")
        for key in options:
            if key in ONLY_FOR and attack not in ONLY_FOR[key]:
                raise InputError(f"member {given!r}: {key}= is {'/'.join(ONLY_FOR[key])}'s option; {attack} takes none")
            if attack in NOT_FOR.get(key, ()):
                raise InputError(f"member {given!r}: {attack} sets its own {key} ({OWN_SETTING[attack]})")
            if key in RANGES and not RANGES[key][1](options[key]):
                raise InputError(f"member {given!r}: {key} must be {RANGES[key][0]}, got {_shown(options[key])}")
        if options.get("radii", "none") not in RADII:
            raise InputError(f"member {text!r}: radii must be one of {', '.join(RADII)}")
        if "then" in options and options["then"] not in LOSSES:
            raise InputError(f"member {text!r}: then= takes a second loss for APGD ({', '.join(LOSSES)})")
        if options.get("gradient", "standard") not in GRADIENTS:
            raise InputError(f"member {text!r}: gradient must be one of {', '.join(GRADIENTS)}")
        return cls(attack, loss, tuple(sorted(options.items())))


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        in_255 = value * 255
        if abs(in_255 - round(in_255)) < 1e-9 and round(in_255) != 0:
            return f"{round(in_255)}/255"  # parses back to the same float
        return repr(value)
    return str(value)


def product(attacks, losses) -> list[Member]:
    """``--attacks`` x ``--losses``: every attack with every loss; attacks with their own loss (and the
    aliases ``segpgd``, ``cospgd``) are one member each."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    try:
        loss_names = parse_losses(losses)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    members: list[Member] = []
    for attack in attacks:
        if attack in ALIASES or attack in OWN_LOSS:
            members.append(Member.parse(attack))
        elif attack in ATTACKS:
            members.extend(Member(attack, loss) for loss in loss_names)
        else:
            raise InputError(f"unknown attack {attack!r}; choose from: {', '.join(sorted(ATTACKS))} (or {', '.join(ALIASES)})")
    return list(dict.fromkeys(members))


def parse_members(spec) -> list[Member]:
    """Members from ``"apgd:ce,apgd:js[restarts=2]"`` or a list (commas inside brackets stay with their member)."""
    items = spec if not isinstance(spec, str) else _split(spec)
    members = [m if isinstance(m, Member) else Member.parse(str(m)) for m in items if str(m).strip()]
    if not members:
        raise InputError("no member given; e.g. --members apgd:ce,apgd:masked_ce")
    return list(dict.fromkeys(members))


def _split(text: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + [current]


@dataclass(frozen=True)
class Preset:
    """A named attack configuration: its members and the budget settings they run with."""

    name: str
    members: tuple[str, ...]
    step: float
    steps: int
    select: str
    about: str

    def parsed(self) -> list[Member]:
        return parse_members(list(self.members))


PAPER_MEMBERS = tuple(f"igsm:{loss}" for loss in ("logcosh_dice", "bce_dice", "exp_log", "structure", "lovasz", "combined"))
PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", PAPER_MEMBERS, 1 / 255, 10, "least",
                    "MedIS as published: IGSM with the paper's six losses, steps of 1/255, 10 iterations"),
}
PRESETS["reliable"] = Preset(
    "reliable",
    ("apgd:masked_spherical[then=js]", "apgd:js", "apgd:margin", "apgd:ce[gradient=smooth]"),
    1 / 255, 100, "strongest",
    "APGD with SEA's masked spherical loss then Jensen-Shannon (50 + 50 iterations: on the shipped brain model 0.738 "
    "where spherical alone for 100 left 0.743), Jensen-Shannon, the capped margin and cross-entropy through the smooth "
    "preprocessing (BPDA for the whole path), 100 iterations each (after 50, twice the iterations still took 0.014 "
    "more Dice on the benchmark's organ models; after 100, 0.003); per-volume worst case")
PRESETS["default"] = Preset(
    "default", ("apgd:masked_spherical[random_start=1]", "apgd:js[random_start=1,seed=1]",
                "apgd:margin[random_start=1,seed=2]"), 1 / 255, 20, "least",
    "MedIS fusion of three APGD members (SEA's masked spherical and Jensen-Shannon losses, the capped margin), each "
    "from its own random start, 20 iterations each (no more network passes than the paper's six IGSM members of 10), "
    "least perturbation among the successful")
DEFAULT_PRESET = "default"


def check_seeds(members: list[Member]) -> None:
    """Refuse ``seed=`` on a member that draws nothing at random (no random start, no restarts: the seed would be
    in its name and change nothing)."""
    for m in members:
        draws = m.attack == "pgd" or m.option("random_start", False) or int(m.option("restarts") or 1) > 1
        if m.option("seed") is not None and not draws:
            more = " or restarts=N" if m.attack == "apgd" else ""
            raise InputError(f"member {m.name!r}: seed= changes nothing, the member draws nothing at random "
                             f"(give it random_start=1{more})")


def with_restarts(members: list[Member], restarts: int | None) -> list[Member]:
    """``--restarts N`` for every APGD member that does not set its own (each restart from a random start); refused
    (one line) below 1, or above 1 where no member would take it (nothing else restarts: it would change nothing)."""
    if restarts is None:
        return members
    if int(restarts) < 1:
        raise InputError(f"--restarts must be at least 1, got {restarts}")
    takers = [m for m in members if m.attack == "apgd" and m.option("restarts") is None]
    if int(restarts) == 1:
        return members
    if not takers:
        raise InputError(f"--restarts {restarts}: no member takes it (it restarts APGD members that set no restarts= of "
                         f"their own; members: {', '.join(m.name for m in members)})")
    out = []
    for m in members:
        if m in takers:
            m = Member(m.attack, m.loss, tuple(sorted(dict(m.options, restarts=int(restarts)).items())))
        out.append(m)
    return out
