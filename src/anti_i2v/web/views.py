"""Pictures that show a user what protection changed: side by side, a zoomed crop, the difference amplified."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GAP = 8  # pixels between tiles
MAX_TILE_HEIGHT = 900  # a very tall photo is shown smaller, never as a picture of unbounded size
BACKGROUND = (255, 255, 255)


def _as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def amplified_difference(original: Image.Image, protected: Image.Image, gain: float = 8.0) -> Image.Image:
    """The change, ``gain`` times larger, around mid-grey (grey: unchanged; colour: where and how it changed)."""
    delta = _as_array(protected) - _as_array(original)
    return Image.fromarray(np.clip(127.5 + gain * delta, 0, 255).round().astype(np.uint8))


def busiest_window(original: Image.Image, protected: Image.Image, fraction: float = 0.25) -> tuple[int, int, int, int]:
    """A square box (left, top, right, bottom), ``fraction`` of the short side, where the change is largest."""
    delta = np.abs(_as_array(protected) - _as_array(original)).sum(axis=2)
    height, width = delta.shape
    side = max(8, int(min(width, height) * fraction))
    # summed-area table: the change inside every side x side window at once
    table = np.pad(delta.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(left), int(top), int(left) + side, int(top) + side


def _fit(image: Image.Image, width: int, height: int = MAX_TILE_HEIGHT) -> Image.Image:
    """``image`` scaled to fill ``width`` pixels, or ``height`` if that comes first (nearest neighbour
    when enlarging, to show the pixels)."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _row(tiles: list[Image.Image], width: int) -> Image.Image:
    """Tiles of equal size side by side, the row ``width`` pixels wide in all."""
    tile_width = (width - GAP * (len(tiles) - 1)) // len(tiles)
    fitted = [_fit(t, tile_width) for t in tiles]
    row = Image.new("RGB", (width, max(t.height for t in fitted)), BACKGROUND)
    for index, tile in enumerate(fitted):
        row.paste(tile, (index * (tile_width + GAP), 0))
    return row


def comparison_panel(original: Image.Image, protected: Image.Image, width: int = 1200, gain: float = 8.0) -> Image.Image:
    """Original | protected on top; below, the zoomed crop of both where the change is largest
    and that crop's difference amplified ``gain`` times. The crop is outlined on the top row."""
    original, protected = original.convert("RGB"), protected.convert("RGB")
    box = busiest_window(original, protected)
    top = _row([_outlined(original, box), _outlined(protected, box)], width)
    crops = [original.crop(box), protected.crop(box)]
    bottom = _row([*crops, amplified_difference(*crops, gain=gain)], width)
    panel = Image.new("RGB", (width, top.height + GAP + bottom.height), BACKGROUND)
    panel.paste(top, (0, 0))
    panel.paste(bottom, (0, top.height + GAP))
    return panel


def _outlined(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    framed = image.copy()
    line = max(1, min(image.size) // 200)
    ImageDraw.Draw(framed).rectangle(box, outline=(255, 64, 0), width=line)
    return framed
