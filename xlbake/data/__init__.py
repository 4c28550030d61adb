"""xlbake.data: see docs/architecture.md."""
