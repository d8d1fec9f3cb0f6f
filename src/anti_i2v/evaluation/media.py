"""Videos and contact sheets a person can look at: MP4, animated WebP/GIF, PNG grids."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from anti_i2v.atomic import write_atomic

logger = logging.getLogger(__name__)

LABEL_HEIGHT = 16


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _labelled(frame: np.ndarray, label: str) -> np.ndarray:
    """A frame with a black caption strip on top."""
    image = Image.new("RGB", (frame.shape[1], frame.shape[0] + LABEL_HEIGHT))
    image.paste(Image.fromarray(frame), (0, LABEL_HEIGHT))
    ImageDraw.Draw(image).text((3, 2), label, fill=(255, 255, 255), font=ImageFont.load_default())
    return np.asarray(image)


def _fit(video: torch.Tensor, size: tuple[int, int], frames: int) -> torch.Tensor:
    index = torch.linspace(0, video.shape[0] - 1, frames).round().long()
    return F.interpolate(video[index].float(), size=size, mode="bilinear", antialias=True, align_corners=False)


def tile_videos(videos: dict[str, torch.Tensor], columns: int = 4, height: int = 160) -> np.ndarray:
    """Labelled videos tiled in a grid, frame by frame: (F, H', W', 3) uint8.

    Every video is resampled to the first one's frame count and to ``height`` rows.
    """
    first = next(iter(videos.values()))
    width = max(2, round(first.shape[-1] * height / first.shape[-2]))
    frames = first.shape[0]
    tiles = [
        np.stack([_labelled(f, name) for f in to_uint8(_fit(v, (height, width), frames))])
        for name, v in videos.items()
    ]
    blank = np.zeros_like(tiles[0])
    while len(tiles) % columns and len(tiles) > columns:
        tiles.append(blank)
    rows = [np.concatenate(tiles[i : i + columns], axis=2) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=1)


def contact_sheet(
    videos: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor] | None = None,
    frames: int = 8,
    height: int = 96,
) -> Image.Image:
    """One labelled row per video, in the given order: its input image (when ``inputs``
    has one, (3, H, W)), then ``frames`` evenly spaced frames."""
    first = next(iter(videos.values()))
    width = max(2, round(first.shape[-1] * height / first.shape[-2]))
    frames = min(frames, first.shape[0])
    rows = []
    for name, video in videos.items():
        cells = list(to_uint8(_fit(video, (height, width), frames)))
        if inputs is not None and name in inputs:
            photo = inputs[name]
            photo_width = max(2, round(photo.shape[-1] * height / photo.shape[-2]))
            cells.insert(0, to_uint8(_fit(photo[None], (height, photo_width), 1))[0])
            cells.insert(1, np.full((height, 6, 3), 255, dtype=np.uint8))  # white gap after the input
        rows.append(_labelled(np.concatenate(cells, axis=1), name))
    return Image.fromarray(np.concatenate(rows, axis=0))


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad to even height and width (H.264 needs them)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else frames


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> Path | None:
    """Write (F, H, W, 3) uint8 as H.264 MP4; None (with a log line) when no encoder is installed."""
    try:
        import imageio.v3 as iio
    except ImportError:
        logger.warning("no MP4 written: install imageio and imageio-ffmpeg for video output")
        return None
    return write_atomic(
        path, lambda tmp: iio.imwrite(tmp, _even(frames), fps=fps, codec="libx264", macro_block_size=1)
    )


def write_animation(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """Write (F, H, W, 3) uint8 as a looping animated WebP or GIF (by suffix), for places without MP4."""
    images = [Image.fromarray(f) for f in frames]
    fmt = "WEBP" if path.suffix.lower() == ".webp" else "GIF"
    options = {"lossless": False, "quality": 80} if fmt == "WEBP" else {}
    return write_atomic(
        path,
        lambda tmp: images[0].save(
            tmp, format=fmt, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, **options
        ),
    )
