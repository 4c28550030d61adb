"""The finetune stage's configuration: one root dataclass composing typed, documented sections.

Every field has an attribute docstring (shown by ``xlbake.config.describe`` and the README). Data, caption, noise
and loss sections live beside the code that uses them (``finetune.data``, ``finetune.captions``,
``finetune.objective``); this module owns the rest and the cross-section checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from finetune.captions import CaptionConfig
from finetune.data import DataConfig
from finetune.kohya.names import KOHYA_KEY_NAMES
from finetune.objective import LossConfig, NoiseConfig
from xlbake.errors import ConfigError, InputError
from xlbake.prompts import parse_prompt_line

CONFIG_VERSION = 1
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
BUILTIN_PREFIX = "builtin:"


def builtin_name(path: Path | str) -> str | None:
    """``"tiny"`` for a config path written as ``builtin:tiny`` (even after resolution against a folder), else None."""
    name = Path(path).name
    return name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else None


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("; ".join(errors))


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to run it."""

    base: Path = Path("builtin:tiny")
    """Base model: a single-file SDXL .safetensors (SGM keys), a diffusers folder, or `builtin:tiny` (the tiny
    test model, built offline into RUN/builtin/)."""
    components: str = SDXL_HUB_ID
    """For a single-file base: a diffusers folder or hub id supplying its configs, tokenizers and noise schedule.
    The default needs nothing: SDXL base 1.0 (or the tiny model) is recognised from the file's shapes, its configs are
    built in, and its two tokenizers are fetched into the Hugging Face cache on first use (not with HF_HUB_OFFLINE=1).
    Ignored for a diffusers-folder or builtin base."""
    vae: Path | None = None
    """Optional separate VAE as a diffusers folder (e.g. an fp16-fixed SDXL VAE); default: the base's VAE."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, slower, slightly different numerics."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: `sdpa` (torch scaled_dot_product_attention) or `eager`."""
    compile: bool = False
    """Wrap the UNet in torch.compile (faster steps on GPU after a slow first step)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _raise(errors)


@dataclass(frozen=True)
class TrainConfig:
    """Length of training, batching and the loop's failure policy."""

    seed: int = 0
    """Seed for model noise, timesteps, data order and augmentations (every epoch reshuffles from it)."""
    epochs: int = 100
    """Number of epochs (a full pass over every image times its folder repeats)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = run all epochs."""
    batch_size: int = 1
    """Images per batch (all from one bucket)."""
    grad_accum: int = 1
    """Gradient accumulation: batches per optimizer step."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """Non-finite loss: `stop` (save nothing, raise with the step and a hint) or `skip` (drop that optimizer step)."""
    max_nan_skips: int = 10
    """With on_nan=skip: stop once this many optimizer steps in a row were skipped."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        for key in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                errors.append(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_steps < 0 or self.num_workers < 0 or self.max_nan_skips < 1:
            errors.append("train.max_steps and train.num_workers must be >= 0, train.max_nan_skips >= 1")
        _raise(errors)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, per-part learning rates and the LR schedule."""

    name: Literal["adamw", "adamw8bit", "lion8bit", "lion", "adafactor", "prodigy", "came"] = "adamw"
    """Optimizer: adamw (torch), adamw8bit / lion8bit (bitsandbytes), lion (lion-pytorch), adafactor
    (transformers), prodigy (prodigyopt), came (came-pytorch). Extras: pip install xlbake[optim]."""
    unet_lr: float = 1e-6
    """UNet learning rate; 0 freezes the UNet."""
    te1_lr: float = 1e-6
    """Text encoder 1 (CLIP ViT-L) learning rate; 0 freezes it."""
    te2_lr: float = 1e-6
    """Text encoder 2 (OpenCLIP bigG) learning rate; 0 freezes it."""
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/Lion betas (not used by adafactor and came, which take theirs from `args`)."""
    eps: float = 1e-8
    """Adam epsilon (not used by lion, adafactor, came)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value on each optimizer step; 0 disables clipping."""
    args: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Extra keyword arguments for the optimizer, e.g. {fused: true} or {d_coef: 0.5} for prodigy."""
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = (
        "constant"
    )
    """LR schedule (diffusers.optimization): constant, constant_with_warmup, linear, cosine,
    cosine_with_restarts, polynomial."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all optimizer steps (use either this or warmup_steps)."""
    cycles: int = 1
    """Number of hard restarts for cosine_with_restarts."""
    power: float = 1.0
    """Power of the polynomial schedule."""

    @property
    def part_lrs(self) -> dict[str, float]:
        """The learning rate of each part by its short name (``xlbake.sdxl.parts.PARTS``); 0 = frozen."""
        return {"unet": self.unet_lr, "te1": self.te1_lr, "te2": self.te2_lr}

    def __post_init__(self) -> None:
        errors: list[str] = []
        lrs = (self.unet_lr, self.te1_lr, self.te2_lr)
        if min(lrs) < 0:
            errors.append("optim.unet_lr/te1_lr/te2_lr: learning rates must be >= 0 (0 freezes that part)")
        elif max(lrs) == 0:
            errors.append("optim.unet_lr/te1_lr/te2_lr: all are 0, nothing would train; set at least one > 0")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            errors.append("optim.warmup_steps must be >= 0 and optim.warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            errors.append("optim.warmup_steps and optim.warmup_ratio are both set; keep one")
        if self.scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            errors.append("optim.scheduler: constant ignores warmup; use constant_with_warmup or remove the warmup")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            errors.append("optim.max_grad_norm and optim.weight_decay must be >= 0")
        _raise(errors)


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision of training (saving precision is checkpoint.dtype)."""

    mixed: Literal["no", "fp16", "bf16"] = "fp16"
    """Autocast precision with fp32 master weights: fp16 (with a gradient scaler), bf16, or no (fp32)."""
    full_bf16: bool = False
    """Keep the trained weights themselves in bf16 (less memory, lower quality); needs mixed: bf16."""
    vae: Literal["fp32", "fp16"] = "fp32"
    """VAE precision: fp32 ("no half VAE"), or fp16 only with an fp16-fixed VAE (model.vae)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.full_bf16 and self.mixed != "bf16":
            errors.append("precision.full_bf16: needs precision.mixed: bf16")
        _raise(errors)


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the trained weights (ema-pytorch)."""

    enabled: bool = False
    """Keep an EMA copy of every trained part (UNet and trained text encoders)."""
    beta: float = 0.9995
    """EMA decay (the upper bound when warmup is on)."""
    update_after_step: int = 0
    """Copy the weights instead of averaging for this many optimizer steps first."""
    update_every: int = 1
    """Average every N optimizer steps."""
    warmup: bool = False
    """Ramp the decay up as 1 - (1 + n / inv_gamma) ** -power instead of using `beta` from the start."""
    inv_gamma: float = 1.0
    """Warmup inverse multiplicative factor."""
    power: float = 2 / 3
    """Warmup exponent."""
    device: Literal["same", "cpu"] = "same"
    """Where the EMA weights live: `same` as the model (GPU) or `cpu` (saves GPU memory, slower updates; samples
    bring the EMA copy to the GPU while they render)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not 0 < self.beta < 1:
            errors.append(f"ema.beta: must be in (0, 1), got {self.beta}")
        if self.update_every < 1 or self.update_after_step < 0:
            errors.append("ema.update_every must be >= 1 and ema.update_after_step >= 0")
        _raise(errors)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (model files) and training state (for --resume)."""

    every_epochs: int = 0
    """Save a checkpoint every N epochs; 0 = only the final one."""
    every_steps: int = 0
    """Save a checkpoint every N optimizer steps; 0 = off."""
    keep_last: int = 0
    """Keep only the newest N intermediate checkpoints; 0 = keep all."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the user-facing checkpoints (tuned.safetensors, checkpoints/): fp16, bf16 or fp32."""
    fp32_copy: bool = True
    """Also write RUN/tuned.fp32.safetensors, the lossless copy extraction reads (an fp16 file rounds away most
    of a low-LR finetune's text-encoder change)."""
    keep_fp32: bool = False
    """Also write each intermediate checkpoint in fp32 as RUN/checkpoints/{tag}.fp32.safetensors, the copy
    `make extract-epochs` extracts a LoRA from (not needed when dtype is fp32)."""
    weights: Literal["auto", "raw", "ema", "both"] = "auto"
    """Which weights the outputs (and samples) hold: raw, ema (needs ema.enabled), both (EMA in tuned*, raw beside
    as tuned-raw*), or auto: both with ema.enabled, else raw."""
    diffusers: bool = False
    """Also write the final model as a diffusers folder RUN/tuned-diffusers/."""
    save_state: bool = True
    """Save the training state beside every checkpoint and the final outputs (and always on interrupt), for
    --resume (raising train.max_steps or train.epochs continues a finished run)."""
    state_every_steps: int = 0
    """Additionally save the training state every N optimizer steps; 0 = off."""
    keep_states: int = 2
    """Keep the newest N training states."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if min(self.every_epochs, self.every_steps, self.keep_last, self.state_every_steps) < 0:
            errors.append("checkpoint.every_epochs/every_steps/keep_last/state_every_steps must be >= 0")
        if self.keep_states < 1:
            errors.append("checkpoint.keep_states: must be >= 1")
        _raise(errors)


@dataclass(frozen=True)
class SampleConfig:
    """Sample images during training (diffusers StableDiffusionXLPipeline)."""

    prompts: tuple[str, ...] = ()
    """Prompts to render; empty = no sampling. A prompt may end with kohya's options, which override the settings
    below for it: `--n` negative prompt, `--w` width, `--h` height, `--s` steps, `--l` guidance scale, `--d` seed
    (e.g. `xlbk emblem --n blurry --w 832 --h 1216 --d 7`)."""
    negative_prompt: str = ""
    """Negative prompt for every sample."""
    every_epochs: int = 0
    """Render the prompts every N epochs; 0 = only at the end of training (they are always rendered then)."""
    steps: int = 20
    """Denoising steps per image."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    width: int = 1024
    """Sample width in pixels (a multiple of 8)."""
    height: int = 1024
    """Sample height in pixels (a multiple of 8)."""
    seed: int = 0
    """Seed of each prompt's sample (the same every time, so epochs compare)."""

    def __post_init__(self) -> None:
        if self.width % 8 or self.height % 8 or self.steps < 1 or self.every_epochs < 0:
            raise ConfigError("sample.width/height must be multiples of 8, sample.steps >= 1, every_epochs >= 0")
        for index, line in enumerate(self.prompts):
            try:
                parse_prompt_line(line, where=f"sample.prompts[{index}]")
            except InputError as err:
                raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class LogConfig:
    """Logs and plots written to RUN/."""

    every_steps: int = 1
    """Log loss and LR every N optimizer steps."""
    tensorboard: bool = True
    """Write tensorboard event files to RUN/logs/."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""
    project: str = "xlbake"
    """Tracker project name."""
    loss_plot: bool = True
    """Write RUN/loss.png (raw and smoothed loss, LR on a second axis) at the end and when interrupted."""
    progress: bool = True
    """Show a progress bar (step, epoch, loss, LR, it/s, share of time waiting for data)."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"log.every_steps: must be >= 1, got {self.every_steps}")


@dataclass(frozen=True)
class FinetuneConfig:
    """A full SDXL finetune (UNet and both text encoders)."""

    KEY_ALIASES: ClassVar[dict[str, str]] = KOHYA_KEY_NAMES  # kohya's names, read as ours by load_config
    config_version: int = CONFIG_VERSION
    """Version of this config format (for later migrations)."""
    run_dir: Path = Path("runs/finetune")
    """Run folder: checkpoints, state, logs, samples, config.resolved.yaml, tuned*.safetensors."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and how it runs."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset folders, buckets and augmentation."""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """Caption handling: shuffle, dropout, token length."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length of training and batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Noise and timestep sampling."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Prediction target, loss function and weighting."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Training precision."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """EMA of the trained weights."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and training state."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Samples during training."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.checkpoint.weights in ("ema", "both") and not self.ema.enabled:
            errors.append(f"checkpoint.weights: {self.checkpoint.weights} needs ema.enabled: true")
        if self.precision.vae == "fp16" and self.model.vae is None:
            errors.append("precision.vae: fp16 needs an fp16-fixed VAE in model.vae (SDXL's own VAE overflows)")
        _raise(errors)
