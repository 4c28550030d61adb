"""xlbake.sdxl: see docs/architecture.md."""
