"""xlbake stage: resize."""
