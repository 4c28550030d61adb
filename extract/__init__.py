"""xlbake stage: extract."""
