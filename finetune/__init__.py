"""xlbake stage: finetune."""
