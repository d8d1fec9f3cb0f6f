"""Training data of the testbeds: camera moves over real photos that ship with scikit-image.

A clip is a 3:4 window moved over a photo (short side resized to 224 px) in one of four
camera motions, linear over the clip, and sampled to ``size`` with bilinear filtering;
its first frame is the condition image and the motion's name is the prompt:

- ``"pan left"``: the window slides left by 25% of its width (the content moves right);
- ``"pan right"``: the opposite;
- ``"zoom in"``: the window shrinks by a factor of 1.35, geometrically;
- ``"zoom out"``: it grows by 1.35.

The held-out photos (`HELD_OUT`) never appear in training; evaluation uses only them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

MOTIONS: tuple[str, ...] = ("pan left", "pan right", "zoom in", "zoom out")
PAN_SHARE = 0.25  # of the window's width, over the clip
ZOOM_FACTOR = 1.35
SHORT_SIDE = 224
ASPECT = 4 / 3  # width / height of the window and of the frames

TRAINING: tuple[str, ...] = (
    "rocket", "motorcycle_left", "motorcycle_right", "immunohistochemistry", "hubble_deep_field",
    "retina", "colorwheel", "logo", "coins", "camera", "page", "text", "brick", "grass", "gravel",
    "moon", "clock", "cell", "shepp_logan_phantom",
)
HELD_OUT: tuple[str, ...] = ("astronaut", "chelsea", "coffee")  # the portrait, a cat's face, an object


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


def photo_array(name: str) -> np.ndarray:
    """The named scikit-image photo as (H, W, 3) float32 in [0, 1] at its native size:
    gray copied into three channels, RGBA composited over white."""
    array = _skimage(name)
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255
    else:
        array = (array - array.min()) / max(float(array.max() - array.min()), 1e-8)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1 - alpha)
    return np.ascontiguousarray(array[..., :3])


@lru_cache(maxsize=None)
def photo(name: str) -> torch.Tensor:
    """The named photo as (3, H, W) in [0, 1], its short side resized to 224 px (antialiased)."""
    image = torch.from_numpy(photo_array(name)).permute(2, 0, 1).unsqueeze(0)
    scale = SHORT_SIDE / min(image.shape[-2:])
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    return F.interpolate(image, size=size, mode="bicubic", antialias=True).clamp(0, 1)[0]


def held_out_photo(name: str, aspect: float = ASPECT) -> torch.Tensor:
    """A held-out photo as a user would give it: the central crop of ``aspect`` (width / height; the
    testbeds' 4:3 by default) at native resolution, (3, H, W)."""
    image = torch.from_numpy(photo_array(name)).permute(2, 0, 1)
    height, width = image.shape[-2:]
    if width / height > aspect:
        new_width = round(height * aspect)
        left = (width - new_width) // 2
        return image[:, :, left : left + new_width].contiguous()
    new_height = round(width / aspect)
    top = (height - new_height) // 2
    return image[:, top : top + new_height].contiguous()


@dataclass(frozen=True)
class Window:
    """A camera window on a photo: centre (cx, cy) and height h, in pixels of the 224-px photo."""

    cx: float
    cy: float
    h: float

    @property
    def w(self) -> float:
        return self.h * ASPECT


def window_path(start: Window, motion: str, frames: int) -> list[Window]:
    """The window at each frame of ``motion`` (linear over the clip, zoom geometric)."""
    path = []
    for i in range(frames):
        s = i / max(frames - 1, 1)
        if motion == "pan left":
            path.append(Window(start.cx - PAN_SHARE * start.w * s, start.cy, start.h))
        elif motion == "pan right":
            path.append(Window(start.cx + PAN_SHARE * start.w * s, start.cy, start.h))
        elif motion == "zoom in":
            path.append(Window(start.cx, start.cy, start.h * ZOOM_FACTOR ** (-s)))
        elif motion == "zoom out":
            path.append(Window(start.cx, start.cy, start.h * ZOOM_FACTOR**s))
        else:
            raise ValueError(f"unknown motion '{motion}'; choose from {MOTIONS}")
    return path


def fits(path: list[Window], height: int, width: int) -> bool:
    """Whether every window of ``path`` lies inside a photo of this size."""
    return all(
        w.cx - w.w / 2 >= 0 and w.cx + w.w / 2 <= width and w.cy - w.h / 2 >= 0 and w.cy + w.h / 2 <= height
        for w in path
    )


def render(image: torch.Tensor, path: list[Window], size: tuple[int, int]) -> torch.Tensor:
    """Frames (F, 3, H, W) of the windows of ``path`` on ``image`` (3, h, w), bilinear.

    The photo is first shrunk (antialiased) so that the path's mean window is about
    ``size``, so the bilinear sampling does not alias; so a zoom's first frame is a little
    sharper (zoom in) or softer (zoom out) than a pan's from the same window.
    """
    mean_h = sum(w.h for w in path) / len(path)
    shrink = min(1.0, size[0] / mean_h)
    if shrink < 0.999:
        small = F.interpolate(
            image[None], scale_factor=shrink, mode="bicubic", antialias=True, recompute_scale_factor=False
        )[0].clamp(0, 1)
    else:
        small = image
    _, height, width = image.shape
    sy, sx = small.shape[1] / height, small.shape[2] / width
    hs, ws = small.shape[1], small.shape[2]
    grids = []
    ys = (torch.arange(size[0]) + 0.5) / size[0] - 0.5
    xs = (torch.arange(size[1]) + 0.5) / size[1] - 0.5
    for w in path:
        py = (w.cy + ys * w.h) * sy  # pixel coordinates in the small image
        px = (w.cx + xs * w.w) * sx
        gy = 2 * py / hs - 1
        gx = 2 * px / ws - 1
        grids.append(torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1))
    grid = torch.stack(grids)
    frames = F.grid_sample(small[None].expand(len(path), -1, -1, -1), grid, mode="bilinear",
                           padding_mode="border", align_corners=False)
    return frames.clamp(0, 1)


def random_clip(
    image: torch.Tensor, motion: str, frames: int, size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    """A clip of ``motion`` over ``image`` (3, h, w) from a random window whose whole path fits.

    The window is between ``size[0]`` px and 72% of the photo's short side tall.
    """
    _, height, width = image.shape
    low, high = size[0], 0.72 * min(height, width)
    for _ in range(100):
        h = math.exp(rng.uniform(math.log(low), math.log(high)))
        start = Window(0.0, 0.0, h)
        # the path's extent relative to the start centre decides where the start may go
        probe = window_path(start, motion, frames)
        left = min(w.cx - w.w / 2 for w in probe)
        right = max(w.cx + w.w / 2 for w in probe)
        top = min(w.cy - w.h / 2 for w in probe)
        bottom = max(w.cy + w.h / 2 for w in probe)
        if right - left > width or bottom - top > height:
            continue
        cx = rng.uniform(-left, width - right)
        cy = rng.uniform(-top, height - bottom)
        path = window_path(Window(cx, cy, h), motion, frames)
        return render(image, path, size)
    raise ValueError(f"no window for '{motion}' fits a {width}x{height} photo")


def canonical_clip(image: torch.Tensor, motion: str, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """The evaluation clip: a centred window half the photo's short side tall (every motion fits)."""
    _, height, width = image.shape
    start = Window(width / 2, height / 2, 0.5 * min(height, width))
    path = window_path(start, motion, frames)
    assert fits(path, height, width), "the canonical window must fit every motion"
    return render(image, path, size)


def augment(clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random channel permutation (50%) and random gamma (30%); never a flip (it swaps pans)."""
    if rng.random() < 0.5:
        clip = clip[:, torch.from_numpy(rng.permutation(3))]
    if rng.random() < 0.3:
        clip = clip.clamp_min(1e-6) ** float(math.exp(rng.uniform(-0.5, 0.5)))
    return clip


def training_batch(
    clips: int, frames: int, size: tuple[int, int], rng: np.random.Generator,
    motions: tuple[str, ...] = MOTIONS, photos: tuple[str, ...] = TRAINING,
) -> tuple[torch.Tensor, list[str]]:
    """``clips`` random augmented clips (B, F, 3, H, W) and their prompts."""
    videos, prompts = [], []
    for _ in range(clips):
        motion = motions[rng.integers(len(motions))]
        image = photo(photos[rng.integers(len(photos))])
        videos.append(augment(random_clip(image, motion, frames, size, rng), rng))
        prompts.append(motion)
    return torch.stack(videos), prompts
