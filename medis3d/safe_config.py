"""Reading a bundle's config without running it: size and node limits, a parser that resolves ``@`` references
and evaluates only plain data expressions (no ``$`` code unless trusted), and ``_target_`` limited to MONAI and
torch classes. ``trust=True`` hands the config to MONAI's own ``ConfigParser``."""

from __future__ import annotations

import ast
import importlib
import json
import operator
import re
from pathlib import Path
from typing import Any

import torch

from medis3d.errors import BundleError, first_line

ALLOWED_PREFIXES = ("monai.", "torch.")
_MISSING = object()

MAX_CONFIG_BYTES = 8 * 2**20  # real bundle configs are kilobytes
MAX_CONFIG_NODES = 1_000_000  # values in the config as read, YAML aliases counted each time they are used


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
