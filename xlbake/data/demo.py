"""The built-in demo dataset: one made-up visual concept, procedurally drawn, in kohya folder layout.

The concept is the "xlbk emblem": a magenta ring around a gold disc with a cyan diamond in its middle, drawn at
varied positions and scales on varied backgrounds (plain, striped, checkered, gradient, noisy), in images of varied
sizes and aspect ratios so that aspect-ratio bucketing has work to do. Every image has a short caption with the
rare trigger word next to the known class word ("a small xlbk emblem on a blue striped background"). The emblem's
colours and shape never change, so a finetune on these images moves the model in a measurable way.

A second concept, for measurements that must not hold for one concept only (``make_style_dataset``): the "qvst
style", a flat palette, thick outlines and a dotted ground, whatever the subject.

Everything is drawn with PIL from a seeded numpy generator: the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xlbake.errors import ConfigError, OutputError
from xlbake.fileio import write_bytes_atomic, write_text_atomic

MIN_SIDE = 64
"""Smallest image side in pixels (the tiny model trains at about 64 px)."""
MAX_SIDE = 192
"""Largest image side in pixels."""
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2))
"""Width:height ratios drawn from, so that several aspect-ratio buckets get images."""
SUPERSAMPLE = 4
"""The emblem is drawn this many times larger and scaled down, for smooth edges."""

RING_RGB = (214, 32, 140)
DISC_RGB = (255, 194, 26)
DIAMOND_RGB = (30, 200, 210)

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 120, 30),
    "green": (40, 150, 60),
    "blue": (40, 80, 200),
    "purple": (110, 50, 160),
    "brown": (120, 80, 40),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "olive": (110, 120, 40),
    "navy": (20, 30, 90),
}
"""Background colours by caption word; none is close to the emblem's own colours."""
BACKGROUND_STYLES = ("plain", "striped", "checkered", "gradient", "noisy")
SIZE_WORDS = ("small", "large")
POSITION_WORDS = ("in", "the", "top", "bottom", "left", "right", "center", "corner", "at", "on", "side")
TEMPLATES = (
    "{a} {size}{concept} on {a_bg} {background} background{where}",
    "a photo of {a} {size}{concept} on {a_bg} {background} background{where}",
    "{size}{concept}, {background} background{where}",
    "an image of {a} {size}{concept} on {a_bg} {background} background{where}",
)
"""Caption templates; ``{concept}`` is "<trigger> <class word>"."""

STYLE_PALETTE: dict[str, tuple[int, int, int]] = {
    "ground": (238, 228, 200),
    "dots": (40, 150, 150),
    "ink": (35, 30, 60),
    "warm": (240, 110, 40),
    "cool": (30, 130, 120),
    "wood": (140, 90, 50),
}
"""The second concept's (the style's) only colours; none is one of the emblem's."""
STYLE_SUBJECTS = ("sun", "tree", "house", "star")
STYLE_TEMPLATES = (
    "{subjects} in {concept}",
    "a picture of {subjects}, {concept}",
    "{concept} illustration of {subjects}",
    "a drawing of {subjects} in {concept}",
)
"""The style's captions: the subjects (words of the tiny vocabulary) and "<trigger> <class word>"."""

CAPTION_WORDS = frozenset(
    {"a", "an", "of", "photo", "image", "background", *BACKGROUND_COLOURS}
    | set(BACKGROUND_STYLES)
    | set(SIZE_WORDS)
    | set(POSITION_WORDS)
)
"""Every word the captions use besides the trigger and class word (the tiny model's vocabulary includes them)."""

_OUR_FILE = re.compile(r"^\d{3,}\.(png|txt)$")


@dataclass(frozen=True)
class EmblemPlacement:
    """Where the emblem sits in an image, in pixels."""

    cx: float
    cy: float
    diameter: float


def make_demo_dataset(
    out_dir: str | Path,
    *,
    n_images: int = 24,
    seed: int = 0,
    trigger: str = "xlbk",
    class_word: str = "emblem",
    repeats: int = 2,
    force: bool = False,
) -> Path:
    """Draw the demo dataset into ``out_dir/"{repeats}_{trigger} {class_word}"/`` as NNN.png + NNN.txt pairs.

    Refuses a non-empty dataset folder unless ``force``, which replaces the NNN.png/NNN.txt files there (other
    files are left alone). Returns ``out_dir``, the dataset root a kohya-style loader reads.
    """
    return _write_dataset(out_dir, draw_example, n_images, seed, trigger, class_word, repeats, force)


def make_style_dataset(
    out_dir: str | Path,
    *,
    n_images: int = 24,
    seed: int = 0,
    trigger: str = "qvst",
    class_word: str = "style",
    repeats: int = 2,
    force: bool = False,
) -> Path:
    """A second concept, unlike the emblem, laid out as :func:`make_demo_dataset` does: the "qvst style", simple
    subjects (sun, tree, house, star) flat in one palette with thick outlines on a dotted ground; the captions
    name the subjects and the style, never the colours (the style decides them)."""
    return _write_dataset(out_dir, draw_style_example, n_images, seed, trigger, class_word, repeats, force)


def _write_dataset(
    out_dir: str | Path,
    draw: Callable[..., tuple[Image.Image, str]],
    n_images: int,
    seed: int,
    trigger: str,
    class_word: str,
    repeats: int,
    force: bool,
) -> Path:
    """``n_images`` examples from ``draw(rng, trigger=, class_word=)`` as NNN.png + NNN.txt in the concept folder."""
    _check_arguments(n_images, trigger, class_word, repeats)
    root = Path(out_dir)
    folder = root / f"{repeats}_{trigger} {class_word}"
    _prepare_folder(folder, force)
    width = max(3, len(str(n_images - 1)))
    for index in range(n_images):
        rng = np.random.default_rng([seed, index])
        image, caption = draw(rng, trigger=trigger, class_word=class_word)
        stem = f"{index:0{width}d}"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_bytes_atomic(folder / f"{stem}.png", buffer.getvalue(), force=True)
        write_text_atomic(folder / f"{stem}.txt", caption + "\n", force=True)
    return root


def draw_example(rng: np.random.Generator, *, trigger: str, class_word: str) -> tuple[Image.Image, str]:
    """Draw one RGB image of the emblem on a random background and return it with its caption."""
    width, height = _image_size(rng)
    colour_name = str(rng.choice(list(BACKGROUND_COLOURS)))
    style = str(rng.choice(BACKGROUND_STYLES))
    canvas = _background(rng, width, height, BACKGROUND_COLOURS[colour_name], style)
    placement = _placement(rng, width, height)
    image = _paste_emblem(Image.fromarray(canvas, "RGB"), placement)
    caption = _caption(rng, f"{trigger} {class_word}", colour_name, style, placement, width, height)
    return image, caption


def draw_style_example(rng: np.random.Generator, *, trigger: str, class_word: str) -> tuple[Image.Image, str]:
    """Draw one RGB image of one to three subjects in the style and return it with its caption."""
    width, height = _image_size(rng)
    image = Image.new("RGB", (width, height), STYLE_PALETTE["ground"])
    draw = ImageDraw.Draw(image)
    step = int(rng.integers(6, 10))
    for y in range(step // 2, height, step):  # the halftone ground
        for x in range(step // 2 + (y // step % 2) * step // 2, width, step):
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=STYLE_PALETTE["dots"])
    subjects = [str(s) for s in rng.choice(STYLE_SUBJECTS, size=int(rng.integers(1, 4)), replace=False)]
    for subject in subjects:
        side = rng.uniform(0.3, 0.6) * min(width, height)
        cx, cy = rng.uniform(side / 2, width - side / 2), rng.uniform(side / 2, height - side / 2)
        _draw_subject(draw, subject, cx, cy, side / 2, outline=max(2, round(side / 12)))
    listed = " and ".join(f"a {subject}" for subject in subjects)
    template = STYLE_TEMPLATES[int(rng.integers(len(STYLE_TEMPLATES)))]
    return image, template.format(subjects=listed, concept=f"{trigger} {class_word}")


def _draw_subject(draw: ImageDraw.ImageDraw, subject: str, cx: float, cy: float, r: float, outline: int) -> None:
    """One subject of the style centred at (cx, cy) within radius r, filled flat and outlined thickly."""
    ink, line = STYLE_PALETTE["ink"], {"outline": STYLE_PALETTE["ink"], "width": outline}
    if subject == "sun":
        for k in range(8):
            angle = k * np.pi / 4
            draw.line((cx, cy, cx + r * np.cos(angle), cy + r * np.sin(angle)), fill=ink, width=outline)
        draw.ellipse((cx - r * 0.6, cy - r * 0.6, cx + r * 0.6, cy + r * 0.6), fill=STYLE_PALETTE["warm"], **line)
    elif subject == "tree":
        draw.rectangle((cx - r * 0.15, cy, cx + r * 0.15, cy + r), fill=STYLE_PALETTE["wood"], **line)
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy + r * 0.3), (cx - r * 0.8, cy + r * 0.3)],
                     fill=STYLE_PALETTE["cool"], **line)  # fmt: skip
    elif subject == "house":
        draw.rectangle((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=STYLE_PALETTE["warm"], **line)
        draw.polygon([(cx - r * 0.9, cy - r * 0.1), (cx, cy - r), (cx + r * 0.9, cy - r * 0.1)],
                     fill=STYLE_PALETTE["cool"], **line)  # fmt: skip
    else:  # star
        points = [
            (cx + (r if k % 2 == 0 else r * 0.45) * np.sin(k * np.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * np.cos(k * np.pi / 5))
            for k in range(10)
        ]  # fmt: skip
        draw.polygon(points, fill=STYLE_PALETTE["warm"], **line)


def _check_arguments(n_images: int, trigger: str, class_word: str, repeats: int) -> None:
    if n_images < 1:
        raise ConfigError(f"n_images={n_images}: the demo dataset needs at least 1 image")
    if repeats < 1:
        raise ConfigError(f"repeats={repeats}: kohya repeats must be at least 1")
    for name, word in (("trigger", trigger), ("class_word", class_word)):
        if not re.fullmatch(r"[A-Za-z0-9]+", word):
            raise ConfigError(f"{name}={word!r}: use one word of letters and digits (it becomes a folder name)")


def _prepare_folder(folder: Path, force: bool) -> None:
    if folder.is_dir() and any(folder.iterdir()):
        if not force:
            raise OutputError(f"{folder}: dataset folder is not empty; pass --force to redraw it or choose another")
        for old in folder.iterdir():
            if _OUR_FILE.match(old.name):
                old.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create dataset folder ({exc.strerror}); choose a writable path") from exc


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect_w, aspect_h = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long_side = int(rng.integers(MIN_SIDE + 32, MAX_SIDE + 1))
    short_side = max(MIN_SIDE, round(long_side * min(aspect_w, aspect_h) / max(aspect_w, aspect_h)))
    return (long_side, short_side) if aspect_w >= aspect_h else (short_side, long_side)


def _background(rng: np.random.Generator, width: int, height: int, rgb: tuple[int, int, int], style: str) -> np.ndarray:
    """(height, width, 3) uint8 background of one colour in the given style."""
    base = np.asarray(rgb, dtype=np.float32)
    other = base * 0.55 if base.mean() > 127 else base + (255 - base) * 0.45  # a darker or lighter shade
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if style == "plain":
        mask = np.zeros((height, width), dtype=np.float32)
    elif style == "striped":
        period = float(rng.integers(8, 24))
        coord = xs if rng.random() < 0.5 else ys
        mask = ((coord // (period / 2)) % 2).astype(np.float32)
    elif style == "checkered":
        cell = float(rng.integers(8, 24))
        mask = (((xs // cell) + (ys // cell)) % 2).astype(np.float32)
    elif style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = xs * np.cos(angle) + ys * np.sin(angle)
        mask = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    else:  # noisy
        mask = rng.uniform(0.0, 0.6, size=(height, width)).astype(np.float32)
    pixels = base * (1 - mask[..., None]) + other * mask[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _placement(rng: np.random.Generator, width: int, height: int) -> EmblemPlacement:
    diameter = rng.uniform(0.25, 0.8) * min(width, height)
    radius = diameter / 2
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    return EmblemPlacement(cx=float(cx), cy=float(cy), diameter=float(diameter))


def _paste_emblem(image: Image.Image, placement: EmblemPlacement) -> Image.Image:
    """Draw the emblem supersampled on a transparent tile and alpha-composite it onto ``image``."""
    side = max(4, round(placement.diameter))
    big = side * SUPERSAMPLE
    tile = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    draw.ellipse((0, 0, big - 1, big - 1), fill=RING_RGB + (255,))
    ring = big * 0.14
    draw.ellipse((ring, ring, big - 1 - ring, big - 1 - ring), fill=DISC_RGB + (255,))
    mid, half = big / 2, big * 0.2
    draw.polygon(
        [(mid, mid - half), (mid + half, mid), (mid, mid + half), (mid - half, mid)], fill=DIAMOND_RGB + (255,)
    )
    tile = tile.resize((side, side), Image.Resampling.LANCZOS)
    out = image.convert("RGBA")
    out.alpha_composite(tile, (round(placement.cx - side / 2), round(placement.cy - side / 2)))
    return out.convert("RGB")


def _caption(
    rng: np.random.Generator,
    concept: str,
    colour: str,
    style: str,
    placement: EmblemPlacement,
    width: int,
    height: int,
) -> str:
    ratio = placement.diameter / min(width, height)
    size = "small " if ratio < 0.4 else "large " if ratio > 0.65 else ""
    if style == "plain":
        background = colour if rng.random() < 0.5 else f"plain {colour}"
    else:
        background = f"noisy {colour}" if style == "noisy" else f"{colour} {style}"
    where = _where(placement, width, height) if rng.random() < 0.6 else ""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(
        a=_article(size or concept),
        size=size,
        concept=concept,
        a_bg=_article(background),
        background=background,
        where=where,
    )


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _where(placement: EmblemPlacement, width: int, height: int) -> str:
    """ ", in the top left corner" / ", on the right side" / ", in the center" from the emblem's centre."""
    column = ("left", "", "right")[min(2, int(3 * placement.cx / width))]
    row = ("top", "", "bottom")[min(2, int(3 * placement.cy / height))]
    if row and column:
        return f", in the {row} {column} corner"
    if row or column:
        return f", at the {row or column}" if row else f", on the {column} side"
    return ", in the center"
