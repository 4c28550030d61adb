"""The sample-grid sheet: equally sized images in rows and columns, with wrapped row and column labels and a title,
drawn with PIL (labels break between names and numbers, never inside one)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, features

MIN_FONT = 12
CELL_WIDTHS_PER_FONT = 20
LINE_SPACING = 1.25
COLUMN_LABEL_LINES = 3
LABEL_WIDTH_IN_FONTS = 10
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)
ELLIPSIS = "..."
SEPARATORS = r"-_/\\,;:+="
BREAK_AFTER = re.compile(rf"\s*[^{SEPARATORS}\s]+[{SEPARATORS}]*|\s*[{SEPARATORS}]+")
"""The pieces a label line may end after: a name or number (dots included: 0.85 stays whole) with the separators
that follow it, and the spaces before it."""


@dataclass(frozen=True)
class GridGeometry:
    """Pixel layout of a grid sheet: optional title line, column headers, then rows of a label and cells."""

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    font_size: int
    line_height: int
    padding: int
    gap: int
    label_width: int  # row labels (prompts), left
    header_height: int  # column labels, top: COLUMN_LABEL_LINES lines
    title_height: int  # 0 without a title

    @property
    def width(self) -> int:
        return self.label_width + self.cols * (self.cell_width + self.gap) + self.gap

    @property
    def height(self) -> int:
        return self.title_height + self.header_height + self.rows * (self.cell_height + self.gap) + self.gap

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of cell (row, col)."""
        left = self.label_width + self.gap + col * (self.cell_width + self.gap)
        top = self.title_height + self.header_height + self.gap + row * (self.cell_height + self.gap)
        return left, top, left + self.cell_width, top + self.cell_height


def grid_geometry(rows: int, cols: int, cell_size: tuple[int, int], *, title: bool = False) -> GridGeometry:
    """The layout for ``rows`` x ``cols`` cells of ``cell_size`` (width, height); text scales with the cells."""
    width, height = cell_size
    font = max(MIN_FONT, width // CELL_WIDTHS_PER_FONT)
    line = round(font * LINE_SPACING)
    padding = font // 2
    return GridGeometry(
        rows=rows,
        cols=cols,
        cell_width=width,
        cell_height=height,
        font_size=font,
        line_height=line,
        padding=padding,
        gap=max(2, width // 64),
        label_width=max(width // 2, LABEL_WIDTH_IN_FONTS * font),
        header_height=COLUMN_LABEL_LINES * line + 2 * padding,
        title_height=line + 2 * padding if title else 0,
    )


def layout_grid(
    cells: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str | None = None,
) -> Image.Image:
    """One RGB sheet of equally sized ``cells[row][col]`` with wrapped row and column labels (PIL's default font).

    Labels longer than their box are cut with "..."; a "\\n" in a label starts a new line.
    """
    if not cells or not cells[0] or any(len(row) != len(cells[0]) for row in cells):
        raise ValueError("layout_grid: cells must be a non-empty rectangle of images")
    if len(row_labels) != len(cells) or len(col_labels) != len(cells[0]):
        raise ValueError(f"layout_grid: {len(cells)}x{len(cells[0])} cells, {len(row_labels)}x{len(col_labels)} labels")
    size = cells[0][0].size
    if any(image.size != size for row in cells for image in row):
        raise ValueError(f"layout_grid: every cell must be {size[0]}x{size[1]} like the first")
    geo = grid_geometry(len(cells), len(cells[0]), size, title=title is not None)
    sheet = Image.new("RGB", (geo.width, geo.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(geo.font_size)
    if title is not None:
        _draw_lines(draw, _fit(draw, title, font, geo.width - 2 * geo.padding, 1), font, geo, geo.width // 2, 0)
    for col, label in enumerate(col_labels):
        left, _, right, _ = geo.cell_box(0, col)
        lines = _fit(draw, label, font, right - left, COLUMN_LABEL_LINES)
        _draw_lines(draw, lines, font, geo, (left + right) // 2, geo.title_height)
    for row, (label, images) in enumerate(zip(row_labels, cells, strict=True)):
        _, top, _, _ = geo.cell_box(row, 0)
        max_lines = max(1, (geo.cell_height - 2 * geo.padding) // geo.line_height)
        lines = _fit(draw, label, font, geo.label_width - 2 * geo.padding, max_lines)
        _draw_lines(draw, lines, font, geo, None, top)
        for col, image in enumerate(images):
            sheet.paste(image.convert("RGB"), geo.cell_box(row, col)[:2])
    return sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` pixels (its fixed bitmap font when Pillow lacks FreeType)."""
    return ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: object, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped into at most ``max_lines`` lines of ``width`` px: at spaces, else after a separator inside a
    word (``BREAK_AFTER``), never inside a name or number. A piece wider than a line ends in "..."; when lines run
    out, the longest "\\n"-separated part loses its last lines first (cut with "..."), so that each part keeps one."""

    def fits(line: str) -> bool:
        return draw.textlength(line, font=font) <= width

    parts = [_wrap(paragraph, fits) for paragraph in text.split("\n")]
    while sum(map(len, parts)) > max_lines and max(map(len, parts)) > 1:
        longest = max(parts, key=len)
        del longest[-1]
        longest[-1] = _cut(BREAK_AFTER.findall(longest[-1]), fits)
    lines = [line for part in parts for line in part]
    if len(lines) > max_lines:  # more parts than lines
        lines = [*lines[: max_lines - 1], _cut(BREAK_AFTER.findall(lines[max_lines - 1]), fits)]
    return lines


def _wrap(paragraph: str, fits: Callable[[str], bool]) -> list[str]:
    """One paragraph wrapped at spaces, else after separators; a piece too wide for a line is cut with "..."."""
    lines: list[str] = []
    line = ""
    for word in paragraph.split(" "):
        for index, piece in enumerate(BREAK_AFTER.findall(word)):
            joined = f"{line} {piece}" if line and index == 0 else line + piece
            if fits(joined):
                line = joined
                continue
            if line:
                lines.append(line)
            line = piece if fits(piece) else _cut([piece], fits)
    return [*lines, line]


def _cut(pieces: list[str], fits: Callable[[str], bool]) -> str:
    """The pieces with "..." after as many whole pieces as fit; with a single piece, as many characters as fit."""
    while len(pieces) > 1 and not fits("".join(pieces) + ELLIPSIS):
        pieces.pop()
    text = "".join(pieces).rstrip()
    while text and not fits(text + ELLIPSIS):
        text = text[:-1]
    return text + ELLIPSIS


def _draw_lines(
    draw: ImageDraw.ImageDraw, lines: Sequence[str], font: object, geo: GridGeometry, center: int | None, top: int
) -> None:
    """Draw ``lines`` from ``top`` + padding: centred on x = ``center``, or left-aligned at the padding if None."""
    for index, line in enumerate(lines):
        y = top + geo.padding + index * geo.line_height
        if center is None:
            draw.text((geo.padding, y), line, fill=INK, font=font)
        else:
            draw.text((center, y), line, fill=INK, font=font, anchor="ma")
