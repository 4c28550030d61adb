"""Streaming checkpoint reader/writer: SGM view of single files and diffusers folders, refusals, memory, metadata."""

import json
import shutil
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xlbake.errors import InputError, OutputError
from xlbake.sdxl.checkpoint import convert_diffusers_folder, open_checkpoint, save_sgm_checkpoint
from xlbake.sdxl.keys import SGM_PREFIX
from xlbake.sdxl.prediction import declared_prediction
from xlbake.sdxl.tensorfile import write_safetensors

TE1 = SGM_PREFIX["text_encoder"]
TE2 = SGM_PREFIX["text_encoder_2"]


@pytest.fixture(scope="module")
def tiny_sgm(tiny_paths) -> dict[str, torch.Tensor]:
    return load_file(tiny_paths.single_file)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_single_file_and_diffusers_folder_give_the_same_sgm_view(tiny_paths, tiny_sgm):
    with open_checkpoint(tiny_paths.single_file) as single, open_checkpoint(tiny_paths.diffusers_dir) as folder:
        assert (single.family, folder.family) == ("sdxl", "sdxl")
        assert (single.source, folder.source) == ("single_file", "diffusers")
        assert set(single.keys()) == set(folder.keys()) == set(tiny_sgm)
        for key in folder:
            tensor = folder.get(key)
            assert tuple(tensor.shape) == folder.shape(key) and tensor.dtype == folder.dtype(key)
            assert torch.equal(tensor, tiny_sgm[key]), key
        assert folder.shape(TE2 + "transformer.resblocks.0.attn.in_proj_weight")[0] % 3 == 0
        with pytest.raises(InputError, match="no tensor named"):
            folder.get("model.diffusion_model.nope.weight")


def test_written_single_file_loads_in_diffusers_from_single_file(tiny_paths):
    """diffusers' own single-file loader is the oracle for what we write."""
    from diffusers import StableDiffusionXLPipeline

    ours = StableDiffusionXLPipeline.from_single_file(
        str(tiny_paths.single_file), config=str(tiny_paths.diffusers_dir), local_files_only=True
    )
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_paths.diffusers_dir, local_files_only=True)
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        got, want = getattr(ours, component).state_dict(), getattr(reference, component).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), component
    meta = safe_open(str(tiny_paths.single_file), "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_text_encoder_prefix_variants_and_shards(tiny_paths, tiny_sgm, tmp_path):
    folder = copy_folder(tiny_paths.diffusers_dir, tmp_path / "v4")
    te1_file = folder / "text_encoder" / "model.safetensors"
    te1 = load_file(te1_file)
    assert not any(k.startswith("text_model.") for k in te1)  # transformers 5 CLIPTextModel
    save_file({"text_model." + k: v for k, v in te1.items()}, te1_file)  # as transformers 4 wrote it
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(unet_file)
    names = sorted(unet)
    shards = {"unet-1.safetensors": names[: len(names) // 2], "unet-2.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: unet[k] for k in keys}, folder / "unet" / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    unet_file.rename(unet_file.with_suffix(".fp16.safetensors"))  # a lone variant file is ignored beside an index
    with open_checkpoint(folder) as reader:
        assert set(reader.keys()) == set(tiny_sgm)
        assert all(torch.equal(reader.get(k), tiny_sgm[k]) for k in reader)


def test_single_file_without_text_model_prefix_is_normalised(tiny_sgm, tmp_path):
    path = tmp_path / "flat.safetensors"
    save_file({k.replace(TE1 + "text_model.", TE1): v for k, v in tiny_sgm.items()}, path)
    with open_checkpoint(path) as reader:
        assert set(reader.keys()) == set(tiny_sgm)
        key = TE1 + "text_model.final_layer_norm.weight"
        assert torch.equal(reader.get(key), tiny_sgm[key])


def test_save_sgm_checkpoint_metadata_dtype_and_force(tiny_sgm, tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = dict(tiny_sgm, **{"extra.ids": torch.arange(4)})
    save_sgm_checkpoint(tensors, path, dtype=torch.float16, metadata={"xlbake.step": 3, "xlbake.cfg": {"lr": 1e-6}})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and loaded["extra.ids"].dtype == torch.int64
    assert all(torch.equal(loaded[k], v.to(torch.float16)) for k, v in tiny_sgm.items() if v.is_floating_point())
    meta = safe_open(str(path), "pt").metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "out"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.implementation"].startswith("https://") and meta["modelspec.date"]
    assert meta["xlbake.step"] == "3" and json.loads(meta["xlbake.cfg"]) == {"lr": 1e-6}
    before = path.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        save_sgm_checkpoint({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    save_sgm_checkpoint({"a": torch.zeros(2)}, path, force=True)
    assert list(load_file(path)) == ["a"] and not list(tmp_path.glob(".xlbake-tmp-*"))


@pytest.mark.parametrize(("prediction", "label"), [("epsilon", "epsilon"), ("v_prediction", "v")])
def test_prediction_label_follows_the_argument_and_readers_see_no_marker(tiny_sgm, tmp_path, prediction, label):
    """modelspec says epsilon or v, and a v-prediction file carries ComfyUI's/A1111's empty v_pred key, whatever
    stale label the caller's metadata or tensors held."""
    stale = {"v_pred": torch.tensor([])} if prediction == "epsilon" else {}
    path = save_sgm_checkpoint(
        {**tiny_sgm, **stale},
        tmp_path / "m.safetensors",
        dtype=torch.float16,
        metadata={"modelspec.prediction_type": "stale"},
        prediction=prediction,
    )
    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        assert meta["modelspec.prediction_type"] == label
        assert keys - set(tiny_sgm) == ({"v_pred"} if prediction == "v_prediction" else set())
    with open_checkpoint(path) as reader:
        assert set(reader.keys()) == set(tiny_sgm) and reader.family == "sdxl"
        assert declared_prediction(reader).prediction == prediction


def test_declared_prediction_of_keys_metadata_pickles_and_folders(tiny_paths, tiny_sgm, tmp_path):
    comfy = tmp_path / "comfy.safetensors"
    save_file({**tiny_sgm, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, comfy)
    spec_only = tmp_path / "spec.safetensors"
    save_file(tiny_sgm, spec_only, metadata={"modelspec.prediction_type": "v"})
    plain = tmp_path / "plain.safetensors"
    save_file(tiny_sgm, plain)
    pickled = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**tiny_sgm, "v_pred": torch.tensor([])}}, pickled)
    for path, expected, where in (
        (comfy, "v_prediction", "v_pred key"),
        (spec_only, "v_prediction", "modelspec.prediction_type: v"),
        (pickled, "v_prediction", "v_pred key"),
        (tiny_paths.single_file, "epsilon", "modelspec.prediction_type: epsilon"),
        (tiny_paths.diffusers_dir, "epsilon", "scheduler_config.json"),
    ):
        with open_checkpoint(path, allow_pickle=True) as reader:
            assert set(reader.keys()) == set(tiny_sgm), path
            declared = declared_prediction(reader)
            assert (declared.prediction, where in declared.where) == (expected, True), path
    with open_checkpoint(plain) as reader:
        assert declared_prediction(reader) is None


def test_v_prediction_folder_converts_to_a_labelled_single_file(tiny_paths, tiny_sgm, tmp_path):
    folder = copy_folder(tiny_paths.diffusers_dir, tmp_path / "vpred")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    with open_checkpoint(folder) as reader:
        assert declared_prediction(reader).prediction == "v_prediction"
    out = convert_diffusers_folder(folder, tmp_path / "vpred.safetensors")
    with safe_open(str(out), "pt") as handle:
        assert "v_pred" in set(handle.keys()) and handle.metadata()["modelspec.prediction_type"] == "v"


def test_convert_diffusers_folder_casts_and_refuses_incomplete(tiny_paths, tiny_sgm, tmp_path):
    out = convert_diffusers_folder(tiny_paths.diffusers_dir, tmp_path / "half.safetensors", dtype=torch.bfloat16)
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in tiny_sgm.items())
    with pytest.raises(OutputError):
        convert_diffusers_folder(tiny_paths.diffusers_dir, out)
    folder = copy_folder(tiny_paths.diffusers_dir, tmp_path / "novae")
    shutil.rmtree(folder / "vae")
    with pytest.raises(InputError, match="no vae/"):
        convert_diffusers_folder(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_and_corrupt_files_are_refused(tiny_paths, tmp_path):
    data = tiny_paths.single_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(InputError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(InputError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")


def test_pieces_read_into_one_scratch_buffer_give_the_tensor(tiny_paths, tiny_sgm, tmp_path):
    """A single file's tensor comes in scratch-sized pieces, all in the scratch's memory; a folder's fused TE2
    in_proj (assembled from q, k, v) comes whole; a file cut short after opening is the truncated-file error."""
    fused = next(k for k in tiny_sgm if k.endswith("in_proj_weight"))
    big = max(tiny_sgm, key=lambda k: tiny_sgm[k].numel())
    scratch = torch.empty(1000, dtype=torch.uint8)  # not a multiple of 8: pieces hold whole elements
    for path in (tiny_paths.single_file, tiny_paths.diffusers_dir):
        with open_checkpoint(path) as reader:
            for key in (fused, big):
                pieces = [piece.clone() for piece in reader.pieces(key, scratch)]
                assert torch.equal(torch.cat(pieces), tiny_sgm[key].reshape(-1)), (path, key)
    with open_checkpoint(tiny_paths.single_file) as reader:
        pointers = {piece.data_ptr() for piece in reader.pieces(big, scratch)}
        assert pointers == {scratch.data_ptr()} and tiny_sgm[big].numel() * tiny_sgm[big].itemsize > 2 * 1000
    cut = tmp_path / "cut.safetensors"
    shutil.copy(tiny_paths.single_file, cut)
    with open_checkpoint(cut) as reader:
        last = max(reader.keys(), key=lambda k: reader._sources[k][1][0][0].offsets[k][1])
        with open(cut, "r+b") as handle:
            handle.truncate(cut.stat().st_size - 10)
        with pytest.raises(InputError, match=f"file ended while reading {last}; the file is truncated"):
            list(reader.pieces(last, scratch))


def test_pickles_are_refused_unless_opted_in(tiny_sgm, tiny_paths, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_sgm}, path)
    with pytest.raises(InputError, match="pickle"):
        open_checkpoint(path)
    with open_checkpoint(path, allow_pickle=True) as reader:
        assert reader.family == "sdxl" and reader.source == "pickle"
        key = next(iter(tiny_sgm))
        assert torch.equal(reader.get(key), tiny_sgm[key])
    folder = copy_folder(tiny_paths.diffusers_dir, tmp_path / "bin")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae), vae.with_suffix(".bin"))
    vae.unlink()
    with pytest.raises(InputError, match="pickle"):
        open_checkpoint(folder)


def sd15_like(tiny_sgm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny model's tensors renamed to SD 1.5's layout: CLIP under cond_stage_model, no label_emb, no TE2."""
    out = {}
    for key, tensor in tiny_sgm.items():
        if key.startswith(TE1):
            out["cond_stage_model.transformer." + key[len(TE1) :]] = tensor
        elif not key.startswith((TE2, "model.diffusion_model.label_emb")):
            out[key] = tensor
    return out


def test_non_sdxl_inputs_are_refused_with_what_was_found(tiny_sgm, tiny_paths, tmp_path):
    cases = {
        "SD 1.x": sd15_like(tiny_sgm),
        "SD 2.x": {k.replace(TE2, "cond_stage_model.model."): v for k, v in tiny_sgm.items() if not k.startswith(TE1)},
        "refiner": {k.replace(TE2, "conditioner.embedders.0.model."): v for k, v in tiny_sgm.items() if TE1 not in k},
        "label_emb": {k: v for k, v in tiny_sgm.items() if "label_emb" not in k},
        "diffusers-named": load_file(tiny_paths.diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"),
    }
    wide = dict(tiny_sgm)  # SDXL names, but text encoder 2 wider than the UNet's cross-attention expects
    for key in (TE2 + "ln_final.weight", TE2 + "ln_final.bias"):
        wide[key] = torch.zeros(wide[key].shape[0] + 8)
    cases["cross-attention width"] = wide
    for found, tensors in cases.items():
        path = tmp_path / f"{len(tensors)}.safetensors"
        save_file(tensors, path)
        with pytest.raises(InputError, match=f"{path}: not an SDXL checkpoint: .*{found}"):
            open_checkpoint(path)
    folder = copy_folder(tiny_paths.diffusers_dir, tmp_path / "sd15")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    with pytest.raises(InputError, match="StableDiffusionPipeline folder, not SDXL"):
        open_checkpoint(folder)


def peak_rss_growth(fn) -> int:
    """Peak resident memory added while ``fn`` runs (Linux: reset the high-water mark first)."""
    process = psutil.Process()
    base = process.memory_info().rss
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here")
    fn()
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return peak_kb * 1024 - base


def test_streaming_read_and_write_keep_about_one_tensor_in_memory(tiny_sgm, tmp_path):
    count, numel = 48, 1 << 20  # 48 tensors of 4 MiB: a 192 MiB file
    tensor_bytes = numel * 4
    pads = [f"model_ema.pad{i:03d}" for i in range(count)]  # extra tensors beside the tiny SDXL ones
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tiny_sgm.items()} | {p: (torch.float32, (numel,)) for p in pads}

    def make(name: str) -> torch.Tensor:
        return tiny_sgm[name] if name in tiny_sgm else torch.full((numel,), float(pads.index(name)))

    path = tmp_path / "big.safetensors"
    write_growth = peak_rss_growth(lambda: write_safetensors(path, specs, make, metadata={}))
    assert path.stat().st_size > count * tensor_bytes
    seen = []

    def read_all() -> None:
        with open_checkpoint(path) as reader:
            seen.extend(reader.get(name).mean().item() for name in pads)  # touches every byte

    tracemalloc.start()
    read_growth = peak_rss_growth(read_all)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == list(range(count))
    # holding the file (or a memory map of it, once touched) would add 192 MiB; one tensor is 4 MiB
    assert read_growth < 8 * tensor_bytes, read_growth
    assert write_growth < 8 * tensor_bytes, write_growth
    assert python_peak < tensor_bytes  # no tensor-sized bytes objects on the Python heap
