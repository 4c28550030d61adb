"""One vocabulary for SDXL's trained parts: the short names users see, mapped once to the diffusers names."""

import dataclasses

from finetune.config import OptimConfig
from finetune.model import SdxlModel
from xlbake.lora.io import COMPONENT_PREFIXES
from xlbake.sdxl.keys import SGM_PREFIX
from xlbake.sdxl.models import Architecture
from xlbake.sdxl.parts import MODEL_PARTS, PART_ATTRS, PARTS, TEXT_PARTS


def test_short_names_are_kohyas_lora_components_and_the_config_keys():
    assert PARTS == ("unet", "te1", "te2")
    assert set(COMPONENT_PREFIXES.values()) == set(PARTS)
    lrs = OptimConfig(unet_lr=1, te1_lr=2, te2_lr=3).part_lrs  # optim.<part>_lr
    assert lrs == {"unet": 1, "te1": 2, "te2": 3} and tuple(lrs) == PARTS


def test_diffusers_names_are_the_models_fields_and_sgm_prefix_keys():
    for fields in (SdxlModel, Architecture):
        assert set(MODEL_PARTS) <= {f.name for f in dataclasses.fields(fields)}
    assert set(MODEL_PARTS) <= set(SGM_PREFIX)
    assert list(MODEL_PARTS) == [PART_ATTRS[part] for part in PARTS]
    assert list(TEXT_PARTS) == [PART_ATTRS["te1"], PART_ATTRS["te2"]]
