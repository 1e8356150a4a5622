"""MONAI bundle -> Target: safe config parsing, weights, inferer and activation settings.

By default no ``$`` expression is evaluated, ``_target_`` may name only MONAI and torch
classes, and weights load with ``torch.load(weights_only=True)``. ``trust=True`` gives full
MONAI config semantics (``ConfigParser``) for bundles the user trusts.
"""

from __future__ import annotations

import ast
import importlib
import json
import operator
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from medis3d.engine import Precision, WindowSettings
from medis3d.errors import BundleError, first_line
from medis3d.target import Target
from medis3d.transforms_diff import DifferentiablePreprocessing, build_step

ALLOWED_PREFIXES = ("monai.", "torch.")
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "brain_t1_segresnet"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_MISSING = object()


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


MAX_CONFIG_BYTES = 8 * 2**20  # real bundle configs are kilobytes
MAX_CONFIG_NODES = 1_000_000  # values in the config as read, YAML aliases counted each time they are used
MAX_ZIP_BYTES = 16 * 2**30  # unpacked size of a bundle archive (the largest model-zoo weights are a few hundred MB)


def _count_nodes(data: Any, limit: int) -> int:
    """How many values ``data`` holds, counting shared (aliased) parts at each use, stopping past ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def read_config(path: Path) -> dict:
    """Read a JSON or YAML bundle config file (refusing one too large to be a config)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the config ({exc.strerror})") from exc
    if size > MAX_CONFIG_BYTES:
        raise BundleError(f"{path}: the config is {size / 2**20:.0f} MB; bundle configs are kilobytes, refused")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise BundleError(f"{path}: cannot parse the config ({first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: a bundle config must be a mapping at its top level")
    if _count_nodes(data, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
        raise BundleError(f"{path}: the config expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases included); refused")
    return data


def _shortened(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
                try:  # plain data expressions (literals, arithmetic, conditionals on references) are safe
                    return literal_expression(value[1:], lambda ref: self.resolve("@" + ref, where, depth + 1))
                except ValueError as exc:
                    raise BundleError(
                        f"{self.source}: refused to evaluate the Python expression {_shortened(value)!r} at {where}; "
                        "re-run with --trust-bundle if you trust this bundle"
                    ) from exc
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


_REF = re.compile(r"@([A-Za-z0-9_#:]+)")
_SAFE_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SAFE_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                 ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


# pure builtins a data expression may call (on data only, positional arguments), and the longest
# sequence one may make (``[0] * 10**9`` or ``list(range(10**12))`` would exhaust memory, not run code)
_SAFE_CALLS: dict[str, Any] = {f.__name__: f for f in (len, min, max, sum, abs, int, float, bool, str, round, tuple, list,
                                                        sorted, range, any, all)}
_MAX_ITEMS = 1_000_000
_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16", "int32",
                "int64", "uint8", "uint16", "uint32", "uint64", "bool", "bool_", "long", "int", "short", "complex64")


def _dtype(module: str, name: str) -> Any:
    """``torch.float32``, ``numpy.float32`` / ``np.float32`` and the like: names of dtypes, nothing else."""
    if name not in _DTYPE_NAMES:
        return None
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) else None
    if module in ("numpy", "np"):
        import numpy

        value = getattr(numpy, name, None)
        return value if isinstance(value, type) and issubclass(value, numpy.generic) else None
    return None


def _bounded(value: Any) -> Any:
    if isinstance(value, range) and len(value) > _MAX_ITEMS:
        raise ValueError("range too long")
    return value


def literal_expression(expression: str, reference) -> Any:
    """Evaluate a bundle ``$`` expression made only of data: literals, lists, arithmetic,
    comparisons, ``and``/``or``/``not``, ``x if c else y``, indexing, ``@references``, calls of
    pure builtins on data (``len``, ``min``, ``max``, ``int``, ``range``...) and dtype names
    (``torch.float32``, ``numpy.float32``). Anything else (other names, calls, attributes,
    imports, comprehensions) raises ValueError: nothing is executed."""
    refs: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        name = f"__ref{len(refs)}"
        refs[name] = match.group(1)
        return name

    try:
        tree = ast.parse(_REF.sub(placeholder, expression.strip()), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Name) and node.id in refs:
            return reference(refs[node.id])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else (+v if isinstance(node.op, ast.UAdd) else not v)
        if isinstance(node, ast.BinOp) and type(node.op) in _SAFE_BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            if isinstance(node.op, ast.Mult):
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) and len(seq) * times > _MAX_ITEMS:
                        raise ValueError("sequence too long")
            return _SAFE_BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Subscript):
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(None if part is None else ev(part) for part in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            dtype = _dtype(node.value.id, node.attr)
            if dtype is not None:
                return dtype
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SAFE_CALLS
                and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)):
            args = [_bounded(ev(a)) for a in node.args]
            return _bounded(_SAFE_CALLS[node.func.id](*args))
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and all(type(o) in _SAFE_COMPARE for o in node.ops):
            left = ev(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp)
                if not _SAFE_COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        raise ValueError(f"not a data expression: {ast.dump(node)[:80]}")

    try:
        return ev(tree)
    except ValueError:
        raise
    except Exception as exc:  # data that does not fit the operation (len(5), 1 / 0, a missing index): still data
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


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
        except (ImportError, AttributeError) as exc:
            raise BundleError(f"{source}: _target_ {name!r} cannot be found") from exc
    module = ComponentLocator().get_component_module_name(name)
    if isinstance(module, list):
        module = module[0]
    if not module:
        raise BundleError(f"{source}: _target_ {name!r} is not a MONAI component")
    return getattr(importlib.import_module(module), name)


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
    return WindowSettings(
        roi_size=tuple(roi),
        sw_batch_size=int(args.get("sw_batch_size", 1)),
        overlap=float(args.get("overlap", 0.25)),
        mode=str(args.get("mode", "constant")),
        sigma_scale=args.get("sigma_scale", 0.125),
        padding_mode=str(args.get("padding_mode", "constant")),
        cval=float(args.get("cval", 0.0)),
    )


def _invert_order(cfg: SafeConfig) -> str:
    """Whether the bundle inverts probabilities (Invertd before AsDiscreted) or labels (after)."""
    names = [str(t.get("_target_", "")).rsplit(".", 1)[-1] for t in (cfg.raw("postprocessing::transforms", []) or []) if isinstance(t, dict)]
    if "Invertd" in names and "AsDiscreted" in names and names.index("AsDiscreted") < names.index("Invertd"):
        return "labels"
    return "probabilities"


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
                 random_weights: bool = False) -> Target:
    notices: list[str] = []
    imports = cfg.raw("imports") if not cfg.trust else None
    if isinstance(imports, list) and imports:
        names = ", ".join(str(i).lstrip("$").replace("import ", "").strip() for i in imports)
        notices.append(f"the config's imports ({names}) were not run: the safe loader needs none of them")
    network, net_name, net_args = _build_network(cfg, ts_path, pt_path, notices, random_weights)
    preprocessing = _preprocessing(cfg)
    window = _window_settings(cfg)
    in_channels = int(net_args.get("in_channels", 0) or 0)
    out_channels = int(net_args.get("out_channels", 0) or 0)
    if not out_channels:  # TorchScript: ask the network
        in_channels, out_channels = _probe_channels(network, window, in_channels or 1)
    activation = _activation(cfg, out_channels)
    for step in preprocessing.steps:
        if step.gradient not in ("exact",):
            notices.append(f"preprocessing {step.name}: gradient by {step.gradient}")
    return Target(
        network=network,
        preprocessing=preprocessing,
        window=window,
        activation=activation,
        invert=_invert_order(cfg),
        out_channels=out_channels,
        in_channels=in_channels,
        class_names=class_names,
        name=net_name,
        source=source,
        device=torch.device(device),
        precision=precision or Precision(),
        notices=notices,
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
        cfg, network if is_ts else None, None if is_ts else network, str(network), device, precision, {}
    )
