"""Bucket sets, bucket assignment and crop geometry against hand-computed cases."""

import pytest

from finetune.buckets import BucketGrid, cover_size, crop_geometry, make_bucket_resolutions


def test_sdxl_bucket_set():
    resos = make_bucket_resolutions(1024, 256, 2048, 64)
    assert list(resos) == sorted(resos)
    assert (1024, 1024) in resos
    # width 1216: 1024^2 // 1216 = 862 -> 832 at step 64; width 256: 4096 capped at max 2048
    assert {(1216, 832), (832, 1216), (256, 2048), (2048, 256), (1088, 960), (960, 1088)} <= set(resos)
    for w, h in resos:
        assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 2048


def test_tiny_bucket_set_uses_its_step():
    resos = make_bucket_resolutions(64, 32, 128, 8)
    assert (64, 64) in resos and (32, 128) in resos and (72, 56) in resos  # 4096 // 72 = 56
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 4096 for w, h in resos)


def test_assign_bucket_closest_aspect_ratio():
    grid = BucketGrid(1024, 256, 2048, 64)
    # 1000x700 has aspect 1.4286: (1216, 832) = 1.4615 beats (1152, 896) = 1.2857 and (1280, 768) = 1.6667
    assert grid.assign_bucket(1000, 700) == (1216, 832)
    assert grid.assign_bucket(700, 1000) == (832, 1216)
    assert grid.assign_bucket(3000, 3000) == (1024, 1024)
    assert grid.assign_bucket(832, 1216) == (832, 1216)  # an image of bucket size keeps it


def test_assign_bucket_no_upscale():
    grid = BucketGrid(1024, 256, 2048, 64, no_upscale=True)
    assert grid.assign_bucket(500, 300) == (448, 256)  # never enlarged: sides floored to the step
    # 4000x3000 shrinks to area 1024^2: scale 0.29560 -> 1182 x 887 -> floored (1152, 832)
    assert grid.assign_bucket(4000, 3000) == (1152, 832)
    # 3000x100 fits the area but not max_reso: scale 2048/3000 -> 2048 x 68 -> (2048, 64)
    assert grid.assign_bucket(3000, 100) == (2048, 64)


def test_bucket_grid_checks():
    with pytest.raises(ValueError, match="multiples"):
        BucketGrid(1000, 256, 2048, 64)
    with pytest.raises(ValueError, match="min <= resolution <= max"):
        BucketGrid(1024, 1088, 2048, 64)
    with pytest.raises(ValueError, match="positive"):
        BucketGrid().assign_bucket(0, 10)


def test_cover_size():
    assert cover_size(1000, 700, 1216, 832) == (1216, 851)  # scale 1.216 on width; 851.2 rounds down
    assert cover_size(800, 1200, 832, 1216) == (832, 1248)  # scale 1.04 on width
    assert cover_size(2000, 1000, 1024, 1024) == (2048, 1024)


def test_center_crop_and_micro_conditioning():
    g = crop_geometry(1000, 700, (1216, 832))
    assert g.resize == (1216, 851)
    assert (g.crop_left, g.crop_top) == (0, 9)  # 19 spare rows, centered
    assert g.original_size_hw == (700, 1000)
    assert g.crop_top_left == (9, 0)  # (top, left): the vertical offset goes first
    assert g.target_size_hw == (832, 1216)


def test_random_crop_offsets_on_the_right_axes():
    # a wide image in a square bucket: only a horizontal offset is possible
    g = crop_geometry(2000, 1000, (1024, 1024), jitter=(0.25, 0.9))
    assert g.resize == (2048, 1024)
    assert (g.crop_left, g.crop_top) == (256, 0)  # floor(0.25 * 1025); no spare rows
    assert g.crop_top_left == (0, 256)
    # a tall image: only a vertical offset
    g = crop_geometry(1000, 2000, (1024, 1024), jitter=(0.9, 0.25))
    assert (g.crop_left, g.crop_top) == (0, 256)
    assert g.crop_top_left == (256, 0)
    assert g.original_size_hw == (2000, 1000)


def test_jitter_reaches_both_ends():
    assert crop_geometry(2000, 1000, (1024, 1024), jitter=(0.0, 0.0)).crop_left == 0
    assert crop_geometry(2000, 1000, (1024, 1024), jitter=(0.9999, 0.0)).crop_left == 1024
    with pytest.raises(ValueError, match="jitter"):
        crop_geometry(2000, 1000, (1024, 1024), jitter=(1.0, 0.0))


def test_flip_mirrors_the_left_offset():
    g = crop_geometry(2000, 1000, (1024, 1024), jitter=(0.25, 0.0), flip=True)
    assert g.flip and g.crop_left == 256
    assert g.crop_top_left == (0, 2048 - 1024 - 256)
    centered = crop_geometry(1000, 2000, (1024, 1024), flip=True)
    assert centered.crop_top_left == (512, 0)  # no horizontal slack: the flip changes nothing
