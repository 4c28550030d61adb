"""SDXL models from checkpoints, and sample grids: the same prompts and seeds across models, LoRAs and LoRA weights.

Any SDXL checkpoint (single-file SGM safetensors or diffusers folder) is read through :mod:`xlbake.checkpoint` into
modules built from its architecture's configs (:func:`resolve_architecture`), tensor by tensor
(:class:`ModelWeights`, which :mod:`xlbake.fidelity` also uses to merge and swap weights in place). A grid renders
rows = prompts and columns = models x LoRA files x LoRA weights with the diffusers SDXL pipeline, LoRAs loaded by
diffusers' own ``load_lora_weights`` (what users run) at each weight through ``set_adapters``. Row r always uses
seed ``seed + r``. The sheet itself is drawn by :func:`xlbake.plots.layout_grid`.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from xlbake.checkpoint import CheckpointReader, open_checkpoint
from xlbake.errors import InputError, OutputError
from xlbake.fileio import check_output, write_bytes_atomic
from xlbake.plots import layout_grid
from xlbake.prompts import PromptDefaults, SampleOptions, resolve_lines
from xlbake.sdxl_keys import (
    SGM_IGNORED,
    SGM_PREFIX,
    plan_from_diffusers,
    plan_from_sgm,
    sgm_shape,
    to_diffusers,
    with_text_model,
)

logger = logging.getLogger(__name__)

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
"""Where the real SDXL's tokenizers are looked up in the local hub cache for a single file (never downloaded)."""
TEXT_PARTS = ("text_encoder", "text_encoder_2")
MODEL_PARTS = ("unet", *TEXT_PARTS)
PIPELINE_PARTS = (*MODEL_PARTS, "vae")
ADAPTER = "xlbake"
METADATA_KEY = "xlbake.grid"


@dataclass(frozen=True)
class Architecture:
    """What it takes to build an SDXL model: diffusers configs, CLIP text configs and the two tokenizers."""

    unet: dict[str, Any]
    text_encoder: Any  # transformers CLIPTextConfig
    text_encoder_2: Any
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    tokenizer: Any  # transformers CLIPTokenizer
    tokenizer_2: Any
    source: str  # where the configs came from, for messages

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side: 2^(VAE levels - 1), 8 for SDXL."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def resolve_architecture(model: str | os.PathLike, components: str | os.PathLike | None = None) -> Architecture:
    """The architecture of ``model``, never downloading anything.

    From ``components`` (a diffusers SDXL folder or a cached hub id) if given, else from ``model`` if it is a
    diffusers folder. A single file is recognised by its tensor shapes as the builtin tiny model (configs and
    tokenizers built in code) or the real SDXL (configs in code, tokenizers from the local hub cache).
    """
    model = Path(model)
    source = components if components is not None else (model if model.is_dir() else None)
    if source is not None:
        return _pretrained_architecture(source)
    from xlbake.sdxl_configs import SDXL_CONFIGS, real_sdxl_sgm_shapes

    with open_checkpoint(model) as reader:
        shapes = _model_shapes(reader.shapes())
    tiny, tiny_shapes = _tiny_architecture()
    if shapes == tiny_shapes:
        return tiny
    if shapes == _model_shapes(real_sdxl_sgm_shapes()):
        return _pretrained_architecture(SDXL_HUB_ID, configs=SDXL_CONFIGS)
    raise InputError(
        f"{model}: a single-file SDXL-architecture model of unknown size; pass a diffusers folder of the same "
        "architecture as components (--components) for its configs and tokenizers"
    )


def build_models(arch: Architecture, parts: Sequence[str]) -> dict[str, torch.nn.Module]:
    """Empty (meta-device) modules of ``parts``: any of "unet", "text_encoder", "text_encoder_2", "vae"."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    builders = {  # copies: models may change their config (e.g. the attention implementation)
        "unet": lambda: UNet2DConditionModel.from_config(copy.deepcopy(arch.unet)),
        "text_encoder": lambda: CLIPTextModel(copy.deepcopy(arch.text_encoder)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(copy.deepcopy(arch.text_encoder_2)),
        "vae": lambda: AutoencoderKL.from_config(copy.deepcopy(arch.vae)),
    }
    with init_empty_weights():
        return {part: builders[part]() for part in parts}


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
) -> list[GridColumn]:
    """Columns for every model x (no LoRA if ``without_lora`` or no LoRAs) + every LoRA x every weight."""
    if not models or not weights:
        raise ValueError("grid_columns: need at least one model and one weight")
    columns = []
    for model in models:
        if without_lora or not loras:
            columns.append(GridColumn(Path(model)))
        columns += [GridColumn(Path(model), Path(lora), float(w)) for lora in loras for w in weights]
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


def render_images(pipe: Any, prompts: Sequence[str], settings: SampleSettings) -> list[Image.Image]:
    """One image per prompt line; row i uses a generator seeded ``settings.seed + i`` (same in every column).

    A line's kohya options (``--n --w --h --s --l --d``, :mod:`xlbake.prompts`) override ``settings`` for its row;
    consecutive rows with the same settings are rendered together, ``settings.batch_size`` at a time.
    """
    rows = row_options(prompts, settings)
    images: list[Image.Image] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < min(len(rows), start + settings.batch_size) and _same_call(rows[end], rows[start]):
            end += 1
        chunk, first = rows[start:end], rows[start]
        with torch.no_grad():
            images += pipe(
                prompt=[row.prompt for row in chunk],
                negative_prompt=[row.negative_prompt for row in chunk] if first.negative_prompt else None,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=[torch.Generator(pipe.device).manual_seed(row.seed) for row in chunk],
            ).images
        start = end
    return images


def row_options(prompts: Sequence[str], settings: SampleSettings) -> list[SampleOptions]:
    """Every row's prompt and settings; InputError for a bad option or rows of different sizes (one sheet)."""
    s = settings
    defaults = PromptDefaults(s.negative_prompt, s.width, s.height, s.steps, s.guidance_scale, s.seed)
    rows = resolve_lines(prompts, defaults)
    for line, row in zip(prompts, rows, strict=True):
        if (row.width, row.height) != (rows[0].width, rows[0].height):
            raise InputError(
                f"prompt {line.strip()!r} is {row.width}x{row.height}, {prompts[0].strip()!r} {rows[0].width}x"
                f"{rows[0].height}: a grid's rows share one size; set it with --width/--height"
            )
    return rows


def _same_call(a: SampleOptions, b: SampleOptions) -> bool:
    """Whether two rows can be rendered in one pipeline call (all but prompt and seed equal)."""
    return replace(a, prompt="", seed=0) == replace(b, prompt="", seed=0)


def render_grid(
    columns: Sequence[GridColumn],
    prompts: Sequence[str],
    settings: SampleSettings,
    *,
    components: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[list[Image.Image]]:
    """Images[row = prompt][column]; each model is loaded once and each LoRA once per model."""
    if not prompts or not columns:
        raise ValueError("render_grid: need at least one prompt and one column")
    row_options(prompts, settings)  # bad options and mixed sizes stop before any model loads
    cells: list[list[Any]] = [[None] * len(columns) for _ in prompts]
    for model in dict.fromkeys(c.model for c in columns):
        pipe = load_pipeline(model, components=components, device=device, dtype=dtype)
        for lora in dict.fromkeys(c.lora for c in columns if c.model == model):
            if lora is not None:
                _load_lora(pipe, lora)
            for index, column in enumerate(columns):
                if column.model != model or column.lora != lora:
                    continue
                if lora is not None:
                    pipe.set_adapters([ADAPTER], adapter_weights=[column.weight])
                logger.info("grid column %d/%d: %s %s x %g", index + 1, len(columns), model, lora or "", column.weight)
                for row, image in enumerate(render_images(pipe, prompts, settings)):
                    cells[row][index] = image
            if lora is not None:
                pipe.unload_lora_weights()
        del pipe
    return cells


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

    Prompts, columns and settings are stored as JSON in each PNG's ``xlbake.grid`` text chunk.
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


def _load_lora(pipe: Any, lora: Path) -> None:
    """Load a kohya LoRA with diffusers' own loader; its refusals become an InputError naming the file."""
    from xlbake.lora_io import read_lora

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


def _architecture(configs: Mapping[str, Any], tokenizer: Any, tokenizer_2: Any, source: str) -> Architecture:
    from transformers import CLIPTextConfig

    te1, te2 = (CLIPTextConfig(**configs[name]) for name in TEXT_PARTS)
    unet, vae, scheduler = (dict(configs[name]) for name in ("unet", "vae", "scheduler"))
    return Architecture(unet, te1, te2, vae, scheduler, tokenizer, tokenizer_2, source)


@functools.lru_cache(maxsize=1)
def _tiny_architecture() -> tuple[Architecture, dict[str, tuple[int, ...]]]:
    """The builtin tiny model's architecture and UNet/text encoder SGM shapes (built once: the BPE takes a second)."""
    from xlbake.tiny import build_tokenizers, tiny_configs

    tokenizers = build_tokenizers()
    tiny = _architecture(tiny_configs(*tokenizers), *tokenizers, "the builtin tiny model")
    return tiny, _model_shapes(_sgm_shapes(tiny))


def _pretrained_architecture(source: str | os.PathLike, configs: Mapping[str, Any] | None = None) -> Architecture:
    """Configs (unless given) and tokenizers from a diffusers SDXL folder or a hub id in the local cache."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    where, local = str(source), {"local_files_only": True}
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(where, subfolder=s, **local) for s in ("tokenizer", "tokenizer_2")]
        if configs is not None:
            return _architecture(configs, *tokenizers, where)
        te1, te2 = (CLIPTextConfig.from_pretrained(where, subfolder=part, **local) for part in TEXT_PARTS)
        unet = dict(UNet2DConditionModel.load_config(where, subfolder="unet", **local))
        vae = dict(AutoencoderKL.load_config(where, subfolder="vae", **local))
        scheduler = dict(EulerDiscreteScheduler.load_config(where, subfolder="scheduler", **local))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{where}: cannot read SDXL configs/tokenizers ({str(exc).splitlines()[0][:120]}); pass a diffusers "
            "SDXL folder as components, or download the hub model first"
        ) from exc
    return Architecture(unet, te1, te2, vae, scheduler, *tokenizers, where)


def _sgm_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """SGM key -> shape of the UNet and text encoder tensors of ``arch`` (a meta build: no memory)."""
    models = build_models(arch, MODEL_PARTS)
    shapes = {part: {k: tuple(t.shape) for k, t in m.state_dict().items()} for part, m in models.items()}
    plan = plan_from_diffusers({part: list(s) for part, s in shapes.items()})
    return {key: sgm_shape(e, [shapes[e.component][d] for d in e.diffusers]) for key, e in plan.items()}


def _model_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The UNet and text encoder entries of an SGM shape map (what decides the architecture)."""
    prefixes = tuple(SGM_PREFIX[part] for part in MODEL_PARTS)
    return {k: tuple(s) for k, s in shapes.items() if k.startswith(prefixes) and k not in SGM_IGNORED}
