"""The objective's pure functions against hand-computed values and diffusers' own scheduler math."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from finetune.objective import (
    LossConfig,
    NoiseConfig,
    add_noise,
    compute_time_ids,
    debiased_weights,
    huber_c_for,
    loss_per_sample,
    make_noise,
    min_snr_weights,
    noise_latents,
    perturb_noise,
    sample_timesteps,
    snr,
    snr_weights,
    target_for,
    weighted_loss,
)
from xlbake.errors import ConfigError


def sdxl_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_min_snr_weights_on_known_snrs():
    s = torch.tensor([1.0, 5.0, 25.0])
    assert torch.allclose(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.2]))
    assert torch.allclose(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5, 5 / 6, 5 / 26]))


def test_debiased_weights_cap_the_snr_at_1000():
    assert torch.allclose(debiased_weights(torch.tensor([4.0, 2000.0])), torch.tensor([0.5, 1 / math.sqrt(1000)]))


def test_snr_weights_multiply_the_enabled_weightings():
    s = torch.tensor([25.0, 1.0])
    assert torch.equal(snr_weights(s, prediction="epsilon", min_snr_gamma=None, debiased=False), torch.ones(2))
    both = snr_weights(s, prediction="epsilon", min_snr_gamma=5.0, debiased=True)
    assert torch.allclose(both, torch.tensor([0.2 * 0.2, 1.0 * 1.0]))


def test_snr_is_abar_over_one_minus_abar():
    alphas_cumprod = torch.tensor([0.5, 0.8, 0.2])
    assert torch.allclose(snr(alphas_cumprod, torch.tensor([0, 1, 2])), torch.tensor([1.0, 4.0, 0.25]))


def test_v_target_formula():
    alphas_cumprod = torch.tensor([0.36, 0.64])
    latents, noise = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 2.0)
    v = target_for("v_prediction", latents, noise, torch.tensor([1]), alphas_cumprod)
    assert torch.allclose(v, torch.full((1, 1, 2, 2), 0.8 * 2.0 - 0.6 * 1.0))
    assert target_for("epsilon", latents, noise, torch.tensor([1]), alphas_cumprod) is noise
    with pytest.raises(ValueError, match="prediction"):
        target_for("sample", latents, noise, torch.tensor([1]), alphas_cumprod)


def test_add_noise_v_target_and_snr_are_diffusers_on_random_inputs():
    """Bit for bit diffusers' DDPMScheduler.add_noise / get_velocity and training_utils.compute_snr, and (up to fp32
    rounding of the SNR) the formulas written out."""
    scheduler = sdxl_scheduler()
    abar_all = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(64, 4, 8, 8, generator=gen), torch.randn(64, 4, 8, 8, generator=gen)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (62,), generator=gen)])
    abar = abar_all[t].view(-1, 1, 1, 1)
    noisy = add_noise(latents, noise, t, abar_all)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise, t))
    assert torch.equal(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    v = target_for("v_prediction", latents, noise, t, abar_all)
    assert torch.equal(v, scheduler.get_velocity(latents, noise, t))
    assert torch.equal(v, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
    every_t = torch.arange(1000)
    assert torch.equal(snr(abar_all, every_t), compute_snr(scheduler, every_t))
    assert torch.allclose(snr(abar_all, every_t), abar_all / (1 - abar_all), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_noise_and_v_target_compute_in_fp32_for_16bit_latents(dtype):
    """In 16 bits abar_0 = 0.99915 rounds to 1 (diffusers computes in the sample's dtype), so t = 0 would add no
    noise at all; ours computes in fp32 and rounds only the result."""
    scheduler = sdxl_scheduler()
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    latents, noise, t, abar = latents.to(dtype), noise.to(dtype), torch.tensor([0, 1]), scheduler.alphas_cumprod
    noisy = add_noise(latents, noise, t, abar)
    assert noisy.dtype == dtype
    assert not torch.equal(noisy, latents)
    assert torch.equal(noisy, add_noise(latents.float(), noise.float(), t, abar).to(dtype))
    v = target_for("v_prediction", latents, noise, t, abar)
    assert v.dtype == dtype
    assert torch.equal(v, target_for("v_prediction", latents.float(), noise.float(), t, abar).to(dtype))


def test_huber_loss_is_quadratic_for_small_and_linear_for_large_residuals():
    c = torch.tensor([0.1])
    target = torch.zeros(1, 1, 1, 1)
    small = loss_per_sample(torch.full((1, 1, 1, 1), 0.01), target, "huber", c)
    large = loss_per_sample(torch.full((1, 1, 1, 1), 10.0), target, "huber", c)
    assert small.item() == pytest.approx(2 * 0.1 * (math.sqrt(0.01**2 + 0.1**2) - 0.1), rel=1e-5)
    assert small.item() == pytest.approx(0.01**2, rel=1e-2)  # ~ r^2
    assert large.item() == pytest.approx(0.2 * (math.sqrt(100.01) - 0.1), rel=1e-5)
    assert large.item() == pytest.approx(2 * 0.1 * 10 - 2 * 0.1**2, rel=1e-3)  # ~ 2c|r| - 2c^2
    smooth = loss_per_sample(torch.full((1, 1, 1, 1), 10.0), target, "smooth_l1", c)
    assert smooth.item() == pytest.approx(2 * (math.sqrt(100.01) - 0.1), rel=1e-5)
    with pytest.raises(ValueError, match="huber_c"):
        loss_per_sample(target, target, "huber")


def test_l1_and_l2_average_per_sample():
    pred = torch.tensor([[[[1.0, -3.0]]], [[[2.0, 2.0]]]])  # (2, 1, 1, 2)
    target = torch.zeros_like(pred)
    assert torch.allclose(loss_per_sample(pred, target, "l2"), torch.tensor([5.0, 4.0]))
    assert torch.allclose(loss_per_sample(pred, target, "l1"), torch.tensor([2.0, 2.0]))


def test_per_sample_huber_c_broadcasts_over_the_batch():
    pred = torch.full((2, 1, 2, 2), 1.0)
    loss = loss_per_sample(pred, torch.zeros_like(pred), "huber", torch.tensor([0.1, 1.0]))
    expected = [2 * c * (math.sqrt(1 + c * c) - c) for c in (0.1, 1.0)]
    assert torch.allclose(loss, torch.tensor(expected))


def test_huber_c_schedules():
    alphas_cumprod = torch.full((1000,), 0.5)
    t = torch.tensor([0, 500])
    assert torch.allclose(huber_c_for("constant", 0.1, t, alphas_cumprod, huber_scale=2.0), torch.tensor([0.2, 0.2]))
    exponential = huber_c_for("exponential", 0.1, t, alphas_cumprod, huber_scale=2.0)
    assert torch.allclose(exponential, torch.tensor([2.0, 2.0 * math.sqrt(0.1)]))  # scale * c^(t/T)
    # abar 0.5 -> sigma 1 -> (1 - c) / 4 + c; kohya applies no scale here
    assert torch.allclose(huber_c_for("snr", 0.1, t, alphas_cumprod, huber_scale=2.0), torch.tensor([0.325, 0.325]))


def test_time_ids_order_is_original_crop_target():
    ids = compute_time_ids(torch.tensor([[768, 1024]]), torch.tensor([[10, 20]]), torch.tensor([[704, 1088]]))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[768.0, 1024.0, 10.0, 20.0, 704.0, 1088.0]]


def test_timesteps_are_in_range_and_reproducible():
    t = sample_timesteps(4096, 100, 200, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and t.min() >= 100 and t.max() < 200 and t.unique().numel() == 100
    again = sample_timesteps(4096, 100, 200, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again)


def test_noise_offset_adds_a_constant_per_image_and_channel():
    latents = torch.zeros(2, 4, 16, 16)
    plain = make_noise(latents, 0.0, generator=torch.Generator().manual_seed(3))
    offset = make_noise(latents, 0.5, generator=torch.Generator().manual_seed(3))
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert shift[:, :, 0, 0].abs().max() > 0.01
    randomized = make_noise(latents, 0.5, random_strength=True, generator=torch.Generator().manual_seed(3))
    shift_r = randomized - plain
    assert torch.allclose(shift_r, shift_r[:, :, :1, :1].expand_as(shift_r), atol=1e-6)
    assert not torch.allclose(shift_r, shift)


def test_input_perturbation_adds_gamma_scaled_noise():
    noise = torch.zeros(4, 4, 64, 64)
    assert perturb_noise(noise, 0.0) is noise
    perturbed = perturb_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    assert perturbed.std().item() == pytest.approx(0.1, rel=0.05)


def test_config_checks():
    with pytest.raises(ConfigError, match="min_timestep"):
        NoiseConfig(min_timestep=500, max_timestep=500)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        LossConfig(min_snr_gamma=0)
    with pytest.raises(ConfigError, match="huber_c"):
        LossConfig(loss_type="huber", huber_c=2.0, huber_schedule="snr")
    assert LossConfig(loss_type="huber", huber_c=2.0, huber_schedule="constant").huber_c == 2.0


def test_a_training_step_composes_the_parts_in_a_fixed_draw_order():
    """noise_latents draws the noise, the timesteps and the input perturbation, in that order (a resumed run
    depends on it); weighted_loss weighs each sample's loss against its target by its timestep."""
    abar = sdxl_scheduler().alphas_cumprod
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise_cfg = NoiseConfig(noise_offset=0.1, ip_noise_gamma=0.1, min_timestep=10, max_timestep=900)
    noised = noise_latents(latents, noise_cfg, abar, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = make_noise(latents, 0.1, generator=gen)
    timesteps = sample_timesteps(3, 10, 900, generator=gen)
    noisy = add_noise(latents, perturb_noise(noise, 0.1, generator=gen), timesteps, abar)
    assert torch.equal(noised.noise, noise) and torch.equal(noised.timesteps, timesteps)
    assert torch.equal(noised.noisy_latents, noisy)

    loss_cfg = LossConfig(prediction="v_prediction", loss_type="huber", min_snr_gamma=5.0)
    pred = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    target = target_for("v_prediction", latents, noise, timesteps, abar)
    per_sample = loss_per_sample(pred, target, "huber", huber_c_for("snr", 0.1, timesteps, abar))
    weights = snr_weights(snr(abar, timesteps), prediction="v_prediction", min_snr_gamma=5.0, debiased=False)
    assert torch.allclose(weighted_loss(pred, latents, noised, abar, loss_cfg), (per_sample * weights).mean())
