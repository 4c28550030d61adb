"""Header metadata of a resized LoRA: the input's, with what describes rank updated and what was done recorded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

from xlbake.data.meta import parsable_json_values
from xlbake.lora.io import LoraFile, lora_metadata
from xlbake.lora.report import Coverage

RECORD_KEY = "xlbake_resize"
COVERAGE_KEY = "xlbake_coverage"
"""What a LoRA covers of its finetune and keeps of that (written by extract, carried forward by each resize)."""
SDXL_VERSION_PREFIX = "sdxl"
# kohya names UNet modules of SDXL by the original (SGM) paths; SD1/SD2 LoRAs use diffusers' down_blocks names.
_SDXL_NAME_PREFIXES = ("lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_NETWORK_KEYS = ("ss_network_dim", "ss_network_alpha")
_CONV_ARGS = ("conv_dim", "conv_alpha")
_DYNAMIC = "Dynamic"

logger = logging.getLogger(__name__)


def is_sdxl(names: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """Whether a kohya LoRA is for SDXL: its header says so, or its module names are SDXL's (TE2, SGM UNet)."""
    version = metadata.get("ss_base_model_version")
    if version:
        return version.startswith(SDXL_VERSION_PREFIX)
    return any(name.startswith(_SDXL_NAME_PREFIXES) for name in names)


def resized_metadata(
    source: Mapping[str, str],
    *,
    title: str,
    ranks: Mapping[str, int],
    conv_names: Iterable[str],
    alpha: float,
    record: Mapping[str, object],
    zero_names: Iterable[str] = (),
) -> dict[str, str]:
    """The input's metadata with rank, alpha, title and date updated and ``record`` stored as JSON under
    ``xlbake_resize``.

    ``ranks``: every written module's rank; ``conv_names``: the 3x3 conv (LoCon) modules among them. ``ss_network_dim``
    and ``ss_network_alpha`` become "Dynamic" when the non-conv ranks vary (kohya's convention);
    ``ss_network_args``' conv_dim/conv_alpha follow the 3x3 convs and its other entries are kept. For SDXL files the
    SDXL keys that A1111 needs (``ss_base_model_version``, modelspec) are added when missing. Values that look like
    JSON but do not parse are dropped (A1111 would fail on them). ``zero_names``: modules of an unchanged layer
    (extract's zero rank-1 padding of a text encoder), whose rank does not make the others "Dynamic".
    """
    zero = set(zero_names)
    shown = {name: rank for name, rank in ranks.items() if name not in zero} or dict(ranks)
    conv_set = set(conv_names)
    conv_ranks = {shown[name] for name in conv_set if name in shown}
    conv_rank = next(iter(conv_ranks)) if len(conv_ranks) == 1 else None
    linear = {name: rank for name, rank in shown.items() if name not in conv_set} or shown
    fresh = lora_metadata(title=title, ranks=linear, alpha=alpha, conv_rank=None)
    meta = parsable_json_values(source)
    if is_sdxl(ranks, source):
        meta = {**fresh, **meta}  # fill missing keys only
    meta |= {key: fresh[key] for key in (*_NETWORK_KEYS, "ss_output_name")}
    for key in ("modelspec.title", "modelspec.date"):
        if key in meta:
            meta[key] = fresh[key]
    meta["ss_network_args"] = _network_args(source.get("ss_network_args"), conv_ranks, conv_rank, alpha)
    meta[RECORD_KEY] = json.dumps(record, sort_keys=True)
    return meta


def _network_args(text: str | None, conv_ranks: set[int], conv_rank: int | None, alpha: float) -> str:
    """The input's ``ss_network_args`` JSON with conv_dim/conv_alpha describing the written 3x3 convs."""
    try:
        args = json.loads(text) if text else {}
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    for key in _CONV_ARGS:
        args.pop(key, None)
    if conv_ranks:
        args["conv_dim"] = str(conv_rank) if conv_rank is not None else _DYNAMIC
        args["conv_alpha"] = str(float(alpha)) if conv_rank is not None else _DYNAMIC
    return json.dumps(args)


def input_coverage(lora: LoraFile) -> Coverage | None:
    """What ``lora`` covers of its finetune and keeps of that, from its ``xlbake_coverage`` metadata (None when
    absent or unreadable: then only the share of the input's own energy is reported)."""
    text = lora.metadata.get(COVERAGE_KEY)
    if not text:
        return None
    try:
        return Coverage.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("%s: metadata %s is unreadable; the finetune's coverage is not carried", lora.path, COVERAGE_KEY)
        return None
