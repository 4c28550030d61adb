"""extract's read path: the differences it reads into pooled buffers stay intact while held."""

import torch

from extract.config import ExtractConfig
from extract.layers import FactorSettings, layer_differences
from xlbake.lora.lowrank import to_matrix
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint


def test_differences_held_at_once_are_each_intact(tiny_paths, tmp_path):
    """Every difference yielded is kept alive at once (as workers and the prefetch queue hold them): a buffer
    handed out again while one of them still uses it would overwrite it."""
    with open_checkpoint(tiny_paths.single_file) as reader:
        weights = {key: reader.get(key).clone() for key in reader}
    gen = torch.Generator().manual_seed(3)
    tuned = dict(weights)
    targets = kohya_targets({k: tuple(v.shape) for k, v in weights.items()}, conv=True)
    for key in {t.key for t in targets}:
        tuned[key] = weights[key] + torch.randn(weights[key].shape, generator=gen)
    base_path = save_sgm_checkpoint(weights, tmp_path / "base.safetensors", dtype=torch.float16)
    tuned_path = save_sgm_checkpoint(tuned, tmp_path / "tuned.safetensors", dtype=torch.float16)
    cfg = ExtractConfig(base=base_path, tuned=tuned_path, out=tmp_path / "lora.safetensors")
    settings = FactorSettings.from_config(cfg)
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned_reader:
        held = list(layer_differences(base, tuned_reader, targets, settings))
        shapes = [tuple(diff.shape) for _, diff, _ in held]
        assert len(set(shapes)) < len(shapes)  # some shapes repeat: their buffers could be reused
        for target, diff, _ in held:
            expected = to_matrix(tuned_reader.get(target.key).float() - base.get(target.key).float())
            if target.rows is not None:
                expected = expected[target.rows[0] : target.rows[1]]
            assert torch.equal(diff, expected), target.name
