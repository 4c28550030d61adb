"""YAML configs -> nested frozen dataclasses, validated once at the edge with every problem reported at once.

A config class is a plain (frozen) dataclass whose fields use the types below; each field is documented by the
string literal right under it (litgpt style), which ``describe`` reads for the README reference:

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = 1e-5
        \"\"\"Learning rate of the UNet.\"\"\"

Supported field types: ``bool``, ``int``, ``float`` (numeric strings such as ``1e-6`` accepted: PyYAML reads them
as strings), ``str``, ``Path`` (relative paths resolved against the config file's folder, or the working folder
for ``--set`` overrides), ``X | None``, ``Literal[...]``, ``Enum``, ``tuple[X, ...]`` / ``list[X]`` (a scalar is
taken as a one-item list), fixed ``tuple[X, Y]``, ``dict[str, X]``, ``Any`` and nested dataclasses. Cross-field
checks live in each class's ``__post_init__`` (raise ``ValueError``); their messages are collected too.
Only ``yaml.SafeLoader`` is used, so a config cannot build Python objects or run code.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import json
import logging
import os
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from xlbake.errors import ConfigError

T = TypeVar("T")
VERSION_KEY = "config_version"
OVERRIDE_SOURCE = "--set"
_YAML_BOOL_WORDS = {True: {"yes", "on", "true", "y"}, False: {"no", "off", "false", "n"}}
_INVALID = object()  # marks a value that failed validation (its problem is already recorded)
_KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class FieldDoc:
    """One documented config option, for the README reference and the "every option is documented" test."""

    key: str  # dotted key, e.g. "optim.lr"
    type: str  # readable type, e.g. "float", "list[int]", "'adamw' | 'lion'", "section"
    default: str  # default as YAML/JSON text, "required", or "" for a section
    doc: str  # the attribute docstring under the field ("" when missing)


@dataclass
class _Context:
    """Where values come from, and the problems found so far."""

    source: str  # config file name as given, or "<config>"
    base: Path  # folder that relative paths from the file are resolved against
    lines: dict[_KeyPath, int]  # key path -> 1-based line in the file
    overridden: set[_KeyPath]
    defaulted: set[_KeyPath] = dataclasses.field(default_factory=set)  # filled in from the dataclass defaults
    problems: list[str] = dataclasses.field(default_factory=list)

    def from_override(self, path: _KeyPath) -> bool:
        return any(path[:i] in self.overridden for i in range(len(path) + 1))

    def base_for(self, path: _KeyPath) -> Path:
        """Overrides and defaults are relative to the working folder, file values to the file's folder."""
        from_cwd = self.from_override(path) or any(path[:i] in self.defaulted for i in range(len(path) + 1))
        return Path.cwd() if from_cwd else self.base

    def error(self, path: _KeyPath, message: str) -> None:
        if self.from_override(path):
            where = OVERRIDE_SOURCE
        else:
            line = next((self.lines[path[:i]] for i in range(len(path), 0, -1) if path[:i] in self.lines), None)
            where = self.source if line is None else f"{self.source}:{line}"
        key = dotted(path)
        self.problems.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, data: Mapping | None = None
) -> T:
    """Load, override and validate a config; raise one ``ConfigError`` listing every problem.

    ``path``: YAML file (relative paths inside resolve against its folder). ``data``: an already parsed mapping
    used instead of reading ``path``. ``overrides``: ``"a.b.c=value"`` strings, values parsed as YAML.
    """
    file = Path(path) if path is not None else None
    source = str(file) if file is not None else "<config>"
    lines: dict[_KeyPath, int] = {}
    if data is not None:
        raw = _plain_copy(data)
    elif file is not None:
        raw, lines = _read_yaml(file)
    else:
        raw = {}
    base = file.absolute().parent if file is not None else Path.cwd()
    ctx = _Context(source, base, lines, set())
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {_show(raw)}")
    for override in overrides:
        _apply_override(cls, raw, override, ctx)
    _apply_aliases(cls, raw, ctx)
    _check_version(cls, raw, ctx)
    result = _convert(raw, cls, (), ctx)
    if ctx.problems or result is _INVALID:
        raise ConfigError(_join(ctx.problems))
    return typing.cast(T, result)


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


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, in field order; ``load_config`` of it gives back an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)


def config_hash(cfg: Any) -> str:
    """sha256 hex digest of the canonical YAML, to tell whether a stage must rerun."""
    return hashlib.sha256(dump_yaml(cfg).encode("utf-8")).hexdigest()


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every option of a config class, depth first, with its type, default and attribute docstring."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        section = _section_class(tp)
        if section is not None:
            out.append(FieldDoc(key, "section", "", docs.get(f.name, "")))
            out.extend(describe(section, key + "."))
        else:
            out.append(FieldDoc(key, type_name(tp), _default_text(f), docs.get(f.name, "")))
    return out


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


def dotted(path: _KeyPath) -> str:
    """("train", "buckets", 0) -> "train.buckets[0]"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# ---------------------------------------------------------------- reading and overriding


def _read_yaml(file: Path) -> tuple[Any, dict[_KeyPath, int]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{file}: cannot read the config ({reason}); give the path of a YAML config file") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines = _key_lines(node, file) if node is not None else {}
        return loader.construct_document(node) if node is not None else None, lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _key_lines(root: yaml.Node, file: Path) -> dict[_KeyPath, int]:
    """Map each key path to the line it is written on; refuse duplicate keys (PyYAML keeps the last silently).

    An aliased node is walked once, so recursive or exponentially nested aliases cannot hang the loader.
    """
    lines: dict[_KeyPath, int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: _KeyPath) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))
        elif isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
                    continue
                key_path, line = (*path, key.value), key.start_mark.line + 1
                if key_path in lines:
                    raise ConfigError(f"{file}:{line}: {dotted(key_path)}: duplicate key; keep only one")
                lines[key_path] = line
                walk(child, key_path)

    walk(root, ())
    return lines


def _check_version(cls: type, raw: dict, ctx: _Context) -> None:
    """A config written for a newer xlbake is refused alone: its other "problems" are likely new options."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = raw.get(VERSION_KEY)
    if VERSION_KEY not in fields or not isinstance(given, int) or isinstance(given, bool):
        return
    current = fields[VERSION_KEY].default
    if isinstance(current, int) and given > current:
        alone = dataclasses.replace(ctx, problems=[])
        alone.error(
            (VERSION_KEY,),
            f"{given} is newer than this xlbake understands ({current}); upgrade xlbake or rewrite the config",
        )
        raise ConfigError(alone.problems[0])


def _apply_aliases(cls: type, raw: dict, ctx: _Context) -> None:
    """Read the top-level keys a config class lists in ``KEY_ALIASES`` (another tool's names, e.g. kohya's
    learning_rate) as the dotted keys they stand for, with a warning naming ours; an alias of a key also set is an
    error."""
    for key, target in getattr(cls, "KEY_ALIASES", {}).items():
        if key not in raw:
            continue
        value, node = raw.pop(key), raw
        *sections, leaf = _read_as(key, target, ctx.source)
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                break  # a malformed section: reported when it is built
        else:
            if leaf in node:
                ctx.error((key,), f"another name for {target}, which is set too; keep {target} only")
                continue
            node[leaf] = value
            if (key,) in ctx.lines:
                ctx.lines[(*sections, leaf)] = ctx.lines[(key,)]


def _read_as(key: str, target: str, source: str) -> _KeyPath:
    logging.getLogger(__name__).warning("%s: %s is read as %s (xlbake's name; write that)", source, key, target)
    return tuple(target.split("."))


def _apply_override(cls: type, raw: dict, override: str, ctx: _Context) -> None:
    """Set one ``a.b.c=value`` override into the raw mapping, after checking the key against the schema."""
    key, sep, text = override.partition("=")
    parts = tuple(key.strip().split("."))
    if len(parts) == 1 and parts[0] in getattr(cls, "KEY_ALIASES", {}):
        parts = _read_as(parts[0], cls.KEY_ALIASES[parts[0]], OVERRIDE_SOURCE)
    problem = None
    if not sep or not all(parts):
        parts, problem = (override,), "expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-5"
    tp: Any = cls
    for depth, part in enumerate(parts if problem is None else ()):
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            if part not in names:
                parts, problem = parts[: depth + 1], _unknown_key(part, names)
                break
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) in (dict, Mapping):
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        elif tp is not Any:
            parts, problem = parts[:depth], f"is a {type_name(tp)}, not a section; cannot set {key.strip()}"
            break
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = problem or f"cannot parse the value {text!r} as YAML ({type(exc).__name__}); quote it"
    if problem is not None:
        ctx.problems.append(f"{OVERRIDE_SOURCE}: {dotted(parts)}: {problem}")
        return
    ctx.overridden.add(parts)
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ---------------------------------------------------------------- validation


def _convert(value: Any, tp: Any, path: _KeyPath, ctx: _Context) -> Any:
    """Validate ``value`` against ``tp``; return the typed value, or ``_INVALID`` after recording the problem."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, args, path, ctx)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path, ctx)
    if value is None:
        ctx.error(path, f"expected {type_name(tp)}, got null")
        return _INVALID
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
        return _INVALID


def _build(cls: type, value: Any, path: _KeyPath, ctx: _Context) -> Any:
    """Build one dataclass section: unknown keys, missing keys, field values, then its ``__post_init__`` checks."""
    if not isinstance(value, Mapping):
        ctx.error(path, f"expected a section of keys ({cls.__name__}), got {_show(value)}")
        return _INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    ok = True
    for key in value:
        if key not in fields:
            ctx.error((*path, key), _unknown_key(key, list(fields)))
            ok = False
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], (*path, name), ctx)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            # defaults go through the same conversion, so relative Path defaults come out absolute like the rest
            ctx.defaulted.add((*path, name))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs[name] = _convert(to_dict(default), hints[name], (*path, name), ctx)
        else:
            ctx.error((*path, name), f"missing required key ({type_name(hints[name])})")
            kwargs[name] = _INVALID
        ok = ok and kwargs[name] is not _INVALID
    if not ok:
        return _INVALID
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as exc:
        ctx.error(path, str(exc))
        return _INVALID


def _convert_union(value: Any, args: tuple, path: _KeyPath, ctx: _Context) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        return _convert(value, members[0], path, ctx)
    # 3 stays an int under ``float | int``; strings go by the declared order ("1e-6" is a float under float | str)
    members.sort(key=lambda member: not (member is type(value) and not isinstance(value, str)))
    for member in members:  # first member that takes the value without complaint
        trial = dataclasses.replace(ctx, problems=[])
        out = _convert(value, member, path, trial)
        if not trial.problems:
            return out
    ctx.error(path, f"expected {' | '.join(type_name(a) for a in args)}, got {_show(value)}")
    return _INVALID


def _convert_choice(value: Any, tp: Any, path: _KeyPath, ctx: _Context) -> Any:
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
    ctx.error(path, f"{_show(value)} is not one of {allowed}{tail}")
    return _INVALID


def _convert_sequence(value: Any, kind: type, args: tuple, path: _KeyPath, ctx: _Context) -> Any:
    variadic = kind is list or not args or (len(args) == 2 and args[1] is Ellipsis)
    if not isinstance(value, (list, tuple, Mapping)) and (variadic or len(args) == 1):
        value = [value]  # a scalar where a list is expected: a one-item list
    if not isinstance(value, (list, tuple)):
        ctx.error(path, f"expected a list, got {_show(value)}")
        return _INVALID
    if not variadic and len(value) != len(args):
        ctx.error(path, f"expected a list of {len(args)} items ({type_name(tuple[args])}), got {len(value)}")
        return _INVALID
    item_types = [args[0] if args else Any] * len(value) if variadic else list(args)
    items = [_convert(v, t, (*path, i), ctx) for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
    if any(item is _INVALID for item in items):
        return _INVALID
    return list(items) if kind is list else tuple(items)


def _convert_mapping(value: Any, args: tuple, path: _KeyPath, ctx: _Context) -> Any:
    if not isinstance(value, Mapping):
        ctx.error(path, f"expected a mapping, got {_show(value)}")
        return _INVALID
    pairs = [
        (_convert(key, args[0], (*path, str(key)), ctx), _convert(item, args[1], (*path, str(key)), ctx))
        for key, item in value.items()
    ]
    return _INVALID if any(k is _INVALID or v is _INVALID for k, v in pairs) else dict(pairs)


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
    raise ValueError(f"expected {expected}, got {_show(value)}{hint}")


def _parse_number(text: str) -> int | float | None:
    """int("12") or float("1e-6"), else None (PyYAML leaves 1e-6 and 1e3 as strings)."""
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return parse(text.strip())
    return None


_SCALARS = (bool, int, float, str, Path)


# ---------------------------------------------------------------- helpers


def _unknown_key(key: Any, names: list[str]) -> str:
    match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if match:
        return f"unknown key; did you mean {match[0]!r}?"
    return f"unknown key; valid keys: {', '.join(names)}"


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _section_class(tp: Any) -> type | None:
    inner = _unwrap_optional(tp)
    return inner if dataclasses.is_dataclass(inner) and isinstance(inner, type) else None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return json.dumps(to_dict(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return json.dumps(to_dict(f.default_factory()))
    return "required"


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under the field in the class body (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # no source (built in a REPL/exec): fields stay undocumented
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for stmt, after in zip(body[:-1], body[1:], strict=True):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _plain_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {key: _plain_copy(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain_copy(item) for item in data]
    return data


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
    return f"{type(value).__name__} {text[:60]}"


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} config problems:\n" + "\n".join(f"  {p}" for p in problems)
