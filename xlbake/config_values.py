"""Value conversion and validation behind ``xlbake.config.load_config`` (private to it).

Raw YAML values are checked against the dataclass field types; every problem is recorded in a ``Context`` with its
file, line and dotted key, and a section's own ``__post_init__`` checks (``ConfigError``) are collected with the
rest, so that one error lists them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

from xlbake.errors import ConfigError

OVERRIDE_SOURCE = "--set"
_YAML_BOOL_WORDS = {True: {"yes", "on", "true", "y"}, False: {"no", "off", "false", "n"}}
INVALID = object()  # marks a value that failed validation (its problem is already recorded)
KeyPath = tuple[str | int, ...]


@dataclass
class Context:
    """Where values come from, and the problems found so far."""

    source: str  # config file name as given, or "<config>"
    base: Path  # folder that relative paths from the file are resolved against
    lines: dict[KeyPath, int]  # key path -> 1-based line in the file
    overridden: set[KeyPath]
    defaulted: set[KeyPath] = dataclasses.field(default_factory=set)  # filled in from the dataclass defaults
    problems: list[str] = dataclasses.field(default_factory=list)

    def from_override(self, path: KeyPath) -> bool:
        return any(path[:i] in self.overridden for i in range(len(path) + 1))

    def base_for(self, path: KeyPath) -> Path:
        """Overrides and defaults are relative to the working folder, file values to the file's folder."""
        from_cwd = self.from_override(path) or any(path[:i] in self.defaulted for i in range(len(path) + 1))
        return Path.cwd() if from_cwd else self.base

    def error(self, path: KeyPath, message: str) -> None:
        if self.from_override(path):
            where = OVERRIDE_SOURCE
        else:
            line = next((self.lines[path[:i]] for i in range(len(path), 0, -1) if path[:i] in self.lines), None)
            where = self.source if line is None else f"{self.source}:{line}"
        key = dotted(path)
        self.problems.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def to_dict(cfg: Any) -> Any:
    """A config (or any value inside one) as plain YAML data: Paths as strings, tuples as lists, enums as values."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, Enum):
        return cfg.value
    if isinstance(cfg, (list, tuple)):
        return [to_dict(item) for item in cfg]
    if isinstance(cfg, Mapping):
        return {key: to_dict(value) for key, value in cfg.items()}
    return cfg


def type_name(tp: Any) -> str:
    """A short readable name of a field type, as shown in the README and in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(to_dict(a)) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin in (dict, Mapping):
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]" if args else "dict"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " | ".join(json.dumps(m.value) for m in tp)
    if tp is Path:
        return "path"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a resolved config's dotted keys, to compare or list configs key by key."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dotted(path: KeyPath) -> str:
    """("train", "buckets", 0) -> "train.buckets[0]"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def convert(value: Any, tp: Any, path: KeyPath, ctx: Context) -> Any:
    """Validate ``value`` against ``tp``; return the typed value, or ``INVALID`` after recording the problem."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, args, path, ctx)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path, ctx)
    if value is None:
        ctx.error(path, f"expected {type_name(tp)}, got null")
        return INVALID
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, Enum)):
        return _convert_choice(value, tp, path, ctx)
    if origin in (tuple, list) or tp in (tuple, list):
        return _convert_sequence(value, origin or tp, args, path, ctx)
    if origin in (dict, Mapping) or tp is dict:
        return _convert_mapping(value, args or (str, Any), path, ctx)
    if tp not in _SCALARS:
        raise TypeError(f"config field {dotted(path)} has an unsupported type {tp!r}")
    try:
        return _convert_scalar(value, tp, ctx.base_for(path))
    except ValueError as exc:
        ctx.error(path, str(exc))
        return INVALID


def _build(cls: type, value: Any, path: KeyPath, ctx: Context) -> Any:
    """Build one dataclass section: unknown keys, missing keys, field values, then its ``__post_init__`` checks."""
    if not isinstance(value, Mapping):
        ctx.error(path, f"expected a section of keys ({cls.__name__}), got {show(value)}")
        return INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ok = True
    for key in value:
        if key not in fields:
            ctx.error((*path, key), unknown_key(key, list(fields)))
            ok = False
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = convert(value[name], hints[name], (*path, name), ctx)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            # defaults go through the same conversion, so relative Path defaults come out absolute like the rest
            ctx.defaulted.add((*path, name))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs[name] = convert(to_dict(default), hints[name], (*path, name), ctx)
        else:
            ctx.error((*path, name), f"missing required key ({type_name(hints[name])})")
            kwargs[name] = INVALID
        ok = ok and kwargs[name] is not INVALID
    if not ok:
        return INVALID
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        ctx.error(path, str(exc))
        return INVALID


def _convert_union(value: Any, args: tuple, path: KeyPath, ctx: Context) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        return convert(value, members[0], path, ctx)
    # 3 stays an int under ``float | int``; strings go by the declared order ("1e-6" is a float under float | str)
    members.sort(key=lambda member: not (member is type(value) and not isinstance(value, str)))
    for member in members:  # first member that takes the value without complaint
        trial = dataclasses.replace(ctx, problems=[])
        out = convert(value, member, path, trial)
        if not trial.problems:
            return out
    ctx.error(path, f"expected {' | '.join(type_name(a) for a in args)}, got {show(value)}")
    return INVALID


def _convert_choice(value: Any, tp: Any, path: KeyPath, ctx: Context) -> Any:
    if typing.get_origin(tp) is Literal:
        choices = {json.dumps(a): a for a in typing.get_args(tp)}
    else:
        choices = {json.dumps(m.value): m for m in tp}
    for text, choice in choices.items():
        if json.dumps(value, default=str) == text:
            return choice
    if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
        spelled = [c for c in choices.values() if isinstance(c, str) and c.lower() in _YAML_BOOL_WORDS[value]]
        if len(spelled) == 1:
            return spelled[0]
    allowed = ", ".join(choices)
    hint = difflib.get_close_matches(json.dumps(value), list(choices), n=1) if isinstance(value, str) else []
    tail = f"; did you mean {hint[0]}?" if hint else ""
    ctx.error(path, f"{show(value)} is not one of {allowed}{tail}")
    return INVALID


def _convert_sequence(value: Any, kind: type, args: tuple, path: KeyPath, ctx: Context) -> Any:
    variadic = kind is list or not args or (len(args) == 2 and args[1] is Ellipsis)
    if not isinstance(value, (list, tuple, Mapping)) and (variadic or len(args) == 1):
        value = [value]  # a scalar where a list is expected: a one-item list
    if not isinstance(value, (list, tuple)):
        ctx.error(path, f"expected a list, got {show(value)}")
        return INVALID
    if not variadic and len(value) != len(args):
        ctx.error(path, f"expected a list of {len(args)} items ({type_name(tuple[args])}), got {len(value)}")
        return INVALID
    item_types = [args[0] if args else Any] * len(value) if variadic else list(args)
    items = [convert(v, t, (*path, i), ctx) for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
    if any(item is INVALID for item in items):
        return INVALID
    return list(items) if kind is list else tuple(items)


def _convert_mapping(value: Any, args: tuple, path: KeyPath, ctx: Context) -> Any:
    if not isinstance(value, Mapping):
        ctx.error(path, f"expected a mapping, got {show(value)}")
        return INVALID
    pairs = [
        (convert(key, args[0], (*path, str(key)), ctx), convert(item, args[1], (*path, str(key)), ctx))
        for key, item in value.items()
    ]
    return INVALID if any(k is INVALID or v is INVALID for k, v in pairs) else dict(pairs)


def _convert_scalar(value: Any, tp: type, base: Path) -> Any:
    """bool, int, float, str or Path from a YAML scalar; ``ValueError`` names what was expected."""
    number = value if not isinstance(value, str) else _parse_number(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(number, int) and not isinstance(number, bool):
        return number
    if tp is int and isinstance(number, float) and number.is_integer():
        return int(number)
    if tp is float and isinstance(number, (int, float)) and not isinstance(number, bool):
        return float(number)
    if tp is str and isinstance(value, str):
        return value
    if tp is Path and isinstance(value, (str, os.PathLike)) and str(value).strip():
        return Path(os.path.normpath(base / Path(value).expanduser()))
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}[tp]
    hint = "; quote it in YAML" if tp is str else ""
    raise ValueError(f"expected {expected}, got {show(value)}{hint}")


def _parse_number(text: str) -> int | float | None:
    """int("12") or float("1e-6"), else None (PyYAML leaves 1e-6 and 1e3 as strings)."""
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return parse(text.strip())
    return None


_SCALARS = (bool, int, float, str, Path)


def unknown_key(key: Any, names: list[str]) -> str:
    match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if match:
        return f"unknown key; did you mean {match[0]!r}?"
    return f"unknown key; valid keys: {', '.join(names)}"


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
    return f"{type(value).__name__} {text[:60]}"
