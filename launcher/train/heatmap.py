"""Expert-load heatmaps for TensorBoard, drawn with numpy and Pillow (both already TensorBoard dependencies).

Colour = the share of a layer's routed tokens (routing slots, counted before capacity drops) that went to one
expert, on a FIXED logarithmic scale around the fair share 1/E, the same at every step and in every layer:

    white = 1/E (balanced)   red = above (dark red: >= 4/E)   blue = below (dark blue: <= 1/(4E), idle experts)
    grey = no tokens routed in that layer/column

Map: ColorBrewer RdBu, reversed (Brewer, colorbrewer2.org; a perceptually ordered diverging scheme), interpolated
linearly between its 11 anchors. A hot expert is a red cell; a dead one a dark blue cell.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_RDBU_R = ("053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7", "fddbc7", "f4a582", "d6604d", "b2182b",
           "67001f")
_ANCHORS_K3 = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _RDBU_R], dtype=np.float64)
NO_DATA_RGB = (150, 150, 150)
LOG2_RANGE = 2.0
"""Colour scale in log2(share / fair share): -2 .. +2, i.e. 1/(4E) .. 4/E; values outside are clipped."""

LEVELS = 64
"""Colour-scale positions are rounded to LEVELS steps, so each image needs only a small palette: PNGs are written
with LEVELS map colours + 16 greys (about 3x smaller than RGB PNGs; a 58-layer x 256-expert map is ~22 KB)."""

_FONT_PX = 12
_PAD = 6
_COLORBAR_H = 12
_MAX_CELL = 32
_GRID_W = 448
"""Target width of the cell grid in pixels: cells are 448 // columns wide (2 .. 32 px), so a picture of up to 224
columns is about as wide as a TensorBoard card (two cards a row in a 1440 px window)."""
_GRID_H = 160
"""Target height of the cell grid in pixels: cells are 160 // rows tall (2 .. 32 px). TensorBoard shows a picture
in a card about 210 px tall unless "Show actual image size" is on: pictures of up to 80 rows stay about that
tall, so their labels remain readable in the card."""


def colorize(t: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] of positions ``t`` in [0, 1] on the reversed RdBu map (clipped); NaN -> grey."""
    t = np.asarray(t, dtype=np.float64)
    pos = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_RDBU_R) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_RDBU_R) - 2)
    w = (pos - lo)[..., None]
    rgb = (1 - w) * _ANCHORS_K3[lo] + w * _ANCHORS_K3[lo + 1]
    rgb[np.isnan(t)] = NO_DATA_RGB
    return np.rint(rgb).astype(np.uint8)


def _palette_image() -> Image.Image:
    greys = np.repeat(np.arange(0, 256, 17, dtype=np.uint8)[:, None], 3, axis=1)
    colours = np.concatenate([colorize(np.linspace(0.0, 1.0, LEVELS)), greys, np.array([NO_DATA_RGB], np.uint8)])
    pal = Image.new("P", (1, 1))
    pal.putpalette(colours.flatten().tolist())
    return pal


_PALETTE = _palette_image()


def png_bytes(rgb_HW3: np.ndarray) -> bytes:
    """PNG of an image drawn by :func:`render`, palette-encoded (its colours are all in the palette but text
    anti-aliasing, which goes to the nearest grey)."""
    buf = io.BytesIO()
    Image.fromarray(rgb_HW3).quantize(palette=_PALETTE, dither=Image.Dither.NONE).save(buf, format="PNG")
    return buf.getvalue()


def load_position(share: np.ndarray, num_experts: int) -> np.ndarray:
    """Colour-scale position in [0, 1] of a load share (fraction of a layer's routed tokens, 0..1): 0.5 at the
    fair share 1/E, 0 at <= 1/(4E) (and 0), 1 at >= 4/E. NaN stays NaN."""
    with np.errstate(divide="ignore"):
        log_ratio = np.log2(np.asarray(share, dtype=np.float64) * num_experts)
    return np.clip(log_ratio, -LOG2_RANGE, LOG2_RANGE) / (2 * LOG2_RANGE) + 0.5


def load_colorbar_ticks(num_experts: int) -> list[tuple[float, str]]:
    """(position, label) of the colour bar: shares 1/(4E), 1/(2E), 1/E, 2/E, 4/E as percentages."""
    ticks = []
    for p in range(-int(LOG2_RANGE), int(LOG2_RANGE) + 1):
        share = 2.0 ** p / num_experts
        label = f"{100 * share:.3g}%"
        label = ("<=" if p == -LOG2_RANGE else ">=" if p == LOG2_RANGE else "") + label
        ticks.append((p / (2 * LOG2_RANGE) + 0.5, label))
    return ticks


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_PX)


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = _font().getbbox(text)
    return right - left, _FONT_PX + 2 if text else 0


@dataclass(frozen=True)
class Grid:
    """Where the cells of a ``rows x cols`` heatmap sit in its image (pixels; row r, column c spans
    ``[top + r * cell_h, top + (r + 1) * cell_h) x [left + c * cell_w, left + (c + 1) * cell_w)``)."""

    rows: int
    cols: int
    cell_h: int
    cell_w: int
    top: int
    left: int
    height: int
    """Image height."""
    width: int
    """Image width."""

    def cell_center(self, r: int, c: int) -> tuple[int, int]:
        """(y, x) of the middle pixel of cell (r, c)."""
        return self.top + r * self.cell_h + self.cell_h // 2, self.left + c * self.cell_w + self.cell_w // 2


def grid_for(rows: int, cols: int, row_labels: Sequence[str], title: str, footer: Sequence[str]) -> Grid:
    """Layout of a heatmap: title line, row labels left of the cells, column labels and footer lines below."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a heatmap needs at least one row and one column, got {rows} x {cols}")
    cell_h = max(2, min(_MAX_CELL, _GRID_H // rows))
    cell_w = max(2, min(_MAX_CELL, _GRID_W // cols))
    line = _text_size("0")[1]
    left = _PAD + max(_text_size(s)[0] for s in row_labels) + _PAD
    top = _PAD + line + _PAD
    below = _PAD + line + _PAD + len(footer) * line + _PAD + _COLORBAR_H + line + _PAD
    widest = max([_text_size(title)[0], *(_text_size(s)[0] for s in footer), 300])
    width = max(left + cols * cell_w + _PAD, _PAD + widest + _PAD)
    return Grid(rows, cols, cell_h, cell_w, top, left, top + rows * cell_h + below, width)


def _every(n: int, size_px: int, label_px: int) -> list[int]:
    """Indices to label among ``n`` cells of ``size_px`` so that labels ``label_px`` wide/tall never overlap."""
    stride = max(1, math.ceil((label_px + 4) / size_px))
    return list(range(0, n, stride))


def render(position_RC: np.ndarray, title: str, row_labels: Sequence[str], col_labels: Sequence[str],
           footer: Sequence[str], ticks: Sequence[tuple[float, str]]) -> np.ndarray:
    """RGB uint8 image [H, W, 3] of a heatmap: ``position_RC`` (colour-scale positions in [0, 1], NaN = no data)
    as cells laid out by :func:`grid_for`, thinned row and column labels, footer lines and a horizontal colour
    bar with ``ticks`` ((position, label) pairs)."""
    rows, cols = position_RC.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{rows} x {cols} heatmap needs {rows} row and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")
    g = grid_for(rows, cols, row_labels, title, footer)
    canvas = np.full((g.height, g.width, 3), 255, dtype=np.uint8)
    position_RC = np.rint(np.asarray(position_RC, dtype=np.float64) * (LEVELS - 1)) / (LEVELS - 1)
    cells = np.repeat(np.repeat(colorize(position_RC), g.cell_h, axis=0), g.cell_w, axis=1)
    canvas[g.top:g.top + rows * g.cell_h, g.left:g.left + cols * g.cell_w] = cells
    y = g.top + rows * g.cell_h + _PAD
    bar_w = g.width - 2 * _PAD
    line = _text_size("0")[1]
    bar_y = y + line + _PAD + len(footer) * line + _PAD
    bar_t = np.rint(np.linspace(0.0, 1.0, bar_w) * (LEVELS - 1)) / (LEVELS - 1)
    canvas[bar_y:bar_y + _COLORBAR_H, _PAD:_PAD + bar_w] = colorize(bar_t)[None]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    ink = (0, 0, 0)
    draw.rectangle([g.left - 1, g.top - 1, g.left + cols * g.cell_w, g.top + rows * g.cell_h], outline=(85, 85, 85))
    draw.text((_PAD, _PAD), title, fill=ink, font=_font())
    for r in _every(rows, g.cell_h, line):
        w = _text_size(row_labels[r])[0]
        draw.text((g.left - _PAD - w, g.top + r * g.cell_h + (g.cell_h - line) // 2), row_labels[r], fill=ink,
                  font=_font())
    widest = max(_text_size(s)[0] for s in col_labels)
    for c in _every(cols, g.cell_w, widest):
        w = _text_size(col_labels[c])[0]
        x = min(max(g.left + c * g.cell_w + (g.cell_w - w) // 2, 0), g.width - w)
        draw.text((x, y), col_labels[c], fill=ink, font=_font())
    for i, text in enumerate(footer):
        draw.text((_PAD, y + line + _PAD + i * line), text, fill=ink, font=_font())
    for pos, text in ticks:
        x = _PAD + round(pos * (bar_w - 1))
        w = _text_size(text)[0]
        draw.line([(x, bar_y - 2), (x, bar_y + _COLORBAR_H + 1)], fill=ink)
        draw.text((min(max(x - w // 2, 0), g.width - w), bar_y + _COLORBAR_H + 2), text, fill=ink, font=_font())
    return np.asarray(image)


def _legend(num_experts: int) -> str:
    return f"white = 1/E = {100 / num_experts:.3g}%, red = hot, blue = cold"


def layers_by_experts(share_LE: np.ndarray, layer_ids: Sequence[int], step: int) -> np.ndarray:
    """Image of one log step: rows = MoE layers, columns = experts, colour = load share (module docstring)."""
    num_experts = share_LE.shape[1]
    title = f"step {step}: share of each layer's routed tokens"
    footer = ["rows: MoE layers, columns: experts", _legend(num_experts)]
    return render(load_position(share_LE, num_experts), title, [f"layer {i}" for i in layer_ids],
                  [str(e) for e in range(num_experts)], footer, load_colorbar_ticks(num_experts))


def experts_by_steps(share_EC: np.ndarray, layer_id: int, last_steps: Sequence[int],
                     steps_per_column: int) -> np.ndarray:
    """Image of one layer's history: rows = experts, columns = log steps (oldest left), colour = load share;
    ``last_steps[c]`` labels column c (its newest step); ``steps_per_column`` > 1 when columns are means of that
    many log steps."""
    num_experts = share_EC.shape[0]
    title = f"layer {layer_id}: share of routed tokens per expert"
    span = f" (mean of {steps_per_column} log steps)" if steps_per_column > 1 else ""
    footer = [f"rows: experts, columns: steps{span}", _legend(num_experts)]
    return render(load_position(share_EC, num_experts), title, [f"expert {e}" for e in range(num_experts)],
                  [str(s) for s in last_steps], footer, load_colorbar_ticks(num_experts))


class LoadHistory:
    """Load shares [L, E] of the log steps so far, in at most ``capacity`` columns: when full, neighbouring columns
    are averaged pairwise and from then on each column holds twice as many log steps, so the whole run stays
    visible at bounded memory (capacity x L x E floats) and image width."""

    def __init__(self, capacity: int):
        if capacity < 2 or capacity % 2:
            raise ValueError(f"LoadHistory capacity must be an even number >= 2, got {capacity}")
        self.capacity = capacity
        self.steps_per_column = 1
        self.columns_created = 0
        """Columns ever started (merging never lowers it): how much is new since a given moment."""
        self._last_step: list[int] = []
        self._sum: list[np.ndarray] = []
        self._count: list[int] = []

    def __len__(self) -> int:
        return len(self._sum)

    def append(self, step: int, share_LE: np.ndarray) -> None:
        if self._count and self._count[-1] < self.steps_per_column:
            self._sum[-1] = self._sum[-1] + share_LE
            self._count[-1] += 1
            self._last_step[-1] = step
        else:
            self.columns_created += 1
            self._sum.append(np.array(share_LE, dtype=np.float64))
            self._count.append(1)
            self._last_step.append(step)
        if len(self._sum) > self.capacity:
            pairs = range(0, len(self._sum), 2)
            self._sum = [sum(self._sum[i:i + 2]) for i in pairs]
            self._count = [sum(self._count[i:i + 2]) for i in pairs]
            self._last_step = [self._last_step[min(i + 1, len(self._last_step) - 1)] for i in pairs]
            self.steps_per_column *= 2

    def last_steps(self) -> list[int]:
        """Newest log step of each column, oldest column first."""
        return list(self._last_step)

    def shares_LEC(self) -> np.ndarray:
        """Mean load share per column: [L, E, columns]."""
        return np.stack([s / n for s, n in zip(self._sum, self._count)], axis=-1)
