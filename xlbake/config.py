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
checks live in each class's ``__post_init__`` (raise ``ConfigError``); their messages are collected too.
Only ``yaml.SafeLoader`` is used, so a config cannot build Python objects or run code.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import textwrap
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from xlbake.config_values import (
    INVALID,
    OVERRIDE_SOURCE,
    Context,
    KeyPath,
    convert,
    dotted,
    show,
    to_dict,
    type_name,
    unknown_key,
    unwrap_optional,
)
from xlbake.errors import ConfigError

__all__ = ["FieldDoc", "config_hash", "describe", "dotted", "dump_yaml", "load_config", "to_dict", "type_name"]

T = TypeVar("T")
VERSION_KEY = "config_version"


@dataclass(frozen=True)
class FieldDoc:
    """One documented config option, for the README reference and the "every option is documented" test."""

    key: str  # dotted key, e.g. "optim.lr"
    type: str  # readable type, e.g. "float", "list[int]", "'adamw' | 'lion'", "section"
    default: str  # default as YAML/JSON text, "required", or "" for a section
    doc: str  # the attribute docstring under the field ("" when missing)


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, data: Mapping | None = None
) -> T:
    """Load, override and validate a config; raise one ``ConfigError`` listing every problem.

    ``path``: YAML file (relative paths inside resolve against its folder). ``data``: an already parsed mapping
    used instead of reading ``path``. ``overrides``: ``"a.b.c=value"`` strings, values parsed as YAML.
    """
    file = Path(path) if path is not None else None
    source = str(file) if file is not None else "<config>"
    lines: dict[KeyPath, int] = {}
    if data is not None:
        raw = _plain_copy(data)
    elif file is not None:
        raw, lines = _read_yaml(file)
    else:
        raw = {}
    base = file.absolute().parent if file is not None else Path.cwd()
    ctx = Context(source, base, lines, set())
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {show(raw)}")
    for override in overrides:
        _apply_override(cls, raw, override, ctx)
    _apply_aliases(cls, raw, ctx)
    _check_version(cls, raw, ctx)
    result = convert(raw, cls, (), ctx)
    if ctx.problems or result is INVALID:
        raise ConfigError(_join(ctx.problems))
    return typing.cast(T, result)


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


# ---------------------------------------------------------------- reading and overriding


def _read_yaml(file: Path) -> tuple[Any, dict[KeyPath, int]]:
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


def _key_lines(root: yaml.Node, file: Path) -> dict[KeyPath, int]:
    """Map each key path to the line it is written on; refuse duplicate keys (PyYAML keeps the last silently).

    An aliased node is walked once, so recursive or exponentially nested aliases cannot hang the loader.
    """
    lines: dict[KeyPath, int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: KeyPath) -> None:
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


def _check_version(cls: type, raw: dict, ctx: Context) -> None:
    """The one check of ``config_version``: versions 1 up to the class's default are read. A newer one is refused
    alone (its other "problems" are likely options added since); one below 1 is reported with the other problems."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = raw.get(VERSION_KEY)
    if VERSION_KEY not in fields or not isinstance(given, int) or isinstance(given, bool):
        return  # no version field, or a wrong type, which the conversion reports
    current = fields[VERSION_KEY].default
    if not isinstance(current, int):
        return
    if given > current:
        alone = dataclasses.replace(ctx, problems=[])
        alone.error(
            (VERSION_KEY,),
            f"{given} is newer than this xlbake understands ({current}); upgrade xlbake or rewrite the config",
        )
        raise ConfigError(alone.problems[0])
    if given < 1:
        readable = "1" if current == 1 else f"1 to {current}"
        ctx.error((VERSION_KEY,), f"{given} is not supported (this xlbake reads {readable})")


def _apply_aliases(cls: type, raw: dict, ctx: Context) -> None:
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


def _read_as(key: str, target: str, source: str) -> KeyPath:
    logging.getLogger(__name__).warning("%s: %s is read as %s (xlbake's name; write that)", source, key, target)
    return tuple(target.split("."))


def _apply_override(cls: type, raw: dict, override: str, ctx: Context) -> None:
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
        tp = unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            if part not in names:
                parts, problem = parts[: depth + 1], unknown_key(part, names)
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


# ---------------------------------------------------------------- describing


def _section_class(tp: Any) -> type | None:
    inner = unwrap_optional(tp)
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


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} config problems:\n" + "\n".join(f"  {p}" for p in problems)
