"""xlbake: full SDXL finetune -> SVD LoRA extraction -> rank resize."""

__version__ = "0.1.0"
