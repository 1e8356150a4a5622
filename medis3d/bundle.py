"""MONAI bundle -> Target: safe config parsing, weights, inferer and activation settings.

By default no ``$`` expression is evaluated, ``_target_`` may name only MONAI and torch
classes, and weights load with ``torch.load(weights_only=True)``. ``trust=True`` gives full
MONAI config semantics (``ConfigParser``) for bundles the user trusts.
"""

from __future__ import annotations

import importlib
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from medis3d.engine import Precision, WindowSettings
from medis3d.errors import BundleError
from medis3d.target import Target
from medis3d.transforms_diff import DifferentiablePreprocessing, build_step

ALLOWED_PREFIXES = ("monai.", "torch.")
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "brain_t1_segresnet"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_MISSING = object()


def default_bundle_path() -> Path:
    """The shipped default bundle (SegResNet brain extraction on T1 MRI)."""
    return DEFAULT_BUNDLE


def read_config(path: Path) -> dict:
    """Read a JSON or YAML bundle config file."""
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise BundleError(f"{path}: cannot parse the config ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    if not isinstance(data, dict):
        raise BundleError(f"{path}: a bundle config must be a mapping at its top level")
    return data


class SafeConfig:
    """Resolves the parts of a bundle config medis3d needs without executing any code."""

    def __init__(self, config: dict, source: Path, trust: bool = False):
        self.config, self.source, self.trust = config, source, trust
        self._parser = None
        if trust:
            from monai.bundle import ConfigParser

            self._parser = ConfigParser(config)
            self._parser.parse()

    def has(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def _lookup(self, key: str):
        node: Any = self.config
        for part in key.replace("#", "::").split("::"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        return node

    def raw(self, key: str, default=None):
        value = self._lookup(key)
        return default if value is _MISSING else value

    def resolve(self, value: Any, where: str, depth: int = 0) -> Any:
        """Plain values as they are; ``@ref`` replaced by the referenced value; ``$expr`` refused."""
        if depth > 20:
            raise BundleError(f"{self.source}: reference cycle at {where}")
        if isinstance(value, str):
            if value.startswith("$"):
                if self.trust:
                    return self._parser.get_parsed_content(where) if self._parser is not None else value
                raise BundleError(
                    f"{self.source}: refused to evaluate the Python expression {value!r} at {where}; "
                    "re-run with --trust-bundle if you trust this bundle"
                )
            if value.startswith("@"):
                ref = value[1:]
                target = self._lookup(ref)
                if target is _MISSING:
                    raise BundleError(f"{self.source}: {where} refers to @{ref}, which the config does not define")
                return self.resolve(target, ref, depth + 1)
            if value.startswith("%"):
                raise BundleError(f"{self.source}: macro {value!r} at {where} is not supported by the safe loader; use --trust-bundle")
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{where}::{i}", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{where}::{k}", depth + 1) for k, v in value.items()}
        return value

    def component_args(self, key: str, only: set[str] | None = None) -> tuple[str, dict]:
        """``(_target_ name, resolved keyword arguments)`` of the component at ``key``.

        With ``only``, just those arguments are resolved (others, like an inferer's
        ``device`` expression, are not needed and are never evaluated)."""
        node = self.raw(key)
        if not isinstance(node, dict) or "_target_" not in node:
            raise BundleError(f"{self.source}: {key} is not a component with a _target_")
        if self.trust and self._parser is not None:
            args = {}
            for k in node:
                if k.startswith("_") or (only is not None and k not in only):
                    continue
                args[k] = self._parser.get_parsed_content(f"{key}::{k}")
            return str(node["_target_"]), args
        name = node["_target_"]
        if not isinstance(name, str) or name.startswith("$"):
            raise BundleError(f"{self.source}: refused a computed _target_ at {key}; use --trust-bundle if you trust it")
        mode = node.get("_mode_", "default")
        if mode != "default":
            raise BundleError(f"{self.source}: refused _mode_ {mode!r} at {key}; use --trust-bundle if you trust it")
        args = {
            k: self.resolve(v, f"{key}::{k}")
            for k, v in node.items()
            if not k.startswith("_") and (only is None or k in only)
        }
        return name, args

    def instantiate(self, key: str):
        name, args = self.component_args(key)
        cls = resolve_component(name, self.source, allow_any=self.trust)
        return cls, args


def resolve_component(name: str, source: Path | str = "", allow_any: bool = False):
    """The class a ``_target_`` names, limited to MONAI and torch unless ``allow_any``."""
    from monai.bundle.config_item import ComponentLocator

    if "." in name:
        module_name, _, attr = name.rpartition(".")
        if not allow_any and not module_name.startswith(ALLOWED_PREFIXES) and module_name not in ("monai", "torch"):
            raise BundleError(
                f"{source}: refused _target_ {name!r} (only MONAI and torch classes are allowed; "
                "use --trust-bundle if you trust this bundle)"
            )
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise BundleError(f"{source}: _target_ {name!r} cannot be found")
    module = ComponentLocator().get_component_module_name(name)
    if isinstance(module, list):
        module = module[0]
    if not module:
        raise BundleError(f"{source}: _target_ {name!r} is not a MONAI component")
    return getattr(importlib.import_module(module), name)


def _unpack_zip(path: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="medis3d-bundle-"))
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            target = (out / member).resolve()
            if not str(target).startswith(str(out.resolve())):
                raise BundleError(f"{path}: refused a zip entry outside the bundle ({member})")
        zf.extractall(out)
    entries = [p for p in out.iterdir() if p.is_dir()]
    return entries[0] if len(entries) == 1 and not (out / "configs").exists() else out


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


def _build_network(cfg: SafeConfig, bundle: Path, notices: list[str]) -> tuple[torch.nn.Module, str, dict]:
    ts_path = bundle / "models" / "model.ts"
    pt_path = bundle / "models" / "model.pt"
    if not cfg.has("network_def") and ts_path.is_file():
        try:
            net = torch.jit.load(str(ts_path), map_location="cpu")
        except Exception as exc:
            raise BundleError(f"{ts_path}: cannot load the TorchScript model ({str(exc).splitlines()[0]})")
        return net, "TorchScript", {}
    if not cfg.has("network_def"):
        raise BundleError(f"{cfg.source}: no network_def, and no models/model.ts")
    cls, args = cfg.instantiate("network_def")
    try:
        net = cls(**args)
    except TypeError as exc:
        if "img_size" in args and "img_size" in str(exc):  # SwinUNETR configs from before MONAI 1.5
            args = {k: v for k, v in args.items() if k != "img_size"}
            notices.append(f"network_def passes img_size, which this MONAI version removed; ignored it")
            net = cls(**args)
        else:
            raise BundleError(f"{cfg.source}: network_def cannot be built ({exc})")
    if pt_path.is_file():
        try:
            state = torch.load(str(pt_path), map_location="cpu", weights_only=not cfg.trust)
        except Exception as exc:
            raise BundleError(
                f"{pt_path}: refused or unreadable weights ({str(exc).splitlines()[0][:200]}); "
                "weights load with weights_only=True unless --trust-bundle"
            )
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
            raise BundleError(f"{pt_path}: weights do not fit network_def ({str(exc).splitlines()[0][:200]})")
    elif ts_path.is_file():
        net = torch.jit.load(str(ts_path), map_location="cpu")
    else:
        notices.append("no models/model.pt or model.ts: the network has random weights")
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
    return WindowSettings(
        roi_size=tuple(roi),
        sw_batch_size=int(args.get("sw_batch_size", 1)),
        overlap=float(args.get("overlap", 0.25)),
        mode=str(args.get("mode", "constant")),
        sigma_scale=args.get("sigma_scale", 0.125),
        padding_mode=str(args.get("padding_mode", "constant")),
        cval=float(args.get("cval", 0.0)),
    )


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
            raise BundleError(f"{cfg.source}: preprocessing step {name} cannot be used ({str(exc).splitlines()[0]})")
        if step is not None:
            steps.append(step)
    return DifferentiablePreprocessing(steps)


def _class_names(bundle: Path, out_channels: int) -> dict[int, str]:
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
) -> Target:
    """Load a MONAI bundle (directory or .zip; default: the shipped brain bundle) as a :class:`Target`."""
    bundle = Path(path) if path is not None else default_bundle_path()
    if not bundle.exists():
        raise BundleError(f"{bundle}: no such bundle")
    if bundle.is_file() and bundle.suffix == ".zip":
        bundle = _unpack_zip(bundle)
    elif not bundle.is_dir():
        raise BundleError(f"{bundle}: a bundle is a directory (or .zip) with configs/ and models/")
    config_path = find_config(bundle, config)
    cfg = SafeConfig(read_config(config_path), config_path, trust=trust)
    notices: list[str] = []
    network, net_name, net_args = _build_network(cfg, bundle, notices)
    out_channels = int(net_args.get("out_channels", 0) or 0)
    in_channels = int(net_args.get("in_channels", 1) or 1)
    preprocessing = _preprocessing(cfg)
    window = _window_settings(cfg)
    if out_channels == 0:
        out_channels = 2
    activation = _activation(cfg, out_channels)
    for step in preprocessing.steps:
        if step.gradient not in ("exact",):
            notices.append(f"preprocessing {step.name}: gradient by {step.gradient}")
    return Target(
        network=network,
        preprocessing=preprocessing,
        window=window,
        activation=activation,
        out_channels=out_channels,
        in_channels=in_channels,
        class_names=_class_names(bundle, out_channels),
        name=net_name,
        source=str(bundle),
        device=torch.device(device),
        precision=precision or Precision(),
        notices=notices,
    )
