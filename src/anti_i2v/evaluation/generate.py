"""Generate videos with a model's real sampling pipeline, cached on disk by content."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anti_i2v.atomic import write_atomic
from anti_i2v.config import DEFAULT_PROMPT
from anti_i2v.models.base import VideoModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """What the attacker's generation uses; the same for the clean and protected photos."""

    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    steps: int = 50
    guidance_scale: float | None = None  # None: the model's released default


def video_key(model: VideoModel, image: torch.Tensor, settings: GenerationSettings) -> str:
    """Content hash of (model, the size and frames it runs the image at and whether it crops the image
    to that size, image pixels, settings): equal keys give equal videos."""
    digest = hashlib.sha256(model.identity.encode())
    size = model.resolution_for(*image.shape[-2:])
    digest.update(f"{size}x{model.num_frames}|crop={model.crops_photo}".encode())
    digest.update(repr(sorted(asdict(settings).items())).encode())
    digest.update(str(tuple(image.shape)).encode())
    digest.update(image.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def generate_video(
    model: VideoModel,
    image: torch.Tensor,
    settings: GenerationSettings,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """Frames (F, 3, H, W) in [0, 1] generated from ``image`` (3, H, W) at any size.

    The pipeline prepares the image itself (8-bit, resized to the input its users would
    give a photo of this size), as an attacker's would. Frames are returned on the 8-bit grid, as a saved video would
    hold them. With ``cache_dir``, a video already generated for the same model, pixels
    and settings is read back (stored as uint8) instead of sampled again.
    """
    path = Path(cache_dir) / f"{video_key(model, image, settings)}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True).float() / 255
    video = model.generate(
        image.unsqueeze(0) if image.dim() == 3 else image,
        settings.prompt,
        steps=settings.steps,
        seed=settings.seed,
        guidance_scale=settings.guidance_scale,
    )
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8)
    if path is not None:
        write_atomic(path, lambda tmp: torch.save(frames, tmp))
    return frames.float() / 255
