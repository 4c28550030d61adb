"""The finetune trainer end to end on the tiny model: outputs, learning, exact resume, interrupts, NaN policy."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_run import tiny_run_sections

from finetune.config import EmaConfig, FinetuneConfig
from finetune.data import collate
from finetune.model import load_model, setup_trainable, unreachable_parameters
from finetune.objective import (
    add_noise,
    compute_time_ids,
    huber_c_for,
    loss_per_sample,
    make_noise,
    perturb_noise,
    sample_timesteps,
    snr,
    snr_weights,
    target_for,
)
from finetune.outputs import Weights, save_sgm
from finetune.state import TrainerState, read_state, write_state
from finetune.text import encode_prompt
from finetune.trainer import Trainer
from xlbake.batch.base_of import base_of
from xlbake.config import config_hash, load_config, to_dict
from xlbake.errors import TrainingError
from xlbake.sdxl.keys import sgm_state_dict
from xlbake.sdxl.parts import PART_ATTRS

TE1_LAST = "conditioner.embedders.0.transformer.text_model.encoder.layers.2."
TE1_FIRST = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE2_KEY = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
UNET_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def make_config(tiny_paths, demo_dataset, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """A tiny, fast run: 32 px buckets, batch 2 x accumulation 2 (4 steps an epoch), stopped by max_steps in the
    second epoch, EMA on (copies at steps 1 and 3, averages at step 5), both weights saved."""
    base = tiny_run_sections(tiny_paths, demo_dataset, run_dir)
    data = {
        **base,
        "data": {**base["data"], "random_crop": True, "flip": True},
        "caption": {"shuffle": True, "dropout_rate": 0.2},
        "train": {"seed": 3, "epochs": 2, "max_steps": 5, "batch_size": 2, "grad_accum": 2},
        "optim": {"unet_lr": 1e-3, "te1_lr": 2e-4, "te2_lr": 2e-4},
        "noise": {"noise_offset": 0.05, "ip_noise_gamma": 0.1},
        "loss": {"min_snr_gamma": 5},
        "precision": {"mixed": "no"},
        "ema": {"enabled": True, "beta": 0.8, "update_after_step": 2, "update_every": 2},
        "checkpoint": {"every_epochs": 1, "weights": "both"},
        "log": {"progress": False, "tensorboard": False},
    }
    return load_config(FinetuneConfig, data=data, overrides=overrides)


def fixed_loss(trainer: Trainer, n: int = 6) -> float:
    """Mean loss of the first ``n`` samples with fixed noise and timesteps (the generator is left untouched)."""
    dataset = trainer.loader.dataset
    saved = trainer.generator.get_state()
    trainer.generator.manual_seed(1234)
    with torch.no_grad():
        value = sum(trainer.training_step(collate([dataset[(0, i)]])).item() for i in range(n)) / n
    trainer.generator.set_state(saved)
    return value


def record_raw_weights(steps: list[dict[str, dict[str, torch.Tensor]]]) -> Callable:
    """A ``Trainer._after_step`` that first appends the trained parts' raw state dicts to ``steps``."""
    original = Trainer._after_step

    def after_step(self, *args):
        steps.append(
            {n: {k: v.detach().clone() for k, v in self.model.part(n).state_dict().items()} for n in self.parts}
        )
        original(self, *args)

    return after_step


def expected_ema(steps: list[dict[str, torch.Tensor]], cfg: EmaConfig) -> dict[str, torch.Tensor]:
    """The EMA of a part after the recorded raw state dicts of each optimizer step, by the EMA's definition (as in
    ema-pytorch and diffusers' EMAModel): the first update and those of steps <= update_after_step + 1 copy the
    weights, later ones average ``beta * ema + (1 - beta) * raw`` on every update_every-th step (constant beta)."""
    assert not cfg.warmup
    ema: dict[str, torch.Tensor] = {}
    for done, raw in enumerate(steps):  # done: optimizer steps before this one
        floats = {k: v for k, v in raw.items() if v.is_floating_point()}
        if done == 0 or (done % cfg.update_every == 0 and done <= cfg.update_after_step):
            ema = dict(floats)
        elif done % cfg.update_every == 0:
            ema = {k: cfg.beta * ema[k] + (1 - cfg.beta) * v for k, v in floats.items()}
    return ema


@pytest.fixture(scope="module")
def full_run(tiny_paths, demo_dataset, tmp_path_factory):
    """The uninterrupted reference run, with the fixed-batch loss before and after training and the trained parts'
    raw weights after every optimizer step."""
    cfg = make_config(
        tiny_paths,
        demo_dataset,
        tmp_path_factory.mktemp("full"),
        "checkpoint.diffusers=true",
        "sample.prompts=[xlbk emblem]",
        "sample.steps=2",
        "sample.width=32",
        "sample.height=32",
        "log.tensorboard=true",
        "data.triggers=[xlbk]",
        "checkpoint.keep_fp32=true",
    )
    trainer = Trainer(cfg)
    trainer.setup()
    before = fixed_loss(trainer)
    raw_steps: list[dict[str, dict[str, torch.Tensor]]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_after_step", record_raw_weights(raw_steps))
        result = trainer.train()
    after = fixed_loss(trainer)
    trainer.cleanup()
    return cfg, result, before, after, raw_steps


def test_end_to_end_outputs(full_run, tiny_paths):
    cfg, result, *_ = full_run
    run = cfg.run_dir
    assert not result.interrupted and (result.epoch, result.global_step, len(result.losses)) == (1, 5, 5)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for name in (
        "tuned.safetensors",
        "tuned-raw.safetensors",
        "tuned.fp32.safetensors",
        "tuned-raw.fp32.safetensors",
        "base.txt",
        "loss.png",
        "samples/final-00.png",
        "tuned-diffusers/unet/diffusion_pytorch_model.safetensors",
        "checkpoints/epoch-0001.safetensors",
        "checkpoints/epoch-0001-raw.safetensors",
    ):
        assert (run / name).is_file(), name
    assert base_of(run) == tiny_paths.single_file.absolute()
    assert load_file(str(run / "tuned.safetensors"))[UNET_KEY].dtype == torch.float16


def test_outputs_carry_the_dataset_keys_and_checkpoints_an_fp32_copy(full_run):
    from xlbake.sdxl.checkpoint import open_checkpoint

    run = full_run[0].run_dir
    for name in ("tuned.fp32.safetensors", "checkpoints/epoch-0001.fp32.safetensors"):
        with open_checkpoint(run / name) as reader:
            meta = reader.metadata
            assert reader.dtype(UNET_KEY) == torch.float32, name
        assert json.loads(meta["ss_dataset_dirs"]) == {"2_xlbk emblem": {"n_repeats": 2, "img_count": 8}}, name
        frequency = json.loads(meta["ss_tag_frequency"])["2_xlbk emblem"]
        assert "xlbk emblem" in frequency and sum(frequency.values()) >= 8, name  # every caption has a tag
        assert meta["modelspec.trigger_phrase"] == "xlbk", name
    assert (run / "checkpoints/epoch-0001-raw.fp32.safetensors").is_file()
    assert load_file(str(run / "checkpoints/epoch-0001.safetensors"))[UNET_KEY].dtype == torch.float16


def test_loss_decreases_on_the_builtin_concept(full_run):
    _, result, before, after, _ = full_run
    assert after < 0.9 * before
    half = len(result.losses) // 2
    assert sum(result.losses[half:]) / (len(result.losses) - half) < sum(result.losses[:half]) / half


def test_checkpoint_loads_back_and_differs_from_base(full_run, tiny_paths):
    from xlbake.sdxl.checkpoint import open_checkpoint

    cfg, *_, raw_steps = full_run
    base = load_file(str(tiny_paths.single_file))
    with open_checkpoint(cfg.run_dir / "tuned.fp32.safetensors") as reader:
        tuned = {key: reader.get(key) for key in reader.keys()}  # noqa: SIM118
        assert reader.metadata["xlbake.weights"] == "ema" and "optim:" in reader.metadata["xlbake.config"]
        assert float(reader.metadata["xlbake.train_seconds"]) > 0  # the batch summary's "time" of the run
    raw = load_file(str(cfg.run_dir / "tuned-raw.fp32.safetensors"))
    assert tuned.keys() == base.keys() == raw.keys()
    for key in (UNET_KEY, TE1_FIRST, TE2_KEY):
        assert not torch.equal(tuned[key], base[key]), key
        assert not torch.equal(tuned[key], raw[key]), key  # EMA differs from the raw weights
    ema = {PART_ATTRS[n]: expected_ema([step[n] for step in raw_steps], cfg.ema) for n in ("unet", "te1", "te2")}
    expected = sgm_state_dict(**ema)
    assert len(raw_steps) == 5 and len(expected) > 500
    for key, value in expected.items():  # the saved EMA is the average of the recorded raw weights
        torch.testing.assert_close(tuned[key], value, rtol=1e-5, atol=1e-7, msg=key)
    frozen = [k for k in base if k.startswith(TE1_LAST) or ".final_layer_norm." in k and "embedders.0" in k]
    assert frozen and all(torch.equal(raw[k], base[k]) for k in frozen)  # no gradient path: untouched


def test_interrupt_then_resume_is_exact(full_run, tiny_paths, demo_dataset, tmp_path, monkeypatch):
    reference_cfg, reference, *_ = full_run
    cfg = make_config(tiny_paths, demo_dataset, tmp_path / "run")
    original = Trainer._after_step

    def after_step_then_sigterm(self, *args):
        original(self, *args)
        if self.state.global_step == 2:  # mid-epoch, with accumulation
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step_then_sigterm)
    first = Trainer(cfg)
    first.setup()
    stopped = first.train()
    first.cleanup()
    assert stopped.interrupted and stopped.global_step == 2 and stopped.state_dir.name == "step-00000002"
    assert not (cfg.run_dir / "tuned.safetensors").exists()
    monkeypatch.setattr(Trainer, "_after_step", original)
    second = Trainer(cfg, resume="auto")
    second.setup()
    assert (second.state.global_step, second.state.batches_in_epoch, len(second.sampler)) == (2, 4, 8)
    saved = json.loads((stopped.state_dir / "trainer_state.json").read_text())
    assert second.state.train_seconds == saved["train_seconds"] > 0  # training time adds up over resumes
    resumed = second.train()
    second.cleanup()
    assert resumed.losses == reference.losses
    for name in ("tuned.fp32.safetensors", "tuned-raw.fp32.safetensors"):
        ours, theirs = load_file(str(cfg.run_dir / name)), load_file(str(reference_cfg.run_dir / name))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_non_finite_step_loss_stops_with_the_step_and_a_hint(tmp_path):
    trainer = Trainer(load_config(FinetuneConfig, None, [f"run_dir={tmp_path}"]))
    trainer.state.global_step = 41
    assert trainer._step_is_finite(0.5)
    with pytest.raises(TrainingError, match=r"step 42 \(epoch 1\): loss is nan; stopped without saving.*fp16 overflow"):
        trainer._step_is_finite(float("nan"))


def test_non_finite_step_losses_are_skipped_up_to_max_nan_skips(tmp_path, monkeypatch):
    import logging

    monkeypatch.setattr("finetune.trainer.logger", logging.getLogger("finetune.trainer"))  # accelerate's needs setup
    overrides = [f"run_dir={tmp_path}", "train.on_nan=skip", "train.max_nan_skips=2"]
    trainer = Trainer(load_config(FinetuneConfig, None, overrides))
    assert [trainer._step_is_finite(v) for v in (float("nan"), float("inf"), 1.0, float("nan"))] == [
        False,
        False,
        True,
        False,
    ]
    assert trainer.state.nan_skips == 1  # a finite step resets the count
    trainer._step_is_finite(float("nan"))
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row had a non-finite loss"):
        trainer._step_is_finite(float("nan"))


def test_short_last_window_is_averaged_and_the_used_lr_is_logged(tiny_paths, demo_dataset, tmp_path, monkeypatch):
    """8 batches with grad_accum 3: windows of 3, 3 and 2 batches; batch j's loss is (j + 1) * sum(w), so the
    gradient of w at each step is the mean of (j + 1) over its window. Warmup over 4 steps: step 1 uses LR 0."""
    cfg = make_config(
        tiny_paths,
        demo_dataset,
        tmp_path,
        "train.grad_accum=3",
        "train.epochs=1",
        "train.max_steps=0",
        "optim.scheduler=constant_with_warmup",
        "optim.warmup_steps=4",
        "optim.max_grad_norm=0",
        "ema.enabled=false",
        "checkpoint.weights=raw",
        "checkpoint.every_epochs=0",
    )
    grads, batches = [], []
    original_step = Trainer._optimizer_step

    def weighted_sum(self, batch):
        batches.append(1)
        return len(batches) * self.params[0].sum()

    def record_gradient(self, *args):
        grads.append(self.params[0].grad.flatten()[0].item())
        return original_step(self, *args)

    monkeypatch.setattr(Trainer, "training_step", weighted_sum)
    monkeypatch.setattr(Trainer, "_optimizer_step", record_gradient)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert grads == pytest.approx([2.0, 5.0, 7.5])
    assert trainer.state.lrs == pytest.approx([0.0, 0.25 * cfg.optim.unet_lr, 0.5 * cfg.optim.unet_lr])


def test_non_finite_weights_are_never_saved(tmp_path):
    good = {"w": torch.ones(2)}
    weights = Weights(good, good, {"w": torch.tensor([1.0, float("inf")])}, good, "raw")
    with pytest.raises(TrainingError, match="text_encoder_2.w: weights are not finite, nothing saved"):
        save_sgm(weights, tmp_path / "tuned.safetensors", "fp16", {})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_loss_skipped_per_config(tiny_paths, demo_dataset, tmp_path, monkeypatch):
    cfg = make_config(
        tiny_paths,
        demo_dataset,
        tmp_path,
        "train.on_nan=skip",
        "train.max_steps=2",
        "ema.enabled=false",
        "checkpoint.weights=raw",
        "train.grad_accum=1",
    )
    original, calls = Trainer.training_step, []

    def nan_on_first_batch(self, batch):
        calls.append(1)
        loss = original(self, batch)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(Trainer, "training_step", nan_on_first_batch)
    trainer = Trainer(cfg)
    trainer.setup()
    base = {k: v.clone() for k, v in trainer.model.unet.state_dict().items()}
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert result.global_step == 2 and torch.isnan(torch.tensor(result.losses[0])) and result.losses[1] > 0
    tuned = load_file(str(tmp_path / "tuned.fp32.safetensors"))
    assert all(torch.isfinite(t).all() for t in tuned.values())
    assert any(not torch.equal(v, base[k]) for k, v in trainer.model.unet.state_dict().items())  # step 2 trained


def test_unreachable_parameters_get_no_gradient(tiny_paths):
    model = load_model(tiny_paths.single_file, str(tiny_paths.diffusers_dir))
    reference = load_model(tiny_paths.diffusers_dir, "")
    assert torch.equal(model.text_encoder_2.text_projection.weight, reference.text_encoder_2.text_projection.weight)
    cfg = load_config(FinetuneConfig, None, ["precision.mixed='no'"])
    setup_trainable(model, cfg.model, cfg.optim, cfg.precision)
    ids = torch.randint(0, 50, (2, 2, 77))
    embeds, pooled = encode_prompt(model.text_encoder, model.text_encoder_2, ids, ids)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    out = model.unet(
        torch.randn(2, 4, 8, 8),
        torch.tensor([10, 500]),
        embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    out.square().mean().backward()
    for part, module in (("te1", model.text_encoder), ("te2", model.text_encoder_2)):
        no_grad = sorted(n for n, p in module.named_parameters() if p.grad is None)
        assert no_grad == sorted(unreachable_parameters(model)[part]), part
        assert all(not module.get_parameter(n).requires_grad for n in no_grad)
    assert unreachable_parameters(model)["te1"] and not unreachable_parameters(model)["te2"]


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = load_config(FinetuneConfig, None, [f"run_dir={tmp_path}"])
    state = TrainerState(global_step=5, config_hash=config_hash(cfg), config=to_dict(cfg))
    folder = write_state(tmp_path / "state", state, lambda d: (d / "accelerate.txt").write_text("x"), {}, keep=2)
    changed = replace(cfg, run_dir=tmp_path / "moved", optim=replace(cfg.optim, unet_lr=2e-6))
    with pytest.raises(TrainingError, match=r"config differs .*\(optim.unet_lr\)"):
        read_state(folder, to_dict(changed), config_hash(changed))
    moved = replace(cfg, run_dir=tmp_path / "moved")
    assert read_state(folder, to_dict(moved), config_hash(moved))[0].global_step == 5
    for step in (6, 7):
        write_state(tmp_path / "state", replace(state, global_step=step), lambda d: None, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-00000006", "step-00000007"]


def test_cli_gates_the_run_folder(tmp_path):
    from finetune.cli import main

    preset = Path(__file__).resolve().parents[2] / "configs/finetune/tiny-cpu.yaml"
    dry = CliRunner().invoke(main, ["--config", str(preset), "--set", f"run_dir={tmp_path}", "--dry-run"])
    assert dry.exit_code == 0 and "builtin:tiny" in dry.output and f"run_dir: {tmp_path}" in dry.output
    (tmp_path / "old.txt").write_text("previous run")
    refused = CliRunner().invoke(main, ["--config", str(preset), "--set", f"run_dir={tmp_path}"])
    assert refused.exit_code == 1 and "--resume auto" in refused.output and "Traceback" not in refused.output


OBJECTIVE_OPTIONS = {
    "l1": ["loss.loss_type=l1"],
    "huber-snr": ["loss.loss_type=huber"],
    "huber-exponential": ["loss.loss_type=huber", "loss.huber_schedule=exponential", "loss.huber_scale=2"],
    "smooth_l1-constant": ["loss.loss_type=smooth_l1", "loss.huber_schedule=constant"],
    "v_prediction": ["loss.prediction=v_prediction"],
    "debiased-no-min-snr": ["loss.min_snr_gamma=null", "loss.debiased_estimation=true"],
    "random-strengths": ["noise.noise_offset_random_strength=true", "noise.ip_noise_gamma_random_strength=true"],
    "timestep-range": ["noise.min_timestep=100", "noise.max_timestep=200"],
}


@pytest.fixture(scope="module")
def step_trainer(tiny_paths, demo_dataset, tmp_path_factory):
    """One set-up trainer whose config each objective smoke test swaps (the last trainer of this module)."""
    trainer = Trainer(make_config(tiny_paths, demo_dataset, tmp_path_factory.mktemp("steps"), "checkpoint.weights=raw"))
    trainer.setup()
    yield trainer
    trainer.cleanup()


def hand_built_loss(trainer: Trainer, cfg: FinetuneConfig, batch: dict, seed: int) -> torch.Tensor:
    """The loss of ``batch`` under ``cfg`` built from finetune.objective alone, with the random draws of a
    generator seeded ``seed`` taken in the trainer's order, and the trainer's own (deterministic) denoiser."""
    model, gen = trainer.model, torch.Generator().manual_seed(seed)
    alphas_cumprod = model.noise_scheduler.alphas_cumprod
    noise_cfg, loss_cfg = cfg.noise, cfg.loss
    with torch.no_grad():
        posterior = model.vae.encode(batch["pixel_values"]).latent_dist
        latents = posterior.sample(generator=gen) * model.vae.config.scaling_factor
        noise = make_noise(
            latents, noise_cfg.noise_offset, random_strength=noise_cfg.noise_offset_random_strength, generator=gen
        )
        timesteps = sample_timesteps(len(latents), noise_cfg.min_timestep, noise_cfg.max_timestep, generator=gen)
        strength = noise_cfg.ip_noise_gamma_random_strength
        input_noise = perturb_noise(noise, noise_cfg.ip_noise_gamma, random_strength=strength, generator=gen)
        noisy_latents = add_noise(latents, input_noise, timesteps, alphas_cumprod)
        time_ids = compute_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        pred = trainer.denoiser(noisy_latents, timesteps, batch["input_ids_1"], batch["input_ids_2"], time_ids)
    target = target_for(loss_cfg.prediction, latents, noise, timesteps, alphas_cumprod)
    huber_c = huber_c_for(
        loss_cfg.huber_schedule, loss_cfg.huber_c, timesteps, alphas_cumprod, huber_scale=loss_cfg.huber_scale
    )
    per_sample = loss_per_sample(pred, target, loss_cfg.loss_type, huber_c)
    weights = snr_weights(
        snr(alphas_cumprod, timesteps),
        prediction=loss_cfg.prediction,
        min_snr_gamma=loss_cfg.min_snr_gamma,
        debiased=loss_cfg.debiased_estimation,
    )
    return (per_sample * weights).mean()


def seeded_step(trainer: Trainer, cfg: FinetuneConfig, batch: dict, seed: int) -> torch.Tensor:
    """``trainer.training_step(batch)`` under ``cfg`` with its generator seeded ``seed``."""
    saved_cfg, trainer.cfg = trainer.cfg, cfg
    trainer.generator.manual_seed(seed)
    try:
        return trainer.training_step(batch)
    finally:
        trainer.cfg = saved_cfg


@pytest.mark.parametrize("name", list(OBJECTIVE_OPTIONS))
def test_objective_options_train(name, step_trainer, tiny_paths, demo_dataset):
    """Each option changes the loss exactly as finetune.objective defines it (a trainer ignoring it would give
    the default config's loss), and gradients reach the trained parts."""
    seed, run_dir = 99, step_trainer.cfg.run_dir
    cfg = make_config(tiny_paths, demo_dataset, run_dir, *OBJECTIVE_OPTIONS[name])
    batch = collate([step_trainer.loader.dataset[(0, 0)]])
    step_trainer.optimizer.zero_grad()
    loss = seeded_step(step_trainer, cfg, batch, seed)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in step_trainer.params[:20])
    torch.testing.assert_close(loss.detach(), hand_built_loss(step_trainer, cfg, batch, seed), rtol=1e-5, atol=0)
    with torch.no_grad():
        default = seeded_step(step_trainer, make_config(tiny_paths, demo_dataset, run_dir), batch, seed)
    # beyond the hand-built comparison's tolerance (random strengths change the tiny model's loss by ~1e-3 of it)
    assert abs(loss.item() - default.item()) > 1e-4 * default.item(), "the option did not change the loss"


MODEL_OPTIONS = {
    "gradient-checkpointing": ["model.gradient_checkpointing=true"],
    "eager-attention": ["model.attention=eager"],
    "full-bf16": ["precision.mixed=bf16", "precision.full_bf16=true"],
    "fp16-fixed-vae": ["precision.vae=fp16"],
    "frozen-te1": ["optim.te1_lr=0"],
}


def assert_module_options(model, trained: list[str], model_cfg) -> None:
    """The trained parts are in the configured state: every block that can checkpoint does so exactly when
    gradient checkpointing is on, and every part (frozen ones too) uses the configured attention kernel."""
    for name in trained:
        flags = {m.gradient_checkpointing for m in model.part(name).modules() if hasattr(m, "gradient_checkpointing")}
        assert flags == {model_cfg.gradient_checkpointing}, name
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0" if model_cfg.attention == "sdpa" else "AttnProcessor"}
    for encoder in (model.text_encoder, model.text_encoder_2):
        assert encoder.config._attn_implementation == model_cfg.attention


@pytest.mark.parametrize("name", list(MODEL_OPTIONS))
def test_model_options_train(name, tiny_paths):
    overrides = [*MODEL_OPTIONS[name], f"model.vae={tiny_paths.diffusers_dir / 'vae'}"]
    cfg = load_config(FinetuneConfig, None, ["precision.mixed='no'", *overrides])
    model = load_model(tiny_paths.single_file, str(tiny_paths.diffusers_dir), cfg.model.vae)
    groups = setup_trainable(model, cfg.model, cfg.optim, cfg.precision)
    assert [g.name for g in groups] == [p for p, lr in (("unet", 1), ("te1", cfg.optim.te1_lr), ("te2", 1)) if lr]
    expected = torch.bfloat16 if cfg.precision.full_bf16 else torch.float32
    assert all(p.dtype == expected for g in groups for p in g.params)
    assert model.vae.dtype == (torch.float16 if cfg.precision.vae == "fp16" else torch.float32)
    assert_module_options(model, [g.name for g in groups], cfg.model)
    ids = torch.randint(0, 50, (1, 1, 77))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.mixed == "bf16"):
        embeds, pooled = encode_prompt(model.text_encoder, model.text_encoder_2, ids, ids)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        out = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), embeds, added_cond_kwargs=added).sample
    out.float().square().mean().backward()
    assert all(p.grad is not None for g in groups for p in g.params if g.name != "te1")
    assert all(p.grad is None for p in model.text_encoder.parameters()) == (cfg.optim.te1_lr == 0)


def test_an_ema_that_cannot_move_is_warned_about_at_the_start(tiny_paths, demo_dataset, tmp_path, caplog):
    cfg = make_config(tiny_paths, demo_dataset, tmp_path / "run", "ema.beta=0.9995")
    trainer = Trainer(cfg)
    try:
        with caplog.at_level("WARNING", logger="finetune.emas"):
            trainer.setup()
    finally:
        trainer.cleanup()
    warnings = [r.getMessage() for r in caplog.records if "ema.beta" in r.getMessage()]
    assert len(warnings) == 1 and "but the run has 5:" in warnings[0] and "100%" in warnings[0]
