"""xlbake.batch.runner: see docs/architecture.md."""
