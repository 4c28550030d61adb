"""Read the forms kohya settings come in: a kohya_ss GUI JSON, an sd-scripts TOML config (flat or in sections) or an
sd-scripts command line, as (key, shown key, value) entries with the GUI's strings cleaned into numbers and booleans.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from xlbake.errors import InputError

GUI, TOML, CLI = "kohya_ss GUI JSON", "sd-scripts TOML", "sd-scripts command line"


def clean_value(value: Any) -> Any:
    """GUI JSONs hold numbers and booleans as strings: "" -> None, "1e-6" -> 1e-6, "True" -> True."""
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 accumulation steps: an int field takes it, a float field takes 1 as well
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return clean_value(parse(text))
        except ValueError:
            pass
    return text or None


def read_kohya(path: Path) -> tuple[str, list[tuple[str, str, Any]]]:
    """The source's kind and its (key, shown key, value) entries in order, values cleaned (see ``_clean``).

    A GUI's additional_parameters come last (the GUI appends them to the command line); a command line's
    --config_file TOML comes first, then the command line's own arguments.
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the config ({err}); give a kohya_ss JSON or sd-scripts TOML") from err
    if data is not None and not isinstance(data, dict):
        raise InputError(f"{path}: a kohya_ss GUI config is a JSON object of settings")
    if data is not None:
        kind, entries = GUI, [(k, k, clean_value(v)) for k, v in data.items()]
    elif path.suffix.lower() == ".toml":
        kind, entries = TOML, [(k, k, clean_value(v)) for k, v in _read_toml(path, text).items()]
    else:
        kind, entries = CLI, _cli_entries(path, text)
    extra = next((v for k, _, v in entries if k == "additional_parameters"), None)
    entries = [e for e in entries if e[0] != "additional_parameters"]
    return kind, entries + [(k, f"{k} (additional_parameters)", v) for k, _, v in _parse_args(str(extra or ""))]


def _read_toml(path: Path, text: str) -> dict[str, Any]:
    """An sd-scripts TOML config: flat, or in sections ([model_arguments], ...) that sd-scripts flattens."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from err
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) and key != "datasets" else {key: value})
    return flat


def _cli_entries(path: Path, text: str) -> list[tuple[str, str, Any]]:
    """An sd-scripts command line (e.g. `accelerate launch sdxl_train.py --config_file=c.toml --a=1 --b`)."""
    tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
    args = _parse_args(shlex.join(tokens[scripts[-1] + 1 :] if scripts else tokens))
    config = next((str(v) for k, _, v in args if k == "config_file"), None)
    if config is None:
        return args
    toml = Path(config) if Path(config).is_absolute() else path.parent / config
    if not toml.is_file():
        raise InputError(f"{path}: --config_file {toml} not found; put it beside the command file")
    return [
        (k, f"{k} ({toml.name})", clean_value(v)) for k, v in _read_toml(toml, toml.read_text("utf-8")).items()
    ] + args


def _parse_args(text: str) -> list[tuple[str, str, Any]]:
    """argparse-style `--key=value`, `--key value [value ...]` and `--flag` into (key, key, value) entries."""
    entries: list[tuple[str, str, Any]] = []
    for token in shlex.split(text):
        if token.startswith("--"):
            key, has_value, value = token[2:].partition("=")
            entries.append((key, key, clean_value(value) if has_value else True))
        elif entries:
            key, _, previous = entries[-1]
            values = [] if previous is True else previous if isinstance(previous, list) else [previous]
            value = [*values, clean_value(token)]
            entries[-1] = (key, key, value[0] if len(value) == 1 else value)
    return entries
