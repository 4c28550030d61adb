"""xlbake.evaluate: see docs/architecture.md."""
