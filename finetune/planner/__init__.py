"""finetune.planner: see docs/architecture.md."""
