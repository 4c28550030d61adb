"""`xlbake import-kohya CONFIG [--out finetune.yaml]`: a kohya_ss GUI JSON, an sd-scripts TOML config or an
sd-scripts command line (the forms the guides share their settings in) -> our finetune YAML.

Every key of the source gets one row: mapped (to which YAML keys), unsupported (it changes training and we cannot
do the same; printed with its value and kept as a comment in the YAML) or ignored (no effect here, or off).
Nothing is dropped silently. The YAML is validated by loading it as a FinetuneConfig before it is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import yaml

from finetune.config import FinetuneConfig
from finetune.kohya.readers import GUI, read_kohya
from finetune.kohya.rule_kinds import Status
from finetune.kohya.rules import FINETUNE_RATES, LORA, SECRET_KEYS, SOURCE, lora_evidence, rule_for
from xlbake.cli import force_option, run_guarded
from xlbake.config import load_config
from xlbake.errors import ConfigError, InputError
from xlbake.fileio import check_output, write_text_atomic
from xlbake.tables import format_table

SD_SCRIPTS_DEFAULTS = {"learning_rate": 2e-6, "mixed_precision": "no", "caption_extension": ".caption"}


@dataclass(frozen=True)
class Row:
    """What became of one key of the source."""

    key: str
    value: Any
    status: Status
    settings: dict[str, Any]
    """Dotted YAML key -> value (mapped rows only)."""
    note: str


@dataclass(frozen=True)
class Conversion:
    source: Path
    kind: str
    rows: tuple[Row, ...]
    lora: str | None = None
    """Why the source trains a LoRA (see kohya_rules.lora_evidence); None for a finetune config."""

    @property
    def data(self) -> dict[str, Any]:
        """The nested finetune YAML data of the mapped rows (a later row wins)."""
        data: dict[str, Any] = {}
        for dotted, value in ((d, v) for row in self.rows for d, v in row.settings.items()):
            *sections, leaf = dotted.split(".")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        return data

    @property
    def warnings(self) -> list[str]:
        data, warnings = self.data, []
        if "base" not in data.get("model", {}):
            warnings.append("model.base is not set: xlbake's default is builtin:tiny (the test model); set it")
        if not data.get("data", {}).keys() & {"roots", "dataset_toml"}:
            warnings.append("no dataset: set data.roots to the folder holding your N_name folders")
        if self.lora:
            warnings.append(
                f"a LoRA training config ({self.lora}): its learning rates were not converted (a full finetune at "
                f"LoRA rates wrecks the model); the YAML keeps xlbake's finetune rates, {FINETUNE_RATES}"
            )
        return warnings


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- converting, writing


def convert(path: Path | str) -> Conversion:
    """Convert a kohya config; InputError for an unreadable, dataset-only or non-SDXL source."""
    path = Path(path)
    kind, entries = read_kohya(path)
    given = {k for k, _, _ in entries}
    if "datasets" in given:
        raise InputError(f"{path}: a kohya dataset config; set data.dataset_toml to it in a finetune YAML instead")
    if kind != GUI:
        defaults = [(k, f"{k} (sd-scripts default)", v) for k, v in SD_SCRIPTS_DEFAULTS.items() if k not in given]
        entries = defaults + entries
        if not given & {"max_train_epochs", "max_train_steps", "epoch"}:
            entries.append(("max_train_steps", "max_train_steps (sd-scripts default)", 1600))
    ctx: dict[str, Any] = {k: v for k, _, v in entries} | {SOURCE: path}
    ctx[LORA] = lora_evidence(ctx)
    if ctx.get("v2") is True or False in (ctx.get("sdxl"), ctx.get("sdxl_checkbox")):
        raise InputError(f"{path}: not an SDXL config (v2 on or sdxl off); xlbake trains SDXL only")
    last = {k: i for i, (k, _, _) in enumerate(entries)}
    rows = [_row(key, shown, value, ctx, last[key] != i) for i, (key, shown, value) in enumerate(entries)]
    return Conversion(path, kind, tuple(rows), ctx[LORA])


def _row(key: str, shown: str, value: Any, ctx: Mapping[str, Any], overridden: bool) -> Row:
    if overridden:
        return Row(shown, _masked(key, value), "ignored", {}, "given again later; that value wins")
    rule = rule_for(key)
    if rule is None:
        return Row(shown, value, "unsupported", {}, "not a setting this importer knows; check it by hand")
    if value is None and key not in ("learning_rate_te1", "learning_rate_te2"):
        return Row(shown, value, "ignored", {}, "empty")
    try:
        status, settings, note = rule(value, ctx)
    except (ValueError, TypeError) as err:
        return Row(shown, _masked(key, value), "unsupported", {}, f"cannot convert it: {err}")
    return Row(shown, _masked(key, value), status, settings, note)


def _masked(key: str, value: Any) -> Any:
    return "***" if key in SECRET_KEYS and value else value


def render_yaml(conversion: Conversion) -> str:
    """The YAML text: a header naming the source and every unsupported key, then the mapped settings."""
    lines = [f"# Converted by `xlbake import-kohya` from {conversion.source} ({conversion.kind}).",
             "# Keys not set here keep xlbake's defaults (python -m finetune --config THIS --dry-run).",
             "# Relative paths are read from this file's folder."]  # fmt: skip
    unsupported_rows = [r for r in conversion.rows if r.status == "unsupported"]
    if unsupported_rows:
        lines.append("# NOT converted (they change training; xlbake cannot do the same):")
        lines += [f"#   {r.key}: {_show(r.value)}  ({r.note})" for r in unsupported_rows]
    lines += [f"# WARNING: {w}" for w in conversion.warnings]
    data = _ordered({"config_version": 1, **conversion.data}, FinetuneConfig)
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _ordered(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """``data`` with its keys in the config class's field order, section by section."""
    hints = typing.get_type_hints(cls)
    order = [f.name for f in dataclasses.fields(cls)]
    ordered = {}
    for key in sorted(data, key=lambda k: order.index(k) if k in order else len(order)):
        section = hints.get(key)
        is_section = isinstance(data[key], dict) and dataclasses.is_dataclass(section)
        ordered[key] = _ordered(data[key], section) if is_section else data[key]
    return ordered


def validate(conversion: Conversion, out: Path) -> Conversion:
    """Load the YAML as a FinetuneConfig (relative paths against ``out``'s folder, as when it is read). A mapped row
    whose value the config refuses becomes unsupported, with the reason, and the rest is loaded again."""
    while True:
        try:
            load_config(FinetuneConfig, out, data=yaml.safe_load(render_yaml(conversion)))
            return conversion
        except ConfigError as err:
            refused = {_culprit(conversion.rows, line): line for line in str(err).splitlines()[::-1]}
            refused.pop(None, None)
            if not refused:
                raise ConfigError(f"{conversion.source}: the converted settings are not valid: {err}") from err
            rows = tuple(
                replace(row, status="unsupported", settings={}, note=refused[i].split(": ", 1)[-1].strip())
                if i in refused
                else row
                for i, row in enumerate(conversion.rows)
            )
            conversion = replace(conversion, rows=rows)


def _culprit(rows: tuple[Row, ...], problem: str) -> int | None:
    """The mapped row whose YAML key a config problem names first (a cross-key check names the key to drop first)."""
    hits = [
        (match.start(), i)
        for i, row in enumerate(rows)
        for key in row.settings
        if (match := re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", problem))
    ]
    return min(hits)[1] if hits else None


@click.command(name="import-kohya", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("finetune.yaml"),
              show_default=True, help="The finetune YAML to write.")  # fmt: skip
@force_option
@run_guarded
def main(config: Path, out: Path, force: bool) -> None:
    """Convert a kohya_ss GUI JSON, sd-scripts TOML or command line into a finetune YAML; list what is not."""
    check_output(out, force)
    conversion = validate(convert(config), out)
    for status, title in (("mapped", "Converted"), ("unsupported", "NOT converted"), ("ignored", "Ignored")):
        rows = [r for r in conversion.rows if r.status == status]
        if status == "mapped":
            cells = [(r.key, _show(r.value), ", ".join(f"{k}={_show(v)}" for k, v in r.settings.items()), r.note)
                     for r in rows]  # fmt: skip
            table = format_table(("kohya key", "value", "YAML", "note"), cells)
        else:
            table = format_table(("kohya key", "value", "why"), [(r.key, _show(r.value), r.note) for r in rows])
        if rows:
            click.echo(f"{title} ({len(rows)}):\n{table}\n")
    for warning in conversion.warnings:
        click.echo(f"WARNING: {warning}")
    write_text_atomic(out, render_yaml(conversion), force=force)
    click.echo(f"Wrote {out}; train with: python -m finetune --config {out}")
