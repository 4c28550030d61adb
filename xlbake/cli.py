"""The umbrella ``xlbake`` command and the pieces every stage CLI shares.

Stage commands are imported only when invoked (click's documented LazyGroup pattern), so ``xlbake --help`` stays
fast and never imports torch or a stage. A stage CLI body is a few lines:

    @click.command()
    @config_options
    @force_option
    @run_guarded
    def main(config, overrides, dry_run, force):
        cfg = resolve_config(ExtractConfig, config, overrides, dry_run)
        run_extract(cfg, force=force)
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from xlbake import __version__
from xlbake.config import dump_yaml, load_config
from xlbake.errors import XlbakeError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
NOISY_LOGGERS = ("diffusers", "transformers", "accelerate", "PIL", "matplotlib", "urllib3", "filelock")
LIBRARY_NOISE = {
    # transformers, on importing the SDXL pipeline: xlbake never uses the image processors it means
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    # DeepSpeed's accelerator probe on a machine without a GPU (a CUDA box never prints it); logged to stdout
    "DeepSpeed": "Setting accelerator to CPU",
    # diffusers warns on every dtype cast of a model even when no module of it must stay in fp32 (the list is empty)
    "diffusers.models.modeling_utils": "should be kept in float32: []",
}
"""Logger name -> text of messages that are not the user's business: dropped unless verbose."""


@dataclass(frozen=True)
class Stage:
    """A subcommand imported on first use: ``"package.module:attribute"`` naming a ``click.Command``."""

    target: str
    help: str


# Adding a command is one line here.
STAGES: dict[str, Stage] = {
    "finetune": Stage("finetune.cli:main", "Full SDXL finetune (UNet + both text encoders, EMA), resumable."),
    "extract": Stage("extract.cli:main", "Extract a kohya LoRA from base and finetuned checkpoints by SVD."),
    "resize": Stage("resize.cli:main", "Resize a LoRA's ranks in factor space (fixed, dynamic or size budget)."),
    "grid": Stage("xlbake.evaluate.cli:grid", "Sample grid: prompts x models/LoRAs/weights, fixed seeds, one PNG."),
    "fidelity": Stage("xlbake.evaluate.cli:fidelity", "How much of the finetune each LoRA keeps (function space)."),
    "loss-plot": Stage("xlbake.evaluate.cli:loss_plot", "Loss curve of a run (raw, smoothed, LR) as a PNG."),
    "dataset": Stage("xlbake.dataset.cli:main", "Dataset tools: check, captions-from-filenames, tags, steps plan."),
    "import-kohya": Stage("finetune.kohya.importer:main", "kohya_ss GUI JSON / sd-scripts TOML -> finetune YAML."),
    "batch": Stage("xlbake.batch.cli:main", "Run many concepts' finetune -> extract -> resize chains, one summary."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported from ``"module:attribute"`` strings when first used."""

    def __init__(self, *args: Any, lazy_commands: dict[str, Stage], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            return load_command(cmd_name, self.lazy_commands[cmd_name].target)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from the map's help text, without importing them."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands:
                rows.append((name, self.lazy_commands[name].help))
            else:
                command = super().get_command(ctx, name)
                if command is not None and not command.hidden:
                    rows.append((name, command.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def load_command(name: str, target: str) -> click.Command:
    """Import ``"module:attribute"``; a missing stage or dependency becomes one clear line (exit 1)."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if module_name == missing or module_name.startswith(missing + "."):
            raise click.ClickException(
                f"command '{name}' is not installed (no module {module_name}); reinstall xlbake: make install"
            ) from None
        raise click.ClickException(
            f"command '{name}' needs the package '{missing.split('.')[0]}', which is not installed; "
            f"pip install it or reinstall xlbake with its extras"
        ) from None
    except ImportError as exc:
        raise click.ClickException(
            f"command '{name}' cannot be loaded ({exc}); reinstall xlbake: make install"
        ) from None
    command = getattr(module, attribute, None)
    if not isinstance(command, click.Command):
        raise click.ClickException(f"command '{name}': {target} is not a click command; the installation is broken")
    return command


@click.group(
    cls=LazyGroup, lazy_commands=STAGES, name="xlbake", context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, "-V", "--version", prog_name="xlbake")
def main() -> None:
    """xlbake: full SDXL finetune -> SVD LoRA extraction -> LoRA rank resize."""


def run_guarded(fn: F) -> F:
    """Run a command body so known errors end it with one line: XlbakeError -> exit 1, Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XlbakeError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted (Ctrl-C); stopped.", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def config_options(fn: F) -> F:
    """Add ``--config PATH``, repeatable ``--set KEY=VALUE`` and ``--dry-run`` (as config, overrides, dry_run)."""
    fn = click.option("--dry-run", is_flag=True, help="Print the resolved config as YAML and exit.")(fn)
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key, value parsed as YAML (e.g. --set optim.lr=1e-5). Repeatable.",
    )(fn)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="YAML config file; relative paths inside it are resolved against its folder.",
    )(fn)


def force_option(fn: F) -> F:
    """Add ``--force`` (argument force): overwrite existing outputs."""
    return click.option("--force", is_flag=True, help="Overwrite existing outputs.")(fn)


def resolve_config(
    cls: type[T], config: Path | None, overrides: Sequence[str], dry_run: bool, *, flags: Sequence[str] = ()
) -> T:
    """Load and validate the command's config; with ``--dry-run`` print it as YAML and exit 0.

    ``flags``: the command's own options as ``key=value`` overrides. Every stage resolves a key the same way: a
    flag wins over ``--set`` (``overrides``), which wins over the ``--config`` file, so that a caller's explicit
    flag (the Makefile's ``--dim``/``--rank``/``--out``) is never undone by a ``--set`` passed along with it.
    """
    cfg = load_config(cls, config, [*overrides, *flags])
    if dry_run:
        click.echo(dump_yaml(cfg), nl=False)
        raise click.exceptions.Exit(0)
    return cfg


def setup_logging(verbose: bool = False) -> None:
    """Log INFO (DEBUG when verbose) to stderr; libraries' chatter only from WARNING unless verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name, text in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)  # the same object the library gets later: the filter outlives its setup
        for old in [f for f in logger.filters if isinstance(f, _DropMessage)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_DropMessage(text))


class _DropMessage(logging.Filter):
    """Drop the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
