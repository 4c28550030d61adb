"""What a kohya conversion rule is, the value converters and the kinds of rules the tables of
``finetune.kohya.rules`` are made of. A rule is ``(value, ctx) -> (status, {dotted YAML key: value}, note)``; ``ctx``
holds every key of the source, so a rule can look at the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

Status = Literal["mapped", "unsupported", "ignored"]
Out = tuple[Status, dict[str, Any], str]
Rule = Callable[[Any, Mapping[str, Any]], Out]


def is_off(value: Any, neutral: tuple = ()) -> bool:
    return value in (None, False, 0, "", [], "none", "None", "no", *neutral)


def to_int(v: Any) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise ValueError(f"expected an integer, got {v!r}")
    return int(float(v))


def to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def to_bool(v: Any) -> bool:
    if not isinstance(v, (bool, int)):
        raise ValueError(f"expected true or false, got {v!r}")
    return bool(v)


def to(key: str | None, convert: Callable[[Any], Any] = str, note: str = "", off: bool = False) -> Rule:
    """Map to ``key`` (or, with key None, to the dict ``convert`` returns); with ``off``, an off value is ignored."""

    def rule(v: Any, ctx: Mapping[str, Any]) -> Out:
        if off and is_off(v):
            return "ignored", {}, "off"
        return "mapped", convert(v) if key is None else {key: convert(v)}, note

    return rule


def unsupported(why: str, *neutral: Any) -> Rule:
    return lambda v, ctx: ("ignored", {}, "off") if is_off(v, neutral) else ("unsupported", {}, why)


def ignored(why: str) -> Rule:
    return lambda v, ctx: ("ignored", {}, why)


def when(condition: Callable[[Any, Mapping[str, Any]], bool], why: str, rule: Rule) -> Rule:
    """``rule`` unless ``condition(value, ctx)``, in which case the key is ignored for reason ``why``."""
    return lambda v, ctx: ("ignored", {}, why) if condition(v, ctx) else rule(v, ctx)
