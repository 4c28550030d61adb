"""SDXL's three trained parts and their two names, mapped in this one place.

The short name ("unet", "te1", "te2") is the one users see: kohya's LoRA prefixes (``lora_te1_``), the config keys
(``optim.te1_lr``), the components of LoRA reports and extract decisions, the finetune's param groups. The
diffusers name ("unet", "text_encoder", "text_encoder_2") is the one the libraries use: pipeline attributes and
folders, the fields of ``finetune.model.SdxlModel`` and ``xlbake.sdxl.models.Architecture``, the keys of
``xlbake.sdxl.keys.SGM_PREFIX`` and of ``diffusers_state_dicts``.
"""

PART_ATTRS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
"""Short name -> diffusers name of each trained part, in SDXL's order."""
PARTS = tuple(PART_ATTRS)
"""The short names: ("unet", "te1", "te2")."""
MODEL_PARTS = tuple(PART_ATTRS.values())
"""The diffusers names: ("unet", "text_encoder", "text_encoder_2")."""
TEXT_PARTS = (PART_ATTRS["te1"], PART_ATTRS["te2"])
"""The text encoders' diffusers names."""
