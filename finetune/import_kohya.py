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
import shlex
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import click
import yaml

from finetune.config import FinetuneConfig
from xlbake.cli import force_option, run_guarded
from xlbake.config import load_config
from xlbake.dataset_cli import format_table
from xlbake.errors import ConfigError, InputError
from xlbake.fileio import check_output, write_text_atomic
from xlbake.kohya_dataset import REPEATS_PREFIX
from xlbake.prompts import OPTIONS as PROMPT_OPTIONS
from xlbake.prompts import SEPARATOR as PROMPT_SEPARATOR

Status = Literal["mapped", "unsupported", "ignored"]
Out = tuple[Status, dict[str, Any], str]
Rule = Callable[[Any, Mapping[str, Any]], Out]
GUI, TOML, CLI = "kohya_ss GUI JSON", "sd-scripts TOML", "sd-scripts command line"
SOURCE = "_source"
"""Context key holding the source file's path (not a kohya key)."""
SD_SCRIPTS_DEFAULTS = {"learning_rate": 2e-6, "mixed_precision": "no", "caption_extension": ".caption"}
"""sd-scripts' own defaults where ours differ, for keys a TOML or command line leaves out (a GUI JSON has all)."""
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "prodigy", "came")
LION_DEFAULTS = {"optim.betas": [0.9, 0.99], "optim.weight_decay": 0.0}
OPTIMIZER_DEFAULTS = {"lion": LION_DEFAULTS, "lion8bit": LION_DEFAULTS, "adafactor": {"optim.weight_decay": 0.0},
                      "prodigy": {"optim.weight_decay": 0.0}, "came": {"optim.weight_decay": 0.0}}  # fmt: skip
"""The optimizers' own defaults, which kohya gets when optimizer_args leaves them out (ours are AdamW's)."""
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SECRET_KEYS = ("wandb_api_key", "huggingface_token")
LORA_KEYS = ("network_module", "network_dim", "network_alpha", "LoRA_type")


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
        data, keys, warnings = self.data, {row.key for row in self.rows}, []
        if "base" not in data.get("model", {}):
            warnings.append("model.base is not set: xlbake's default is builtin:tiny (the test model); set it")
        if not data.get("data", {}).keys() & {"roots", "dataset_toml"}:
            warnings.append("no dataset: set data.roots to the folder holding your N_name folders")
        if keys & set(LORA_KEYS):
            warnings.append("a LoRA training config: its learning rates are LoRA rates, far too high for a finetune")
        return warnings


# ---------------------------------------------------------------- values and rule factories


def _clean(value: Any) -> Any:
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
            return _clean(parse(text))
        except ValueError:
            pass
    return text or None


def _is_off(value: Any, neutral: tuple = ()) -> bool:
    return value in (None, False, 0, "", [], "none", "None", "no", *neutral)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise ValueError(f"expected an integer, got {v!r}")
    return int(float(v))


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, (bool, int)):
        raise ValueError(f"expected true or false, got {v!r}")
    return bool(v)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to(key: str | None, convert: Callable[[Any], Any] = str, note: str = "", off: bool = False) -> Rule:
    """Map to ``key`` (or, with key None, to the dict ``convert`` returns); with ``off``, an off value is ignored."""

    def rule(v: Any, ctx: Mapping[str, Any]) -> Out:
        if off and _is_off(v):
            return "ignored", {}, "off"
        return "mapped", convert(v) if key is None else {key: convert(v)}, note

    return rule


def unsupported(why: str, *neutral: Any) -> Rule:
    return lambda v, ctx: ("ignored", {}, "off") if _is_off(v, neutral) else ("unsupported", {}, why)


def ignored(why: str) -> Rule:
    return lambda v, ctx: ("ignored", {}, why)


def when(condition: Callable[[Any, Mapping[str, Any]], bool], why: str, rule: Rule) -> Rule:
    """``rule`` unless ``condition(value, ctx)``, in which case the key is ignored for reason ``why``."""
    return lambda v, ctx: ("ignored", {}, why) if condition(v, ctx) else rule(v, ctx)


# ---------------------------------------------------------------- rules that look at other keys


def _base_model(v: Any, ctx: Mapping[str, Any]) -> Out:
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(v)) and Path(str(v)).suffix.lower() not in MODEL_SUFFIXES:
        return "unsupported", {}, "a hub id: xlbake reads local files only; set model.base to your SDXL file"
    return "mapped", {"model.base": str(v)}, ""


def _image_folder(v: Any, ctx: Mapping[str, Any]) -> Out:
    folder = Path(str(v).rstrip("/\\"))
    if REPEATS_PREFIX.match(folder.name):
        return "mapped", {"data.roots": [str(folder.parent)]}, f"every N_name folder in {folder.parent} trains"
    repeats = ctx.get("dataset_repeats") or 1
    return "unsupported", {}, f"images must be in N_name folders: move them to {folder.parent}/{repeats}_{folder.name}"


def _dataset_repeats(v: Any, ctx: Mapping[str, Any]) -> Out:
    if "image_folder" not in ctx:
        return "ignored", {}, "no image_folder: repeats come from the N_name folder names"
    folder = Path(str(ctx["image_folder"]).rstrip("/\\")).name
    match = REPEATS_PREFIX.match(folder)
    if match and int(match.group(1)) == _int(v):
        return "ignored", {}, "the image folder's N_ prefix says the same"
    name = match.group(2) if match else folder
    return "unsupported", {}, f"repeats come from the folder name here: rename {folder} to {_int(v)}_{name}"


def _resolution(v: Any, ctx: Mapping[str, Any]) -> Out:
    sides = [_int(s) for s in str(v).replace("x", ",").split(",") if s.strip()]
    if len(set(sides)) != 1:
        side = round((sides[0] * sides[-1]) ** 0.5)
        return "unsupported", {}, f"non-square; xlbake buckets by area: set data.resolution ≈ {side}"
    return "mapped", {"data.resolution": sides[0]}, ""


def _te_lr(index: int) -> Rule:
    """sd-scripts: a text encoder's own LR if given (0 freezes it), else learning_rate; none without
    train_text_encoder."""

    def rule(v: Any, ctx: Mapping[str, Any]) -> Out:
        if ctx.get("train_text_encoder") is False:
            return "mapped", {f"optim.te{index}_lr": 0.0}, "train_text_encoder is off: frozen"
        lr = _float(v) if v is not None else _float(ctx.get("learning_rate") or 0)
        return "mapped", {f"optim.te{index}_lr": lr}, "0 freezes it" if lr == 0 else ""

    return rule


def _train_te(v: Any, ctx: Mapping[str, Any]) -> Out:
    if not _bool(v):
        return "mapped", {"optim.te1_lr": 0.0, "optim.te2_lr": 0.0}, "text encoders frozen"
    lr = _float(ctx.get("learning_rate") or 0)
    settings = {f"optim.te{i}_lr": lr for i in (1, 2) if ctx.get(f"learning_rate_te{i}") is None}
    if not settings:
        return "ignored", {}, "on: learning_rate_te1/te2 set the encoders' learning rates"
    return "mapped", settings, "learning_rate, for each encoder without its own"


def _optimizer_args(v: Any) -> dict[str, Any]:
    """kohya's optimizer_args ("weight_decay=0.1 betas=.9,.95", a list of such, or comma-separated) as a dict."""
    text = " ".join(map(str, v)) if isinstance(v, list) else str(v or "")
    starts = list(re.finditer(r"(\w+)\s*=", text))
    ends = [match.start() for match in starts[1:]] + [len(text)] * bool(starts)
    args = {}
    for match, end in zip(starts, ends, strict=True):
        raw = text[match.end() : end].strip(" ,\"'[]()")
        items = [_clean(item.strip(" []()")) for item in raw.split(",")]
        args[match.group(1)] = items if len(items) > 1 else items[0]
    return args


def _optimizer(v: Any, ctx: Mapping[str, Any]) -> Out:
    name = str(v).lower().rsplit(".", 1)[-1]  # also module.Class names such as prodigyopt.Prodigy
    if name not in OPTIMIZERS:
        return "unsupported", {}, f"optimizer not available; use one of {', '.join(OPTIMIZERS)}"
    given = _optimizer_args(ctx.get("optimizer_args"))
    defaults = {k: d for k, d in OPTIMIZER_DEFAULTS.get(name, {}).items() if k.split(".")[1] not in given}
    note = "its own defaults" if defaults else ""
    if name == "adafactor":
        note = "kohya defaults to relative_step=True (its own LR); xlbake uses the configured LR"
    return "mapped", {"optim.name": name, **defaults}, note


def _optimizer_args_rule(v: Any, ctx: Mapping[str, Any]) -> Out:
    args = _optimizer_args(v)
    settings = {f"optim.{key}": _float(args.pop(key)) for key in ("weight_decay", "eps") if key in args}
    if isinstance(args.get("betas"), list) and len(args["betas"]) == 2:
        settings["optim.betas"] = [_float(b) for b in args.pop("betas")]
    lists = sorted(k for k, a in args.items() if isinstance(a, list))
    if lists:
        return "unsupported", {}, f"list-valued optimizer arguments {lists} cannot be passed"
    return "mapped", {**settings, **({"optim.args": args} if args else {})}, ""


def _warmup(value_of: Callable[[Any], float | int]) -> Rule:
    """A warmup: a float is a ratio of all steps (sd-scripts reads lr_warmup_steps < 1 so), an int is steps."""

    def rule(v: Any, ctx: Mapping[str, Any]) -> Out:
        if _is_off(v):
            return "ignored", {}, "off"
        if str(ctx.get("lr_scheduler") or "constant") == "constant":
            return "ignored", {}, "kohya refuses a warmup with the constant scheduler"
        value = value_of(v)
        return "mapped", {"optim.warmup_ratio" if isinstance(value, float) else "optim.warmup_steps": value}, ""

    return rule


def _epoch_set(v: Any, ctx: Mapping[str, Any]) -> bool:
    return not _is_off(ctx.get("max_train_epochs"))


def _steps_overridden(v: Any, ctx: Mapping[str, Any]) -> bool:
    return not (_is_off(ctx.get("max_train_epochs")) and _is_off(ctx.get("epoch")))


def _scheduler_is_not(name: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    return lambda v, ctx: ctx.get("lr_scheduler") != name


def _run_dir(v: Any, ctx: Mapping[str, Any]) -> Out:
    name = ctx.get("output_name")
    run = str(Path(str(v)) / str(name)) if name else str(v)
    return "mapped", {"run_dir": run}, "the run folder holds every output" + (" (output_dir/output_name)" * bool(name))


def _save_as(v: Any, ctx: Mapping[str, Any]) -> Out:
    if str(v) == "safetensors":
        return "ignored", {}, "xlbake saves safetensors"
    if str(v).startswith("diffusers"):
        return "mapped", {"checkpoint.diffusers": True}, "a diffusers folder beside the single file"
    return "unsupported", {}, "pickle checkpoints are never written; xlbake saves safetensors"


def _samples(v: Any, ctx: Mapping[str, Any]) -> Out:
    """kohya prompt lines ("prompt --n negative --w 1024 ..."): the prompts with the options xlbake reads; the
    others (e.g. --ss sampler) are dropped and listed."""
    text, path = str(v), Path(str(v))
    if "\n" not in text and path.suffix in (".txt", ".toml", ".json"):
        path = path if path.is_absolute() else Path(ctx[SOURCE]).parent / path
        if path.suffix != ".txt" or not path.is_file():
            return "unsupported", {}, f"prompt file {path} is not a readable .txt; list the prompts in sample.prompts"
        text = path.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    kept, dropped = [], set()
    for line in lines:
        prompt, *pieces = line.split(PROMPT_SEPARATOR)
        supported = [p for p in pieces if p.strip()[:1].lower() in PROMPT_OPTIONS and p.strip()[1:2] in ("", " ")]
        dropped |= {p.split(" ", 1)[0] for p in pieces if p not in supported}
        kept.append(PROMPT_SEPARATOR.join([prompt.strip(), *supported]))
    names = ", --".join(sorted(dropped))
    note = f"prompt options --{names} not converted (xlbake's samples do not have them)" if dropped else ""
    return "mapped", {"sample.prompts": kept}, note


DIRECT = {
    "vae": "model.vae", "gradient_checkpointing": "model.gradient_checkpointing", "dataset_config": "data.dataset_toml",
    "min_bucket_reso": "data.min_bucket_reso", "max_bucket_reso": "data.max_bucket_reso",
    "bucket_reso_steps": "data.bucket_step", "bucket_no_upscale": "data.no_upscale", "random_crop": "data.random_crop",
    "flip_aug": "data.flip", "cache_latents": "data.cache_latents", "caption_extension": "data.caption_extension",
    "shuffle_caption": "caption.shuffle", "keep_tokens": "caption.keep_tokens",
    "caption_separator": "caption.separator",
    "caption_dropout_rate": "caption.dropout_rate", "caption_dropout_every_n_epochs": "caption.dropout_every_n_epochs",
    "caption_tag_dropout_rate": "caption.tag_dropout_rate", "caption_prefix": "caption.prefix",
    "caption_suffix": "caption.suffix", "max_token_length": "caption.max_token_length",
    "train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "max_data_loader_n_workers": "train.num_workers", "max_grad_norm": "optim.max_grad_norm",
    "lr_scheduler": "optim.scheduler", "mixed_precision": "precision.mixed", "full_bf16": "precision.full_bf16",
    "noise_offset": "noise.noise_offset", "noise_offset_random_strength": "noise.noise_offset_random_strength",
    "ip_noise_gamma": "noise.ip_noise_gamma", "ip_noise_gamma_random_strength": "noise.ip_noise_gamma_random_strength",
    "min_timestep": "noise.min_timestep", "debiased_estimation_loss": "loss.debiased_estimation",
    "loss_type": "loss.loss_type", "huber_c": "loss.huber_c", "huber_schedule": "loss.huber_schedule",
    "huber_scale": "loss.huber_scale", "ema_decay": "ema.beta", "save_every_n_epochs": "checkpoint.every_epochs",
    "save_every_n_steps": "checkpoint.every_steps", "save_last_n_epochs": "checkpoint.keep_last",
    "save_state": "checkpoint.save_state", "use_wandb": "log.wandb", "sample_every_n_epochs": "sample.every_epochs",
}  # fmt: skip
"""kohya keys that are one of our keys (values typed and checked when the YAML is validated)."""
NEUTRAL = {"prior_loss_weight": 1, "token_warmup_min": 1, "noise_offset_type": "Original", "enable_bucket": True}
"""Values of unsupported keys that mean "off" (besides false, 0 and empty)."""
NO_REG = "regularization images are not used (the guide: don't use them)"
UNSUPPORTED = {
    "enable_bucket": "xlbake always buckets by aspect ratio", "color_aug": "colour augmentation is not available",
    "face_crop_aug_range": "face crop augmentation is not available", "alpha_mask": "alpha masks are not available",
    "masked_loss": "masked loss is not available", "reg_data_dir": NO_REG, "prior_loss_weight": NO_REG,
    "in_json": "kohya metadata JSON: xlbake reads the captions beside the images",
    "keep_tokens_separator": "not available; use keep_tokens", "secondary_separator": "secondary separators: none",
    "enable_wildcard": "caption wildcards: not available", "weighted_captions": "weighted captions: not available",
    "token_warmup_step": "token warmup is not available", "token_warmup_min": "token warmup is not available",
    "lr_scheduler_args": "scheduler arguments: not available", "lr_scheduler_type": "custom schedulers: not available",
    "block_lr": "per-block UNet learning rates are not available", "fp8_base": "fp8 base weights are not available",
    "stop_text_encoder_training": "stopping text encoder training early is not available",
    "full_fp16": "full fp16 is not available: use mixed fp16 (fp32 weights) or full_bf16",
    "noise_offset_type": "multires noise is not available",
    "adaptive_noise_scale": "adaptive noise scale is not available",
    "multires_noise_iterations": "multires noise is not available",
    "zero_terminal_snr": "zero terminal SNR is not available", "v_pred_like_loss": "v-pred-like loss: not available",
    "scale_v_pred_loss_like_noise_pred": "v-pred loss scaling is not available",
    "save_last_n_steps": "use checkpoint.keep_last", "save_last_n_steps_state": "use checkpoint.keep_states",
    "save_last_n_epochs_state": "use checkpoint.keep_states", "save_n_epoch_ratio": "use checkpoint.every_epochs",
    "resume": "resume with `python -m finetune --config C --resume auto|STATE`",
    "sample_every_n_steps": "samples are drawn every N epochs (sample.every_epochs)",
    "sample_at_first": "sampling before training is not available",
}  # fmt: skip
"""kohya keys that change training in a way xlbake cannot reproduce (when not off)."""
IGNORED = {
    **dict.fromkeys(("train_dir", "caption_metadata_filename", "latent_metadata_filename", "full_path", "batch_size",
                     "create_caption", "create_buckets", "generate_caption_database", "generate_image_buckets",
                     "use_latent_files"), "finetune-tab metadata preparation: xlbake reads images and captions"),
    **dict.fromkeys(("num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
                     "main_process_port", "extra_accelerate_launch_args", "deepspeed", "zero_stage"),
                    "launch setting: use `accelerate launch` (configs/accelerate/) for GPUs and processes"),
    **dict.fromkeys(("persistent_data_loader_workers", "vae_batch_size", "lowram", "highvram", "fused_backward_pass",
                     "disable_mmap_load_safetensors", "cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs",
                     "fused_optimizer_groups", "mem_eff_save", "cpu_offload_checkpointing"),
                    "memory/speed setting without an xlbake switch; training is the same"),
    **dict.fromkeys(("model_list", "training_comment", "log_prefix", "log_tracker_name", "log_tracker_config",
                     "log_config", "wandb_run_name", "async_upload", "save_as_bool", "save_state_on_train_end",
                     "save_state_to_huggingface", "resume_from_huggingface", "tokenizer_cache_dir", "output_config",
                     "config_file", "training_preset", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
                     "metadata_", "huggingface_"), "GUI or run bookkeeping; no effect on training"),
    **dict.fromkeys(("sd3_", "flux1_", "t5xxl", "clip_l", "clip_g"), "an SD3/FLUX setting; no effect on SDXL"),
    **dict.fromkeys(("v2", "sdxl", "sdxl_checkbox"), "SDXL (checked before converting)"),
    **dict.fromkeys(SECRET_KEYS, "a secret: not copied (`wandb login` / `huggingface-cli login`)"),
    "cache_latents_to_disk": "xlbake's latent cache is on disk whenever data.cache_latents is on",
    "clip_skip": "sd-scripts ignores clip_skip for SDXL (it conditions on the penultimate layers)",
    "learning_rate_te": "SD 1.x text encoder LR; SDXL uses learning_rate_te1/te2",
    "logging_dir": "xlbake logs to RUN/logs",
    "multires_noise_discount": "only used by multires noise (see multires_noise_iterations)",
    "output_name": "part of run_dir (see output_dir)", "sample_sampler": "samples use the base model's scheduler",
}  # fmt: skip
"""kohya keys with no effect here; a key ending in "_" stands for every key starting with it."""
SPECIAL: dict[str, Rule] = {
    "pretrained_model_name_or_path": _base_model, "image_folder": _image_folder, "dataset_repeats": _dataset_repeats,
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), to("model.attention", lambda v: "sdpa", "torch SDPA", True)),
    "dynamo_backend": to("model.compile", lambda v: True, "torch.compile", off=True),
    "v_parameterization": to("loss.prediction", lambda v: "v_prediction" if _bool(v) else "epsilon"),
    "train_data_dir": to("data.roots", lambda v: [str(v)]), "resolution": _resolution, "max_resolution": _resolution,
    "seed": when(lambda v, ctx: _is_off(v), "kohya: random seed; xlbake seeds train.seed (0)", to("train.seed", _int)),
    "max_train_epochs": to("train.epochs", _int, off=True),
    "epoch": when(_epoch_set, "max_train_epochs wins (the guide: use it)", to("train.epochs", _int, off=True)),
    "max_train_steps": when(_steps_overridden, "sd-scripts lets the epoch count override it",
                            to("train.max_steps", _int, "xlbake also stops after train.epochs", off=True)),
    "learning_rate": lambda v, ctx: ("mapped", {"optim.unet_lr": _float(v)}, "0: UNet frozen" if v == 0 else ""),
    "learning_rate_te1": _te_lr(1), "learning_rate_te2": _te_lr(2), "train_text_encoder": _train_te,
    "optimizer": _optimizer, "optimizer_type": _optimizer, "optimizer_args": _optimizer_args_rule,
    "lr_warmup": _warmup(lambda v: _float(v) / 100),
    "lr_warmup_steps": _warmup(lambda v: _float(v) if _float(v) < 1 else _int(v)),
    "lr_scheduler_num_cycles": when(_scheduler_is_not("cosine_with_restarts"), "only used by cosine_with_restarts",
                                    to("optim.cycles", _int)),
    "lr_scheduler_power": when(_scheduler_is_not("polynomial"), "only used by polynomial", to("optim.power")),
    **dict.fromkeys(("no_half_vae", "sdxl_no_half_vae"), when(
        lambda v, ctx: not _bool(v), "xlbake keeps SDXL's VAE in fp32 (in fp16 it overflows)",
        to("precision.vae", lambda v: "fp32"))),
    "save_precision": to("checkpoint.dtype", lambda v: {"float": "fp32"}.get(str(v), str(v))),
    "max_timestep": to("noise.max_timestep", lambda v: _int(v) or 1000),
    "min_snr_gamma": to("loss.min_snr_gamma", lambda v: _float(v) or None),
    "enable_ema": to(None, lambda v: {"ema.enabled": True, "checkpoint.weights": "ema"},
                     "the EMA weights are the output (as configs/finetune/a100-80gb-ema.yaml)", off=True),
    "output_dir": _run_dir, "save_model_as": _save_as, "sample_prompts": _samples,
    "log_with": to(None, lambda v: {"log.tensorboard": v in ("tensorboard", "all"),
                                    "log.wandb": v in ("wandb", "all")}),
}  # fmt: skip
"""kohya keys whose conversion depends on their value or on other keys."""


# ---------------------------------------------------------------- reading, converting, writing


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
        kind, entries = GUI, [(k, k, _clean(v)) for k, v in data.items()]
    elif path.suffix.lower() == ".toml":
        kind, entries = TOML, [(k, k, _clean(v)) for k, v in _read_toml(path, text).items()]
    else:
        kind, entries = CLI, _cli_entries(path, text)
    extra = next((v for k, _, v in entries if k == "additional_parameters"), None)
    entries = [e for e in entries if e[0] != "additional_parameters"]
    return kind, entries + [(k, f"{k} (additional_parameters)", v) for k, _, v in _parse_args(str(extra or ""))]


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
    if ctx.get("v2") is True or False in (ctx.get("sdxl"), ctx.get("sdxl_checkbox")):
        raise InputError(f"{path}: not an SDXL config (v2 on or sdxl off); xlbake trains SDXL only")
    last = {k: i for i, (k, _, _) in enumerate(entries)}
    rows = [_row(key, shown, value, ctx, last[key] != i) for i, (key, shown, value) in enumerate(entries)]
    return Conversion(path, kind, tuple(rows))


def _rule(key: str) -> Rule | None:
    if key in SPECIAL:
        return SPECIAL[key]
    if key in DIRECT:
        return to(DIRECT[key], lambda v: v)
    if key in UNSUPPORTED:
        return unsupported(UNSUPPORTED[key], *([NEUTRAL[key]] if key in NEUTRAL else []))
    why = IGNORED.get(key) or next((w for p, w in IGNORED.items() if p.endswith("_") and key.startswith(p)), None)
    return ignored(why) if why else None


def _row(key: str, shown: str, value: Any, ctx: Mapping[str, Any], overridden: bool) -> Row:
    if overridden:
        return Row(shown, _masked(key, value), "ignored", {}, "given again later; that value wins")
    rule = _rule(key)
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
    return [(k, f"{k} ({toml.name})", _clean(v)) for k, v in _read_toml(toml, toml.read_text("utf-8")).items()] + args


def _parse_args(text: str) -> list[tuple[str, str, Any]]:
    """argparse-style `--key=value`, `--key value [value ...]` and `--flag` into (key, key, value) entries."""
    entries: list[tuple[str, str, Any]] = []
    for token in shlex.split(text):
        if token.startswith("--"):
            key, has_value, value = token[2:].partition("=")
            entries.append((key, key, _clean(value) if has_value else True))
        elif entries:
            key, _, previous = entries[-1]
            values = [] if previous is True else previous if isinstance(previous, list) else [previous]
            value = [*values, _clean(token)]
            entries[-1] = (key, key, value[0] if len(value) == 1 else value)
    return entries


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
