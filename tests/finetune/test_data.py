"""The training dataset, bad-data policy and the bucket batch sampler on small synthetic images."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from finetune.buckets import crop_geometry
from finetune.captions import CaptionConfig
from finetune.data import DataConfig, build_dataset, collate, load_pixels
from finetune.sampler import BucketBatchSampler, window_size
from xlbake.errors import ConfigError, InputError, TrainingError

TINY = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_step": 8}
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (100, 60), (60, 100), (70, 70)]


@pytest.fixture(scope="module")
def tokenizers():
    from xlbake.sdxl.tiny import build_tiny_components

    components = build_tiny_components()
    return components["tokenizer"], components["tokenizer_2"]


def noise_image(path: Path, size, seed: int, caption: str | None = "xlbk emblem, red, small") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture
def root(tmp_path):
    for i, size in enumerate(SIZES):
        folder = "2_xlbk emblem" if i < 5 else "1_other"
        noise_image(tmp_path / folder / f"{i:03d}.png", size, i)
    return tmp_path


def dataset(root, tokenizers, caption: CaptionConfig | None = None, **options):
    cfg = DataConfig(roots=(root,), **{**TINY, **options})
    return build_dataset(cfg, caption or CaptionConfig(), tokenizers, seed=5)


def test_items_have_the_contract_shapes(root, tokenizers):
    ds = dataset(root, tokenizers, caption=CaptionConfig(max_token_length=150))
    assert len(ds) == 5 * 2 + 3 * 1  # repeats expanded
    index = next(i for i in range(len(ds)) if ds.samples[ds.sample_of[i]].image.name == "000.png")
    item = ds[index]
    bw, bh = ds.samples[ds.sample_of[index]].bucket
    assert item["pixel_values"].shape == (3, bh, bw) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    for key in ("original_size", "crop_top_left", "target_size"):
        assert item[key].dtype == torch.long and item[key].shape == (2,)
    assert item["original_size"].tolist() == [64, 64] and item["target_size"].tolist() == [bh, bw]
    assert item["input_ids_1"].shape == item["input_ids_2"].shape == (2, 77)
    assert item["caption"] == "xlbk emblem, red, small" and item["path"].endswith("000.png")


def test_pixels_follow_the_geometry_including_flip(tmp_path):
    path = noise_image(tmp_path / "a.png", (64, 32), 0, caption=None)
    geometry = crop_geometry(64, 32, (32, 32), jitter=(0.25, 0.0), flip=True)
    assert (geometry.crop_left, geometry.crop_top_left) == (8, (0, 24))
    pixels = load_pixels(path, geometry, (64, 32))
    # the flipped sample is the mirrored image cropped at the offset SDXL is conditioned on
    expected = ImageOps.mirror(Image.open(path)).crop((24, 0, 56, 32))
    expected = torch.from_numpy(np.asarray(expected) / 127.5 - 1).permute(2, 0, 1).float()
    assert torch.allclose(pixels, expected, atol=1e-6)


def test_augmentations_are_reproducible_and_redrawn_each_epoch(root, tokenizers):
    ds = dataset(root, tokenizers, random_crop=True, flip=True)
    wide = next(i for i in range(len(ds)) if ds.samples[ds.sample_of[i]].size == (128, 64))
    first = ds[(0, wide)]
    assert torch.equal(first["pixel_values"], ds[(0, wide)]["pixel_values"])
    ds.set_epoch(0)
    assert torch.equal(first["crop_top_left"], ds[wide]["crop_top_left"])
    crops = {tuple(ds[(epoch, wide)]["crop_top_left"].tolist()) for epoch in range(12)}
    assert len(crops) > 3  # the crop offset moves from epoch to epoch
    flips = {ds.geometry(epoch, wide)[0].flip for epoch in range(12)}
    assert flips == {True, False}


def test_center_crop_without_augmentation_is_fixed(root, tokenizers):
    ds = dataset(root, tokenizers)
    assert all(not ds.geometry(epoch, 3)[0].flip for epoch in range(5))
    assert len({tuple(ds[(epoch, 3)]["crop_top_left"].tolist()) for epoch in range(5)}) == 1


def test_subset_caption_options_from_a_toml(tmp_path, tokenizers):
    noise_image(tmp_path / "imgs" / "a.png", (64, 64), 0, caption="xlbk, a, b, c")
    (tmp_path / "d.toml").write_text(
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 4\n'
        "keep_tokens = 1\ncaption_tag_dropout_rate = 1.0\n"
    )
    cfg = DataConfig(dataset_toml=tmp_path / "d.toml", **TINY)
    ds = build_dataset(cfg, CaptionConfig(), tokenizers)
    assert len(ds) == 4 and ds.samples[0].caption_cfg.keep_tokens == 1
    assert ds[0]["caption"] == "xlbk"


def test_out_of_range_subset_caption_option_is_an_input_error(tmp_path, tokenizers):
    """The TOML is an input file: its caption option failing CaptionConfig's check names the subset."""
    noise_image(tmp_path / "imgs" / "a.png", (64, 64), 0)
    toml = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\ncaption_dropout_rate = 1.5\n'
    (tmp_path / "d.toml").write_text(toml)
    cfg = DataConfig(dataset_toml=tmp_path / "d.toml", **TINY)
    with pytest.raises(InputError, match=r"dataset TOML subset .*imgs: invalid caption option \(caption.dropout_rate"):
        build_dataset(cfg, CaptionConfig(), tokenizers)


def test_bad_data_stops_with_a_clear_error(root, tokenizers):
    (root / "2_xlbk emblem" / "zz_corrupt.png").write_bytes(b"garbage")
    (root / "2_xlbk emblem" / "zz_corrupt.txt").write_text("x")
    noise_image(root / "2_xlbk emblem" / "zz_small.png", (16, 64), 9)
    noise_image(root / "1_other" / "zz_nocap.png", (64, 64), 9, caption=None)
    with pytest.raises(InputError) as err:
        dataset(root, tokenizers)
    message = str(err.value)
    assert "3 bad dataset files" in message and "zz_nocap.png" in message and "on_bad_image=skip" in message
    assert "\n" not in message


def test_bad_data_skipped_with_one_warning(root, tokenizers, caplog):
    (root / "2_xlbk emblem" / "zz_corrupt.png").write_bytes(b"garbage")
    (root / "2_xlbk emblem" / "zz_corrupt.txt").write_text("x")
    noise_image(root / "2_xlbk emblem" / "zz_small.png", (16, 64), 9)
    noise_image(root / "1_other" / "zz_nocap.png", (64, 64), 9, caption=None)
    with caplog.at_level(logging.WARNING):
        ds = dataset(root, tokenizers, on_bad_image="skip")
    assert len(ds.samples) == len(SIZES)
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = record.getMessage()
    assert all(name in text for name in ("zz_corrupt.png", "zz_small.png", "zz_nocap.png"))
    assert dataset(root, tokenizers, on_bad_image="skip", min_image_side=8).samples[-1].image.name == "zz_small.png"


def test_empty_dataset_is_an_error(tmp_path, tokenizers):
    (tmp_path / "3_nothing").mkdir()
    with pytest.raises(InputError, match="no usable image"):
        build_dataset(DataConfig(roots=(tmp_path,), **TINY), CaptionConfig(), tokenizers)


def test_data_config_checks():
    with pytest.raises(ConfigError, match="cache_latents"):
        DataConfig(cache_latents=True, random_crop=True)
    with pytest.raises(ConfigError, match="bucket_step"):
        DataConfig(bucket_step=12)
    with pytest.raises(ConfigError, match="multiples"):
        DataConfig(resolution=1000)
    assert DataConfig(cache_latents=True).cache_latents


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return [[index for _, index in batch] for batch in sampler]


def test_sampler_batches_are_single_bucket_and_cover_the_epoch(root, tokenizers):
    ds = dataset(root, tokenizers)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=1)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == sampler.total_batches
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for batch in batches:
        assert len({ds.samples[ds.sample_of[i]].bucket for i in batch}) == 1
    assert batches == epoch_batches(BucketBatchSampler(ds, batch_size=2, seed=1), 0)
    assert batches != epoch_batches(sampler, 1)
    assert all(epoch == 1 for batch in sampler for epoch, _ in batch)


def test_sampler_splits_between_ranks(root, tokenizers):
    ds = dataset(root, tokenizers)
    ranks = [BucketBatchSampler(ds, batch_size=1, seed=1, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [epoch_batches(s, 2) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0]) == 5  # 13 batches -> 5 each
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(ds))) and len(seen) == 15  # two batches repeated to even out
    dropped = BucketBatchSampler(ds, batch_size=1, seed=1, num_replicas=3, rank=0, drop_last=True)
    assert len(dropped) == len(epoch_batches(dropped, 2)) == 4


def test_sampler_resumes_mid_epoch(root, tokenizers):
    ds = dataset(root, tokenizers)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    sampler.set_epoch(4)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    assert state["epoch"] == 4 and state["position"] == 3
    resumed = BucketBatchSampler(ds, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)
    uninterrupted = BucketBatchSampler(ds, batch_size=2, seed=3)
    uninterrupted.set_epoch(4)
    full = list(uninterrupted)
    assert head + list(resumed) == full
    assert list(resumed) == full  # a later pass over the same epoch starts from its beginning
    uninterrupted.set_epoch(5)
    assert uninterrupted.state_dict()["position"] == 0 and uninterrupted.state_dict(consumed=2)["position"] == 2
    with pytest.raises(TrainingError, match="batch_size"):
        BucketBatchSampler(ds, batch_size=1, seed=3).load_state_dict(state)
    noise_image(root / "1_other" / "zz_new.png", (64, 64), 9)  # same bucket count, different images
    changed = dataset(root, tokenizers)
    with pytest.raises(TrainingError, match="dataset_hash"):
        BucketBatchSampler(changed, batch_size=2, seed=3).load_state_dict(state)


def test_dataloader_batches(root, tokenizers):
    ds = dataset(root, tokenizers)
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, batch_size=2, seed=0), collate_fn=collate)
    batch = next(iter(loader))
    n, _, h, w = batch["pixel_values"].shape
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (n, 2)
    assert batch["target_size"].tolist() == [[h, w]] * n
    assert batch["input_ids_1"].shape == (n, 1, 77) and len(batch["caption"]) == len(batch["path"]) == n


def test_builtin_demo_dataset(demo_dataset, tokenizers, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(DataConfig(roots=(demo_dataset,), **TINY), CaptionConfig(), tokenizers)
    assert not caplog.records  # nothing to complain about
    assert len(ds.samples) == 8 and len(ds) == 16 and all("xlbk emblem" in s.caption for s in ds.samples)
    assert len(ds.bucket_groups()) > 1


def test_window_size_is_short_only_in_the_last_window_of_an_epoch():
    assert [window_size(p, 8, 3) for p in range(8)] == [3, 3, 3, 3, 3, 3, 2, 2]
    assert [window_size(p, 4, 2) for p in range(4)] == [2, 2, 2, 2]
    assert [window_size(p, 3, 1) for p in range(3)] == [1, 1, 1]
