"""Aspect-ratio buckets (kohya sd-scripts semantics) and the crop geometry with SDXL's micro-conditioning.

Pure: sizes in, sizes out. Sizes are (width, height) unless named ``*_hw``; SDXL's conditioning tuples are
(h, w) and (top, left), as in its paper and in diffusers' ``add_time_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Size = tuple[int, int]


def make_bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> tuple[Size, ...]:
    """kohya's ``make_bucket_resolutions``: every (w, h) with sides in [min_reso, max_reso], multiples of ``step``,
    and area at most resolution^2 (the larger side as large as that allows), plus the square; sorted."""
    max_area = resolution * resolution
    square = int(math.sqrt(max_area) // step) * step
    resos = {(square, square)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            resos.update({(width, height), (height, width)})
    return tuple(sorted(resos))


@dataclass(frozen=True)
class BucketGrid:
    """The bucket set of one training run and the rule that assigns an image to a bucket."""

    resolution: int = 1024
    min_reso: int = 256
    max_reso: int = 2048
    step: int = 64
    no_upscale: bool = False
    resolutions: tuple[Size, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.step <= 0 or any(v % self.step for v in (self.resolution, self.min_reso, self.max_reso)):
            raise ValueError(
                f"resolution {self.resolution}, min {self.min_reso} and max {self.max_reso} must be multiples of "
                f"the bucket step {self.step}"
            )
        if not 0 < self.min_reso <= self.resolution <= self.max_reso:
            raise ValueError(f"need min <= resolution <= max, got {self.min_reso}, {self.resolution}, {self.max_reso}")
        resos = make_bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)
        object.__setattr__(self, "resolutions", resos)

    def assign_bucket(self, width: int, height: int) -> Size:
        """The bucket (bw, bh) of a width x height image.

        Default (kohya): the image's own size if it is a bucket, else the bucket with the closest aspect ratio
        (|bw/bh - w/h|, first in sorted order on ties); the image is later resized to cover it (up or down).
        no_upscale: the image shrunk to fit area resolution^2 and sides max_reso if larger (never enlarged), each
        side rounded down to the step (at least one step), so only a few pixels are cropped.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.no_upscale:
            scale = min(1.0, math.sqrt(self.resolution**2 / (width * height)), self.max_reso / max(width, height))
            return self._floor(round(width * scale)), self._floor(round(height * scale))
        if (width, height) in self.resolutions:
            return width, height
        aspect = width / height
        return min(self.resolutions, key=lambda reso: abs(reso[0] / reso[1] - aspect))

    def _floor(self, side: int) -> int:
        return max(self.step, side // self.step * self.step)


@dataclass(frozen=True)
class CropGeometry:
    """How one image becomes one training sample of its bucket, and SDXL's conditioning of that sample."""

    resize: Size
    """(w, h) the source is resized to: the smallest size that covers the bucket with the source's aspect."""
    crop_left: int
    """Left edge of the crop in the resized image, before any flip."""
    crop_top: int
    """Top edge of the crop in the resized image."""
    flip: bool
    """Whether the crop is mirrored horizontally."""
    original_size_hw: Size
    """SDXL original_size (h, w): the source image size."""
    crop_top_left: Size
    """SDXL crops_coords_top_left (top, left): the crop's offset in the resized image; with a flip, the left edge
    of the crop in the mirrored resized image (resized_w - bucket_w - crop_left)."""
    target_size_hw: Size
    """SDXL target_size (h, w): the bucket."""


def cover_size(width: int, height: int, bucket_w: int, bucket_h: int) -> Size:
    """Smallest (w, h) with the source's aspect ratio (rounded) that covers bucket_w x bucket_h."""
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def crop_geometry(
    width: int,
    height: int,
    bucket: Size,
    *,
    jitter: tuple[float, float] | None = None,
    flip: bool = False,
) -> CropGeometry:
    """Resize-to-cover then crop for a width x height source and a (bw, bh) bucket.

    Args:
        jitter: None for a center crop; (u_x, u_y) in [0, 1) for a random crop, mapping uniformly onto the
            possible offsets: left = floor(u_x * (resized_w - bw + 1)), likewise top.
        flip: mirror the crop horizontally; the pixels are those of the mirrored resized image cropped at
            (top, resized_w - bw - left), and that is the offset SDXL is conditioned on.
    """
    bucket_w, bucket_h = bucket
    resized_w, resized_h = cover_size(width, height, bucket_w, bucket_h)
    slack_x, slack_y = resized_w - bucket_w, resized_h - bucket_h
    if jitter is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        u_x, u_y = jitter
        if not (0 <= u_x < 1 and 0 <= u_y < 1):
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        left, top = math.floor(u_x * (slack_x + 1)), math.floor(u_y * (slack_y + 1))
    cond_left = slack_x - left if flip else left
    return CropGeometry(
        resize=(resized_w, resized_h),
        crop_left=left,
        crop_top=top,
        flip=flip,
        original_size_hw=(height, width),
        crop_top_left=(top, cond_left),
        target_size_hw=(bucket_h, bucket_w),
    )
