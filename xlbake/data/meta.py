"""The dataset keys of kohya sd-scripts' LoRA metadata: tag frequencies, folders and trigger words.

A1111's LoRA metadata view, CivitAI and prompt helpers read them. The finetune writes them into its checkpoints
(it knows the dataset); extract copies them into every LoRA and resize keeps them. Formats as sd-scripts writes
them (``train_network.py``): ``ss_tag_frequency`` JSON {folder name: {tag: count}}, tags being a caption's
comma-separated pieces, stripped and lower-cased (a natural-language caption is one tag); ``ss_dataset_dirs`` JSON
{folder name: {"n_repeats": N, "img_count": M}}; ``modelspec.trigger_phrase`` the trigger words joined by ", ".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

TAG_FREQUENCY = "ss_tag_frequency"
DATASET_DIRS = "ss_dataset_dirs"
TRIGGER_PHRASE = "modelspec.trigger_phrase"
DATASET_KEYS = (TAG_FREQUENCY, DATASET_DIRS, TRIGGER_PHRASE)
TAG_SEPARATOR = ","

logger = logging.getLogger(__name__)


def dataset_metadata(images: Iterable[tuple[str, int, str]], triggers: Iterable[str] = ()) -> dict[str, str]:
    """The dataset keys for training images given as (folder name, repeats, raw caption), one per image."""
    frequency: dict[str, dict[str, int]] = {}
    folders: dict[str, dict[str, int]] = {}
    for folder, repeats, caption in images:
        counts = frequency.setdefault(folder, {})
        for tag in caption.split(TAG_SEPARATOR):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
        entry = folders.setdefault(folder, {"n_repeats": repeats, "img_count": 0})
        entry["img_count"] += 1
    meta = {TAG_FREQUENCY: json.dumps(frequency), DATASET_DIRS: json.dumps(folders)}
    words = [word.strip() for word in triggers if word.strip()]
    if words:
        meta[TRIGGER_PHRASE] = ", ".join(words)
    return meta


def dataset_keys(metadata: Mapping[str, str]) -> dict[str, str]:
    """The dataset keys present in ``metadata`` (e.g. a finetuned checkpoint's), without unparsable JSON values."""
    return parsable_json_values({key: metadata[key] for key in DATASET_KEYS if key in metadata})


def parsable_json_values(source: Mapping[str, str]) -> dict[str, str]:
    """Copy of ``source`` without values that start like JSON ("{" or "[") but do not parse: A1111's metadata view
    fails on them, so a LoRA never carries one (each dropped key is logged)."""
    kept = {}
    for key, value in source.items():
        if value[:1] in ("{", "["):
            try:
                json.loads(value)
            except ValueError:
                logger.warning("metadata %s looks like JSON but does not parse; it is not copied", key)
                continue
        kept[key] = value
    return kept
