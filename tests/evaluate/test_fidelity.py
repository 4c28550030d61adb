"""Fidelity in function space on the tiny model: a tuned model that is the base plus an exact rank-4 difference on
every LoRA layer, and LoRAs holding its top 1, 2 and 4 singular directions."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from xlbake.errors import InputError
from xlbake.evaluate.fidelity import FidelityResult, fidelity_table, kept_effect, make_inputs, measure_fidelity
from xlbake.evaluate.weight_kept import lora_updates, merged, weight_energies
from xlbake.lora.io import LoraFile, LoraModule, lora_metadata, read_lora, write_lora
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint

SPECTRUM = torch.tensor([1.0, 0.5, 0.25, 0.125])
"""Relative singular values of every layer's difference: kept energy at rank r is the same everywhere."""
RELATIVE_SIZE = 0.05
"""‖ΔW‖ / ‖W‖ of each layer: a finetune-sized change."""


def kept_at(rank: int) -> float:
    return float(SPECTRUM[:rank].square().sum() / SPECTRUM.square().sum())


@pytest.fixture(scope="module")
def lowrank_run(tiny_paths, tmp_path_factory):
    """(tuned file, {name: LoRA file}): LoRAs "r1", "r2", "r4" (exact) and "unet" (rank 4, UNet modules only)."""
    folder = tmp_path_factory.mktemp("fidelity")
    with open_checkpoint(tiny_paths.single_file) as reader:
        tensors = {key: reader.get(key).clone() for key in reader.keys()}  # noqa: SIM118 (a reader, not a dict)
        targets = kohya_targets(reader.shapes(), conv=True)
    gen = torch.Generator().manual_seed(0)
    factors = {}  # name -> (u * s (out, 4), v^T (4, in...))
    for target in targets:
        rows = slice(*target.rows) if target.rows else slice(None)
        weight = tensors[target.key][rows]
        out, inner = target.shape[0], math.prod(target.shape[1:])
        u = torch.linalg.qr(torch.randn(out, 4, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(inner, 4, generator=gen)).Q
        s = SPECTRUM * RELATIVE_SIZE * weight.norm() / SPECTRUM.norm()
        factors[target.name] = (u * s, v.T.reshape(4, *target.shape[1:]))
        tensors[target.key][rows] += (u * s @ v.T).reshape(target.shape)
    tuned = save_sgm_checkpoint(tensors, folder / "tuned.safetensors")
    loras = {}
    for name, rank, prefix in (("r1", 1, "lora_"), ("r2", 2, "lora_"), ("r4", 4, "lora_"), ("unet", 4, "lora_unet_")):
        chosen = {n: (up[:, :rank], down[:rank]) for n, (up, down) in factors.items() if n.startswith(prefix)}
        meta = lora_metadata(title=name, ranks=dict.fromkeys(chosen, rank), alpha=rank, conv_rank=rank)
        loras[name] = write_lora(folder / f"lora-{name}.safetensors", chosen, metadata=meta, dtype=torch.float32)
    return tuned, loras


def test_kept_effect_is_one_minus_the_relative_squared_error():
    base, tuned = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert kept_effect(tuned, tuned, base) == 1.0
    assert kept_effect(base, tuned, base) == 0.0
    assert kept_effect(torch.ones(2, 3), tuned, base) == pytest.approx(0.75)  # error 1 of 4 per element
    assert kept_effect(torch.full((2, 3), 6.0), tuned, base) == pytest.approx(-3.0)  # worse than the base
    assert kept_effect(base, base, base) == 1.0


def test_inputs_are_fixed_by_the_seed_and_spread_over_the_schedule():
    alphas = torch.linspace(0.99, 0.01, 1000)
    inputs = make_inputs(8, (4, 6), ["a", "b", "c"], alphas, seed=5, vae_scale=8)
    again = make_inputs(8, (4, 6), ["a", "b", "c"], alphas, seed=5, vae_scale=8)
    assert torch.equal(inputs.latents, again.latents) and torch.equal(inputs.timesteps, again.timesteps)
    assert not torch.equal(inputs.latents, make_inputs(8, (4, 6), ["a"], alphas, seed=6, vae_scale=8).latents)
    assert inputs.latents.shape == (8, 4, 4, 6)
    assert sorted(inputs.timesteps.tolist()) == [62 + 125 * i for i in range(8)]  # one per eighth of the schedule
    assert inputs.prompt_index.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert inputs.time_ids[0].tolist() == [32, 48, 0, 0, 32, 48]


def test_lora_merge_matches_what_diffusers_fuses(tiny_paths, lowrank_run):
    """Our kohya name -> SGM key mapping (TE2 q/k/v row blocks, convs) agrees with diffusers' LoRA loader."""
    from diffusers import StableDiffusionXLPipeline

    from xlbake.sdxl.keys import sgm_state_dict

    _, loras = lowrank_run
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_paths.diffusers_dir))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    before = {key: value.clone() for key, value in sgm_state_dict(**parts).items()}
    pipe.load_lora_weights(str(loras["r2"]))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = sgm_state_dict(**parts)
    targets = {t.name: t for t in kohya_targets({k: tuple(v.shape) for k, v in before.items()}, conv=True)}
    updates = lora_updates(read_lora(loras["r2"]), targets)
    assert {t.component for t in targets.values() if t.key in updates} == {"unet", "te1", "te2"}
    assert any(u.rows for parts_ in updates.values() for u in parts_)  # TE2's fused in_proj is covered
    for key, weight in before.items():
        expected = merged(weight, updates.get(key, []))
        assert torch.allclose(after[key], expected, atol=1e-5), key


def test_fidelity_is_one_at_full_rank_and_falls_with_rank(tiny_paths, lowrank_run):
    tuned, loras = lowrank_run
    names = ["r1", "r2", "r4", "unet"]
    prompts = ["xlbk emblem, red circle", "a blue square on a white background"]
    results = measure_fidelity(
        tiny_paths.single_file, tuned, [loras[n] for n in names], n_samples=4, latent_size=16, prompts=prompts
    )
    by_name = dict(zip(names, results, strict=True))
    assert [r.lora for r in results] == [loras[n] for n in names]
    assert [(r.min_rank, r.max_rank) for r in results] == [(1, 1), (2, 2), (4, 4), (4, 4)]
    assert by_name["r4"].kept_effect == pytest.approx(1.0, abs=1e-6)  # exact difference: nothing lost
    assert 0.0 < by_name["r1"].kept_effect < by_name["r2"].kept_effect < by_name["r4"].kept_effect
    for name, rank in (("r1", 1), ("r2", 2), ("r4", 4)):  # every layer keeps the same share of its energy
        assert by_name[name].kept_energy == pytest.approx(kept_at(rank), abs=1e-5)
    # Leaving the text encoders out loses their share of the weights and of the effect on the prediction.
    assert by_name["unet"].kept_energy < 1.0 - 1e-3
    assert by_name["unet"].kept_effect < 1.0 - 1e-3
    assert all(r.reference > 0 and r.file_mb > 0 for r in results)
    table = fidelity_table(results).splitlines()
    assert len(table) == 5 and "lora-r1.safetensors" in table[1] and "100.00%" in table[3]
    assert table[0].split()[3:] == ["covered", "kept", "of", "covered", "kept", "of", "finetune", "kept", "effect"]
    assert by_name["unet"].covered < 1 and "te1 layers" in by_name["unet"].left_out


def test_fidelity_command_prints_the_table_and_writes_plot_and_json(tiny_paths, lowrank_run, tmp_path):
    from xlbake.evaluate.cli import fidelity

    tuned, loras = lowrank_run
    out = tmp_path / "fid.png"
    args = [str(tiny_paths.single_file), str(tuned), str(loras["r1"]), str(loras["r4"])]
    args += ["--samples", "2", "--latent-size", "8", "--device", "cpu", "--prompt", "xlbk emblem", "--out", str(out)]
    result = CliRunner().invoke(fidelity, args)
    assert result.exit_code == 0, result.output
    assert "kept effect" in result.output and "lora-r4.safetensors" in result.output
    document = json.loads(out.with_suffix(".json").read_text())
    assert [r["ranks"] for r in document["results"]] == ["1", "4"]
    assert document["results"][1]["kept_effect"] == pytest.approx(1.0, abs=1e-6)
    assert out.stat().st_size > 10_000


def test_lora_for_another_model_is_refused_naming_the_module(tiny_paths, tmp_path):
    with open_checkpoint(tiny_paths.single_file) as reader:
        targets = {t.name: t for t in kohya_targets(reader.shapes(), conv=True)}
    name = next(n for n in targets if n.startswith("lora_te1_"))
    foreign = LoraFile(
        {"lora_unet_input_blocks_99_1_proj_in": LoraModule(torch.ones(4, 1), torch.ones(1, 4), 1.0)}, {}, tmp_path / "x"
    )
    with pytest.raises(InputError, match="input_blocks_99"):
        lora_updates(foreign, targets)
    wrong_shape = LoraFile({name: LoraModule(torch.ones(7, 1), torch.ones(1, 5), 1.0)}, {}, tmp_path / "y")
    with pytest.raises(InputError, match="another model"):
        lora_updates(wrong_shape, targets)
    # the single-encoder "lora_te_" spelling means text encoder 1
    module = LoraModule(torch.ones(targets[name].shape[0], 1), torch.ones(1, targets[name].shape[1]), 1.0)
    alias = LoraFile({"lora_te_" + name.removeprefix("lora_te1_"): module}, {}, tmp_path / "z")
    assert list(lora_updates(alias, targets)) == [targets[name].key]


def test_a_tuned_model_equal_to_its_base_is_reported(tiny_paths, lowrank_run):
    _, loras = lowrank_run
    with pytest.raises(InputError, match="no finetune effect"):
        measure_fidelity(tiny_paths.single_file, tiny_paths.diffusers_dir, [loras["r1"]], n_samples=1, latent_size=8)


def test_results_serialise_with_their_rank_label(tmp_path):
    result = FidelityResult(tmp_path / "l.safetensors", 2, 8, 100, 1.5, 0.9, 0.95, 0.1, 1.0)
    assert result.ranks == "2-8"
    assert result.as_dict()["lora"] == str(tmp_path / "l.safetensors") and result.as_dict()["ranks"] == "2-8"


def test_weight_energy_says_what_the_lora_covers_of_the_whole_finetune(tiny_paths, lowrank_run, tmp_path):
    """The UNet-only LoRA covers the UNet's share; a changed norm (no LoRA holds one) is left out of every LoRA."""
    tuned, loras = lowrank_run
    norm = "model.diffusion_model.out.0.weight"
    with open_checkpoint(tuned) as reader:
        tensors = {key: reader.get(key).clone() for key in reader.keys()}  # noqa: SIM118 (a reader, not a dict)
    tensors[norm] += 0.5
    changed = save_sgm_checkpoint(tensors, tmp_path / "tuned-norm.safetensors")
    with open_checkpoint(tiny_paths.single_file) as base, open_checkpoint(changed) as tuned_reader:
        targets = {t.name: t for t in kohya_targets(base.shapes(), conv=True, extra=True)}
        updates = [lora_updates(read_lora(loras[name]), targets) for name in ("r4", "unet")]
        energy = {
            key: float((tuned_reader.get(key).double() - base.get(key).double()).square().sum())
            for key in base.keys()  # noqa: SIM118 (a reader, not a dict)
            if base.dtype(key).is_floating_point and not key.startswith("first_stage_model.")
        }
        full, unet = weight_energies(base, tuned_reader, list(energy), updates, list(targets.values()))
    total = sum(energy.values())
    assert full.left_out == {"norms": pytest.approx(energy[norm] / total)}
    assert full.covered == pytest.approx(1 - energy[norm] / total)
    assert full.kept_of_finetune == pytest.approx(full.covered, abs=1e-6)  # rank 4 holds every covered difference
    unet_share = sum(e for key, e in energy.items() if key.startswith("model.diffusion_model.") and key != norm)
    assert unet.covered == pytest.approx(unet_share / total)
    assert set(unet.left_out) == {"norms", "te1 layers", "te2 layers"}
    assert unet.covered + sum(unet.left_out.values()) == pytest.approx(1.0)


def test_dataset_inputs_measure_on_one_half_of_the_images_and_their_captions(tiny_paths, lowrank_run, demo_dataset,
                                                                             tmp_path):  # fmt: skip
    from xlbake.data.run_images import dataset_source, run_items, split_items
    from xlbake.evaluate.cli import fidelity

    tuned, loras = lowrank_run
    items = run_items(dataset_source(demo_dataset, resolution=64), seed=0)
    documents = {}
    for split in ("heldout", "calibration"):
        out = tmp_path / f"{split}.png"
        args = [str(tiny_paths.single_file), str(tuned), str(loras["r1"]), "--device", "cpu", "--out", str(out)]
        args += ["--inputs", "dataset", "--dataset", str(demo_dataset), "--split", split, "--per-image", "1"]
        result = CliRunner().invoke(fidelity, args)
        assert result.exit_code == 0, result.output
        documents[split] = json.loads(out.with_suffix(".json").read_text())
        expected = sorted(item.image.name for item in split_items(items, split))
        assert [Path(p).name for p in documents[split]["inputs"]["images"]] == expected
    held, fitted = (set(documents[s]["inputs"]["images"]) for s in ("heldout", "calibration"))
    assert held.isdisjoint(fitted) and len(held | fitted) == len(items) == 8
    assert documents["heldout"]["inputs"]["split"] == "heldout"
    kept = [documents[s]["results"][0]["kept_effect"] for s in ("heldout", "calibration")]
    assert 0 < kept[0] < 1 and kept[0] != pytest.approx(kept[1], abs=1e-6)


def test_a_bad_dataset_path_is_one_line_and_exit_1(tiny_paths, lowrank_run, tmp_path):
    from xlbake.evaluate.cli import fidelity

    tuned, loras = lowrank_run
    args = [str(tiny_paths.single_file), str(tuned), str(loras["r1"]), "--out", str(tmp_path / "f.png")]
    result = CliRunner().invoke(fidelity, [*args, "--inputs", "dataset", "--dataset", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "neither a finetune run folder" in result.output
    result = CliRunner().invoke(fidelity, [*args, "--inputs", "dataset"])
    assert result.exit_code == 2 and "--dataset" in result.output
    result = CliRunner().invoke(fidelity, [*args, "--inputs", "dataset", "--dataset", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and "caption" in result.output
