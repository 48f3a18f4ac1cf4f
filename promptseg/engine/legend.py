"""A legend under a quick-look picture: which contour colour is truth, prediction or which label.

The legend is a black strip below the picture with one line per entry, a colour swatch then its
name; the picture is padded on the right with black when the legend is wider than it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from promptseg.engine.overlay import Colour

LINE = 14  # pixels per legend line
SWATCH = 10  # side of the colour square before each name
MARGIN = 3  # pixels around the legend's lines
TEXT = (235, 235, 235)

Entry = tuple[str, Colour]  # (name, colour)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow: its small bitmap font
        return ImageFont.load_default()


def legend_size(entries: Sequence[Entry]) -> tuple[int, int]:
    """(height, width) in pixels of the legend strip of `entries`."""
    widths = [int(np.ceil(_font().getlength(name))) for name, _ in entries]
    return 2 * MARGIN + LINE * len(entries), 2 * MARGIN + SWATCH + 4 + max(widths, default=0)


def with_legend(picture: np.ndarray, entries: Sequence[Entry]) -> np.ndarray:
    """(H, W, 3) uint8 picture -> (H + h, max(W, w), 3) uint8 with the legend strip (h, w) of
    legend_size(entries) below it; the picture itself is unchanged in its top-left corner."""
    height, width = legend_size(entries)
    out = np.zeros((picture.shape[0] + height, max(picture.shape[1], width), 3), np.uint8)
    out[: picture.shape[0], : picture.shape[1]] = picture
    strip = Image.fromarray(out[picture.shape[0] :])
    draw = ImageDraw.Draw(strip)
    for n, (name, colour) in enumerate(entries):
        top = MARGIN + n * LINE
        draw.rectangle((MARGIN, top + 2, MARGIN + SWATCH - 1, top + 1 + SWATCH), fill=tuple(colour))
        draw.text((MARGIN + SWATCH + 4, top), name, fill=TEXT, font=_font())
    out[picture.shape[0] :] = np.asarray(strip)
    return out
