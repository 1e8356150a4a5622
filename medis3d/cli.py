"""The medis3d command line: attack, batch, evaluate, harden, diagnose, predict, bundle (typer app, rich progress)."""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medis3d.config import AttackConfig, check_budget, given_eps, parse_fraction, resolve_members
from medis3d.errors import InputError, Medis3dError
from medis3d.html_report import verdict
from medis3d.io.paths import within

if TYPE_CHECKING:  # imported where used: `medis3d --help` does not load torch
    from medis3d.target import Target

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure how robust a 3D medical segmentation model is by attacking it (MedIS).",
    pretty_exceptions_enable=False,
)

BUNDLE_HELP = "MONAI bundle folder or .zip, or a shipped bundle's name: brain_t1_segresnet (the default; SegResNet brain extraction on T1 MRI), brain_t1_unetr (UNETR, same task) or brain_t1_segresnet_robust (the default, adversarially hardened by medis3d harden)."


def _fail(message: str) -> None:
    typer.echo(f"medis3d: error: {message}", err=True)
    raise typer.Exit(code=2)


def _quiet_warnings() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    if not getattr(warnings.showwarning, "medis3d", False):
        warnings.showwarning = _show_notices(warnings.showwarning)


def _show_notices(show: Callable) -> Callable:
    """``warnings.showwarning`` that gives the DICOM files a read skipped as one notice line, not as a Python warning
    (its file, line number and source line read like part of a traceback)."""

    def shown(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "SkippedDicomWarning":
            typer.echo(f"medis3d: notice: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    shown.medis3d = True  # type: ignore[attr-defined]
    return shown


def _load_target(bundle: Path | None, config: str | None, trust: bool, device: str, bare: dict | None = None,
                 random_weights: bool = False, threads: int | None = None):

    from medis3d.bundle import load_bundle, load_network
    from medis3d.threads import apply_threads

    _check_device(device)
    _threads_notice(apply_threads(threads, device))
    bare = bare or {}
    given = [f"--{key.replace('_', '-')}" for key in ("network_def", "transforms") if bare.get(key) is not None]
    if given and not bare.get("network"):
        raise InputError(f"{' and '.join(given)} go{'es' if len(given) == 1 else ''} with --network (a bundle brings its "
                         "own network and preprocessing)")
    if bare.get("network"):
        if bundle is not None:
            raise InputError("give either --bundle or --network, not both")
        return load_network(
            bare["network"], network_def=bare.get("network_def"), transforms=bare.get("transforms") or "mr_t1_brain",
            trust=trust, device=device,
        )
    return load_bundle(bundle, config=config, trust=trust, device=device, random_weights=random_weights)


_SHOWN: set[str] = set()


def _threads_notice(chosen: dict) -> None:
    """Say once on stderr when the threads chosen outnumber the cores (the source and every victim load choose)."""
    if chosen.get("notice") and chosen["notice"] not in _SHOWN:
        _SHOWN.add(chosen["notice"])
        typer.echo(f"medis3d: notice: {chosen['notice']}", err=True)


def _check_device(device: str) -> None:
    """Refuse a ``--device`` that is not there (never fall back to another one)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--device {device}: not a device name; use cpu, cuda, cuda:N or mps") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device}: Apple MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise InputError(f"--device {device}: medis3d runs on cpu, cuda or mps, not {parsed.type}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Options shared by attack and batch.
OUT_DIR = typer.Option(None, "--out", "-o", help="Output folder (default: medis3d-out/<scan name>/).")
BUNDLE = typer.Option(None, "--bundle", "-b", help=BUNDLE_HELP)
CONFIG = typer.Option(None, "--config", help="Bundle config file name (default: inference.json/yaml).")
TRUST = typer.Option(False, "--trust-bundle", help="Allow the bundle's config to run Python and its weights to unpickle code.")
LABEL = typer.Option(None, "--label", help="Reference segmentation on the scan's grid (default: the clean prediction).")
TARGET = typer.Option(None, "--target", help="Targeted attack: background (all black), foreground (all white) or a mask file.")
def _registry_help() -> tuple[str, str]:
    from medis3d.attacks import ALIASES, ATTACKS
    from medis3d.losses import LOSSES as REGISTRY

    names: dict[type, list[str]] = {}  # one class under several names (igsm and bim): the first is its name
    for name, cls in ATTACKS.items():
        names.setdefault(cls, []).append(name)
    attacks = sorted(f"{n[0]} (also {', '.join(n[1:])})" if len(n) > 1 else n[0] for n in names.values())
    attacks += [f"{alias} (= {attack}:{loss})" for alias, (attack, loss) in sorted(ALIASES.items())]
    return ", ".join(attacks), ", ".join(REGISTRY)


_ATTACK_NAMES, _LOSS_NAMES = _registry_help()
LOSSES = typer.Option(None, "--losses", help=f"Comma-separated surrogate losses fused with --attacks, or 'all' (the paper's six): {_LOSS_NAMES}. Default: the preset's members.")
EPS = typer.Option(None, "--eps", help="Largest perturbation, measured in --norm (L-inf unless told); a number or a fraction such as 8/255 (default 10/255; required under --norm l2 or --eps-units native).")
STEP = typer.Option(None, "--step", help="Step size, in --eps-units (default: the preset's, 1/255 of the model's intensity range in any units; under --norm l2 a tenth of eps).")
STEPS = typer.Option(None, "--steps", help="Most iterations per member (default: the preset's; the paper's 10).")
PRESET = typer.Option(None, "--preset", help="default (three APGD members with SEA's losses, 20 iterations each), paper (MedIS as published: IGSM, the paper's six losses, 10 steps of 1/255) or reliable (the measured-strongest ensemble, per-volume worst case; slower).")
MEMBERS = typer.Option(None, "--members", help="Explicit members, attack:loss\\[option=value,...], comma-separated, e.g. 'apgd:masked_ce\\[radii=sea],adam:cosine'; replaces --attacks x --losses.")
RESTARTS = typer.Option(None, "--restarts", help="Random restarts of every APGD member (SEA's protocol).")
EPS_UNITS = typer.Option("normalized", "--eps-units", help="normalized (fractions of the model's intensity range) or native (scan units, e.g. HU).")
SUCCESS = typer.Option(None, "--success", help="Success threshold on mean IoU (default: <= 0.5 untargeted, >= 0.45 targeted).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available).")
AMP = typer.Option(False, "--amp", help="Mixed precision for the network (bfloat16 on CPU, float16 on CUDA).")
CHECKPOINT = typer.Option(False, "--checkpoint", help="Gradient checkpointing of the network's stages (less memory, ~30% slower).")
SW_BATCH = typer.Option(None, "--sw-batch-size", help="Windows per batch (default: the bundle's).")
OVERLAP = typer.Option(None, "--overlap", help="Window overlap in [0, 1) (default: the bundle's).")
ROI = typer.Option(None, "--roi", help="Window size, e.g. 96 or 96,96,64 (default: the bundle's).")
WINDOW_MODE = typer.Option(None, "--window-mode", help="constant or gaussian window blending (default: the bundle's).")
SEED = typer.Option(0, "--seed", help="Random seed.")
NETWORK = typer.Option(None, "--network", help="A bare network instead of a bundle: TorchScript (.ts) or a state dict (.pt, with --network-def).")
NETWORK_DEF = typer.Option(None, "--network-def", help="JSON/YAML with the network's MONAI _target_ and arguments (for a .pt state dict).")
TRANSFORMS = typer.Option(None, "--transforms", help="Preprocessing preset for --network (only with it): ct_abdomen, ct_wide, mr_t1_brain, mr_zscore, or a file (default: mr_t1_brain).")
THREADS = typer.Option(None, "--threads", help="CPU threads for torch (default: one a core this process may use, by its CPU affinity, container quota and torch's count of physical cores; OMP_NUM_THREADS where set, which torchrun sets to 1 for each of several processes). Reported.")
MEMORY_BUDGET = typer.Option(None, "--memory-budget", help="Largest memory for the attack, e.g. 8GB: picks window batch, checkpointing and AMP from a probe window (reported).")
OUTPUT_FORMAT = typer.Option("auto", "--output-format", help="nifti, dicom or both (default: the input's format).")
SEG_FORMAT = typer.Option("nifti", "--seg-format", help="Predictions as nifti label maps, or also as DICOM SEG (dicom; DICOM inputs).")
ATTACKS = typer.Option(None, "--attacks", help=f"Comma-separated attacks (optimisers) fused with --losses: {_ATTACK_NAMES}. Default: the preset's members.")
CLASSES_HELP = "Output channels that count as the attacked structures, by index or name, e.g. 1,3 or liver,spleen (default: all foreground)."
CLASSES = typer.Option(None, "--classes", "--labels", help=CLASSES_HELP + " --labels is the older name.")
NORM = typer.Option("linf", "--norm", help="Budget norm: linf or l2 (eps in the same units).")
MASK = typer.Option(None, "--mask", help="Region the perturbation may touch (a mask on the scan's grid, e.g. the body).")
MIN_EPS = typer.Option(False, "--min-eps", help="Find each member's smallest successful budget (bisection below its success, FMN's own search; not under --select strongest, whose members keep their strongest iterate) and the chosen member's eps50 / eps90.")
SELECT = typer.Option(None, "--select", help="Fusion: least (the successful member with the least perturbation, the paper's) or strongest (the member closest to the goal at the budget: worst case over members). Default: the preset's.")
TOGETHER = typer.Option(None, "--together", help="Members that share each pass through the network (their windows batched; each member's results as when run alone). 1: one after another. Default: 1 on CPU (measured no faster batched there), on GPU as many as half the free memory allows.")
ANONYMIZE = typer.Option(False, "--anonymize", help="DICOM output: remove patient identity (basic profile), remap UIDs.")

# The options the commands share, declared once, in the order --help lists them: a command decorated with
# @shared_options(...) takes them after its own and receives them as one dict, ``options``. A new attack option is
# one typer.Option above, one line in its group here, and one field of medis3d.config.AttackConfig (checked in its
# __post_init__, read from these options in its from_options).
MODEL_OPTIONS: dict[str, tuple[Any, Any]] = {  # the model and how it runs: attack, batch and evaluate
    "bundle": (Path | None, BUNDLE),
    "config": (str | None, CONFIG),
    "trust_bundle": (bool, TRUST),
    "network": (Path | None, NETWORK),
    "network_def": (Path | None, NETWORK_DEF),
    "transforms": (str | None, TRANSFORMS),
    "classes": (str | None, CLASSES),
    "device": (str | None, DEVICE),
    "threads": (int | None, THREADS),
    "amp": (bool, AMP),
    "checkpoint": (bool, CHECKPOINT),
    "sw_batch_size": (int | None, SW_BATCH),
    "overlap": (float | None, OVERLAP),
    "roi": (str | None, ROI),
    "window_mode": (str | None, WINDOW_MODE),
}
MEMBER_OPTIONS: dict[str, tuple[Any, Any]] = {  # the members and their budget but eps: attack, batch and evaluate
    "preset": (str | None, PRESET),
    "members": (str | None, MEMBERS),
    "losses": (str | None, LOSSES),
    "attacks": (str | None, ATTACKS),
    "restarts": (int | None, RESTARTS),
    "norm": (str, NORM),
    "step": (str | None, STEP),
    "steps": (int | None, STEPS),
    "eps_units": (str, EPS_UNITS),
    "success": (float | None, SUCCESS),
    "seed": (int, SEED),
    "together": (int | None, TOGETHER),
}
SCAN_OPTIONS: dict[str, tuple[Any, Any]] = {  # one budget on one scan, and its outputs: attack and batch
    "eps": (str | None, EPS),
    "mask": (Path | None, MASK),
    "min_eps": (bool, MIN_EPS),
    "select": (str | None, SELECT),
    "memory_budget": (str | None, MEMORY_BUDGET),
    "output_format": (str, OUTPUT_FORMAT),
    "seg_format": (str, SEG_FORMAT),
    "anonymize": (bool, ANONYMIZE),
}
ATTACK_OPTIONS: dict[str, tuple[Any, Any]] = {**MODEL_OPTIONS, **MEMBER_OPTIONS, **SCAN_OPTIONS}
_LAST = ("json_out", "quiet")  # a command's own flags that --help lists after the shared options


def shared_options(groups: Mapping[str, tuple[Any, Any]], **overrides: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator giving a command the options of ``groups`` in its signature (for typer), passed to it as one dict,
    ``options``; ``overrides`` replace an option's typer.Option for this command (another help or default)."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        own = [p for name, p in signature.parameters.items() if name != "options"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=overrides.get(name, option), annotation=annotation)
                  for name, (annotation, option) in groups.items()]
        first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name not in _LAST]
        last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name in _LAST]

        @functools.wraps(command)
        def run(**values: Any) -> None:
            options = {name: values.pop(name) for name in groups}
            command(**values, options=options)

        run.__signature__ = signature.replace(parameters=[*first, *shared, *last])  # type: ignore[attr-defined]
        return run

    return decorate


attack_options = shared_options(ATTACK_OPTIONS)  # attack and batch


def _parse_roi(text: str | None):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"--roi must be one size or three, e.g. 96 or 96,96,64; got {text!r}") from exc
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise InputError(f"--roi must be one size or three, e.g. 96 or 96,96,64; got {text!r}")
    if min(values) < 1:
        raise InputError(f"--roi sizes must be positive (voxels), e.g. 96 or 96,96,64; got {text!r}")
    return values


def _prepare(p: dict) -> tuple[Target, AttackConfig, int]:
    """Load and configure the target and build the attack's config from a command's parameters."""
    config = AttackConfig.from_options(p)  # every option checked before the target loads
    return _model(p), config, len(config.members)


def _model(p: dict) -> Target:
    """The target :data:`MODEL_OPTIONS` name: loaded, its attacked classes chosen and its inferer set."""
    bare = {"network": p.get("network"), "network_def": p.get("network_def"), "transforms": p.get("transforms")}
    tgt = _load_target(p["bundle"], p["config"], p["trust_bundle"], p["device"], bare, threads=p.get("threads"))
    return tgt.select_classes(p.get("classes")).configure(
        roi_size=_parse_roi(p["roi"]), overlap=p["overlap"], sw_batch_size=p["sw_batch_size"], mode=p["window_mode"],
        checkpoint=p["checkpoint"], amp=p["amp"],
    )


@app.command()
@attack_options
def attack(
    scan: Path = typer.Argument(..., help="NIfTI file (.nii/.nii.gz) or DICOM series (folder or any file of it)."),
    out: Path | None = OUT_DIR,
    label: Path | None = LABEL,
    target: str | None = TARGET,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    *,
    options: dict,
) -> None:
    """Attack SCAN with MedIS and write the adversarial scan, predictions and a report."""
    _quiet_warnings()
    from medis3d.workflow import run_attack

    params = dict(options, label=label, target=target, device=options["device"] or _default_device())
    try:
        tgt, attack_settings, member_count = _prepare(params)
        if quiet or json_out:
            report = run_attack(scan, tgt, attack_settings, out)
        else:
            report = _with_progress(lambda cb: run_attack(scan, tgt, attack_settings, out, progress=cb), member_count)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        _print_summary(report)


def _with_progress(fn, members: int):
    """``fn(progress)`` with an attack's progress shown: its phases, then its ``members`` (bars on a terminal, plain
    lines on stderr otherwise; nothing before the first phase, so an input error found earlier is its only line)."""
    from medis3d.progress import Reporter

    with Reporter() as reporter:
        reporter.count("members", members)
        return fn(reporter)


def _print_summary(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="MedIS members", show_lines=False)
    l2 = report["attack"].get("norm") == "l2"
    for col in ("member", "success", "steps", "L2 (native units)" if l2 else "L-inf (x/255)", "score"):
        table.add_column(col)
    for m in report["members"]:
        score = m["mean_iou"] if m["mean_iou"] is not None else m["target_mean_iou"]
        size = f"{m['l2_native']:.4g}" if l2 else f"{m['linf_normalized'] * 255:.2f}"
        table.add_row(escape(m["member"]), "yes" if m["success"] else "no", str(m["steps"]), size, f"{score:.3f}")
    console.print(table)
    clean, adv = report["clean"], report["adversarial"]
    colour = "green" if report["success"] else "red"
    console.print(f"[{colour}]{escape(verdict(report))}[/{colour}]")
    console.print(
        "Dice clean -> adversarial: "
        + ", ".join(f"{k} {clean['dice'][k]:.3f} -> {adv['dice'][k]:.3f}" for k in clean["dice"])
        + f"; mean IoU {clean['mean_iou']:.3f} -> {adv['mean_iou']:.3f}"
        + ("" if report["attack"]["reference"] == "label file" else " (reference = the model's clean prediction)")
    )
    for notice in report["target"].get("notices", []) + report["outputs"].get("notices", []):  # the model's (e.g. a
        console.print(f"[yellow]notice:[/yellow] {notice}")  # memory plan's mixed precision), then the outputs'
    console.print(f"Outputs in {report['output_dir']} ({report['time_s']:.1f} s)")


@app.command()
@attack_options
def batch(
    input_dir: Path = typer.Argument(..., help="Folder holding NIfTI volumes and/or DICOM series (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per volume, summary.csv and summary.json."),
    target: str | None = typer.Option(None, "--target", help="Targeted attack: background or foreground."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    *,
    options: dict,
) -> None:
    """Attack every volume under INPUT_DIR; resumable; shards across processes under torchrun."""
    _quiet_warnings()
    from medis3d.batch import BATCH_OUTPUTS, Shard, discover
    from medis3d.io.outputs import check_folder_replaceable, check_output_folder, marked_by, output_lock, writing

    if target not in (None, "background", "foreground"):
        _fail(f"--target in batch must be background or foreground, got {target!r}")
    shard = Shard.from_env()
    params = dict(options, target=target, device=shard.device(options["device"]))
    try:
        items = discover(input_dir)
        if not items:
            raise InputError(f"{input_dir}: no NIfTI volume or DICOM image series found")
        if within(out, input_dir):
            raise InputError(f"{out}: the output folder must not be inside the input folder {input_dir}")
        check_output_folder(out)
        check_folder_replaceable(out, BATCH_OUTPUTS, marked_by("batch"), "medis3d batch")
        tgt, attack_settings, _ = _prepare(params)
        with output_lock(out, part=f"batch rank {shard.rank}"), writing(out):
            code = _run_batch(items, out, tgt, attack_settings, shard, quiet)
    except Medis3dError as exc:
        shard.close()
        _fail(str(exc))
        return
    raise typer.Exit(code=code)


def _run_batch(items, out: Path, tgt, options, shard, quiet: bool) -> int:
    from medis3d.batch import pending, run_one, settings_digest, write_summary
    from medis3d.io.outputs import mark_folder
    from medis3d.workflow import run_attack

    mark_folder(out, "batch")
    settings = settings_digest(tgt, options)
    todo = list(pending(shard.mine(items), out, settings))
    skipped = len(shard.mine(items)) - len(todo)

    reporter: Any = None  # the progress, where shown

    def attack_one(volume, folder):
        return run_attack(volume, tgt, options, folder, progress=reporter)

    failures = 0
    show = not quiet and shard.rank == 0
    if show:
        from medis3d.progress import Reporter

        with Reporter() as reporter:  # bars with an ETA on a terminal; in a log, each volume's phases, steps and end
            reporter.count("volumes", len(todo), item="volume", info=f"{skipped} already done")
            for item in todo:
                reporter.info(f"{item.name} | failed {failures}")
                reporter.phase(f"loading {item.name}")
                status = run_one(item, out, attack_one, settings)
                failures += status["status"] != "done"
                reporter.advance(item.name, status["status"] + (f": {status['error']}" if status.get("error") else ""))
            reporter.info(f"failed {failures}, {skipped} already done")
    else:
        for item in todo:
            failures += run_one(item, out, attack_one, settings)["status"] != "done"
    shard.barrier()
    code = 0
    if shard.rank == 0:
        rows = write_summary(items, out)
        failed = [r for r in rows if r["status"] != "done"]
        if not quiet:
            done = len(rows) - len(failed)
            typer.echo(f"{done} of {len(rows)} volume(s) done, {len(failed)} failed; summary in {out / 'summary.csv'}")
            for r in failed:
                typer.echo(f"  failed: {r['name']}: {r['error']}", err=True)
        code = 1 if failed else 0
    shard.barrier()
    shard.close()
    if shard.rank != 0:
        code = 1 if failures else 0
    return code


def _bundle_name(bundle: Path | None) -> str:
    """How a bundle is named in a study (:func:`medis3d.bundle.bundle_name`)."""
    from medis3d.bundle import bundle_name

    return bundle_name(bundle)


def _load_victims(spec: str | None, source, source_name: str, trust: bool, device: str, threads: int | None = None) -> list:
    """The ``--victim`` bundles, each loaded as a target (a bad one is the usual one-line error), each named
    apart from the source and the others, and each predicting the source's classes."""
    from medis3d.study import Victim

    if spec is None:
        return []
    names = [v.strip() for v in spec.split(",") if v.strip()]
    if not names:
        raise InputError(f"--victim needs one or more bundles, got {spec!r}")

    def classes(t) -> list[str]:
        return [t.class_name(c) for c in range(t.out_channels)]

    victims: list[Victim] = []
    for name in names:
        victim = Victim(_bundle_name(Path(name)), _load_target(Path(name), None, trust, device, threads=threads))
        if victim.name == source_name:
            raise InputError(f"--victim {name}: named like the source ({source_name}), which every study scores anyway; "
                             "give a victim in a folder of another name")
        if victim.name in {v.name for v in victims}:
            raise InputError(f"--victim {spec}: two victims are named {victim.name}; give them folders of different names")
        if (victim.target.activation, classes(victim.target)) != (source.activation, classes(source)):
            raise InputError(f"--victim {name}: predicts {', '.join(classes(victim.target))} ({victim.target.activation}), the source "
                             f"{', '.join(classes(source))} ({source.activation}); transfer needs the same classes")
        victims.append(Victim(victim.name, victim.target.select_classes(source.attacked_classes)))  # scored on the same structures
    return victims


def _study_settings(params: dict, member_list, eps_list, step, steps) -> dict:
    """Everything needed to reproduce a study: the options as given, the members as run, and a command line
    that repeats it (the dataset, then every option that was set, as ``--name value``)."""
    import shlex

    import medis3d

    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()
             if isinstance(v, (str, int, float, bool, Path)) and k != "quiet"}
    words = ["medis3d", "evaluate", str(given.get("dataset", ""))]
    for key, value in given.items():
        if key == "dataset" or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    from medis3d.threads import choice

    return {"command": " ".join(shlex.quote(w) for w in words), "options": given, "members": [m.name for m in member_list],
            "threads": choice(),
            "eps": list(eps_list), "step": step, "steps": steps, "medis3d": medis3d.__version__}


@app.command()
@shared_options(
    {**MODEL_OPTIONS, **MEMBER_OPTIONS},
    bundle=typer.Option(None, "--bundle", "--source", "-b", help=BUNDLE_HELP + " The attacks are made on this model (the transfer source)."),
    preset=typer.Option(None, "--preset", help="reliable (the default here: the measured-strongest ensemble), default or paper (MedIS as published)."),
    classes=typer.Option(None, "--classes", help=CLASSES_HELP),
)
def evaluate(
    dataset: Path = typer.Argument(..., help="Decathlon-style datalist JSON (test/testing/validation entries, each with an image and optionally a label and a mask) or a folder of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: report.html (the study on one page), results.csv, summary.json, robustness.png, report.md."),
    labels: Path | None = typer.Option(None, "--labels", help="Folder of labels named like the images (folder datasets)."),
    masks: Path | None = typer.Option(None, "--masks", help="Folder of masks named like the images (folder datasets): the region each volume's perturbation may touch, as --mask in attack. In a datalist, an entry's \"mask\"."),
    victim: str | None = typer.Option(None, "--victim", help="Comma-separated bundles (folders, .zip or shipped names) that every adversarial is also scored on: a transfer matrix (the black-box threat) in results.csv, summary.json and report.html."),
    eps: str | None = typer.Option(None, "--eps", help="Comma-separated budgets (numbers or fractions; default 1/255,2/255,4/255,8/255; required under --norm l2 or --eps-units native)."),
    diagnose: bool = typer.Option(False, "--diagnose", help="Also run the gradient-masking checks (medis3d diagnose) on each volume at the largest budget, into diagnose/."),
    stop_at_success: bool = typer.Option(False, "--stop-at-success", help="Stop each member at its first success (mean IoU <= the threshold). Faster, and the success rate is the same, but Dice at a budget where a member succeeds is then where it stopped, not the lowest it reaches: without it every member runs all its iterations and keeps its strongest iterate."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    *,
    options: dict,
) -> None:
    """Evaluate robustness over a dataset: every volume x member x eps, with MedIS fusion and the worst case (resumable)."""
    _quiet_warnings()
    from medis3d.io.volume import scan_name
    from medis3d.study import diagnose_words, evaluate_dataset, read_dataset, rise_words

    device = options["device"] or _default_device()
    try:
        eps = given_eps(eps, options["norm"], options["eps_units"], "1/255,2/255,4/255,8/255")
        params = dict(options, dataset=dataset, out=out, labels=labels, masks=masks, victim=victim, eps=eps, diagnose=diagnose,
                      stop_at_success=stop_at_success, preset=options["preset"] or "reliable")
        eps_list = [parse_fraction(e.strip(), "--eps") for e in eps.split(",") if e.strip()]
        if not eps_list or min(eps_list) <= 0:
            raise InputError(f"--eps must be positive budgets, got {eps!r}")
        _, member_list, step_value, steps_value, _ = resolve_members(params)
        for budget in eps_list:  # the checks every attack's budget passes (medis3d.config)
            check_budget(budget, step_value, steps_value, options["eps_units"], options["norm"], together=options["together"],
                         success=options["success"])
        cases = read_dataset(dataset, labels, masks)
        tgt = _model(dict(params, device=device))
        source = _bundle_name(options["bundle"]) if options["network"] is None else scan_name(options["network"])
        victims = _load_victims(victim, tgt, source, options["trust_bundle"], device, options["threads"])
        kwargs: dict[str, Any] = dict(members=[m.name for m in member_list], eps_list=eps_list, step=step_value, steps=steps_value,
                      eps_units=options["eps_units"], success=options["success"], seed=options["seed"], norm=options["norm"],
                      diagnose=diagnose, together=options["together"], victims=victims, source=source,
                      stop_at_success=stop_at_success, settings=_study_settings(params, member_list, eps_list, step_value, steps_value),
                      preset_step=not params.get("step"))
        if quiet:
            summary = evaluate_dataset(tgt, cases, out, **kwargs)
        else:
            from medis3d.progress import Reporter
            from medis3d.study import check_study_folder

            check_study_folder(out)  # before the bar: a bad --out is its one line
            with Reporter() as reporter:  # bars with an ETA on a terminal; in a log, phases, steps and volumes x budgets
                reporter.count("volumes x budgets", len(cases) * (len(eps_list) + int(diagnose)), item="volume x budget")
                reporter.info(f"{len(member_list)} members")
                summary = evaluate_dataset(tgt, cases, out, progress=lambda name: reporter.advance(name), steps_progress=reporter,
                                           **kwargs)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    failed = summary.get("failed_volumes") or []
    if not quiet:
        for notice in tgt.notices:
            typer.echo(f"medis3d: notice: {notice}", err=True)
        if summary.get("rises_with_budget"):
            typer.echo(f"medis3d: warning: {rise_words(summary['rises_with_budget'])}; see report.md", err=True)
        masking = diagnose_words(summary.get("diagnose") or {})
        if masking:
            typer.echo(f"medis3d: warning: {masking}; see report.md", err=True)
        typer.echo(f"{len(cases) - len(failed)} volume(s), {len(eps_list)} budget(s), {len(member_list)} member(s): see {out / 'report.md'}")
    for failure in failed:  # the study went on without them; the exit code says it is not whole, as batch's does
        typer.echo(f"medis3d: error: {failure['error']} (not in the study)", err=True)
    if failed:
        raise typer.Exit(code=1)


def _parse_crop(text: str | None) -> tuple | None:
    if not text:
        return None
    try:
        crop = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        crop = ()
    if len(crop) not in (1, 2, 3) or min(crop) < 8:
        raise InputError(f"--crop must be a size such as 96 or 96x96x64 (at least 8 voxels a side), got {text!r}")
    return crop


@app.command()
def harden(
    bundle: str = typer.Argument(..., help=BUNDLE_HELP + " The bundle to harden (it is read, never changed)."),
    dataset: Path = typer.Argument(..., help="Decathlon-style datalist JSON with training entries (and validation or test entries), or a folder of images with --labels."),
    out: Path = typer.Option(..., "--out", "-o", help="A new or empty folder: the hardened MONAI bundle (configs, models/model.pt, docs/ with the before/after figures) and evaluation/ (both studies). Rerun with the same --out to continue an interrupted run."),
    labels: Path | None = typer.Option(None, "--labels", help="Folder of labels named like the images (folder datasets)."),
    eps: str = typer.Option("8/255", "--eps", help="L-inf radius of the training attack, in the unit of attack and evaluate budgets (fractions of the model's normalised intensity range), taken into model space for each volume."),
    attack: str = typer.Option("pgd", "--attack", help="The training attack: pgd (signed steps of --attack-step, Madry et al.) or apgd (Auto-PGD: its own step size, halved where a crop's loss stalls, and each crop's strongest iterate; one more pass than PGD)."),
    attack_steps: int = typer.Option(2, "--attack-steps", help="Attack steps per training batch (from a random start)."),
    attack_step: str | None = typer.Option(None, "--attack-step", help="PGD step size (default: 2.5 eps / --attack-steps; APGD chooses its own)."),
    attack_loss: str = typer.Option("ce", "--attack-loss", help="The loss the training attack ascends (any of --losses in attack)."),
    adv_weight: float = typer.Option(0.5, "--adv-weight", help="Training loss = (1 - w) clean + w adversarial."),
    warmup: float = typer.Option(0.3, "--warmup", help="Share of the steps over which eps grows linearly from 0."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="After training, shift the foreground logits (the output layer's bias) by the amount that gives the training volumes their highest mean Dice: adversarial training at large radii over-segments."),
    steps: int = typer.Option(200, "--steps", help="Optimiser steps."),
    batch: int = typer.Option(2, "--batch", help="Crops per step."),
    crop: str | None = typer.Option(None, "--crop", help="Crop size in model-space voxels, e.g. 64 or 96x96x64 (default: the inferer's window)."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (warm-up, then cosine to a tenth)."),
    val_split: float = typer.Option(0.2, "--val-split", help="Share of the volumes held out for validation where the dataset sets none aside."),
    save_every: int = typer.Option(20, "--save-every", help="Steps between checkpoints (what a rerun continues from)."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU)."),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="Gradient checkpointing of the network's stages (less memory, more time)."),
    eval_eps: str = typer.Option("4/255,8/255", "--eval-eps", help="Budgets of the closing comparison of source and hardened model."),
    eval_preset: str = typer.Option("reliable", "--eval-preset", help="Attack preset of the closing comparison (reliable: the strongest ensemble)."),
    eval_members: str | None = typer.Option(None, "--eval-members", help="Explicit members of the closing comparison (replaces --eval-preset's)."),
    eval_steps: int | None = typer.Option(None, "--eval-steps", help="Iterations per member in the comparison (default: the preset's)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the closing comparison (the bundle then has no robustness figures)."),
    trust_bundle: bool = TRUST,
    device: str | None = DEVICE,
    threads: int | None = THREADS,
    seed: int = SEED,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Adversarially fine-tune a MONAI bundle into a more robust bundle, and measure robustness before and after."""
    _quiet_warnings()
    from medis3d.harden import HardenOptions, harden as run_harden
    from medis3d.members import PRESETS, parse_members

    try:
        eval_list = tuple(parse_fraction(e.strip(), "--eval-eps") for e in eval_eps.split(",") if e.strip())
        if eval_preset not in PRESETS:
            raise InputError(f"--eval-preset must be one of {', '.join(PRESETS)}, got {eval_preset!r}")
        members_given = tuple(m.name for m in parse_members(eval_members)) if eval_members else None
        options = HardenOptions(
            eps=parse_fraction(eps, "--eps"), attack=attack, attack_steps=attack_steps,
            attack_step=parse_fraction(attack_step, "--attack-step") if attack_step else None, attack_loss=attack_loss,
            adv_weight=adv_weight, warmup=warmup, calibrate=calibrate, steps=steps, batch=batch, crop=_parse_crop(crop), lr=lr, seed=seed, amp=amp,
            checkpoint=checkpoint, save_every=save_every, val_split=val_split, evaluate=not no_eval, eval_eps=eval_list,
            eval_preset=eval_preset, eval_members=members_given, eval_steps=eval_steps)
        options.check()
        dev = device or _default_device()
        _check_device(dev)
        from medis3d.threads import apply_threads

        _threads_notice(apply_threads(threads, dev))
        if quiet:
            result = run_harden(bundle, dataset, out, options, labels=labels, trust=trust_bundle, device=dev)
        else:
            from medis3d.progress import Reporter

            with Reporter() as reporter:
                def progress(kind: str, info: dict) -> None:
                    if kind == "phase":
                        reporter.phase(info["text"])
                    elif kind == "train":
                        reporter.count("training steps", info["total"], item="step")
                        reporter.phase("training")
                    elif kind == "step":
                        reporter.reach(info["step"], f"eps {info['eps'] * 255:.3g}/255, clean loss {info['clean_loss']:.3f}, "
                                                     f"adversarial loss {info['adversarial_loss']:.3f}")
                    elif kind == "eval":
                        reporter.advance(info["volume"])

                result = run_harden(bundle, dataset, out, options, labels=labels, trust=trust_bundle, device=dev,
                                    progress=progress)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    if not quiet:
        typer.echo(f"hardened bundle in {result.out} ({result.train_minutes:.1f} min of training)")
        if result.comparison:
            for role, model in result.comparison["models"].items():
                curve = ", ".join(f"{e * 255:g}/255: {d:.3f}" for e, d in model["curve"])
                typer.echo(f"  {role}: clean Dice {model['clean_dice']:.3f}; worst case {curve}")
        for notice in result.notices:
            typer.echo(f"  notice: {notice}")


@app.command()
def diagnose(
    scan: Path = typer.Argument(..., help="NIfTI file or DICOM series."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the checks as JSON to this file (default: medis3d-out/<scan name>/diagnose.json); replaces only a diagnosis medis3d wrote."),
    bundle: Path | None = BUNDLE,
    config: str | None = CONFIG,
    trust_bundle: bool = TRUST,
    network: Path | None = NETWORK,
    network_def: Path | None = NETWORK_DEF,
    transforms: str | None = TRANSFORMS,
    label: Path | None = LABEL,
    mask: Path | None = MASK,
    member: str = typer.Option("apgd:masked_ce_balanced", "--member", help="The white-box member the checks run (attack:loss\\[options])."),
    eps: str | None = typer.Option(None, "--eps", help="The budget of the step-doubling, restart and random-search checks, in --eps-units and --norm (default 8/255; under --norm l2 required, e.g. --eps 2000 --eps-units native)."),
    eps_units: str = EPS_UNITS,
    norm: str = typer.Option("linf", "--norm", help="Budget norm of every check: linf or l2 (the eps sweep then runs over L2 balls of rms 2/255 .. 64/255 per voxel)."),
    step: str | None = typer.Option(None, "--step", help="Step size of step-based members, in --eps-units (default: 1/255 of the model's range; under --norm l2 a tenth of eps; APGD chooses its own)."),
    steps: int = typer.Option(20, "--steps", help="Iterations of the member (doubled in the step-doubling check)."),
    queries: int = typer.Option(200, "--queries", min=1, help="Forward passes of the gradient-free random search."),
    success: float | None = SUCCESS,
    device: str | None = DEVICE,
    threads: int | None = THREADS,
    seed: int = SEED,
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Check an attack on SCAN for gradient masking: eps sweep, step doubling, restarts, random search, finite differences, layers."""
    _quiet_warnings()
    from medis3d.diagnose import SCHEMA, Diagnose
    from medis3d.io import read_volume
    from medis3d.io.outputs import check_output_file, check_replaceable_file, has_schema
    from medis3d.report import write_json
    from medis3d.workflow import default_out_dir, read_region, read_segmentation

    try:
        eps_value = parse_fraction(given_eps(eps, norm, eps_units, "8/255"), "--eps")
        step_value = parse_fraction(step, "--step") if step else None
        check_budget(eps_value, eps_value if step_value is None else step_value, steps, eps_units, norm, success=success)
        bare = {"network": network, "network_def": network_def, "transforms": transforms}
        tgt = _load_target(bundle, config, trust_bundle, device or _default_device(), bare, threads=threads)
        volume = read_volume(scan)
        reference = read_segmentation(Path(label), volume, tgt, "label") if label else None
        region = read_region(Path(mask), volume) if mask else None
        path = out or default_out_dir(volume.name) / "diagnose.json"
        if path.resolve() == Path(scan).resolve():
            raise InputError(f"{scan}: refusing to overwrite the input; choose another --out")
        check_output_file(path)
        check_replaceable_file(path, lambda p: has_schema(p, SCHEMA), "a diagnosis")
        show = (lambda m: typer.echo(f"  {m}", err=True)) if not (quiet or json_out) else None
        result = Diagnose(tgt, member=member, eps=eps_value, steps=steps, step=step_value, queries=queries, seed=seed,
                          progress=show, norm=norm, eps_units=eps_units, success=success, region=region)(volume, reference)
        report = result.as_dict()
        if region is not None:
            report["mask"] = {"file": str(mask), "voxels": int((region > 0).sum())}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        for check in report["checks"]:
            mark = "FLAG" if check["flagged"] else "n/a " if check.get("applicable") is False else "ok  "
            typer.echo(f"{mark} {check['check']}" + (f": {check['cause']}" if check["cause"] else ""))
        verdict = "signs of gradient masking: see the flags" if result.flagged else "no sign of gradient masking"
        skipped = [c["check"] for c in report["checks"] if c.get("applicable") is False]
        if skipped:
            verdict += f" (not measured: {', '.join(skipped)})"
        typer.echo(f"{verdict} ({report['time_s']:.0f} s); the checks are in {path}")
    if result.flagged:
        raise typer.Exit(code=1)


@app.command()
def predict(
    scan: Path = typer.Argument(..., help="NIfTI file or DICOM series."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: medis3d-out/<scan name>/prediction.nii.gz); replaces only a prediction medis3d wrote, never a file of yours."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help=BUNDLE_HELP),
    config: str | None = CONFIG,
    trust_bundle: bool = TRUST,
    network: Path | None = NETWORK,
    network_def: Path | None = NETWORK_DEF,
    transforms: str | None = TRANSFORMS,
    device: str | None = DEVICE,
    threads: int | None = THREADS,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No line saying what was written."),
) -> None:
    """Segment SCAN with the target and write the label map on the scan's grid."""
    _quiet_warnings()
    from medis3d.workflow import run_predict

    try:
        bare = {"network": network, "network_def": network_def, "transforms": transforms}
        tgt = _load_target(bundle, config, trust_bundle, device or _default_device(), bare, threads=threads)
        path, prediction, volume = run_predict(scan, tgt, out)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    if not quiet:
        from medis3d.bundle import NO_INVERTD_NOTICE

        counts = {tgt.class_name(c): int(m.sum()) for c, m in zip(tgt.foreground_classes, tgt.masks(prediction))}
        typer.echo(f"wrote {path} ({', '.join(f'{k}: {v} voxels' for k, v in counts.items())})")
        if NO_INVERTD_NOTICE in tgt.notices:  # what the file is, where it cannot be the bundle's own output file
            typer.echo(f"medis3d: notice: {NO_INVERTD_NOTICE}", err=True)


bundle_app = typer.Typer(help="Inspect MONAI bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("check")
def bundle_check(
    bundle: Path = typer.Argument(..., help="Bundle folder or .zip, or a shipped bundle's name (brain_t1_segresnet, brain_t1_unetr, brain_t1_segresnet_robust)."),
    scan: Path | None = typer.Argument(None, help="A scan to check gradients on (default: a synthetic one)."),
    config: str | None = CONFIG,
    trust_bundle: bool = TRUST,
    device: str | None = DEVICE,
    threads: int | None = THREADS,
    json_out: bool = typer.Option(False, "--json", help="Print the check as JSON."),
) -> None:
    """Load BUNDLE safely, list what will be attacked, and check that gradients reach the scan."""
    _quiet_warnings()
    from medis3d.bundle_check import check_bundle

    try:
        # a config can be checked before its weights exist (a notice says the weights are random)
        tgt = _load_target(bundle, config, trust_bundle, device or _default_device(), random_weights=True, threads=threads)
        report = check_bundle(tgt, scan)
    except Medis3dError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich's 80 columns would fold the table's long cells line by line
        console = Console(width=max(console.width, 160))
    console.print(f"[bold]{report['network']}[/bold] ({report['parameters']:,} parameters), {report['activation']}, classes {report['classes']}")
    console.print(f"inferer: {report['inferer']}")
    table = Table(title="preprocessing (scan space -> model space)")
    for col in ("transform", "arguments", "gradient", "stand-in", "smooth path's stand-in"):
        table.add_column(col, no_wrap=col == "transform")
    for step in report["preprocessing"]:
        table.add_row(step["transform"], json.dumps(step["args"]), step["gradient"], step["stand_in"],
                      step.get("smooth_stand_in") or "as the stand-in")
    for step in report["other_non_differentiable_steps"]:
        table.add_row(step["step"], "", "approximated", step["stand_in"], "as the stand-in")
    console.print(table)
    for notice in report["notices"]:
        console.print(f"[yellow]notice:[/yellow] {notice}")
    g = report["gradient"]
    verdict = "[green]gradients reach the scan[/green]" if g["ok"] else "[red]gradient flow is broken[/red]"
    console.print(
        f"gradient check on {report['scan']} (model space {report['model_shape']}): {verdict}; "
        f"|grad| {g['input_grad_norm']:.3g}, {g['fraction_of_voxels_reached'] * 100:.1f}% of voxels reached"
    )
    for path, info in g.get("paths", {}).items():
        console.print(f"  {path} gradient path: {info['fraction_of_voxels_reached'] * 100:.1f}% of voxels reached")
    if g["blocking_layers"]:
        console.print(f"[red]layers that block the gradient:[/red] {', '.join(g['blocking_layers'])}")
    if g["zero_gradient_layers"]:
        console.print(f"[yellow]layers with an all-zero gradient:[/yellow] {', '.join(g['zero_gradient_layers'][:20])}")
    if not g["ok"]:
        raise typer.Exit(code=1)


@bundle_app.command("fragment")
def bundle_fragment() -> None:
    """Print the path of the config fragment that adds an 'attack' workflow to any bundle for MONAI's runner."""
    from medis3d.monai_workflow import fragment_path

    typer.echo(str(fragment_path()))


def main() -> None:
    """The ``medis3d`` command (see :func:`medis3d.__main__.main`, which installs the signal handling first)."""
    from medis3d.__main__ import main as entry

    entry()


if __name__ == "__main__":
    main()
