"""The training objective as pure functions of tensors: timesteps, noise, targets, SNR weights, losses, time ids;
and the two halves of a training step built from them as the ``noise`` and ``loss`` config sections say
(``noise_latents`` before the UNet, ``weighted_loss`` after it).

Formulas follow kohya sd-scripts (``library/train_util.py``, ``library/custom_train_functions.py``) so that its
settings mean the same here. Shapes: ``B`` batch, ``C`` latent channels, ``H, W`` latent size, ``T`` number of
training timesteps (1000 for SDXL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor

from xlbake.errors import ConfigError

Prediction = Literal["epsilon", "v_prediction"]
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]

SNR_CAP = 1000.0
"""kohya caps the SNR at 1000 for debiased estimation (the SNR of timestep 0 is large)."""


@dataclass(frozen=True)
class NoiseConfig:
    """Noise and timestep sampling."""

    noise_offset: float = 0.0
    """Noise offset: add offset * N(0, 1) per image and channel to the noise (brighter/darker images); 0 = off."""
    noise_offset_random_strength: bool = False
    """Scale the noise offset by U(0, 1) on each step (kohya's noise_offset_random_strength)."""
    ip_noise_gamma: float = 0.0
    """Input perturbation: noise the latents with noise + gamma * N(0, 1) while the target keeps the plain noise
    (0.1 in the paper); 0 = off."""
    ip_noise_gamma_random_strength: bool = False
    """Scale ip_noise_gamma by U(0, 1) on each step."""
    min_timestep: int = 0
    """Smallest training timestep (inclusive)."""
    max_timestep: int = 1000
    """Largest training timestep (exclusive); at most the scheduler's num_train_timesteps (1000 for SDXL)."""

    def __post_init__(self) -> None:
        errors = []
        if self.noise_offset < 0 or self.ip_noise_gamma < 0:
            errors.append("noise.noise_offset and noise.ip_noise_gamma must be >= 0")
        if not 0 <= self.min_timestep < self.max_timestep:
            errors.append(f"noise: need 0 <= min_timestep < max_timestep, got {self.min_timestep}, {self.max_timestep}")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass(frozen=True)
class LossConfig:
    """Prediction target, loss function and per-timestep weighting."""

    prediction: Prediction = "epsilon"
    """What the UNet predicts: `epsilon` (SDXL base) or `v_prediction` (v-pred finetunes). Every output is labelled
    with it (a `v_pred` key and modelspec.prediction_type in single files, the diffusers scheduler config), and the
    samples use it. A base that declares the other type is refused unless prediction_override is set."""
    prediction_override: bool = False
    """Train with `prediction` even though the base model declares the other type (its `v_pred` key or
    modelspec.prediction_type, or its diffusers scheduler config), e.g. to convert an epsilon model to v-prediction."""
    loss_type: LossType = "l2"
    """Loss: `l2` (MSE), `l1`, `huber` (pseudo-Huber 2c(sqrt(r^2+c^2)-c)) or `smooth_l1` (2(sqrt(r^2+c^2)-c)),
    both with kohya's formulas."""
    huber_c: float = 0.1
    """Huber threshold c (kohya's huber_c); with the `exponential` and `snr` schedules, its value at t = T."""
    huber_schedule: HuberSchedule = "snr"
    """How c varies with the timestep (kohya): `constant`, `exponential` (c^(t/T) * huber_scale) or `snr`
    ((1-c)/(1+sigma_t)^2 + c with sigma_t = sqrt((1-abar_t)/abar_t))."""
    huber_scale: float = 1.0
    """Multiplier of c for the `constant` and `exponential` schedules (kohya's huber_scale)."""
    min_snr_gamma: float | None = None
    """Min-SNR weighting gamma (5 in the paper and the guide): weight min(SNR, gamma)/SNR for epsilon,
    min(SNR, gamma)/(SNR+1) for v-prediction; null = off."""
    debiased_estimation: bool = False
    """Debiased estimation: weight 1/sqrt(SNR) (SNR capped at 1000), applied after Min-SNR if both are on."""

    def __post_init__(self) -> None:
        errors = []
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            errors.append(f"loss.min_snr_gamma must be > 0 or null, got {self.min_snr_gamma}")
        if self.loss_type in ("huber", "smooth_l1"):
            if not 0 < self.huber_c <= 1 and self.huber_schedule != "constant":
                errors.append(f"loss.huber_c must be in (0, 1] with the {self.huber_schedule} schedule")
            if self.huber_c <= 0 or self.huber_scale <= 0:
                errors.append("loss.huber_c and loss.huber_scale must be > 0")
        if errors:
            raise ConfigError("; ".join(errors))


def sample_timesteps(
    batch_size: int, min_timestep: int, max_timestep: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep): (B,) long on the generator's device (CPU)."""
    if not 0 <= min_timestep < max_timestep:
        raise ValueError(f"need 0 <= min_timestep < max_timestep, got {min_timestep}, {max_timestep}")
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, dtype=torch.long)


def make_noise(
    latents: Tensor, offset: float = 0.0, *, random_strength: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian noise like ``latents`` (B, C, H, W), plus a noise offset per image and channel (kohya's
    ``apply_noise_offset``): noise + s * N(0, 1) of shape (B, C, 1, 1), s = offset (times U(0, 1) if
    ``random_strength``). Drawn on the generator's device, then moved to the latents' device."""
    device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if offset > 0:
        strength = offset * torch.rand(1, generator=generator, device=device) if random_strength else offset
        noise = noise + strength * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
    return noise.to(device=latents.device, dtype=latents.dtype)


def perturb_noise(
    noise: Tensor, gamma: float, *, random_strength: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Input-perturbation noise (B, C, H, W): noise + s * N(0, 1), s = gamma (times U(0, 1) if ``random_strength``).
    Use it to noise the latents (``add_noise(latents, perturb_noise(noise, ...), t)``); the target keeps ``noise``.
    Returns ``noise`` itself when gamma is 0."""
    if gamma <= 0:
        return noise
    device = generator.device if generator is not None else noise.device
    strength = gamma * torch.rand(1, generator=generator, device=device) if random_strength else gamma
    extra = strength * torch.randn(noise.shape, generator=generator, device=device)
    return noise + extra.to(device=noise.device, dtype=noise.dtype)


class _Schedule:
    """``alphas_cumprod`` (T,) as the scheduler object diffusers' noise functions take: ``add_noise``,
    ``get_velocity`` and ``compute_snr`` read only this attribute, so the functions here stay functions of tensors.
    The first two compute in the sample's dtype, where 16 bits round abar_0 = 0.99915 to 1 (no noise at t = 0):
    callers here pass fp32 samples and round only the result."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise: ``DDPMScheduler.add_noise``.
    latents, noise: (B, C, H, W); timesteps: (B,) long; alphas_cumprod: (T,). Returns (B, C, H, W) in the
    latents' dtype, computed in fp32 (see ``_Schedule``)."""
    noisy = DDPMScheduler.add_noise(_Schedule(alphas_cumprod), latents.float(), noise.float(), timesteps)
    return noisy.to(latents.dtype)


def target_for(
    prediction: Prediction, latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor
) -> Tensor:
    """Training target (B, C, H, W) in the noise's dtype: the noise for epsilon, v = sqrt(abar_t) noise -
    sqrt(1 - abar_t) x_0 for v-prediction (``DDPMScheduler.get_velocity``, computed in fp32)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        velocity = DDPMScheduler.get_velocity(_Schedule(alphas_cumprod), latents.float(), noise.float(), timesteps)
        return velocity.to(noise.dtype)
    raise ValueError(f"unknown prediction type {prediction!r}: use 'epsilon' or 'v_prediction'")


def snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio (sqrt(abar_t) / sqrt(1 - abar_t))^2 of each timestep: (B,) fp32, diffusers'
    ``compute_snr`` (kohya computes it the same way)."""
    return compute_snr(_Schedule(alphas_cumprod), timesteps)


def min_snr_weights(snr_t: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Min-SNR-gamma loss weights (B,): min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR + 1) for v."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1) if prediction == "v_prediction" else clipped / snr_t


def debiased_weights(snr_t: Tensor) -> Tensor:
    """Debiased-estimation loss weights (B,): 1 / sqrt(min(SNR, 1000))."""
    return 1 / torch.sqrt(torch.clamp(snr_t, max=SNR_CAP))


def snr_weights(snr_t: Tensor, *, prediction: Prediction, min_snr_gamma: float | None, debiased: bool) -> Tensor:
    """All per-sample timestep weights (B,) of a LossConfig multiplied together (ones when none is on)."""
    weights = torch.ones_like(snr_t)
    if min_snr_gamma is not None:
        weights = weights * min_snr_weights(snr_t, min_snr_gamma, prediction)
    if debiased:
        weights = weights * debiased_weights(snr_t)
    return weights


def huber_c_for(
    schedule: HuberSchedule,
    huber_c: float,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    *,
    huber_scale: float = 1.0,
) -> Tensor:
    """Per-sample Huber threshold c (B,) fp32, kohya's ``get_huber_threshold_if_needed``:
    constant: c * scale; exponential: exp(ln(c) t / T) * scale; snr: (1 - c) / (1 + sigma_t)^2 + c with
    sigma_t = sqrt((1 - abar_t) / abar_t) (kohya applies no scale there). T = len(alphas_cumprod)."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / alphas_cumprod.shape[0]) * huber_scale
    if schedule == "snr":
        abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
        sigma = torch.sqrt((1 - abar) / abar)
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber schedule {schedule!r}: use 'constant', 'exponential' or 'snr'")


def loss_per_sample(pred: Tensor, target: Tensor, loss_type: LossType, huber_c: Tensor | None = None) -> Tensor:
    """Element loss averaged over all but the batch axis, in fp32: (B, ...) x (B, ...) -> (B,).

    l2: r^2; l1: |r|; huber: 2c (sqrt(r^2 + c^2) - c); smooth_l1: 2 (sqrt(r^2 + c^2) - c), with r = pred - target
    and c (B,) from ``huber_c_for`` (kohya's ``conditional_loss``)."""
    residual = pred.float() - target.float()
    if loss_type == "l2":
        element = residual**2
    elif loss_type == "l1":
        element = residual.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss type {loss_type!r} needs huber_c (B,)")
        c = huber_c.float().to(residual.device).view(-1, *([1] * (residual.ndim - 1)))
        element = 2 * (torch.sqrt(residual**2 + c**2) - c)
        if loss_type == "huber":
            element = c * element
    else:
        raise ValueError(f"unknown loss type {loss_type!r}: use 'l2', 'l1', 'huber' or 'smooth_l1'")
    return element.mean(dim=tuple(range(1, element.ndim)))


def compute_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL's ``add_time_ids`` (B, 6) fp32: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] from
    original_size (B, 2) = (h, w), crop_top_left (B, 2) = (top, left) and target_size (B, 2) = (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@dataclass(frozen=True)
class Noised:
    """Latents noised for one training step."""

    noise: Tensor  # (B, C, H, W): what the target is made of
    timesteps: Tensor  # (B,) long, on the latents' device
    noisy_latents: Tensor  # (B, C, H, W): the UNet's input


def noise_latents(latents: Tensor, cfg: NoiseConfig, alphas_cumprod: Tensor, generator: torch.Generator) -> Noised:
    """Noise ``latents`` (B, C, H, W) for a training step as ``cfg`` says, drawing from ``generator`` in this
    order: the noise (with its offset), the timesteps, the input perturbation."""
    noise = make_noise(latents, cfg.noise_offset, random_strength=cfg.noise_offset_random_strength, generator=generator)
    timesteps = sample_timesteps(len(latents), cfg.min_timestep, cfg.max_timestep, generator=generator)
    timesteps = timesteps.to(latents.device)
    input_noise = perturb_noise(
        noise, cfg.ip_noise_gamma, random_strength=cfg.ip_noise_gamma_random_strength, generator=generator
    )
    return Noised(noise, timesteps, add_noise(latents, input_noise, timesteps, alphas_cumprod))


def weighted_loss(pred: Tensor, latents: Tensor, noised: Noised, alphas_cumprod: Tensor, cfg: LossConfig) -> Tensor:
    """The loss of a training step: the per-sample loss of ``pred`` (B, C, H, W) against its target, weighted by
    timestep as ``cfg`` says and averaged over the batch; a scalar fp32 tensor."""
    timesteps = noised.timesteps
    target = target_for(cfg.prediction, latents, noised.noise, timesteps, alphas_cumprod)
    huber_c = None
    if cfg.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_c_for(cfg.huber_schedule, cfg.huber_c, timesteps, alphas_cumprod, huber_scale=cfg.huber_scale)
    per_sample = loss_per_sample(pred, target, cfg.loss_type, huber_c)  # (B,)
    weights = snr_weights(
        snr(alphas_cumprod, timesteps),
        prediction=cfg.prediction,
        min_snr_gamma=cfg.min_snr_gamma,
        debiased=cfg.debiased_estimation,
    )
    return (per_sample * weights.to(per_sample.device)).mean()
