"""kohya's names for our finetune settings, shared by the finetune config loader and ``xlbake import-kohya``."""

KOHYA_KEY_NAMES = {
    "learning_rate": "optim.unet_lr", "learning_rate_te1": "optim.te1_lr", "learning_rate_te2": "optim.te2_lr",
    "max_train_epochs": "train.epochs", "max_train_steps": "train.max_steps", "seed": "train.seed",
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
"""kohya sd-scripts / kohya_ss GUI key names that mean one of our keys: a finetune YAML or --set may use them at the
top level (read as ours, with a warning naming ours); ``xlbake import-kohya`` maps them the same way."""
