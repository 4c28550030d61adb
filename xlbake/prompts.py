"""Per-prompt sample options in kohya sd-scripts' prompt-line syntax, for training samples and grids.

    a photo of kafka, red coat --n lowres, blurry --w 832 --h 1216 --s 28 --l 6.5 --d 42

As kohya's ``line_to_prompt_dict`` reads it: the line is split at every " --"; the first piece is the prompt, each
other piece is one option, a letter (case-insensitive) and its value; a later option overrides an earlier one.
``--n`` negative prompt (a bare ``--n``: none), ``--w``/``--h`` width/height, ``--s`` steps, ``--l`` guidance
(CFG) scale, ``--d`` seed. Unlike kohya, an unknown or malformed option is an error naming the prompt instead of
being ignored (a typo would otherwise silently render something else); kohya's ``--ss`` sampler is refused too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from xlbake.errors import InputError

SEPARATOR = " --"
PIXEL_MULTIPLE = 8
"""Width and height must be multiples of this (the VAE's downscale factor)."""
MAX_STEPS = 1000
OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps", "l": "guidance scale", "d": "seed"}
_FIELDS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps", "l": "guidance_scale", "d": "seed"}
_OPTION = re.compile(r"([A-Za-z]+)(?:\s+(.*))?", re.DOTALL)
_FLOAT = re.compile(r"\d+(\.\d*)?|\.\d+")


@dataclass(frozen=True)
class PromptDefaults:
    """What a prompt line does not set; prompt i's seed is ``seed + i``."""

    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


@dataclass(frozen=True)
class SampleOptions:
    """A prompt and the options its line sets (None: the default)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None

    def resolve(self, defaults: PromptDefaults, index: int) -> SampleOptions:
        """Every field set: the line's options, else ``defaults`` (seed ``defaults.seed + index``)."""
        filled = {
            name: getattr(defaults, name) if getattr(self, name) is None else getattr(self, name)
            for name in _FIELDS.values()
        }
        if self.seed is None:
            filled["seed"] = defaults.seed + index
        return replace(self, **filled)


def resolve_lines(lines: Sequence[str], defaults: PromptDefaults) -> list[SampleOptions]:
    """Every line's prompt and settings, line i seeded ``defaults.seed + i`` unless it sets ``--d``."""
    return [parse_prompt_line(line).resolve(defaults, index) for index, line in enumerate(lines)]


def prompt_text(line: str) -> str:
    """The prompt of a line, without its options."""
    return line.split(SEPARATOR)[0].strip()


def parse_prompt_line(line: str, where: str = "prompt") -> SampleOptions:
    """The prompt and options of one line; InputError ``{where}: '{line}': ...`` for an unknown or bad option."""
    line = line.strip()
    prompt, *pieces = line.split(SEPARATOR)
    if not prompt.strip() or prompt.startswith(SEPARATOR.strip()):
        raise InputError(f"{where}: {line!r}: empty prompt before the options")
    values: dict[str, object] = {}
    for piece in pieces:
        match = _OPTION.fullmatch(piece.strip())
        letter = match.group(1).lower() if match else piece.strip()[:1]
        if letter not in OPTIONS:
            known = ", ".join(f"--{key} {what}" for key, what in OPTIONS.items())
            raise InputError(f"{where}: {line!r}: unknown option --{letter} (known: {known})")
        value = ((match and match.group(2)) or "").strip()
        values[_FIELDS[letter]] = _option_value(letter, value, f"{where}: {line!r}")
    return SampleOptions(prompt.strip(), **values)  # type: ignore[arg-type]


def _option_value(letter: str, value: str, context: str) -> str | int | float:
    if letter == "n":
        return value
    if letter == "l":
        if not _FLOAT.fullmatch(value):
            raise InputError(f"{context}: --l needs a guidance scale like 5 or 6.5, got {value!r}")
        return float(value)
    if not value.isdigit():
        raise InputError(f"{context}: --{letter} ({OPTIONS[letter]}) needs a whole number, got {value!r}")
    number = int(value)
    if letter in "wh" and (number == 0 or number % PIXEL_MULTIPLE):
        raise InputError(f"{context}: --{letter} {number}: the {OPTIONS[letter]} must be a multiple of 8")
    if letter == "s" and not 1 <= number <= MAX_STEPS:
        raise InputError(f"{context}: --s {number}: steps must be between 1 and {MAX_STEPS}")
    return number
