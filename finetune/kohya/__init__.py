"""finetune.kohya: see docs/architecture.md."""
