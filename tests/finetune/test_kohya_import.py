"""kohya config import: GUI JSONs (the guide's 80 GB recipe, a kohya_ss finetune preset), an sd-scripts TOML and a
command line, converted to a finetune YAML that loads, with every key accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from finetune.config import FinetuneConfig
from finetune.kohya.importer import convert, main, render_yaml, validate
from xlbake import cli
from xlbake.config import load_config
from xlbake.errors import InputError

GUIDE_80GB = {  # the guide's A100 80 GB finetune settings as the kohya_ss GUI saves them
    "pretrained_model_name_or_path": "/workspace/kohya_ss/pretrained/sd_xl_base_1.0_0.9vae.safetensors",
    "sdxl_checkbox": True, "v2": False, "v_parameterization": False,
    "train_dir": "/workspace/out", "image_folder": "/workspace/kohya_ss/dataset/2_ewpp femme",
    "output_dir": "/workspace/out", "output_name": "ewpp", "logging_dir": "/workspace/out",
    "max_resolution": "1024,1024", "min_bucket_reso": "256", "max_bucket_reso": "2048", "bucket_reso_steps": 64,
    "bucket_no_upscale": False, "learning_rate": 1e-06, "train_text_encoder": True,
    "lr_scheduler": "constant", "lr_warmup": 0, "dataset_repeats": "2", "train_batch_size": 1, "epoch": 1,
    "max_train_epochs": "100", "save_every_n_epochs": 100, "mixed_precision": "fp16", "save_precision": "fp16",
    "seed": "", "num_cpu_threads_per_process": 2, "cache_latents": False, "cache_latents_to_disk": False,
    "caption_extension": ".txt", "optimizer": "AdamW", "optimizer_args": "", "xformers": "xformers",
    "gradient_checkpointing": False, "gradient_accumulation_steps": 3.0, "shuffle_caption": False, "keep_tokens": "0",
    "max_token_length": "75", "full_fp16": False, "full_bf16": False, "color_aug": False, "flip_aug": False,
    "random_crop": True, "min_snr_gamma": 5, "noise_offset": 0, "noise_offset_type": "Original",
    "adaptive_noise_scale": 0, "multires_noise_iterations": 0, "multires_noise_discount": 0,
    "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0, "sdxl_no_half_vae": True,
    "min_timestep": 0, "max_timestep": 1000, "block_lr": "", "clip_skip": "1", "save_model_as": "safetensors",
    "sample_prompts": "", "sample_sampler": "euler_a", "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
    "use_wandb": False, "wandb_api_key": "", "weighted_captions": False, "vae_batch_size": 0,
    "additional_parameters": "--enable_ema --ema_decay=0.9995",
}  # fmt: skip
TOML = """
[model_arguments]
pretrained_model_name_or_path = "models/sd_xl_base_1.0.safetensors"

[dataset_arguments]
train_data_dir = "datasets/kafka"
caption_extension = ".txt"
resolution = "1024,1024"
random_crop = true
max_token_length = 150

[training_arguments]
output_dir = "runs/kafka"
max_train_epochs = 20
train_batch_size = 2
mixed_precision = "bf16"
full_bf16 = true
save_precision = "bf16"
sdpa = true
seed = 42
ip_noise_gamma = 0.1
loss_type = "huber"
huber_c = 0.2
huber_schedule = "exponential"
sample_prompts = "prompts.txt"
sample_every_n_epochs = 5
log_with = "all"
zero_terminal_snr = true
color_aug = true

[optimizer_arguments]
optimizer_type = "Lion8bit"
learning_rate = 3e-7
learning_rate_te1 = 0
learning_rate_te2 = 1e-7
train_text_encoder = true
optimizer_args = ["weight_decay=0.05", "use_triton=True"]
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05
lr_scheduler_power = 2
"""


def write_json(tmp_path: Path, data: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def rows_by_key(conversion) -> dict[str, object]:
    return {row.key: row for row in conversion.rows}


def test_guide_gui_json_converts_to_the_80gb_ema_recipe(tmp_path):
    source = write_json(tmp_path, {**GUIDE_80GB, "image_folder": "/workspace/kohya_ss/dataset/1_ewpp femme"})
    out = tmp_path / "out" / "finetune.yaml"
    result = CliRunner().invoke(main, [str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(FinetuneConfig, out)
    assert (cfg.optim.name, cfg.optim.unet_lr, cfg.optim.te1_lr, cfg.optim.te2_lr) == ("adamw", 1e-6, 1e-6, 1e-6)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (100, 1, 3)
    assert (cfg.ema.enabled, cfg.ema.beta, cfg.checkpoint.weights) == (True, 0.9995, "ema")
    assert (cfg.loss.min_snr_gamma, cfg.precision.mixed, cfg.precision.vae, cfg.checkpoint.dtype) == (
        5.0, "fp16", "fp32", "fp16"
    )  # fmt: skip
    assert (cfg.data.random_crop, cfg.data.cache_latents, cfg.data.resolution, cfg.data.max_bucket_reso) == (
        True, False, 1024, 2048
    )  # fmt: skip
    assert cfg.data.roots == (Path("/workspace/kohya_ss/dataset"),)
    assert cfg.model.base == Path("/workspace/kohya_ss/pretrained/sd_xl_base_1.0_0.9vae.safetensors")
    assert (cfg.model.attention, cfg.model.gradient_checkpointing, cfg.run_dir) == (
        "sdpa", False, Path("/workspace/out/ewpp")
    )  # fmt: skip
    assert "Converted (" in result.output and "NOT converted" in result.output  # dataset_repeats 2 vs folder 1_


def test_every_key_is_accounted_for_and_nothing_dropped_silently(tmp_path):
    extra = {"color_aug": True, "block_lr": "1e-6,2e-6", "some_future_key": 7, "wandb_api_key": "s3cret-key"}
    source = write_json(tmp_path, {**GUIDE_80GB, **extra})
    conversion = convert(source)
    shown = {row.key.split(" (")[0] for row in conversion.rows}
    assert shown == (set(GUIDE_80GB) | set(extra)) - {"additional_parameters"} | {"enable_ema", "ema_decay"}
    assert len(conversion.rows) == len(shown)
    rows = rows_by_key(conversion)
    unsupported = {row.key: row.value for row in conversion.rows if row.status == "unsupported"}
    assert unsupported == {"color_aug": True, "block_lr": "1e-6,2e-6", "some_future_key": 7}
    assert "rename" not in rows["dataset_repeats"].note  # 2_ewpp femme with dataset_repeats 2 agree
    assert rows["dataset_repeats"].status == "ignored"
    assert rows["some_future_key"].note.startswith("not a setting this importer knows")
    assert rows["enable_ema (additional_parameters)"].settings == {"ema.enabled": True, "checkpoint.weights": "ema"}
    text = render_yaml(conversion)
    assert "#   color_aug: true" in text and "#   block_lr" in text and "#   some_future_key: 7" in text
    out = tmp_path / "f.yaml"
    result = CliRunner().invoke(main, [str(source), "--out", str(out)])
    assert "s3cret" not in result.output and "s3cret" not in out.read_text()
    assert "color_aug" in result.output.split("NOT converted")[1].split("Ignored")[0]


def test_finetune_tab_preset_and_folder_repeats(tmp_path):
    """The kohya_ss finetune preset by the guide's author: a hub id as model, images in 1_, latents cached."""
    essenz = {**GUIDE_80GB, "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
              "image_folder": "/kohya_ss/dataset/1_/", "dataset_repeats": "2", "optimizer": "AdamW8bit",
              "cache_latents": True, "random_crop": False, "min_bucket_reso": "64", "max_bucket_reso": "4096",
              "gradient_checkpointing": True, "additional_parameters": ""}  # fmt: skip
    conversion = validate(convert(write_json(tmp_path, essenz)), tmp_path / "f.yaml")
    rows = rows_by_key(conversion)
    assert rows["pretrained_model_name_or_path"].status == "unsupported"
    assert "rename 1_ to 2_" in rows["dataset_repeats"].note
    assert any("model.base is not set" in w for w in conversion.warnings)
    assert conversion.data["optim"]["name"] == "adamw8bit" and conversion.data["data"]["cache_latents"] is True
    loose = validate(convert(write_json(tmp_path, {**essenz, "image_folder": "/d/pics"})), tmp_path / "f.yaml")
    assert "move them to /d/2_pics" in rows_by_key(loose)["image_folder"].note


def test_sd_scripts_toml_with_sections(tmp_path):
    source = tmp_path / "train.toml"
    source.write_text(TOML)
    prompts = "a photo of kafka --n lowres --w 1024 --ss k_euler\n# note\nkafka in a forest --W 832\n"
    (tmp_path / "prompts.txt").write_text(prompts)
    out = tmp_path / "finetune.yaml"
    assert CliRunner().invoke(main, [str(source), "--out", str(out)]).exit_code == 0
    cfg = load_config(FinetuneConfig, out)
    assert (cfg.optim.name, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.args) == (
        "lion8bit", (0.9, 0.99), 0.05, {"use_triton": True}
    )  # fmt: skip
    assert (cfg.optim.unet_lr, cfg.optim.te1_lr, cfg.optim.te2_lr) == (3e-7, 0.0, 1e-7)
    assert (cfg.optim.scheduler, cfg.optim.cycles, cfg.optim.warmup_ratio, cfg.optim.power) == (
        "cosine_with_restarts", 3, 0.05, 1.0  # power only applies to polynomial: not taken
    )  # fmt: skip
    assert (cfg.loss.loss_type, cfg.loss.huber_c, cfg.loss.huber_schedule, cfg.noise.ip_noise_gamma) == (
        "huber", 0.2, "exponential", 0.1
    )  # fmt: skip
    assert (cfg.precision.mixed, cfg.precision.full_bf16, cfg.checkpoint.dtype, cfg.caption.max_token_length) == (
        "bf16", True, "bf16", 150
    )  # fmt: skip
    assert cfg.sample.prompts == ("a photo of kafka --n lowres --w 1024", "kafka in a forest --W 832")
    assert cfg.sample.every_epochs == 5
    assert cfg.data.roots == (tmp_path / "datasets" / "kafka",) and (cfg.log.tensorboard, cfg.log.wandb) == (True, True)
    rows = rows_by_key(convert(source))
    assert {k for k, r in rows.items() if r.status == "unsupported"} == {"zero_terminal_snr", "color_aug"}
    assert "--ss" in rows["sample_prompts"].note and "--n" not in rows["sample_prompts"].note


def test_sd_scripts_defaults_fill_what_a_toml_leaves_out(tmp_path):
    source = tmp_path / "short.toml"
    source.write_text('pretrained_model_name_or_path = "/m/sdxl.safetensors"\ntrain_data_dir = "/d"\n')
    conversion = validate(convert(source), tmp_path / "f.yaml")
    data = conversion.data
    assert data["optim"]["unet_lr"] == 2e-6 and data["precision"]["mixed"] == "no"
    assert data["data"]["caption_extension"] == ".caption" and data["train"]["max_steps"] == 1600
    assert "learning_rate (sd-scripts default)" in rows_by_key(conversion)


def test_command_line_with_config_file_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('learning_rate = 1e-6\nmax_train_epochs = 50\ntrain_data_dir = "/d"\n')
    command = tmp_path / "train.sh"
    command.write_text(
        "accelerate launch --num_cpu_threads_per_process=8 sdxl_train.py \\\n"
        '  --config_file="base.toml" --pretrained_model_name_or_path=/m/sdxl.safetensors \\\n'
        "  --learning_rate=7e-5 --optimizer_args weight_decay=0.1 betas=0.9,0.95 --gradient_checkpointing\n"
    )
    conversion = validate(convert(command), tmp_path / "f.yaml")
    data = conversion.data
    assert data["optim"]["unet_lr"] == 7e-5 and data["optim"]["betas"] == [0.9, 0.95]
    assert data["train"]["epochs"] == 50 and data["model"]["gradient_checkpointing"] is True
    rows = {(row.key, row.status) for row in conversion.rows}
    assert ("learning_rate (base.toml)", "ignored") in rows and ("learning_rate", "mapped") in rows
    assert "num_cpu_threads_per_process" not in {row.key for row in conversion.rows}  # accelerate's own argument


def test_values_the_config_refuses_become_unsupported(tmp_path):
    bad = {**GUIDE_80GB, "max_token_length": "100", "cache_latents": True, "lr_scheduler": "piecewise_constant"}
    conversion = validate(convert(write_json(tmp_path, bad)), tmp_path / "f.yaml")
    rows = rows_by_key(conversion)
    assert rows["max_token_length"].status == "unsupported" and "75, 150, 225" in rows["max_token_length"].note
    assert rows["lr_scheduler"].status == "unsupported" and "constant_with_warmup" in rows["lr_scheduler"].note
    assert rows["cache_latents"].status == "unsupported" and rows["random_crop"].status == "mapped"
    load_config(FinetuneConfig, data=yaml.safe_load(render_yaml(conversion)))


def test_warmup_percent_needs_a_warmup_scheduler(tmp_path):
    cosine = convert(write_json(tmp_path, {**GUIDE_80GB, "lr_scheduler": "cosine", "lr_warmup": 10}))
    assert cosine.data["optim"]["warmup_ratio"] == 0.1
    constant = rows_by_key(convert(write_json(tmp_path, {**GUIDE_80GB, "lr_warmup": 10})))
    assert constant["lr_warmup"].status == "ignored" and "constant" in constant["lr_warmup"].note


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ({**GUIDE_80GB, "v2": True}, "c.json", "not an SDXL config"),
        ({**GUIDE_80GB, "sdxl_checkbox": False}, "c.json", "not an SDXL config"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "d.toml", "dataset config"),
        ("{not json", "c.json", "cannot read the config"),
    ],
)
def test_refused_sources_are_one_line_errors(tmp_path, content, name, message):
    source = tmp_path / name
    source.write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(InputError, match=message):
        convert(source)
    result = CliRunner().invoke(cli.main, ["import-kohya", str(source), "--out", str(tmp_path / "o.yaml")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert not (tmp_path / "o.yaml").exists()


def test_never_overwrites_without_force(tmp_path):
    source, out = write_json(tmp_path, GUIDE_80GB), tmp_path / "finetune.yaml"
    out.write_text("mine\n")
    refused = CliRunner().invoke(main, [str(source), "--out", str(out)])
    assert refused.exit_code == 1 and "exists" in refused.output and out.read_text() == "mine\n"
    assert CliRunner().invoke(main, [str(source), "--out", str(out), "--force"]).exit_code == 0
    assert load_config(FinetuneConfig, out).ema.enabled


LORA_PRESET = {  # the shape of a kohya_ss GUI LoRA-tab preset (LoRA_type, network_*, unet_lr, text_encoder_lr)
    **{k: v for k, v in GUIDE_80GB.items() if k != "additional_parameters"},
    "LoRA_type": "Standard", "network_dim": 32, "network_alpha": 32, "conv_dim": 32, "conv_alpha": 32,
    "network_dropout": 0, "lora_network_weights": "", "learning_rate": 0.0001, "unet_lr": 0.0001,
    "text_encoder_lr": 0.0001, "optimizer": "AdamW",
}  # fmt: skip


def test_lora_type_alone_does_not_make_a_finetune_preset_a_lora_config(tmp_path):
    preset = {**GUIDE_80GB, "LoRA_type": "Standard", "network_dim": 8, "unet_lr": "", "text_encoder_lr": ""}
    conversion = validate(convert(write_json(tmp_path, preset)), tmp_path / "f.yaml")
    assert not any("LoRA" in w for w in conversion.warnings), conversion.warnings
    assert conversion.data["optim"]["unet_lr"] == 1e-6
    rows = rows_by_key(conversion)
    assert rows["LoRA_type"].status == "ignored" and "extract" in rows["network_dim"].note


def test_a_lora_preset_keeps_the_finetune_rates_and_says_so(tmp_path):
    out = tmp_path / "f.yaml"
    result = CliRunner().invoke(main, [str(write_json(tmp_path, LORA_PRESET)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(FinetuneConfig, out)
    assert (cfg.optim.unet_lr, cfg.optim.te1_lr, cfg.optim.te2_lr) == (1e-6, 1e-6, 1e-6)  # not the LoRA's 1e-4
    assert "not a setting this importer knows" not in result.output
    assert "LoRA rate" in result.output and "learning_rate 0.0001" in result.output
    assert "WARNING: a LoRA training config" in result.output and "not converted" in result.output
    rows = rows_by_key(convert(write_json(tmp_path, LORA_PRESET)))
    assert {rows[k].status for k in ("learning_rate", "unet_lr", "text_encoder_lr")} == {"ignored"}


def test_network_module_says_lora_whatever_the_rate(tmp_path):
    source = tmp_path / "lora.toml"
    source.write_text('network_module = "networks.lora"\nlearning_rate = 5e-5\nunet_lr = 5e-5\ntrain_data_dir = "/d"\n')
    conversion = convert(source)
    assert any(w.startswith("a LoRA training config (network_module") for w in conversion.warnings)
    assert "unet_lr" not in conversion.data.get("optim", {})


def test_lora_rates_in_a_finetune_config_point_at_ours(tmp_path):
    rows = rows_by_key(convert(write_json(tmp_path, {**GUIDE_80GB, "unet_lr": 1e-6, "text_encoder_lr": 1e-6})))
    assert rows["unet_lr"].status == "ignored" and "learning_rate" in rows["unet_lr"].note
    assert "optim.unet_lr" in rows["unet_lr"].note


def test_import_kohya_does_not_import_a_cli_module(tmp_path):
    import subprocess
    import sys

    code = "import sys, finetune.kohya.importer; sys.exit('xlbake.dataset.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0  # this checkout via PYTHONPATH
