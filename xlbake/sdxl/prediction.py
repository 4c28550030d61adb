"""What a checkpoint says its UNet predicts (epsilon or v), and how xlbake's outputs say it.

The labels UIs and trainers use, checked against their source:

- Single file: an empty tensor named ``v_pred`` at the top of the state dict marks a v-prediction model. ComfyUI
  (``supported_models.SDXL.model_type``; its savers write the key) and AUTOMATIC1111 (``sd_models_config``:
  ``'v_pred' in sd`` selects ``sd_xl_v.yaml``) read only this key. ComfyUI's ``ztsnr`` beside it asks for
  zero-terminal-SNR sampling; xlbake never trains that way, it only reads past the key.
- ``modelspec.prediction_type`` metadata: ``epsilon`` or ``v`` (kohya sd-scripts' ``sai_model_spec``, written for
  checkpoints and LoRAs alike).
- Diffusers folder: ``prediction_type`` in ``scheduler/scheduler_config.json``: ``epsilon`` or ``v_prediction``.

Inside xlbake a prediction type is named as diffusers' schedulers and ``loss.prediction`` name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from xlbake.errors import InputError

V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
MARKER_KEYS = frozenset({V_PRED_KEY, ZTSNR_KEY})
"""Top-level single-file keys that label the model instead of holding weights."""
MODELSPEC_KEY = "modelspec.prediction_type"
EPSILON, V_PREDICTION = "epsilon", "v_prediction"
MODELSPEC_VALUES = {EPSILON: "epsilon", V_PREDICTION: "v"}
"""Prediction type -> its modelspec value."""
_READ_MODELSPEC = {"epsilon": EPSILON, "eps": EPSILON, "v": V_PREDICTION, "v_prediction": V_PREDICTION}
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


@dataclass(frozen=True)
class Declared:
    """A prediction type a checkpoint declares, and what declares it."""

    prediction: str  # "epsilon" | "v_prediction"
    where: str  # e.g. "its v_pred key", "its metadata modelspec.prediction_type: v"


class Labelled(Protocol):
    """What :func:`declared_prediction` reads of a checkpoint (a :class:`xlbake.sdxl.checkpoint.CheckpointReader`)."""

    path: Path
    source: str  # "single_file" | "diffusers" | "pickle"
    markers: frozenset[str]  # label keys of a single file

    @property
    def metadata(self) -> dict[str, str]: ...


def modelspec_value(prediction: str) -> str:
    """``epsilon`` -> ``epsilon``, ``v_prediction`` -> ``v`` (ValueError for anything else)."""
    if prediction not in MODELSPEC_VALUES:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {sorted(MODELSPEC_VALUES)}")
    return MODELSPEC_VALUES[prediction]


def marker_tensors(prediction: str) -> dict[str, torch.Tensor]:
    """The state-dict keys that label a single file: ``{"v_pred": empty}`` for v-prediction, else none."""
    modelspec_value(prediction)
    return {V_PRED_KEY: torch.tensor([])} if prediction == V_PREDICTION else {}


def declared_prediction(reader: Labelled) -> Declared | None:
    """The prediction type ``reader``'s checkpoint declares, None when it declares none (or one xlbake does not know).

    A single file: its ``v_pred`` key (what the UIs read) wins over its modelspec metadata. A diffusers folder: its
    scheduler config.
    """
    if reader.source == "diffusers":
        path = reader.path / SCHEDULER_CONFIG
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("prediction_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise InputError(f"{path}: cannot read as a JSON object ({exc}); re-download or fix the file") from exc
        found = value if value in MODELSPEC_VALUES else None
        return Declared(found, f"prediction_type: {value} in {SCHEDULER_CONFIG}") if found else None
    if V_PRED_KEY in reader.markers:
        return Declared(V_PREDICTION, f"its {V_PRED_KEY} key")
    value = reader.metadata.get(MODELSPEC_KEY, "").strip()
    found = _READ_MODELSPEC.get(value.lower())
    return Declared(found, f"its metadata {MODELSPEC_KEY}: {value}") if found else None
