"""SDXL models from checkpoints, and sample grids: the same prompts and seeds across models, LoRAs and LoRA weights.

Any SDXL checkpoint (single-file SGM safetensors or diffusers folder) is read through :mod:`xlbake.sdxl.checkpoint` into
modules built from its architecture's configs (:func:`resolve_architecture`), tensor by tensor (:class:`ModelWeights`,
which :mod:`xlbake.evaluate.fidelity` also uses to merge and swap weights in place). A grid renders rows = prompts and
columns = the base x LoRA files x LoRA weights and the other models (:func:`grid_columns`) with the diffusers SDXL
pipeline, LoRAs loaded by diffusers' own ``load_lora_weights`` (what users run) at each weight through ``set_adapters``
(:mod:`xlbake.evaluate.render`). Row r always uses seed ``seed + r``. The sheet itself is drawn by
:func:`xlbake.evaluate.sheet.layout_grid`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from xlbake.errors import InputError, OutputError
from xlbake.evaluate.sheet import layout_grid
from xlbake.fileio import check_output, write_bytes_atomic
from xlbake.sdxl.checkpoint import CheckpointReader, open_checkpoint
from xlbake.sdxl.keys import plan_from_sgm, to_diffusers, with_text_model
from xlbake.sdxl.models import Architecture, build_models, resolve_architecture
from xlbake.sdxl.parts import MODEL_PARTS, TEXT_PARTS

logger = logging.getLogger(__name__)

PIPELINE_PARTS = (*MODEL_PARTS, "vae")
ADAPTER = "xlbake"
METADATA_KEY = "xlbake.grid"


class ModelWeights:
    """Modules whose weights are set one SGM-keyed tensor at a time: loaded, merged or swapped in place."""

    def __init__(
        self, models: dict[str, torch.nn.Module], keys: Sequence[str], *, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.models, self.device, self.dtype = models, device, dtype
        self.plan = {key: e for key, e in plan_from_sgm(keys).items() if e.component in models}
        self._names = {
            part: {with_text_model(name) if part in TEXT_PARTS else name: name for name, _ in m.named_parameters()}
            for part, m in models.items()
        }

    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        arch: Architecture,
        parts: Sequence[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> ModelWeights:
        """Build ``parts`` of ``arch`` and load them from ``reader`` tensor by tensor, on ``device`` in ``dtype``."""
        weights = cls(build_models(arch, parts), reader.keys(), device=device, dtype=dtype)
        for key in weights.plan:
            weights.set(key, reader.get(key))
        for part, module in weights.models.items():
            missing = [name for name, param in module.named_parameters() if param.is_meta]
            if missing:
                raise InputError(
                    f"{reader.path}: no weight for {part}.{missing[0]} ({len(missing)} missing); "
                    f"the checkpoint does not fit {arch.source}"
                )
            module.to(device).eval().requires_grad_(False)
        return weights

    def set(self, key: str, tensor: Tensor) -> None:
        """Copy the SGM tensor ``key`` into its parameter(s) (a TE2 ``in_proj`` into q, k and v)."""
        from accelerate.utils import set_module_tensor_to_device

        entry = self.plan[key]
        module = self.models[entry.component]
        for name, value in zip(entry.diffusers, to_diffusers(entry, tensor), strict=True):
            actual = self._names[entry.component].get(name)
            if actual is None or module.get_parameter(actual).shape != value.shape:
                raise InputError(f"{key}: the {entry.component} has no {tuple(value.shape)} weight {name}")
            param = module.get_parameter(actual)
            if param.is_meta:
                set_module_tensor_to_device(module, actual, self.device, value=value, dtype=self.dtype)
            else:
                with torch.no_grad():
                    param.copy_(value)


def load_pipeline(
    model: str | os.PathLike,
    *,
    components: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """A diffusers ``StableDiffusionXLPipeline`` of ``model`` (single file or diffusers folder) on ``device``.

    ``dtype`` defaults to fp32 on the CPU and fp16 on a GPU (the SDXL VAE config upcasts itself to decode).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    arch = resolve_architecture(model, components)
    with open_checkpoint(model) as reader:
        models = ModelWeights.load(reader, arch, PIPELINE_PARTS, device=device, dtype=dtype).models
    scheduler = EulerDiscreteScheduler.from_config(arch.scheduler)
    pipe = StableDiffusionXLPipeline(
        **models, tokenizer=arch.tokenizer, tokenizer_2=arch.tokenizer_2, scheduler=scheduler, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class SampleSettings:
    """How every image of a grid is made."""

    steps: int = 30
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    seed: int = 0  # row r uses seed + r in every column
    negative_prompt: str = ""
    batch_size: int = 4  # prompts per pipeline call


@dataclass(frozen=True)
class GridColumn:
    """One column: a model, optionally a LoRA file at a weight."""

    model: Path
    lora: Path | None = None
    weight: float = 1.0


def grid_columns(
    models: Sequence[str | os.PathLike],
    loras: Sequence[str | os.PathLike] = (),
    weights: Sequence[float] = (1.0,),
    *,
    without_lora: bool = False,
    lora_on_tuned: bool = False,
) -> list[GridColumn]:
    """Columns: the first model (the base the LoRAs were extracted against) x every LoRA x every weight, plus a
    column without LoRA if ``without_lora`` or there are no LoRAs; every other model as it is, or like the base if
    ``lora_on_tuned``."""
    if not models or not weights:
        raise ValueError("grid_columns: need at least one model and one weight")
    columns = []
    for index, model in enumerate(models):
        with_loras = loras if index == 0 or lora_on_tuned else ()
        if without_lora or not with_loras:
            columns.append(GridColumn(Path(model)))
        columns += [GridColumn(Path(model), Path(lora), float(w)) for lora in with_loras for w in weights]
    return columns


def column_labels(columns: Sequence[GridColumn]) -> list[str]:
    """One label per column naming what varies between columns (model, LoRA, weight), one line each."""
    models = _short_names([c.model for c in columns])
    with_lora = [c.lora for c in columns if c.lora is not None]
    loras = dict(zip(with_lora, _short_names(with_lora), strict=True))
    vary_model = len(set(models)) > 1
    vary_lora = len({c.lora for c in columns}) > 1
    vary_weight = len({c.weight for c in columns if c.lora}) > 1
    labels = []
    for column, model in zip(columns, models, strict=True):
        lines = [model] if vary_model or not (vary_lora or vary_weight) else []
        if column.lora is None:
            lines += ["no LoRA"] if vary_lora else []
        else:
            lines += [loras[column.lora]] if vary_lora or not vary_model else []
            lines += [f"weight {column.weight:g}"] if vary_weight or column.weight != 1.0 else []
        labels.append("\n".join(lines))
    return labels


def save_grid(
    cells: Sequence[Sequence[Image.Image]],
    prompts: Sequence[str],
    columns: Sequence[GridColumn],
    out_png: str | os.PathLike,
    *,
    settings: SampleSettings,
    title: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Write the labelled grid ``out_png`` and each image as ``<out stem>/rRR-cCC.png``; return the grid first.

    Prompts, columns and settings are stored as JSON in each PNG's ``xlbake.evaluate.grid`` text chunk.
    """
    out_png = check_output(out_png, force)
    singles = out_png.with_name(out_png.stem)
    if singles.exists() and not force:
        raise OutputError(f"{singles}: output folder exists; pass --force to overwrite it or choose another --out")
    info = {
        "prompts": list(prompts),
        "columns": [{**asdict(c), "model": str(c.model), "lora": c.lora and str(c.lora)} for c in columns],
        "settings": asdict(settings),
    }
    sheet = layout_grid(cells, list(prompts), column_labels(columns), title=title)
    written = [write_bytes_atomic(out_png, _png_bytes(sheet, info), force=force)]
    for row, images in enumerate(cells):
        for col, image in enumerate(images):
            single = {"prompt": prompts[row], "column": info["columns"][col], "settings": info["settings"]}
            written.append(write_bytes_atomic(singles / f"r{row:02d}-c{col:02d}.png", _png_bytes(image, single), force))
    return written


def load_lora(pipe: Any, lora: Path) -> None:
    """Load a kohya LoRA with diffusers' own loader; its refusals become an InputError naming the file."""
    from xlbake.lora.io import read_lora

    read_lora(lora)  # our checks first: clear messages for foreign formats and broken files
    try:
        pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{lora}: diffusers cannot load this LoRA ({str(exc).splitlines()[0][:160]})") from exc


def _png_bytes(image: Image.Image, info: Mapping[str, Any]) -> bytes:
    text = PngImagePlugin.PngInfo()
    text.add_text(METADATA_KEY, json.dumps(info))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=text)
    return buffer.getvalue()


def _short_names(paths: Sequence[Path]) -> list[str]:
    """File names without ``.safetensors`` (folder names for folders), with the parent folder where they clash."""
    names = [p.name.removesuffix(".safetensors") for p in paths]
    sources: dict[str, set[Path]] = {}
    for path, name in zip(paths, names, strict=True):
        sources.setdefault(name, set()).add(path)
    return [f"{p.parent.name}/{n}" if len(sources[n]) > 1 else n for p, n in zip(paths, names, strict=True)]
