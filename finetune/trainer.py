"""The finetune recipe: one small class, read top to bottom (torchtune recipe shape, nanoGPT loop, accelerate).

trainer = Trainer(cfg, resume="auto")
trainer.setup()
result = trainer.train()
trainer.cleanup()
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import outputs
from finetune.config import FinetuneConfig
from finetune.data import BucketBatchSampler, CheckedData, build_dataset, collate, steps_per_epoch, window_size
from finetune.distributed import (
    ZERO3,
    Denoiser,
    RankTrace,
    fixed_tensors,
    rank_seed,
    setup_zero,
    start_processes,
    trained_state_dicts,
    whole_parameters,
)
from finetune.ema_reach import ema_warning
from finetune.latent_cache import CACHE_DIR, build_latent_cache
from finetune.model import (
    PART_ATTRS,
    SdxlModel,
    frozen_base_weights,
    load_model,
    make_ema,
    resolve_inputs,
    setup_trainable,
)
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
from finetune.optim import build_optimizer, build_scheduler, current_lrs, follow_schedule
from finetune.progress import DataTimer, tracker_config
from finetune.signals import stop_on_signals
from finetune.state import TrainerState, decode_generator, encode_generator, find_resume, read_state, write_state
from xlbake.batch import run_folder
from xlbake.config import config_hash, dump_yaml, to_dict
from xlbake.data.meta import dataset_metadata
from xlbake.errors import ConfigError, TrainingError

logger = get_logger(__name__)

NAN_HINT = "fp16 overflow (try precision.mixed: bf16) or a too-high learning rate"


@dataclass(frozen=True)
class TrainResult:
    """What a call to ``Trainer.train`` did."""

    global_step: int
    epoch: int
    interrupted: bool
    state_dir: Path | None  # newest saved training state
    outputs: tuple[Path, ...]  # model files written by the final save
    losses: tuple[float, ...]  # mean loss of every optimizer step of the run (resumed runs included)


class Trainer:
    """Full SDXL finetune of the UNet and text encoders, with optional EMA, resumable exactly."""

    def __init__(self, cfg: FinetuneConfig, resume: str | None = None, checked: CheckedData | None = None) -> None:
        """``checked``: the dataset as ``check_dataset`` found it before the run started (else checked in setup)."""
        self.cfg, self.resume, self.run_dir, self.checked = cfg, resume, Path(cfg.run_dir), checked
        self.state = TrainerState(config_hash=config_hash(cfg), config=to_dict(cfg))
        self.state_dir: Path | None = None
        self.outputs: list[Path] = []
        self.clock_start: float | None = None  # time.monotonic() at which this run's training time would be 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load the model and data, build optimizer/scheduler/EMA, prepare with accelerate, restore a state."""
        cfg = self.cfg
        start_processes()  # join a launch's processes as accelerate alone would not (DeepSpeed on CPU)
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.train.grad_accum,
            mixed_precision=cfg.precision.mixed,
            log_with=[t for t, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on] or None,
            project_dir=str(self.run_dir / run_folder.LOGS),
            dynamo_backend="inductor" if cfg.model.compile else "no",
        )
        self.zero = setup_zero(acc, cfg)  # DeepSpeed's settings (checked against cfg), None without DeepSpeed
        if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "log.wandb: the wandb package is not installed; pip install wandb, or set log.wandb false"
            )
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
        set_seed(cfg.train.seed)
        with acc.main_process_first():
            builtin = self.run_dir / run_folder.BUILTIN
            inputs = resolve_inputs(cfg.model.base, cfg.model.components, cfg.data.roots, builtin)
        self.model: SdxlModel = load_model(inputs.base, inputs.components, cfg.model.vae, cfg.loss.prediction)
        self.base_weights = frozen_base_weights(self.model, cfg.optim)  # saved as loaded, not as they run
        groups = setup_trainable(self.model, cfg.model, cfg.optim, cfg.precision)
        self.parts = [g.name for g in groups]
        self.params = [p for g in groups for p in g.params]
        tokenizers = (self.model.tokenizer, self.model.tokenizer_2)
        data_cfg = replace(cfg.data, roots=inputs.roots)
        dataset = build_dataset(
            data_cfg, cfg.caption, tokenizers, seed=cfg.train.seed, logger=logger, checked=self.checked
        )
        folders = ((s.image.parent.name, s.repeats, s.caption) for s in dataset.samples)
        self.dataset_meta = dataset_metadata(folders, cfg.data.triggers)  # kohya's keys, copied into every LoRA
        if cfg.data.cache_latents:
            progress = cfg.log.progress and acc.is_local_main_process
            cache = build_latent_cache(dataset, self.model.vae, self.run_dir / CACHE_DIR, acc, progress=progress)
            dataset.latent_source = cache
        self.sampler = BucketBatchSampler(
            dataset, cfg.train.batch_size, cfg.train.seed, acc.num_processes, acc.process_index
        )
        self.steps_per_epoch = steps_per_epoch(self.sampler.total_batches, cfg.train.grad_accum, acc.num_processes)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        if cfg.ema.enabled and (warning := ema_warning(cfg.ema, self.total_steps)):
            logger.warning(warning, main_process_only=True)
        ema_device = torch.device("cpu") if cfg.ema.device == "cpu" else acc.device
        self.emas = (
            {n: make_ema(self.model.part(n), cfg.ema, ema_device) for n in self.parts} if cfg.ema.enabled else {}
        )
        if cfg.ema.enabled and "ema" not in outputs.output_kinds(cfg.checkpoint.weights, ema=True):
            logger.warning(
                "ema.enabled with checkpoint.weights: raw: the EMA costs memory and time but no output or sample "
                "holds it; set checkpoint.weights: auto (EMA in tuned*, raw beside) or ema, or ema.enabled: false"
            )
        optimizer = build_optimizer(groups, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, acc.num_processes)
        self._prepare(optimizer, scheduler)
        loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=cfg.train.num_workers)
        # The sampler already splits batches between processes: accelerate must not shard them again.
        self.loader = prepare_data_loader(loader, acc.device, num_processes=1, process_index=0, put_on_device=True)
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.train.seed, acc.process_index))
        self.trace = RankTrace.from_env(acc.process_index)  # XLBAKE_TRACE_DIR: tests of multi-process runs
        if self.resume:
            self._restore(self.resume)
        if cfg.log.tensorboard or cfg.log.wandb:
            acc.init_trackers("finetune", config=tracker_config(to_dict(cfg)))
        self.inputs = inputs
        logger.info(
            "training %s for %d optimizer steps (%d per epoch, %d epochs), from step %d",
            "+".join(self.parts),
            self.total_steps,
            self.steps_per_epoch,
            cfg.train.epochs,
            self.state.global_step,
        )

    def _prepare(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """accelerate.prepare the trained parts: each on its own (DDP), or as one Denoiser under DeepSpeed."""
        acc, parts = self.accelerator, {name: self.model.part(name) for name in PART_ATTRS}
        self.fixed = {name: fixed_tensors(parts[name]) for name in self.parts} if self.zero else None
        if self.zero:
            engine, self.optimizer, self.lr_scheduler = acc.prepare(Denoiser(parts, self.parts), optimizer, scheduler)
            self.prepared, self.denoiser = [engine], engine
        else:
            *self.prepared, self.optimizer, self.lr_scheduler = acc.prepare(
                *[parts[n] for n in self.parts], optimizer, scheduler
            )
            self.denoiser = Denoiser(parts | dict(zip(self.parts, self.prepared, strict=True)), trained=())
        if not self.cfg.data.cache_latents or self.cfg.sample.prompts:  # cached latents: the VAE only decodes samples
            self.model.vae.to(acc.device)
        for module in [parts[name] for name in PART_ATTRS if name not in self.parts]:
            module.to(acc.device)

    def _restore(self, resume: str) -> None:
        folder, acc = find_resume(self.run_dir / run_folder.STATE, resume), self.accelerator
        if folder is None:
            logger.info("no training state in %s: starting from the beginning", self.run_dir / run_folder.STATE)
            return
        saved, ema_tensors = read_state(folder, self.state.config, self.state.config_hash)
        acc.load_state(str(folder))
        self.sampler.load_state_dict(saved.sampler)  # refuses a changed dataset, seed, batch size or process count
        decode_generator(self.generator, saved.generators[acc.process_index] if saved.generators else saved.generator)
        for name, ema in self.emas.items():
            ema.load_state_dict({k.split(".", 1)[1]: v for k, v in ema_tensors.items() if k.startswith(name + ".")})
        limits = ("max_steps", "epochs")
        if any(saved.config.get("train", {}).get(k) != self.state.config["train"][k] for k in limits):
            follow_schedule(self.lr_scheduler.scheduler)  # raised to train further: the new schedule's LR
            logger.info("the LR schedule now spans %d optimizer steps", self.total_steps)
        self.state = replace(saved, config_hash=self.state.config_hash, config=self.state.config)
        self.state_dir = folder
        logger.info("resumed from %s: step %d, epoch %d", folder, saved.global_step, saved.epoch + 1)

    # ------------------------------------------------------------------ training

    def train(self) -> TrainResult:
        """Run until the configured epochs/steps are done or SIGINT/SIGTERM; then save (final outputs or state)."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        bar = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            unit="step",
            disable=not (cfg.log.progress and acc.is_local_main_process),
        )
        self.clock_start = time.monotonic() - state.train_seconds
        with stop_on_signals() as stop:
            while not self._finished():
                self.loader.set_epoch(state.epoch)
                self.sampler.load_state_dict(self._sampler_state())  # continue mid-epoch after a resume
                window: list[torch.Tensor] = []  # losses of this accumulation window's batches
                timer = DataTimer()
                for batch in timer.wrap(self.loader):
                    if self.trace:
                        self.trace.batch(state.epoch, state.global_step, batch["path"])
                    with acc.accumulate(*self.prepared):
                        loss = self.training_step(batch)
                        # A non-finite loss is back-propagated too: every process runs the same collectives, and the
                        # step is skipped on all of them (by the shared step loss below, or by DeepSpeed's own check)
                        acc.backward(loss * cfg.train.grad_accum / self._window_size())
                        window.append(loss.detach())
                        if acc.sync_gradients:
                            lrs = current_lrs(self.optimizer)  # the LR this step uses (the scheduler steps next)
                            step_loss = acc.reduce(torch.stack(window).mean(), "mean").item()  # the step's one sync
                            self._optimizer_step(self._step_is_finite(step_loss))
                    state.batches_in_epoch += 1
                    if not acc.sync_gradients:
                        continue
                    state.global_step += 1
                    window = []
                    self._after_step(step_loss, lrs, bar, timer)
                    if stop or (self._finished() and state.batches_in_epoch < len(self.sampler)):
                        break  # signal, or train.max_steps reached mid-epoch
                else:
                    self._end_epoch()
                if stop:
                    bar.close()
                    return self._interrupted()
        bar.close()
        self.save("final")
        if self.trace:
            self.trace.weights(trained_state_dicts(self.model, self.parts, self.fixed, keep=True))
        if cfg.sample.prompts:
            self.sample("final")
        return self._result(interrupted=False)

    def _interrupted(self) -> TrainResult:
        """After SIGINT/SIGTERM: save the state (and loss curve) so that --resume continues exactly."""
        self.save_state()
        if self.cfg.log.loss_plot and self.accelerator.is_main_process:
            outputs.write_loss_plot(self.state.losses, self.state.lrs, self.run_dir / run_folder.LOSS_PNG)
        logger.warning("stopped at step %d; resume with --resume auto", self.state.global_step)
        return self._result(interrupted=True)

    def training_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean weighted diffusion loss of one batch: a scalar fp32 tensor (with a graph to the trained parts)."""
        cfg, model, gen, acc = self.cfg, self.model, self.generator, self.accelerator
        if "latent_dist" in batch:  # data.cache_latents: the VAE posterior (B, 8, h, w), sampled as below
            posterior = DiagonalGaussianDistribution(batch["latent_dist"].to(acc.device))
        else:
            pixels = batch["pixel_values"].to(acc.device, model.vae.dtype)  # (B, 3, H, W) in [-1, 1]
            with torch.no_grad(), torch.autocast(acc.device.type, enabled=False):  # the SDXL VAE overflows in fp16
                posterior = model.vae.encode(pixels).latent_dist
        latents = (posterior.sample(generator=gen) * model.vae.config.scaling_factor).float()  # (B, 4, H/8, W/8)
        alphas_cumprod = model.noise_scheduler.alphas_cumprod
        noise = make_noise(
            latents, cfg.noise.noise_offset, random_strength=cfg.noise.noise_offset_random_strength, generator=gen
        )
        timesteps = sample_timesteps(len(latents), cfg.noise.min_timestep, cfg.noise.max_timestep, generator=gen)
        timesteps = timesteps.to(acc.device)
        input_noise = perturb_noise(
            noise, cfg.noise.ip_noise_gamma, random_strength=cfg.noise.ip_noise_gamma_random_strength, generator=gen
        )
        noisy_latents = add_noise(latents, input_noise, timesteps, alphas_cumprod)
        time_ids = compute_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        with acc.autocast():
            pred = self.denoiser(
                noisy_latents, timesteps, batch["input_ids_1"], batch["input_ids_2"], time_ids.to(acc.device)
            )
        target = target_for(cfg.loss.prediction, latents, noise, timesteps, alphas_cumprod)
        huber_c = None
        if cfg.loss.loss_type in ("huber", "smooth_l1"):
            huber_c = huber_c_for(
                cfg.loss.huber_schedule, cfg.loss.huber_c, timesteps, alphas_cumprod, huber_scale=cfg.loss.huber_scale
            )
        per_sample = loss_per_sample(pred, target, cfg.loss.loss_type, huber_c)  # (B,)
        weights = snr_weights(
            snr(alphas_cumprod, timesteps),
            prediction=cfg.loss.prediction,
            min_snr_gamma=cfg.loss.min_snr_gamma,
            debiased=cfg.loss.debiased_estimation,
        )
        return (per_sample * weights.to(per_sample.device)).mean()

    def _window_size(self) -> int:
        """Batches in the current accumulation window: accelerate divides each loss by grad_accum, a shorter last
        window of the epoch is scaled back to the mean of its own batches."""
        return window_size(self.state.batches_in_epoch, len(self.sampler), self.cfg.train.grad_accum)

    def _step_is_finite(self, loss: float) -> bool:
        """True for a finite step loss; a non-finite one stops training (on_nan: stop) or skips the step (on_nan:
        skip, up to max_nan_skips in a row). ``loss`` is the mean over the window and all processes, so that every
        process decides the same."""
        if math.isfinite(loss):
            self.state.nan_skips = 0
            return True
        where = f"step {self.state.global_step + 1} (epoch {self.state.epoch + 1})"
        if self.cfg.train.on_nan == "stop":
            raise TrainingError(
                f"{where}: loss is {loss}; stopped without saving, {NAN_HINT}; "
                f"the last saved state is in {self.run_dir / run_folder.STATE}"
            )
        self.state.nan_skips += 1
        if self.state.nan_skips > self.cfg.train.max_nan_skips:
            raise TrainingError(
                f"{where}: {self.state.nan_skips} optimizer steps in a row had a non-finite loss; stopped, {NAN_HINT}"
            )
        logger.warning("%s: loss is %s, skipping this optimizer step (%s)", where, loss, NAN_HINT)
        return False

    def _optimizer_step(self, finite: bool) -> None:
        """Clip, step and zero the gradients; a non-finite step drops the window's gradients instead (the LR waits)."""
        if finite:
            if self.cfg.optim.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _after_step(self, loss_value: float, lrs: dict[str, float], bar: tqdm, timer: DataTimer) -> None:
        """EMA update, records, logs and step-based saves after each optimizer step (its loss and LRs)."""
        cfg, state = self.cfg, self.state
        for ema in self.emas.values():
            ema.update()
        state.losses.append(loss_value)
        state.lrs.append(next(iter(lrs.values())))
        if state.global_step % cfg.log.every_steps == 0:
            self.accelerator.log({"loss": loss_value, **{f"lr/{k}": v for k, v in lrs.items()}}, step=state.global_step)
        bar.update(1)
        bar.set_postfix(
            epoch=state.epoch + 1, loss=f"{loss_value:.4f}", lr=f"{state.lrs[-1]:.2e}", data=f"{timer.share():.0%}"
        )
        if cfg.checkpoint.every_steps and state.global_step % cfg.checkpoint.every_steps == 0 and not self._finished():
            self.save(run_folder.step_tag(state.global_step))
        elif cfg.checkpoint.state_every_steps and state.global_step % cfg.checkpoint.state_every_steps == 0:
            self.save_state()

    def _end_epoch(self) -> None:
        """Advance the epoch; save and sample on the configured epochs (the last one is saved by the final save)."""
        cfg, state = self.cfg, self.state
        state.epoch += 1
        state.batches_in_epoch = 0
        last = self._finished()
        if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0 and not last:
            self.save(run_folder.epoch_tag(state.epoch))
        if cfg.sample.prompts and cfg.sample.every_epochs and state.epoch % cfg.sample.every_epochs == 0 and not last:
            self.sample(run_folder.epoch_tag(state.epoch))

    def _finished(self) -> bool:
        return self.state.global_step >= self.total_steps or self.state.epoch >= self.cfg.train.epochs

    def _sampler_state(self) -> dict[str, int]:
        return {**self.sampler.state_dict(), "epoch": self.state.epoch, "position": self.state.batches_in_epoch}

    # ------------------------------------------------------------------ outputs

    def weights(self) -> list[outputs.Weights]:
        """The model's state dicts to save: raw, EMA, or both (EMA first), per checkpoint.weights."""
        kinds = outputs.output_kinds(self.cfg.checkpoint.weights, self.cfg.ema.enabled)
        # Under DeepSpeed the fp32 weights are gathered (split under ZeRO-3): every process takes part
        raw = trained_state_dicts(self.model, self.parts, self.fixed, keep=self.accelerator.is_main_process)
        return outputs.collect_weights(self.model, self.emas, kinds, raw=raw | self.base_weights)

    def save(self, tag: str) -> list[Path]:
        """Save model checkpoint(s) for ``tag`` ("final" writes the run's tuned*.safetensors), then the state.

        Every process calls it (gathering DeepSpeed's weights is collective); only the main process writes.
        """
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        self._clock()
        written: list[Path] = []
        weights, meta = self.weights(), self._metadata()
        if acc.is_main_process and tag == "final":
            written = outputs.save_final(
                self.run_dir, weights, cfg.checkpoint.dtype, cfg.checkpoint.fp32_copy, self.inputs.base, meta
            )
            if cfg.log.loss_plot:
                outputs.write_loss_plot(self.state.losses, self.state.lrs, self.run_dir / run_folder.LOSS_PNG)
        elif acc.is_main_process:
            ckpt = cfg.checkpoint
            written = outputs.save_intermediate(
                self.run_dir, tag, weights, ckpt.dtype, ckpt.keep_last, meta, keep_fp32=ckpt.keep_fp32
            )
        if tag == "final" and cfg.checkpoint.diffusers:
            emas = self.emas if weights[0].kind == "ema" else {}
            with whole_parameters(self.denoiser, self._zero3()):
                if acc.is_main_process:
                    parts = outputs.pipeline_parts(self.model, emas)
                    base = {PART_ATTRS[name]: state for name, state in self.base_weights.items()}
                    written.append(outputs.save_diffusers_folder(parts, self.run_dir / run_folder.DIFFUSERS_DIR, base))
        if written:
            logger.info("saved %s", ", ".join(str(p) for p in written))
        if tag == "final":
            self.outputs = written
        if cfg.checkpoint.save_state:  # after the final outputs too: raising train.max_steps/epochs continues it
            self.save_state()
        return written

    def save_state(self) -> Path:
        """Save the training state (weights, optimizer, scheduler, RNG, EMA, data position) for --resume."""
        state, acc = self.state, self.accelerator
        self._clock()
        outputs.check_finite(self.weights()[0])
        state.sampler = self._sampler_state()
        state.generator = encode_generator(self.generator)
        state.generators = gather_object([state.generator]) if acc.num_processes > 1 else []
        ema_tensors = {f"{n}.{k}": v for n, ema in self.emas.items() for k, v in ema.state_dict().items()}
        self.state_dir = write_state(
            self.run_dir / run_folder.STATE,
            state,
            lambda d: acc.save_state(str(d)),
            ema_tensors,
            self.cfg.checkpoint.keep_states,
            main=acc.is_main_process,
            barrier=acc.wait_for_everyone,
        )
        return self.state_dir

    def sample(self, tag: str) -> list[Path]:
        """Render the configured prompts with the weights that are saved (EMA if so) into RUN/samples."""
        from finetune.sampling import moved_to, render_samples

        acc, cfg = self.accelerator, self.cfg
        emas = self.emas if outputs.output_kinds(cfg.checkpoint.weights, cfg.ema.enabled)[0] == "ema" else {}
        parts = outputs.pipeline_parts(self.model, emas)
        with whole_parameters(self.denoiser, self._zero3()):
            if not acc.is_main_process:
                return []
            # EMA copies kept on the CPU (ema.device: cpu) join the rest of the pipeline on the GPU meanwhile
            with moved_to([ema.ema_model for ema in emas.values()], acc.device):
                return render_samples(parts, cfg.sample, self.run_dir / run_folder.SAMPLES, tag, acc.autocast)

    def _zero3(self) -> bool:
        return self.zero is not None and self.zero.stage == ZERO3

    def _metadata(self) -> dict[str, str]:
        return outputs.output_metadata(dump_yaml(self.cfg), self.inputs.base, self.state, self.dataset_meta)

    def _clock(self) -> None:
        """Bring the run's training time up to now (it is saved in the state and the outputs' metadata)."""
        if self.clock_start is not None:
            self.state.train_seconds = round(time.monotonic() - self.clock_start, 1)

    def _result(self, interrupted: bool) -> TrainResult:
        return TrainResult(
            self.state.global_step,
            self.state.epoch,
            interrupted,
            self.state_dir,
            tuple(self.outputs),
            tuple(self.state.losses),
        )

    def cleanup(self) -> None:
        """End trackers and release accelerate's process-wide state (so another Trainer can run in this process)."""
        from accelerate.state import AcceleratorState, GradientState

        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run(cfg: FinetuneConfig, resume: str | None = None, checked: CheckedData | None = None) -> TrainResult:
    """Set up, train and clean up one run (what the CLI does, after ``finetune.cli.check_start``)."""
    trainer = Trainer(cfg, resume, checked)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
