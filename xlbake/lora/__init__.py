"""xlbake.lora: see docs/architecture.md."""
