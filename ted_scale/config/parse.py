"""YAML + ``a.b=value`` overrides -> typed, validated dataclasses, with errors that say what to fix.

Field types drive the checks (``Literal`` for choices, ``X | None``, ``list``/``tuple``, nested
dataclasses); numeric bounds come from field metadata built with :func:`bounded`, and no number may
be infinite or NaN. A config file must be UTF-8 YAML holding at least one key, with no key twice in
a mapping and at most :data:`MAX_YAML_NODES` values once its aliases are expanded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

# A config has a few hundred values; aliases expanding past this are a "billion laughs" document,
# whose expansion (to_dict, the DeepSpeed config) would exhaust memory.
MAX_YAML_NODES = 100_000


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what it expects."""


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with numeric bounds checked when the config is built."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Read ``path`` (YAML), apply ``a.b=value`` overrides, and build a validated ``cls``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = read_yaml(path)
        if not raw:
            raise ConfigError(
                f"{path}: the config is empty: it must set at least one key (see configs/)"
            )
    for item in overrides:
        apply_override(raw, item)
    _count_nodes(raw, str(path) if path else "config")
    return build(cls, raw, where=str(path) if path else "config")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(
                    f"{line}: key {key!r} is given twice (first on line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(value: Any, where: str) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_YAML_NODES` values (counted as
    ``to_dict`` would walk it: a value reached twice through aliases counts twice)."""
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: more than {MAX_YAML_NODES:,} values once its YAML aliases (*name) are "
                "expanded; a run config holds a few hundred: write the values out"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def read_yaml(path: Path) -> Any:
    """The YAML mapping in ``path``, refused by name when it is not UTF-8 text, not YAML or has a
    duplicate key (with its line); an empty document is ``{}``."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text config (byte {e.start} is not UTF-8): give a YAML file"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no tags that run code
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except ConfigError as e:  # a duplicate key, found with its line
        raise ConfigError(f"{path}:{e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}"
        )
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e


def build(cls: type[T], raw: Any, *, where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, checking keys, types and bounds."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'{hint} "
                f"(valid keys: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            value = _convert(raw[name], hints[name], f"{prefix}{name}", where)
            _check_bounds(value, f.metadata, f"{prefix}{name}", where)
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        section = f" {prefix.rstrip('.')}:" if prefix else ""
        raise ConfigError(f"{where}:{section} {e}") from e


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where=where, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, where)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: {key} expects {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}{hint}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key} expects {_describe(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {key} expects {len(args)} values, got {value!r}")
            return tuple(
                _convert(v, a, f"{key}[{i}]", where)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} expects true or false, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-6" as a string; accept numbers written either way.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} expects a number, got {value!r}")
        number = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where}: {key} expects a number, got {value!r}")
        if not math.isfinite(number):  # no knob of a run means anything at inf or NaN
            raise ConfigError(f"{where}: {key} expects a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} expects an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} expects a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_bounds(value: Any, meta: Any, key: str, where: str) -> None:
    if value is None or not isinstance(value, int | float):
        return
    checks = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    )
    for name, ok, symbol in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {key} must be {symbol} {bound}, got {value!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of ``config`` (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
