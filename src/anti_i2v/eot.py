"""Expectation over transformations: random, differentiable stand-ins for an upload channel.

At each optimisation step one transform is drawn (or none, so the untouched photo is
optimised too) and applied to what the model will see, so that the perturbation is
optimised to survive what a photo goes through before an attacker gets it:

- ``"jpeg"``: JPEG at a quality drawn in [50, 95], 4:2:0 (kornia's differentiable codec);
- ``"resize"``: antialiased downscale by a factor drawn in [0.5, 1], then back up;
- ``"blur"``: Gaussian blur with sigma drawn in [0.3, 1.2] px;
- ``"noise"``: Gaussian noise with sigma drawn in [0, 0.03].

Images are (B, 3, H, W) in [0, 1]; every draw comes from the generator the caller
passes (the optimisation's own), so a seeded run is reproducible and resumable.

Example:
    >>> eot = ExpectationOverTransforms(("jpeg", "resize"))
    >>> out = eot(torch.rand(1, 3, 64, 64), torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anti_i2v.errors import ConfigError

EOT_TRANSFORMS: tuple[str, ...] = ("jpeg", "resize", "blur", "noise")
JPEG_QUALITY = (50.0, 95.0)
RESIZE_SCALE = (0.5, 1.0)
BLUR_SIGMA = (0.3, 1.2)
NOISE_SIGMA = (0.0, 0.03)


def parse_eot(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"jpeg,resize"`` (or a sequence, or ""/None/"none") -> the checked transform names."""
    if text is None:
        return ()
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in EOT_TRANSFORMS]
    if unknown:
        raise ConfigError(f"unknown EOT transform(s) {unknown}; choose from {', '.join(EOT_TRANSFORMS)}")
    return tuple(dict.fromkeys(names))


def _uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def jpeg(image: torch.Tensor, quality: float) -> torch.Tensor:
    """Differentiable JPEG (4:2:0) of ``image`` (B, 3, H, W) in [0, 1] at ``quality``."""
    from kornia.enhance import jpeg_codec_differentiable

    q = torch.tensor([quality], device=image.device, dtype=torch.float32)
    return jpeg_codec_differentiable(image.float(), q).clamp(0, 1).to(image.dtype)


def resize_round_trip(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Antialiased bilinear downscale by ``scale`` then bilinear upscale to the original size."""
    size = image.shape[-2:]
    small = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    down = F.interpolate(image, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` px (kernel of 2 * ceil(3 sigma) + 1)."""
    from kornia.filters import gaussian_blur2d

    size = 2 * int(torch.tensor(3 * sigma).ceil()) + 1
    return gaussian_blur2d(image, (size, size), (sigma, sigma), border_type="reflect")


class ExpectationOverTransforms:
    """Draws one of ``transforms`` (or none) per call and applies it.

    Args:
        transforms: names from `EOT_TRANSFORMS`.
    """

    def __init__(self, transforms: Sequence[str]) -> None:
        self.transforms = parse_eot(list(transforms))

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``image`` (B, 3, H, W) in [0, 1] after a randomly drawn transform (or unchanged)."""
        if not self.transforms:
            return image
        pick = int(torch.randint(len(self.transforms) + 1, (), generator=generator))
        if pick == len(self.transforms):
            return image
        name = self.transforms[pick]
        if name == "jpeg":
            return jpeg(image, _uniform(generator, JPEG_QUALITY))
        if name == "resize":
            return resize_round_trip(image, _uniform(generator, RESIZE_SCALE))
        if name == "blur":
            return blur(image, _uniform(generator, BLUR_SIGMA))
        sigma = _uniform(generator, NOISE_SIGMA)
        noise = torch.randn(image.shape, generator=generator).to(image.device, image.dtype)
        return (image + sigma * noise).clamp(0, 1)

    def __repr__(self) -> str:
        return f"ExpectationOverTransforms({list(self.transforms)})"
