"""MONAI bundle -> Target: its config (read by :mod:`medis3d.safe_config`), weights, inferer and activation settings.

By default no ``$`` expression is evaluated, ``_target_`` may name only MONAI and torch
classes, and weights load with ``torch.load(weights_only=True)``. ``trust=True`` gives full
MONAI config semantics (``ConfigParser``) for bundles the user trusts.
"""

from __future__ import annotations

import json
import math
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from medis3d.engine import (
    CPU_CHANNELS_LAST_NOTICE,
    CPU_WINDOW_BATCH_LARGEST,
    CPU_WINDOW_BATCH_NOTICE,
    Precision,
    WindowSettings,
    channels_last_on_cpu,
)
from medis3d.errors import BundleError, first_line
from medis3d.postprocessing import LABEL_MAP_STEPS, LabelStep, step_name
from medis3d.preprocessing import DifferentiablePreprocessing, build_step
from medis3d.safe_config import SafeConfig, read_config
from medis3d.target import Target

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "brain_t1_segresnet"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


def _shipped_folders() -> list[Path]:
    """Where shipped bundles live: the source checkout's ``bundles/``, else where a wheel installs
    them (``sys.prefix/share/medis3d/bundles``)."""
    import sys

    return [DEFAULT_BUNDLE.parent, Path(sys.prefix) / "share" / "medis3d" / "bundles"]


def shipped_bundles() -> dict[str, Path]:
    """The shipped bundles by name (``brain_t1_segresnet``, ``brain_t1_unetr``), checkout first."""
    found: dict[str, Path] = {}
    for folder in _shipped_folders():
        if folder.is_dir():
            for candidate in sorted(folder.iterdir()):
                if (candidate / "configs").is_dir() and candidate.name not in found:
                    found[candidate.name] = candidate
    return found


def bundle_name(bundle: str | Path | None) -> str:
    """How a bundle is named in a study: its folder's (or .zip's) name, the default bundle's name when none."""
    if bundle is None:
        return DEFAULT_BUNDLE.name
    name = Path(bundle).name
    return name[:-4] if name.endswith(".zip") else name


def default_bundle_path() -> Path:
    """The shipped default bundle (SegResNet brain extraction on T1 MRI): from the source
    checkout, else where a wheel installs it (``sys.prefix/share/medis3d/bundles``)."""
    return shipped_bundles().get(DEFAULT_BUNDLE.name, DEFAULT_BUNDLE)


def resolve_bundle_path(path: str | Path | None) -> Path:
    """A bundle path as given; or, where no such path exists and it is a bare name, the shipped
    bundle of that name (``--bundle brain_t1_unetr``); ``None`` is the shipped default."""
    if path is None:
        return default_bundle_path()
    bundle = Path(path)
    if bundle.exists():
        return bundle
    shipped = shipped_bundles()
    if len(bundle.parts) == 1 and bundle.name in shipped:
        return shipped[bundle.name]
    names = ", ".join(shipped) or "none found"
    raise BundleError(f"{bundle}: no such bundle (a folder or .zip, or a shipped bundle's name: {names})")


MAX_ZIP_BYTES = 16 * 2**30  # unpacked size of a bundle archive (the largest model-zoo weights are a few hundred MB)


def _unpack_zip(path: Path, out: Path) -> Path:
    """Unpack a bundle archive into the (temporary) folder ``out``; entries that would land outside it,
    links, and archives that unpack to more than :data:`MAX_ZIP_BYTES` are refused before anything is written."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: not a readable zip archive ({exc})") from exc
    with zf:
        root = out.resolve()
        total = 0
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if target != root and root not in target.parents:
                raise BundleError(f"{path}: refused a zip entry outside the bundle ({info.filename})")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{path}: refused a link inside the archive ({info.filename})")
            total += info.file_size
        if total > MAX_ZIP_BYTES:
            raise BundleError(f"{path}: the archive unpacks to {total / 2**30:.1f} GB; refused (limit {MAX_ZIP_BYTES / 2**30:.0f} GB)")
        try:
            zf.extractall(root)
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            raise BundleError(f"{path}: cannot unpack the archive ({exc})") from exc
    entries = [p for p in root.iterdir() if p.is_dir()]
    return entries[0] if len(entries) == 1 and not (root / "configs").exists() else root


def _inside(bundle: Path, path: Path, what: str) -> Path:
    """``path``, refused when it (or a link on the way) leads outside the bundle folder."""
    root, real = bundle.resolve(), path.resolve()
    if real != root and root not in real.parents:
        raise BundleError(f"{path}: refused the {what}: it leads outside the bundle (to {real})")
    return path


def find_config(bundle: Path, config: str | None) -> Path:
    configs = bundle / "configs"
    if config:
        candidates = [bundle / config, configs / config] + [configs / f"{config}{ext}" for ext in (".json", ".yaml", ".yml")]
    else:
        candidates = [configs / n for n in CONFIG_NAMES]
    for c in candidates:
        if c.is_file():
            return c
    raise BundleError(f"{bundle}: no {'config ' + repr(config) if config else 'configs/inference.json or .yaml'} found")


def _load_torchscript(path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise BundleError(f"{path}: cannot load the TorchScript model ({first_line(exc)})") from exc


def _load_state(net: torch.nn.Module, path: Path, trust: bool) -> None:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except Exception as exc:
        raise BundleError(
            f"{path}: refused or unreadable weights ({first_line(exc)[:200]}); "
            "weights load with weights_only=True unless --trust-bundle"
        ) from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict", "network", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    try:
        net.load_state_dict(state)
    except Exception as exc:
        raise BundleError(f"{path}: weights do not fit network_def ({first_line(exc)[:200]})") from exc


def _build_network(
    cfg: SafeConfig, ts_path: Path | None, pt_path: Path | None, notices: list[str], random_weights: bool = False
) -> tuple[torch.nn.Module, str, dict]:
    """The network from ``network_def`` and a state dict, or a TorchScript model; without either, an error
    (``random_weights``: the network's random initialisation, with a notice)."""
    ts = ts_path if ts_path is not None and ts_path.is_file() else None
    pt = pt_path if pt_path is not None and pt_path.is_file() else None
    if not cfg.has("network_def"):
        if ts is not None:
            return _load_torchscript(ts), "TorchScript", {}
        raise BundleError(f"{cfg.source}: no network_def, and no TorchScript model (models/model.ts)")
    cls, args = cfg.instantiate("network_def")
    try:
        net = cls(**args)
    except TypeError as exc:
        if "img_size" in args and "img_size" in str(exc):  # SwinUNETR configs from before MONAI 1.5
            args = {k: v for k, v in args.items() if k != "img_size"}
            notices.append("network_def passes img_size, which this MONAI version removed; ignored it")
            net = cls(**args)
        else:
            raise BundleError(f"{cfg.source}: network_def cannot be built ({exc})") from exc
    if pt is not None:
        _load_state(net, pt, cfg.trust)
    elif ts is not None:
        net = _load_torchscript(ts)
    elif random_weights:
        notices.append("no models/model.pt or model.ts: the network has random weights")
    else:
        raise BundleError(f"{cfg.source}: the bundle has no weights (models/model.pt or models/model.ts); refusing to stand in "
                          "a randomly initialised network")
    return net, type(net).__name__, args


def _window_settings(cfg: SafeConfig) -> WindowSettings:
    if not cfg.has("inferer"):
        return WindowSettings()
    name, args = cfg.component_args("inferer", only=set(WindowSettings.__dataclass_fields__))
    short = name.rsplit(".", 1)[-1]
    if short == "SimpleInferer":
        return WindowSettings(roi_size=(-1, -1, -1), sw_batch_size=1, overlap=0.0)
    if short != "SlidingWindowInferer":
        raise BundleError(f"{cfg.source}: inferer {name!r} is not supported (SlidingWindowInferer or SimpleInferer)")
    roi = args.get("roi_size", (96, 96, 96))
    roi = [int(roi)] * 3 if isinstance(roi, (int, float)) else [int(v) for v in roi]
    overlap = args.get("overlap", 0.25)  # MONAI takes one per axis too
    return WindowSettings(
        roi_size=tuple(roi),
        sw_batch_size=int(args.get("sw_batch_size", 1)),
        overlap=tuple(float(v) for v in overlap) if isinstance(overlap, (list, tuple)) else float(overlap),
        mode=str(args.get("mode", "constant")),
        sigma_scale=args.get("sigma_scale", 0.125),
        padding_mode=str(args.get("padding_mode", "constant")),
        cval=float(args.get("cval", 0.0)),
    )


def _invert_order(cfg: SafeConfig) -> str:
    """Whether the bundle inverts probabilities (Invertd before AsDiscreted) or labels (after), of the steps that act
    on the prediction (an AsDiscreted of the label before the prediction's Invertd was taken for the prediction's)."""
    inverts = [i for i, _ in _prediction_steps(cfg, "Invertd")]
    discretes = [i for i, _ in _prediction_steps(cfg, "AsDiscreted")]
    if inverts and discretes and discretes[0] < inverts[0]:
        return "labels"
    return "probabilities"


# a bundle without Invertd leaves its prediction on the model's grid: medis3d puts the bundle's own labels on the scan's
NO_INVERTD_NOTICE = ("the bundle's postprocessing has no Invertd, so MONAI leaves its prediction on the model's grid: medis3d's "
                     "label maps are on the scan's grid, each voxel the bundle's label at the nearest model voxel")


def _prediction_steps(cfg: SafeConfig, *names: str):
    """``(index, step)`` of each postprocessing step named ``names`` that acts on the prediction (its keys name
    ``pred``, or it names none)."""
    for i, t in enumerate(cfg.raw("postprocessing::transforms", []) or []):
        if isinstance(t, dict) and str(t.get("_target_", "")).rsplit(".", 1)[-1] in names and _on_prediction(cfg, i, t):
            yield i, t


def _keys(cfg: SafeConfig, i: int, t: dict) -> list[str]:
    """The keys postprocessing step ``i`` acts on (``pred`` where it names none)."""
    keys = cfg.resolve(t.get("keys", "pred"), f"postprocessing::transforms::{i}::keys")
    return [keys] if isinstance(keys, str) else list(keys or [])


def _on_prediction(cfg: SafeConfig, i: int, t: dict) -> bool:
    """Whether postprocessing step ``i`` acts on the prediction (its keys name ``pred``, or it names none)."""
    return "pred" in _keys(cfg, i, t)


def _prediction_arg(cfg: SafeConfig, i: int, t: dict, arg: str, default: Any) -> Any:
    """A postprocessing step's argument for the prediction (one of a list given per key)."""
    value = cfg.resolve(t.get(arg, default), f"postprocessing::transforms::{i}::{arg}")
    if isinstance(value, (list, tuple)):
        keys = _keys(cfg, i, t)
        if len(value) == len(keys):
            value = value[keys.index("pred")]
    return value


# postprocessing steps that leave the prediction's labels as medis3d makes them: the ones it models (activation,
# inversion, discretisation) and the ones that only convert, copy or save it
POSTPROCESSING_TAKEN = {
    "Activations", "Invert", "AsDiscrete", "SaveImage", "CopyItems", "DeleteItems", "SelectItems", "EnsureType",
    "CastToType", "ToDevice", "ToNumpy", "ToTensor", "Identity", "EnsureChannelFirst",
}


def _check_postprocessing(cfg: SafeConfig) -> None:
    """Refuse, in one line, a postprocessing step on the prediction that medis3d does not apply (``MeanEnsembled``, a
    bundle's own class ...): its predictions and scores would be another model's. The label-map steps
    (:mod:`medis3d.postprocessing`) are applied."""
    for i, t in enumerate(cfg.raw("postprocessing::transforms", []) or []):
        if not isinstance(t, dict):
            continue
        name = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        if name in POSTPROCESSING_TAKEN or (name.endswith("d") and name[:-1] in POSTPROCESSING_TAKEN) or step_name(name):
            continue
        if _on_prediction(cfg, i, t):
            raise BundleError(f"{cfg.source}: postprocessing step {name} is not supported (medis3d applies Activationsd, "
                              f"Invertd, AsDiscreted and {', '.join(f'{n}d' for n in LABEL_MAP_STEPS)} only, so its "
                              "predictions would not be the bundle's)")


def _label_steps(cfg: SafeConfig, activation: str) -> tuple[LabelStep, ...]:
    """The bundle's label-map steps on the prediction, in order, each in the space the bundle applies it (the model's
    grid before its Invertd or without one, the scan's after it). One before the prediction's AsDiscreted (on probabilities), or
    with an argument MONAI's transform does not take, or whose package is missing, is refused in one line."""
    transforms = cfg.raw("postprocessing::transforms", []) or []
    discretes = [i for i, _ in _prediction_steps(cfg, "AsDiscreted", "AsDiscrete")]
    inverts = [i for i, _ in _prediction_steps(cfg, "Invertd")]
    steps = []
    for i, t in enumerate(transforms):
        if not isinstance(t, dict) or not _on_prediction(cfg, i, t):
            continue
        name = step_name(str(t.get("_target_", "")))
        if name is None:
            continue
        before = [j for j in discretes if j < i]
        if not before:
            raise BundleError(f"{cfg.source}: postprocessing {name}d before the prediction's AsDiscreted is not supported "
                              "(it takes a label map)")
        _, args = cfg.component_args(f"postprocessing::transforms::{i}")
        args = {k: v for k, v in args.items() if k not in ("keys", "allow_missing_keys")}
        onehot = _prediction_arg(cfg, before[-1], transforms[before[-1]], "to_onehot", None)
        # the model's grid before the bundle's Invertd, or where it has none (MONAI's prediction stays there)
        step = LabelStep(name, args, "model" if not inverts or i < inverts[0] else "scan",
                         int(onehot) if activation == "softmax" and onehot else None)
        try:
            step.transform  # noqa: B018  (made now: refused at loading, not on the first prediction)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{cfg.source}: postprocessing {name}d cannot be used ({first_line(exc)})") from exc
        steps.append(step)
    return tuple(steps)


def _invert_nearest(cfg: SafeConfig) -> bool:
    """Whether the bundle's ``Invertd`` maps the prediction back with nearest-neighbour interpolation (its
    ``nearest_interp``, True unless the config says otherwise); one that interpolates a discrete label map is refused."""
    for i, t in _prediction_steps(cfg, "Invertd"):
        nearest = bool(_prediction_arg(cfg, i, t, "nearest_interp", True))
        if not nearest and _invert_order(cfg) == "labels":
            raise BundleError(f"{cfg.source}: postprocessing Invertd with nearest_interp false after AsDiscreted is not "
                              "supported (it interpolates the label values themselves, into values no class has)")
        return nearest
    return False


def _activated_at(cfg: SafeConfig) -> int | None:
    """The index of the postprocessing step that activates the prediction (softmax or sigmoid), None where none does."""
    for i, t in _prediction_steps(cfg, "Activationsd", "Activations"):
        if any(cfg.resolve(t.get(a, False), f"postprocessing::transforms::{i}::{a}") is True for a in ("sigmoid", "softmax")):
            return i
    return None


def _invert_logits(cfg: SafeConfig) -> bool:
    """Whether the bundle's ``Invertd`` maps the network's logits back (no activation before it, no discretisation)."""
    for i, _ in _prediction_steps(cfg, "Invertd"):
        activated = _activated_at(cfg)
        discretised = [j for j, _ in _prediction_steps(cfg, "AsDiscreted", "AsDiscrete") if j < i]
        return (activated is None or activated > i) and not discretised
    return False


def _threshold(cfg: SafeConfig, activation: str) -> float:
    """The probability at which the bundle's ``AsDiscreted(threshold=...)`` makes a sigmoid channel foreground
    (0.5 where it sets none). An argmax over sigmoid channels (one label map, where medis3d thresholds each channel)
    is refused."""
    for i, t in _prediction_steps(cfg, "AsDiscreted", "AsDiscrete"):
        if activation == "sigmoid" and _prediction_arg(cfg, i, t, "argmax", False) is True:
            raise BundleError(f"{cfg.source}: postprocessing AsDiscreted argmax after a sigmoid activation is not supported "
                              "(medis3d thresholds each sigmoid channel)")
        value = _prediction_arg(cfg, i, t, "threshold", None)
        if value is not None:
            activated = _activated_at(cfg)
            if activation != "sigmoid" or activated is None or activated > i or isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise BundleError(f"{cfg.source}: postprocessing AsDiscreted threshold {value!r} is not supported "
                                  "(a probability strictly between 0 and 1, after a sigmoid Activationsd)")
            return float(value)
    return 0.5


def _activation(cfg: SafeConfig, out_channels: int) -> str:
    transforms = cfg.raw("postprocessing::transforms", []) or []
    for i, t in enumerate(transforms):
        if not isinstance(t, dict):
            continue
        name = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        if name in ("Activationsd", "Activations"):
            if cfg.resolve(t.get("sigmoid", False), f"postprocessing::transforms::{i}::sigmoid") is True:
                return "sigmoid"
            if cfg.resolve(t.get("softmax", False), f"postprocessing::transforms::{i}::softmax") is True:
                return "softmax"
    return "softmax" if out_channels > 1 else "sigmoid"


def _preprocessing(cfg: SafeConfig) -> DifferentiablePreprocessing:
    key = "preprocessing::transforms"
    transforms = cfg.raw(key)
    if transforms is None and isinstance(cfg.raw("preprocessing"), list):
        key, transforms = "preprocessing", cfg.raw("preprocessing")
    steps = []
    for i, _ in enumerate(transforms or []):
        name, args = cfg.component_args(f"{key}::{i}")
        try:
            step = build_step(name, args)
        except Exception as exc:
            raise BundleError(f"{cfg.source}: preprocessing step {name} cannot be used ({first_line(exc)})") from exc
        if step is not None:
            steps.append(step)
    return DifferentiablePreprocessing(steps)


def _probe_channels(network: torch.nn.Module, window: WindowSettings, in_channels: int) -> tuple[int, int]:
    """Input and output channels of a network that does not say (TorchScript): one small forward."""
    size = [max(16, min(int(r), 64)) if int(r) > 0 else 64 for r in window.roi_size]
    for channels in dict.fromkeys((in_channels, 1, 2, 3, 4)):
        try:
            with torch.no_grad():
                out = network(torch.zeros(1, channels, *size))
        except Exception:
            continue
        out = out[0] if isinstance(out, (tuple, list)) else out
        return channels, int(out.shape[1])
    raise BundleError("the network does not run on a 1-4 channel window; give --network-def")


def _class_names(bundle: Path) -> dict[int, str]:
    meta = bundle / "configs" / "metadata.json"
    names: dict[int, str] = {}
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
            outputs = data.get("network_data_format", {}).get("outputs", {})
            pred = next(iter(outputs.values())) if outputs else {}
            for k, v in (pred.get("channel_def") or {}).items():
                names[int(k)] = str(v)
        except Exception:
            pass
    return names


def load_bundle(
    path: str | Path | None = None,
    *,
    config: str | None = None,
    trust: bool = False,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    random_weights: bool = False,
) -> Target:
    """Load a MONAI bundle (directory or .zip, or a shipped bundle's name; default: the shipped
    brain SegResNet) as a :class:`Target`. A bundle without weights is refused unless
    ``random_weights`` asks for the network's random initialisation (to check a config)."""
    bundle = resolve_bundle_path(path)
    if bundle.is_file() and bundle.suffix == ".zip":
        # unpacked into a temporary folder that is always removed: everything is in memory once loaded
        with tempfile.TemporaryDirectory(prefix="medis3d-bundle-") as tmp:
            return _load_folder(_unpack_zip(bundle, Path(tmp)), str(bundle), config, trust, device, precision, random_weights)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: a bundle is a directory (or .zip) with configs/ and models/")
    return _load_folder(bundle, str(bundle), config, trust, device, precision, random_weights)


def _load_folder(bundle: Path, source: str, config: str | None, trust: bool, device, precision, random_weights: bool) -> Target:
    config_path = _inside(bundle, find_config(bundle, config), "config")
    cfg = SafeConfig(read_config(config_path), config_path, trust=trust)
    ts, pt, meta = bundle / "models" / "model.ts", bundle / "models" / "model.pt", bundle / "configs" / "metadata.json"
    for part, what in ((ts, "weights"), (pt, "weights"), (meta, "metadata")):
        if part.exists():
            _inside(bundle, part, what)
    return _target_from(cfg, ts, pt, source, device, precision, _class_names(bundle), random_weights)


def _target_from(cfg: SafeConfig, ts_path, pt_path, source: str, device, precision, class_names: dict,
                 random_weights: bool = False, bundle: bool = True) -> Target:
    notices: list[str] = []
    imports = cfg.raw("imports") if not cfg.trust else None
    if isinstance(imports, list) and imports:
        names = ", ".join(str(i).lstrip("$").replace("import ", "").strip() for i in imports)
        notices.append(f"the config's imports ({names}) were not run: the safe loader needs none of them")
    network, net_name, net_args = _build_network(cfg, ts_path, pt_path, notices, random_weights)
    preprocessing = _preprocessing(cfg)
    window = _window_settings(cfg)
    if (torch.device(device).type == "cpu" and window.sw_batch_size == 1 and min(window.roi_size) > 0
            and math.prod(window.roi_size) <= CPU_WINDOW_BATCH_LARGEST):
        window.sw_batch_size = 2
        notices.append(CPU_WINDOW_BATCH_NOTICE)
    if channels_last_on_cpu(network, device):
        notices.append(CPU_CHANNELS_LAST_NOTICE)
    in_channels = int(net_args.get("in_channels", 0) or 0)
    out_channels = int(net_args.get("out_channels", 0) or 0)
    if not out_channels:  # TorchScript: ask the network
        in_channels, out_channels = _probe_channels(network, window, in_channels or 1)
    activation = _activation(cfg, out_channels)
    _check_postprocessing(cfg)
    label_steps = _label_steps(cfg, activation)
    notices.extend(f"postprocessing {step.describe()}: applied to every prediction as the bundle applies it; the attack's "
                   "gradient passes around it (BPDA, identity)" for step in label_steps)
    for step in preprocessing.steps:
        if step.gradient not in ("exact",):
            notices.append(f"preprocessing {step.name}: gradient by {step.gradient}")
    invert = _invert_order(cfg)
    if bundle and not any(_prediction_steps(cfg, "Invertd")):
        # the bundle's prediction is its labels on the model's grid (MONAI's output): the labels themselves go back to
        # the scan's grid, nearest, not its probabilities interpolated (once 249 of 46080 voxels of the tests' tiny
        # bundle's prediction were a label the bundle gave at no model voxel nearest them; the losses still take the
        # probabilities mapped back, their gradient smooth)
        invert = "labels"
        if any(step.invertible is not None for step in preprocessing.steps):
            notices.append(NO_INVERTD_NOTICE)
    return Target(
        network=network,
        preprocessing=preprocessing,
        window=window,
        activation=activation,
        invert=invert,
        invert_nearest=_invert_nearest(cfg),
        invert_logits=_invert_logits(cfg),
        threshold=_threshold(cfg, activation),
        label_steps=label_steps,
        out_channels=out_channels,
        in_channels=in_channels,
        class_names=class_names,
        name=net_name,
        source=source,
        device=torch.device(device),
        precision=precision or Precision(),
        notices=tuple(notices),
    )


TRANSFORMS_DIR = Path(__file__).resolve().parent.parent / "transforms"


def transforms_preset(name_or_file: str | Path) -> tuple[dict, Path]:
    """A preprocessing preset: a name from ``transforms/`` or a JSON/YAML file with ``preprocessing``."""
    import sys

    path = Path(name_or_file)
    if not path.is_file():
        folders = [f for f in (TRANSFORMS_DIR, Path(sys.prefix) / "share" / "medis3d" / "transforms") if f.is_dir()]
        for folder in folders:  # the checkout's, else where a wheel installs them
            if (folder / f"{name_or_file}.json").is_file():
                path = folder / f"{name_or_file}.json"
                break
        else:
            names = sorted({p.stem for f in folders for p in f.glob("*.json")})
            raise BundleError(f"{name_or_file}: no such preprocessing preset or file (presets: {', '.join(names) or 'none installed'})")
    data = read_config(path)
    if "preprocessing" not in data:
        raise BundleError(f"{path}: a preprocessing preset needs a 'preprocessing' entry")
    return data, path


def load_network(
    network: str | Path,
    *,
    network_def: str | Path | None = None,
    transforms: str | Path = "mr_t1_brain",
    roi_size=(96, 96, 96),
    activation: str | None = None,
    trust: bool = False,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
) -> Target:
    """A Target from a bare network: TorchScript (``.ts``) or a state dict with ``network_def``
    (JSON/YAML holding a ``_target_`` component, or a file with a ``network_def`` entry), and a
    preprocessing preset (``transforms/`` name or file)."""
    network = Path(network)
    if not network.is_file():
        raise BundleError(f"{network}: no such network file")
    preset, preset_path = transforms_preset(transforms)
    config: dict[str, Any] = {"preprocessing": preset["preprocessing"], "image_key": preset.get("image_key", "image")}
    config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"}
    if network_def is not None:
        definition = read_config(Path(network_def)) if Path(str(network_def)).is_file() else None
        if definition is None:
            raise BundleError(f"{network_def}: no such network definition file")
        config["network_def"] = definition.get("network_def", definition)
    if activation:
        config["postprocessing"] = {"transforms": [{"_target_": "Activationsd", activation: True}]}
    cfg = SafeConfig(config, preset_path if network_def is None else Path(network_def), trust=trust)
    is_ts = network_def is None
    if is_ts and network.suffix.lower() in (".pt", ".pth", ".ckpt"):
        try:  # a .pt file may hold TorchScript too
            torch.jit.load(str(network), map_location="cpu")
        except Exception as exc:
            raise BundleError(f"{network}: not TorchScript; a state dict needs --network-def") from exc
    return _target_from(
        cfg, network if is_ts else None, None if is_ts else network, str(network), device, precision, {}, bundle=False
    )
