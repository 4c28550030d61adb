"""How each kohya key becomes finetune YAML settings: one rule per key (mapped, unsupported or ignored, with the
reason), in tables by kind, made of the rule kinds of ``finetune.kohya.rule_kinds``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune.config import OptimConfig
from finetune.kohya.names import KOHYA_KEY_NAMES
from finetune.kohya.readers import clean_value
from finetune.kohya.rule_kinds import Out, Rule, ignored, is_off, to, to_bool, to_float, to_int, unsupported, when
from xlbake.data.kohya import REPEATS_PREFIX
from xlbake.prompts import OPTIONS as PROMPT_OPTIONS
from xlbake.prompts import SEPARATOR as PROMPT_SEPARATOR

SOURCE = "_source"
"""Context key holding the source file's path (not a kohya key)."""
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "prodigy", "came")
LION_DEFAULTS = {"optim.betas": [0.9, 0.99], "optim.weight_decay": 0.0}
OPTIMIZER_DEFAULTS = {"lion": LION_DEFAULTS, "lion8bit": LION_DEFAULTS, "adafactor": {"optim.weight_decay": 0.0},
                      "prodigy": {"optim.weight_decay": 0.0}, "came": {"optim.weight_decay": 0.0}}  # fmt: skip
"""The optimizers' own defaults, which kohya gets when optimizer_args leaves them out (ours are AdamW's)."""
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SECRET_KEYS = ("wandb_api_key", "huggingface_token")
LORA = "_lora"
"""Context key holding why the source trains a LoRA (``lora_evidence``), or None (not a kohya key)."""
LORA_LR = 1e-4
"""Learning rates from this up are LoRA rates: LoRAs train at ~1e-4 to 1e-3, SDXL finetunes at ~1e-6 to 5e-5."""
LORA_TAB_KEYS = ("LoRA_type", "network_dim", "network_alpha")
"""Keys of the kohya_ss GUI's LoRA tab. Presets of the other tabs can carry them too: alone they prove nothing."""
ADAPTIVE_OPTIMIZERS = ("prodigy", "dadapt")
"""Optimizers whose learning rate is a multiplier around 1, for LoRAs and finetunes alike: it says nothing."""
LORA_ONLY_RATES = ("unet_lr", "text_encoder_lr", "text_encoder_lr1", "text_encoder_lr2")
"""Rates that only kohya's LoRA trainer (train_network.py) reads; its finetune (sdxl_train.py) ignores them."""
FINETUNE_RATES = f"optim.unet_lr/te1_lr/te2_lr = {OptimConfig.unet_lr:g}/{OptimConfig.te1_lr:g}/{OptimConfig.te2_lr:g}"
LORA_NETWORK_KEYS = (
    "LoRA_type", "LyCORIS_preset", "network_module", "network_dim", "network_alpha", "network_args", "network_dropout",
    "network_weights", "lora_network_weights", "dim_from_weights", "conv_dim", "conv_alpha", "module_dropout",
    "rank_dropout", "rank_dropout_scale", "scale_weight_norms", "network_train_unet_only",
    "network_train_text_encoder_only", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "factor", "decompose_both", "use_cp",
    "use_tucker", "use_scalar", "train_on_input", "train_norm", "unit", "constrain", "dora_wd", "bypass_mode",
    "base_weights", "base_weights_multiplier",
)  # fmt: skip
"""LoRA network settings: xlbake trains the whole model; the LoRA is extracted from it afterwards."""


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
    if match and int(match.group(1)) == to_int(v):
        return "ignored", {}, "the image folder's N_ prefix says the same"
    name = match.group(2) if match else folder
    return "unsupported", {}, f"repeats come from the folder name here: rename {folder} to {to_int(v)}_{name}"


def _resolution(v: Any, ctx: Mapping[str, Any]) -> Out:
    sides = [to_int(s) for s in str(v).replace("x", ",").split(",") if s.strip()]
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
        lr = to_float(v) if v is not None else to_float(ctx.get("learning_rate") or 0)
        return "mapped", {f"optim.te{index}_lr": lr}, "0 freezes it" if lr == 0 else ""

    return rule


def _train_te(v: Any, ctx: Mapping[str, Any]) -> Out:
    if not to_bool(v):
        return "mapped", {"optim.te1_lr": 0.0, "optim.te2_lr": 0.0}, "text encoders frozen"
    if ctx.get(LORA):
        return "ignored", {}, f"on: the encoders train at xlbake's finetune rates ({FINETUNE_RATES})"
    lr = to_float(ctx.get("learning_rate") or 0)
    settings = {f"optim.te{i}_lr": lr for i in (1, 2) if ctx.get(f"learning_rate_te{i}") is None}
    if not settings:
        return "ignored", {}, "on: learning_rate_te1/te2 set the encoders' learning rates"
    return "mapped", settings, "learning_rate, for each encoder without its own"


def lora_evidence(ctx: Mapping[str, Any]) -> str | None:
    """Why the source trains a LoRA, or None: network_module is set (sd-scripts' LoRA trainer), or LoRA-tab keys come
    with a LoRA-sized learning rate (>= LORA_LR, with an optimizer whose rate is not a multiplier around 1)."""
    if not is_off(ctx.get("network_module")):
        return f"network_module = {ctx['network_module']}"
    marker = next((key for key in LORA_TAB_KEYS if key in ctx), None)
    optimizer = str(ctx.get("optimizer_type") or ctx.get("optimizer") or "").lower()
    if marker is None or any(name in optimizer for name in ADAPTIVE_OPTIMIZERS):
        return None
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        try:
            if to_float(ctx.get(key)) >= LORA_LR:
                return f"{key} {ctx[key]}, a LoRA rate, with the LoRA tab's {marker}"
        except (TypeError, ValueError):
            continue
    return None


def _rate(rule: Rule) -> Rule:
    """``rule`` for a learning rate, unless the source trains a LoRA: its rates are far too high for a finetune."""

    def wrapped(v: Any, ctx: Mapping[str, Any]) -> Out:
        if ctx.get(LORA):
            return "ignored", {}, f"a LoRA rate: not converted; the finetune keeps xlbake's {FINETUNE_RATES}"
        return rule(v, ctx)

    return wrapped


def _lora_only_rate(v: Any, ctx: Mapping[str, Any]) -> Out:
    return (
        "ignored",
        {},
        (
            "read only by kohya's LoRA trainer; a finetune's rates are learning_rate (ours: optim.unet_lr) and "
            "learning_rate_te1/te2 (ours: optim.te1_lr/te2_lr)"
        ),
    )


def _optimizer_args(v: Any) -> dict[str, Any]:
    """kohya's optimizer_args ("weight_decay=0.1 betas=.9,.95", a list of such, or comma-separated) as a dict."""
    text = " ".join(map(str, v)) if isinstance(v, list) else str(v or "")
    starts = list(re.finditer(r"(\w+)\s*=", text))
    ends = [match.start() for match in starts[1:]] + [len(text)] * bool(starts)
    args = {}
    for match, end in zip(starts, ends, strict=True):
        raw = text[match.end() : end].strip(" ,\"'[]()")
        items = [clean_value(item.strip(" []()")) for item in raw.split(",")]
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
    settings = {f"optim.{key}": to_float(args.pop(key)) for key in ("weight_decay", "eps") if key in args}
    if isinstance(args.get("betas"), list) and len(args["betas"]) == 2:
        settings["optim.betas"] = [to_float(b) for b in args.pop("betas")]
    lists = sorted(k for k, a in args.items() if isinstance(a, list))
    if lists:
        return "unsupported", {}, f"list-valued optimizer arguments {lists} cannot be passed"
    return "mapped", {**settings, **({"optim.args": args} if args else {})}, ""


def _warmup(value_of: Callable[[Any], float | int]) -> Rule:
    """A warmup: a float is a ratio of all steps (sd-scripts reads lr_warmup_steps < 1 so), an int is steps."""

    def rule(v: Any, ctx: Mapping[str, Any]) -> Out:
        if is_off(v):
            return "ignored", {}, "off"
        if str(ctx.get("lr_scheduler") or "constant") == "constant":
            return "ignored", {}, "kohya refuses a warmup with the constant scheduler"
        value = value_of(v)
        return "mapped", {"optim.warmup_ratio" if isinstance(value, float) else "optim.warmup_steps": value}, ""

    return rule


def _epoch_set(v: Any, ctx: Mapping[str, Any]) -> bool:
    return not is_off(ctx.get("max_train_epochs"))


def _steps_overridden(v: Any, ctx: Mapping[str, Any]) -> bool:
    return not (is_off(ctx.get("max_train_epochs")) and is_off(ctx.get("epoch")))


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


DIRECT = KOHYA_KEY_NAMES
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
    **dict.fromkeys(LORA_NETWORK_KEYS, "a LoRA network setting: xlbake trains the whole model and extracts the LoRA "
                    "from it afterwards (its rank: extract --dim, e.g. make extract DIM=32)"),
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
    "v_parameterization": to("loss.prediction", lambda v: "v_prediction" if to_bool(v) else "epsilon"),
    "train_data_dir": to("data.roots", lambda v: [str(v)]), "resolution": _resolution, "max_resolution": _resolution,
    "seed": when(lambda v, ctx: is_off(v), "kohya: random seed; xlbake seeds train.seed (0)", to("train.seed", to_int)),
    "max_train_epochs": to("train.epochs", to_int, off=True),
    "epoch": when(_epoch_set, "max_train_epochs wins (the guide: use it)", to("train.epochs", to_int, off=True)),
    "max_train_steps": when(_steps_overridden, "sd-scripts lets the epoch count override it",
                            to("train.max_steps", to_int, "xlbake also stops after train.epochs", off=True)),
    "learning_rate": _rate(lambda v, ctx: ("mapped", {"optim.unet_lr": to_float(v)},
                                           "0: UNet frozen" if v == 0 else "")),
    "learning_rate_te1": _rate(_te_lr(1)), "learning_rate_te2": _rate(_te_lr(2)), "train_text_encoder": _train_te,
    **dict.fromkeys(LORA_ONLY_RATES, _rate(_lora_only_rate)),
    "optimizer": _optimizer, "optimizer_type": _optimizer, "optimizer_args": _optimizer_args_rule,
    "lr_warmup": _warmup(lambda v: to_float(v) / 100),
    "lr_warmup_steps": _warmup(lambda v: to_float(v) if to_float(v) < 1 else to_int(v)),
    "lr_scheduler_num_cycles": when(_scheduler_is_not("cosine_with_restarts"), "only used by cosine_with_restarts",
                                    to("optim.cycles", to_int)),
    "lr_scheduler_power": when(_scheduler_is_not("polynomial"), "only used by polynomial", to("optim.power")),
    **dict.fromkeys(("no_half_vae", "sdxl_no_half_vae"), when(
        lambda v, ctx: not to_bool(v), "xlbake keeps SDXL's VAE in fp32 (in fp16 it overflows)",
        to("precision.vae", lambda v: "fp32"))),
    "save_precision": to("checkpoint.dtype", lambda v: {"float": "fp32"}.get(str(v), str(v))),
    "max_timestep": to("noise.max_timestep", lambda v: to_int(v) or 1000),
    "min_snr_gamma": to("loss.min_snr_gamma", lambda v: to_float(v) or None),
    "enable_ema": to(None, lambda v: {"ema.enabled": True, "checkpoint.weights": "ema"},
                     "the EMA weights are the output (as configs/finetune/a100-80gb-ema.yaml)", off=True),
    "output_dir": _run_dir, "save_model_as": _save_as, "sample_prompts": _samples,
    "log_with": to(None, lambda v: {"log.tensorboard": v in ("tensorboard", "all"),
                                    "log.wandb": v in ("wandb", "all")}),
}  # fmt: skip
"""kohya keys whose conversion depends on their value or on other keys."""


def rule_for(key: str) -> Rule | None:
    if key in SPECIAL:
        return SPECIAL[key]
    if key in DIRECT:
        return to(DIRECT[key], lambda v: v)
    if key in UNSUPPORTED:
        return unsupported(UNSUPPORTED[key], *([NEUTRAL[key]] if key in NEUTRAL else []))
    why = IGNORED.get(key) or next((w for p, w in IGNORED.items() if p.endswith("_") and key.startswith(p)), None)
    return ignored(why) if why else None
