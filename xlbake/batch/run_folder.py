"""The names in a finetune run folder (RUN/) and the metadata keys of its model files, defined once: the contract
between the finetune stage (which writes them), make, ``xlbake batch``, extract and ``xlbake loss-plot``.

    RUN/config.resolved.yaml            the run's whole config (the --config of a resume)
    RUN/base.txt                        the base model's path (make's extract step reads it)
    RUN/tuned.safetensors               the final weights at checkpoint.dtype (tuned-raw.* beside the EMA: weights both)
    RUN/tuned.fp32.safetensors          the fp32 copy extract reads, written last: make's target
    RUN/tuned-diffusers/                the same weights as a diffusers folder (checkpoint.diffusers)
    RUN/checkpoints/TAG[.fp32].safetensors   intermediate checkpoints, TAG epoch-NNNN or step-NNNNNNNN
    RUN/state/step-NNNNNNNN/trainer_state.json   resumable training states
    RUN/samples/, RUN/logs/, RUN/loss.png, RUN/builtin/ (the drawn demo dataset)

Names only, no torch: make imports its users while it reads the Makefile.
"""

from __future__ import annotations

from pathlib import Path

RESOLVED_CONFIG = "config.resolved.yaml"
BASE_TXT = "base.txt"
TUNED = "tuned.safetensors"
TUNED_FP32 = "tuned.fp32.safetensors"
TUNED_PREFIX = "tuned"  # every final model file (tuned*.safetensors, tuned-diffusers)
RAW_SUFFIX = "-raw"
SAFETENSORS = ".safetensors"
FP32_SUFFIX = ".fp32.safetensors"
DIFFUSERS_DIR = "tuned-diffusers"
CHECKPOINTS = "checkpoints"
STATE = "state"
STEP_PREFIX = "step-"  # of state folders and step checkpoints
FINAL_TAG = "final"  # the tag of the final save and its samples (samples/final-00.png)
STATE_FILE = "trainer_state.json"
SAMPLES = "samples"
LOGS = "logs"
LOSS_PNG = "loss.png"
BUILTIN = "builtin"

# Metadata of the finetune's model files
STAGE_KEY = "xlbake.stage"
CONFIG_KEY = "xlbake.config"
BASE_KEY = "xlbake.base"  # the base model's absolute path (extract checks --base/--tuned are not swapped)
STEP_KEY = "xlbake.global_step"
EPOCH_KEY = "xlbake.epoch"
SECONDS_KEY = "xlbake.train_seconds"  # the run's training time (the batch summary's "time")
WEIGHTS_KEY = "xlbake.weights"  # "raw" | "ema"


def step_tag(step: int) -> str:
    """The name of the state folder (and step checkpoint) of optimizer step ``step``: step-00000123."""
    return f"{STEP_PREFIX}{step:08d}"


def epoch_tag(epoch: int) -> str:
    """The tag of the checkpoint saved after epoch ``epoch`` (1-based): epoch-0002."""
    return f"epoch-{epoch:04d}"


def output_name(name: str, kind: str, both: bool) -> str:
    """``tuned.safetensors`` -> ``tuned-raw.safetensors`` for the raw copy when both EMA and raw are saved."""
    if not both or kind == "ema":
        return name
    stem, _, ext = name.partition(".")
    return f"{stem}{RAW_SUFFIX}.{ext}"


def final_output(run_dir: Path, fp32_copy: bool) -> Path:
    """The run's main output: tuned.fp32.safetensors (written last, the Makefile's target), else tuned.safetensors."""
    return Path(run_dir) / (TUNED_FP32 if fp32_copy else TUNED)
