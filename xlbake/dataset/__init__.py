"""xlbake.dataset: see docs/architecture.md."""
