"""The diffusion-loss term and its reference video.

``L_DM`` is the model's own training loss with the protected image as condition and
a reference video as the clean sample; Anti-I2V maximises it (AdvDM-style). The
reference video is one of:

- ``"repeat"`` (default): the photo repeated over all frames;
- ``"generate"``: one clean generation from the photo, cached on disk;
- a file: an animated GIF/WebP/PNG, a ``.npy`` array (F, H, W, 3) in [0, 1] or
  uint8, or a video file when the optional ``imageio[ffmpeg]`` is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence

from anti_i2v.atomic import write_atomic
from anti_i2v.errors import ConfigError, InputError
from anti_i2v.models.base import VideoModel

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where generated reference videos are cached (``ANTI_I2V_CACHE`` overrides)."""
    root = os.environ.get("ANTI_I2V_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anti-i2v"
    return Path(root)


def _read_frames(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in {".mp4", ".mov", ".mkv", ".avi", ".webm"}:
        import imageio.v3 as iio

        return iio.imread(path)
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def read_video_file(path: Path) -> torch.Tensor:
    """Frames (F, 3, H, W) in [0, 1] from an animation, a .npy array or a video file."""
    if not path.is_file():
        raise InputError(f"reference video '{path}' does not exist; pass an existing file or 'repeat'")
    try:
        array = _read_frames(path)
    except ImportError as err:
        raise InputError(
            "reading video files needs imageio: pip install 'imageio[ffmpeg]', "
            "or pass an animated GIF/WebP or a .npy array"
        ) from err
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read reference video '{path}': {str(err).splitlines()[0]}") from err
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype.kind not in "uif":
        raise InputError(f"reference video '{path}' must hold RGB frames (F, H, W, 3), got {array.shape}")
    frames = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    return frames.float() / 255 if array.dtype == np.uint8 else frames.float().clamp(0, 1)


def fit_frames(frames: torch.Tensor, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Resample a clip to ``num_frames`` evenly spaced frames at ``size`` (H, W)."""
    index = torch.linspace(0, frames.shape[0] - 1, num_frames).round().long()
    frames = frames[index]
    return F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def reference_latents(
    model: VideoModel,
    x: torch.Tensor,
    reference: str,
    prompt: str,
    seed: int,
    steps: int = 50,
) -> torch.Tensor:
    """Latents of the reference video for the diffusion loss (see module docstring)."""
    if reference == "repeat":
        return model.encode_video(model.repeat_frames(x))
    if reference == "generate":
        key = hashlib.sha256()
        for part in (model.identity, model.frame_layout(), prompt, str(seed), str(steps), str(tuple(x.shape))):
            key.update(part.encode())
        key.update(x.detach().float().cpu().numpy().tobytes())
        path = cache_dir() / "reference" / f"{key.hexdigest()[:32]}.pt"
        if path.is_file():
            frames = torch.load(path, weights_only=True)
        else:
            logger.info("generating the clean reference video (cached at %s)", path)
            frames = model.generate(x, prompt, steps=steps, seed=seed)
            write_atomic(path, lambda tmp: torch.save(frames, tmp))
        return model.encode_video(fit_frames(frames, model.num_frames, model.resolution))
    path = Path(reference)
    if not path.suffix:
        raise ConfigError(f"reference must be 'repeat', 'generate' or a video file (got '{reference}')")
    return model.encode_video(fit_frames(read_video_file(path), model.num_frames, model.resolution))
