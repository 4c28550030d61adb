"""The finetune recipe: one small class, read top to bottom (torchtune recipe shape, nanoGPT loop, accelerate).

trainer = Trainer(cfg, resume="auto")
trainer.setup()
result = trainer.train()
trainer.cleanup()
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import outputs
from finetune.config import FinetuneConfig
from finetune.data import CheckedData, collate
from finetune.distributed import (
    ZERO3,
    Denoiser,
    fixed_tensors,
    rank_seed,
    setup_zero,
    start_processes,
    trained_state_dicts,
    whole_parameters,
)
from finetune.emas import build_emas, ema_tensors, load_ema_tensors
from finetune.latent_cache import batch_latents
from finetune.model import SdxlModel, frozen_base_weights, load_model, resolve_inputs, setup_trainable
from finetune.objective import compute_time_ids, noise_latents, weighted_loss
from finetune.optim import build_optimizer, build_scheduler, current_lrs, follow_schedule
from finetune.progress import DataTimer, progress_bar, report_step, start_trackers, trackers
from finetune.sampler import window_size
from finetune.signals import StopRequest, stop_on_signals
from finetune.state import TrainerState, decode_generator, encode_generator, find_resume, read_state, write_state
from finetune.training_data import load_training_data
from xlbake.batch import run_folder
from xlbake.batch.run_folder import FINAL_TAG
from xlbake.config import config_hash, dump_yaml, to_dict
from xlbake.errors import TrainingError
from xlbake.sdxl.parts import PART_ATTRS

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
        """``checked``: the dataset as ``read_training_data`` read it before the run started (else read in setup)."""
        self.cfg, self.resume, self.run_dir, self.checked = cfg, resume, Path(cfg.run_dir), checked
        self.state = TrainerState(config_hash=config_hash(cfg), config=to_dict(cfg))
        self.state_dir: Path | None = None
        self.final_files: list[Path] = []  # written by the final save
        self.clock_start: float | None = None  # time.monotonic() at which this run's training time would be 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load the model and data, build optimizer/scheduler/EMA, prepare with accelerate, restore a state."""
        cfg = self.cfg
        start_processes()  # join a launch's processes as accelerate alone would not (DeepSpeed on CPU)
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.train.grad_accum,
            mixed_precision=cfg.precision.mixed,
            log_with=trackers(cfg.log),
            project_dir=str(self.run_dir / run_folder.LOGS),
            dynamo_backend="inductor" if cfg.model.compile else "no",
        )
        self.zero = setup_zero(acc, cfg)  # DeepSpeed's settings (checked against cfg), None without DeepSpeed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
        set_seed(cfg.train.seed)
        with acc.main_process_first():  # the builtin model and dataset are made once
            builtin = self.run_dir / run_folder.BUILTIN
            self.inputs = resolve_inputs(cfg.model.base, cfg.model.components, cfg.data.roots, builtin)
        self.model: SdxlModel = load_model(self.inputs.base, self.inputs.components, cfg.model.vae, cfg.loss.prediction)
        self.base_weights = frozen_base_weights(self.model, cfg.optim)  # saved as loaded, not as they run
        groups = setup_trainable(self.model, cfg.model, cfg.optim, cfg.precision)
        self.parts = [g.name for g in groups]
        self.params = [p for g in groups for p in g.params]
        data = load_training_data(cfg, self.inputs.roots, self.model, acc, self.run_dir, self.checked)
        self.sampler, self.total_steps, self.dataset_meta = data.sampler, data.total_steps, data.metadata
        self.emas = build_emas(self.model, self.parts, cfg, self.total_steps, acc.device)
        optimizer = build_optimizer(groups, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, acc.num_processes)
        self._prepare(optimizer, scheduler)
        workers = cfg.train.num_workers
        loader = DataLoader(data.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers)
        # The sampler already splits batches between processes: accelerate must not shard them again.
        self.loader = prepare_data_loader(loader, acc.device, num_processes=1, process_index=0, put_on_device=True)
        self.generator = torch.Generator().manual_seed(rank_seed(cfg.train.seed, acc.process_index))
        if self.resume:
            self._restore(self.resume)
        start_trackers(acc, cfg)
        what = ("+".join(self.parts), self.total_steps, data.steps_per_epoch, cfg.train.epochs, self.state.global_step)
        logger.info("training %s for %d optimizer steps (%d per epoch, %d epochs), from step %d", *what)

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
        saved, saved_emas = read_state(folder, self.state.config, self.state.config_hash)
        acc.load_state(str(folder))
        self.sampler.load_state_dict(saved.sampler)  # refuses a changed dataset, seed, batch size or process count
        decode_generator(self.generator, saved.generators[acc.process_index] if saved.generators else saved.generator)
        load_ema_tensors(self.emas, saved_emas)
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
        bar = progress_bar(self.total_steps, state.global_step, show=cfg.log.progress and acc.is_local_main_process)
        self.clock_start = time.monotonic() - state.train_seconds
        with stop_on_signals() as stop:
            while not self._finished():
                self.loader.set_epoch(state.epoch)
                self.sampler.load_state_dict(self._sampler_state())  # continue mid-epoch after a resume
                window: list[torch.Tensor] = []  # losses of this accumulation window's batches
                timer = DataTimer()
                for batch in timer.wrap(self.loader):
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
                    return self._interrupted(stop)
        bar.close()
        self.save(FINAL_TAG)
        if cfg.sample.prompts:
            self.sample(FINAL_TAG)
        return self._result(interrupted=False)

    def _interrupted(self, stop: StopRequest) -> TrainResult:
        """After SIGINT/SIGTERM: save the state (and loss curve) so that --resume continues exactly."""
        stop.arm()  # a second signal during the save ends the process at once
        self.save_state()
        if self.cfg.log.loss_plot and self.accelerator.is_main_process:
            self._plot_loss()
        logger.warning("stopped at step %d; resume with --resume auto", self.state.global_step)
        return self._result(interrupted=True)

    def training_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean weighted diffusion loss of one batch: a scalar fp32 tensor (with a graph to the trained parts)."""
        cfg, model, gen, acc = self.cfg, self.model, self.generator, self.accelerator
        latents = batch_latents(batch, model.vae, acc.device, gen)  # (B, 4, H/8, W/8)
        alphas_cumprod = model.noise_scheduler.alphas_cumprod
        noised = noise_latents(latents, cfg.noise, alphas_cumprod, gen)
        time_ids = compute_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        ids = (batch["input_ids_1"], batch["input_ids_2"])
        with acc.autocast():
            pred = self.denoiser(noised.noisy_latents, noised.timesteps, *ids, time_ids.to(acc.device))
        return weighted_loss(pred, latents, noised, alphas_cumprod, cfg.loss)

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
        report_step(self.accelerator, cfg.log, bar, timer, state.global_step, state.epoch, loss_value, lrs)
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
        """Save model checkpoint(s) for ``tag`` (FINAL_TAG writes the run's tuned*.safetensors), then the state.

        Every process calls it (gathering DeepSpeed's weights is collective); only the main process writes.
        """
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        self._clock()
        written: list[Path] = []
        weights, meta = self.weights(), self._metadata()
        if acc.is_main_process:
            written = outputs.save_checkpoint(self.run_dir, tag, weights, cfg.checkpoint, self.inputs.base, meta)
            if tag == FINAL_TAG and cfg.log.loss_plot:
                self._plot_loss()
        if tag == FINAL_TAG and cfg.checkpoint.diffusers:
            written += self._save_diffusers(weights[0].kind)
        if written:
            logger.info("saved %s", ", ".join(str(p) for p in written))
        if tag == FINAL_TAG:
            self.final_files = written
        if cfg.checkpoint.save_state:  # after the final outputs too: raising train.max_steps/epochs continues it
            self.save_state()
        return written

    def _save_diffusers(self, kind: str) -> list[Path]:
        """RUN/tuned-diffusers with the ``kind`` weights of tuned*; every process calls it (ZeRO-3 gathers)."""
        emas = self.emas if kind == "ema" else {}
        with whole_parameters(self.denoiser, self._zero3()):
            if not self.accelerator.is_main_process:
                return []
            base = {PART_ATTRS[name]: state for name, state in self.base_weights.items()}
            parts = outputs.pipeline_parts(self.model, emas)
            return [outputs.save_diffusers_folder(parts, self.run_dir / run_folder.DIFFUSERS_DIR, base)]

    def save_state(self) -> Path:
        """Save the training state (weights, optimizer, scheduler, RNG, EMA, data position) for --resume."""
        state, acc = self.state, self.accelerator
        self._clock()
        outputs.check_finite(self.weights()[0])
        state.sampler = self._sampler_state()
        state.generator = encode_generator(self.generator)
        state.generators = gather_object([state.generator]) if acc.num_processes > 1 else []
        self.state_dir = write_state(
            self.run_dir / run_folder.STATE,
            state,
            lambda d: acc.save_state(str(d)),
            ema_tensors(self.emas),
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

    def _plot_loss(self) -> None:
        outputs.write_loss_plot(self.state.losses, self.state.lrs, self.run_dir / run_folder.LOSS_PNG)

    def _zero3(self) -> bool:
        return self.zero is not None and self.zero.stage == ZERO3

    def _metadata(self) -> dict[str, str]:
        return outputs.output_metadata(dump_yaml(self.cfg), self.inputs.base, self.state, self.dataset_meta)

    def _clock(self) -> None:
        """Bring the run's training time up to now (it is saved in the state and the outputs' metadata)."""
        if self.clock_start is not None:
            self.state.train_seconds = round(time.monotonic() - self.clock_start, 1)

    def _result(self, interrupted: bool) -> TrainResult:
        state = self.state
        return TrainResult(
            state.global_step, state.epoch, interrupted, self.state_dir, tuple(self.final_files), tuple(state.losses)
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
