"""The purification battery: counter-attacks against a protected photo.

An attacker who wants to animate a protected photo can first try to wash the
perturbation out of it. The evaluation applies each of these purifiers to the
protected photo and reports how much protection is left afterwards.

Every purifier has the same signature, :data:`Purifier`: it takes a
``(3, H, W)`` float image in [0, 1] (a full-resolution photo, any size) and a
seed, and returns a float32 image of the same shape in [0, 1] on the same
device. Given the same seed the result is always the same.

* :func:`jpeg` / :func:`webp` - lossy re-encoding with Pillow, in memory (the
  image is rounded to 8 bits first, as any saved file would be).
* :func:`resize_back` - antialiased bicubic downscale, bicubic upscale back.
* :func:`resize_long_edge` - what an upload's size limit does: antialiased
  bicubic downscale so that the long edge is at most ``long_edge`` pixels
  (never an upscale), then bicubic upscale back to the original size.
* :func:`chain` - several purifiers one after the other, e.g. ``social``: a
  1080-pixel long edge, then JPEG 75 with 4:2:0 chroma (what a photo goes
  through when it is posted and downloaded again).
* :func:`gaussian_blur` - separable Gaussian blur (kornia).
* :func:`gaussian_noise` - additive Gaussian noise from a seeded generator.
* :func:`center_crop` - crop the centre and stretch it back to full size.
* :func:`cleaner` - AdverseCleaner: repeated bilateral filtering, then guided
  filtering with the input as guide (OpenCV).
* :class:`DiffPure` - diffuse to ``t*`` and denoise with an image diffusion
  model (diffusers ``UNet2DModel`` + ``DDPMScheduler``).

:func:`build_purifier` turns the names in :data:`PURIFIER_NAMES` into
purifiers (plus ``long<N>`` and ``social<N>`` for any long edge ``N``, see
:func:`is_purifier_name`); :data:`DEFAULT_BATTERY` is the set that needs no
model weights.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anti_i2v.errors import ConfigError, InputError, ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DDPMScheduler, UNet2DModel

logger = logging.getLogger(__name__)

Purifier = Callable[[torch.Tensor, int], torch.Tensor]
"""``(image, seed) -> image``: ``(3, H, W)`` float in [0, 1] to float32 ``(3, H, W)`` in [0, 1]."""

DEFAULT_DIFFPURE_MODEL: str = "google/ddpm-ema-celebahq-256"
"""The DiffPure model used when none is named: the DDPM (EMA) trained on CelebA-HQ 256x256 faces."""

PURIFIER_NAMES: tuple[str, ...] = (
    "jpeg95",
    "jpeg75",
    "jpeg50",
    "jpeg30",
    "webp",
    "resize0.5",
    "long1080",
    "social",
    "blur",
    "noise0.05",
    "noise0.1",
    "crop",
    "cleaner",
    "diffpure",
)
"""The named purifiers :func:`build_purifier` knows, mildest codecs first (it also takes
``long<N>`` and ``social<N>`` for any long edge ``N``)."""

SOCIAL_LONG_EDGE: int = 1080
"""Long edge (pixels) of ``social``: a common size cap of photo-sharing uploads."""

SOCIAL_JPEG_QUALITY: int = 75
"""JPEG quality of ``social<N>`` (Pillow's default quality, with its default 4:2:0 chroma)."""

_SIZED_NAME = re.compile(r"(long|social)([1-9][0-9]*)")

DEFAULT_BATTERY: tuple[str, ...] = tuple(name for name in PURIFIER_NAMES if name != "diffpure")
"""The purifiers that need no model weights (all but ``diffpure``)."""

# AdverseCleaner (github.com/lllyasviel/AdverseCleaner, clean.py): 64 rounds of
# cv2.bilateralFilter(y, 5, 8, 8) then 4 rounds of
# cv2.ximgproc.guidedFilter(img, y, 4, 16), all on float32 images in 0..255.
CLEANER_BILATERAL_ROUNDS: int = 64
CLEANER_BILATERAL_DIAMETER: int = 5
CLEANER_SIGMA_COLOR: float = 8.0
CLEANER_SIGMA_SPACE: float = 8.0
CLEANER_GUIDED_ROUNDS: int = 4
CLEANER_GUIDED_RADIUS: int = 4
CLEANER_GUIDED_EPS: float = 16.0

_WEIGHT_FILES: tuple[str, ...] = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# --------------------------------------------------------------------------- helpers


def _check_image(image: torch.Tensor) -> None:
    """Refuse anything that is not a ``(3, H, W)`` floating-point tensor."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"purifiers take a (3, H, W) image tensor in [0, 1], got {shape}; convert the photo first")
    if not image.is_floating_point():
        raise InputError(f"purifiers take a float image in [0, 1], got {image.dtype}; divide 8-bit images by 255")


def _finish(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``result`` as float32 in [0, 1] on ``like``'s device."""
    return result.to(device=like.device, dtype=torch.float32).clamp_(0.0, 1.0)


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> contiguous ``(H, W, 3)`` uint8, rounded to nearest."""
    pixels = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())


def _from_uint8_hwc(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 (writable) -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ``(N, C, H, W)`` batch; antialiased when shrinking."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    shrinking = size[0] < batch.shape[-2] or size[1] < batch.shape[-1]
    return F.interpolate(batch, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def _named(fn: Purifier, label: str) -> Purifier:
    """Give a purifier closure a readable name for logs and reprs."""
    fn.__name__ = label
    fn.__qualname__ = label
    return fn


def _codec(image: torch.Tensor, fmt: str, **options: Any) -> torch.Tensor:
    """Encode ``image`` with Pillow in memory and decode it again."""
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8_hwc(image), mode="RGB").save(buffer, format=fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.array(decoded.convert("RGB"))  # a writable copy
    return _finish(_from_uint8_hwc(array), image)


def _check_quality(quality: int, what: str) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ConfigError(f"{what} quality must be an integer in 1..100, got {quality!r}")
    return int(quality)


def _check_positive(value: float, what: str, *, upper: float | None = None, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (upper is None or value <= upper)
    if not ok:
        span = (">= 0" if allow_zero else "> 0") + ("" if upper is None else f" and <= {upper:g}")
        raise ConfigError(f"{what} must be a number {span}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- purifiers


def jpeg(quality: int) -> Purifier:
    """JPEG re-compression at ``quality`` (1..100) with Pillow, 4:2:0 chroma subsampling.

    The returned purifier takes a ``(3, H, W)`` float image in [0, 1], rounds it to
    8 bits, encodes it as a baseline JPEG in memory (4:2:0, as most uploads are)
    and decodes it again; the result is the decoded ``(3, H, W)`` float32 image in
    [0, 1] (on the 1/255 grid). The seed is ignored: JPEG is deterministic.
    """
    quality = _check_quality(quality, "JPEG")

    def purify_jpeg(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        return _codec(image, "JPEG", quality=quality, subsampling=2)

    return _named(purify_jpeg, f"jpeg(quality={quality})")


def webp(quality: int = 80) -> Purifier:
    """Lossy WebP re-compression at ``quality`` (1..100) with Pillow.

    Takes a ``(3, H, W)`` float image in [0, 1], rounds it to 8 bits, encodes it as
    lossy WebP in memory (libwebp default effort, ``method=4``) and decodes it;
    returns the ``(3, H, W)`` float32 result in [0, 1]. The seed is ignored.
    """
    quality = _check_quality(quality, "WebP")

    def purify_webp(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        return _codec(image, "WEBP", quality=quality, lossless=False, method=4)

    return _named(purify_webp, f"webp(quality={quality})")


def resize_back(scale: float = 0.5) -> Purifier:
    """Downscale by ``scale`` (0 < scale <= 1) and upscale back to the original size.

    Takes a ``(3, H, W)`` float image in [0, 1]; shrinks it to
    ``(round(H * scale), round(W * scale))`` with antialiased bicubic
    interpolation, enlarges it back to ``(H, W)`` with bicubic interpolation and
    clamps to [0, 1]. Stays in float (no 8-bit rounding). The seed is ignored.
    """
    scale = _check_positive(scale, "resize scale", upper=1.0)

    def purify_resize(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        height, width = image.shape[-2:]
        small = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = image.detach().to(torch.float32).unsqueeze(0)
        restored = _resize(_resize(batch, small).clamp_(0.0, 1.0), (height, width))
        return _finish(restored[0], image)

    return _named(purify_resize, f"resize_back(scale={scale:g})")


def long_edge_size(height: int, width: int, long_edge: int) -> tuple[int, int]:
    """``(height, width)`` scaled so that the longer side is at most ``long_edge``, aspect kept.

    Sizes already within the limit come back unchanged (never an upscale); the
    shorter side is rounded to the nearest pixel and kept at least 1.
    """
    longest = max(height, width)
    if longest <= long_edge:
        return height, width
    scale = long_edge / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_long_edge(long_edge: int = SOCIAL_LONG_EDGE) -> Purifier:
    """Downscale so that the long edge is at most ``long_edge`` pixels (>= 1), then back up.

    Models the size cap of an upload: takes a ``(3, H, W)`` float image in
    [0, 1]; when ``max(H, W) > long_edge`` it shrinks it, aspect ratio kept, to
    :func:`long_edge_size` with antialiased bicubic interpolation, enlarges it
    back to ``(H, W)`` with bicubic interpolation and clamps to [0, 1]. A photo
    whose long edge is already within the limit is returned unchanged (as
    float32): it is never upscaled. Stays in float (no 8-bit rounding). The
    seed is ignored.
    """
    if isinstance(long_edge, bool) or not isinstance(long_edge, (int, np.integer)) or long_edge < 1:
        raise ConfigError(f"long edge must be a whole number of pixels >= 1, got {long_edge!r}")
    long_edge = int(long_edge)

    def purify_long_edge(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        height, width = image.shape[-2:]
        small = long_edge_size(height, width, long_edge)
        batch = image.detach().to(torch.float32).unsqueeze(0)
        if small == (height, width):
            return _finish(batch[0].clone(), image)
        restored = _resize(_resize(batch, small).clamp_(0.0, 1.0), (height, width))
        return _finish(restored[0], image)

    return _named(purify_long_edge, f"resize_long_edge(long_edge={long_edge})")


def chain(*purifiers: Purifier) -> Purifier:
    """Apply ``purifiers`` in order, each to the previous one's output, all with the same seed.

    Takes one or more purifiers (see :data:`Purifier`); the result is a purifier
    itself: ``(3, H, W)`` float image in [0, 1] and a seed in, float32
    ``(3, H, W)`` in [0, 1] out. ``chain(resize_long_edge(1080), jpeg(75))`` is
    an upload to a photo-sharing site and the download of the result.
    """
    if not purifiers:
        raise ConfigError("chain needs at least one purifier")
    for purifier in purifiers:
        if not callable(purifier):
            raise ConfigError(f"chain takes purifiers (callables image, seed -> image), got {purifier!r}")

    def purify_chain(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        result = image
        for purifier in purifiers:
            result = purifier(result, seed)
        return _finish(result, image)

    label = ", ".join(getattr(p, "__name__", type(p).__name__) for p in purifiers)
    return _named(purify_chain, f"chain({label})")


def gaussian_blur(sigma: float = 1.0) -> Purifier:
    """Gaussian blur with standard deviation ``sigma`` pixels (> 0).

    Takes a ``(3, H, W)`` float image in [0, 1] and convolves each channel with a
    separable Gaussian kernel of size ``2 * ceil(3 * sigma) + 1`` (kornia,
    reflected borders); returns the float32 ``(3, H, W)`` result in [0, 1]. The
    seed is ignored.
    """
    sigma = _check_positive(sigma, "blur sigma")
    size = 2 * math.ceil(3.0 * sigma) + 1

    def purify_blur(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        from kornia.filters import gaussian_blur2d

        _check_image(image)
        height, width = image.shape[-2:]
        batch = image.detach().to(torch.float32).unsqueeze(0)
        # Reflect padding needs the kernel radius to be smaller than the image.
        kernel = (min(size, 2 * ((height - 1) // 2) + 1), min(size, 2 * ((width - 1) // 2) + 1))
        blurred = gaussian_blur2d(batch, kernel, (sigma, sigma), border_type="reflect")
        return _finish(blurred[0], image)

    return _named(purify_blur, f"gaussian_blur(sigma={sigma:g})")


def gaussian_noise(sigma: float) -> Purifier:
    """Additive Gaussian noise N(0, sigma^2) in [0, 1] units (sigma >= 0), then clamping.

    Takes a ``(3, H, W)`` float image in [0, 1] and a seed; draws the noise on the
    CPU from a ``torch.Generator`` seeded with ``seed`` (so the result is the same
    on every device), adds it, clamps to [0, 1] and returns float32. No 8-bit
    rounding.
    """
    sigma = _check_positive(sigma, "noise sigma", allow_zero=True)

    def purify_noise(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(tuple(image.shape), generator=generator, dtype=torch.float32).mul_(sigma)
        return _finish(image.detach().to(torch.float32) + noise.to(image.device), image)

    return _named(purify_noise, f"gaussian_noise(sigma={sigma:g})")


def center_crop(fraction: float = 0.9) -> Purifier:
    """Crop the central ``fraction`` (0 < fraction <= 1) of each side and resize back.

    Takes a ``(3, H, W)`` float image in [0, 1]; keeps the centred
    ``round(H * fraction) x round(W * fraction)`` window and enlarges it to
    ``(H, W)`` with bicubic interpolation, so the shape is kept (a slight zoom,
    like a re-framed repost). Returns float32 in [0, 1]. The seed is ignored.
    """
    fraction = _check_positive(fraction, "crop fraction", upper=1.0)

    def purify_crop(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        _check_image(image)
        height, width = image.shape[-2:]
        crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        window = image.detach().to(torch.float32)[:, top : top + crop_h, left : left + crop_w]
        return _finish(_resize(window.unsqueeze(0), (height, width))[0], image)

    return _named(purify_crop, f"center_crop(fraction={fraction:g})")


def cleaner(
    *,
    bilateral_rounds: int = CLEANER_BILATERAL_ROUNDS,
    diameter: int = CLEANER_BILATERAL_DIAMETER,
    sigma_color: float = CLEANER_SIGMA_COLOR,
    sigma_space: float = CLEANER_SIGMA_SPACE,
    guided_rounds: int = CLEANER_GUIDED_ROUNDS,
    radius: int = CLEANER_GUIDED_RADIUS,
    eps: float = CLEANER_GUIDED_EPS,
) -> Purifier:
    """AdverseCleaner: repeated bilateral filtering, then guided filtering by the input.

    Takes a ``(3, H, W)`` float image in [0, 1]; works on it as float32 in 0..255
    (no 8-bit rounding) exactly like lllyasviel/AdverseCleaner's ``clean.py``:

    1. ``bilateral_rounds`` (64) rounds of ``cv2.bilateralFilter`` with diameter
       ``diameter`` (5), ``sigma_color`` (8 levels of 0..255) and ``sigma_space``
       (8 px) - flattens the perturbation, which is smaller than ``sigma_color``,
       while keeping edges stronger than it;
    2. ``guided_rounds`` (4) rounds of ``cv2.ximgproc.guidedFilter`` guided by the
       *input* image, radius ``radius`` (4 px), ``eps`` (16, i.e. a 4-level
       standard deviation in 0..255 units) - puts back the structure the
       bilateral rounds smeared, taken from the input's locally linear edges.

    Returns the float32 ``(3, H, W)`` result in [0, 1]. Deterministic; the seed is
    ignored. About 0.4 s for a 512x512 image on one CPU core.
    """
    for value, what in ((bilateral_rounds, "bilateral_rounds"), (guided_rounds, "guided_rounds")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"cleaner {what} must be an integer >= 0, got {value!r}")
    for value, what in ((diameter, "diameter"), (radius, "radius")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"cleaner {what} must be an integer >= 1, got {value!r}")
    sigma_color = _check_positive(sigma_color, "cleaner sigma_color")
    sigma_space = _check_positive(sigma_space, "cleaner sigma_space")
    eps = _check_positive(eps, "cleaner eps")

    def purify_cleaner(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        cv2 = _import_cv2_ximgproc()
        _check_image(image)
        source = np.ascontiguousarray(
            image.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).permute(1, 2, 0).numpy()
        )
        result = source.copy()
        for _ in range(bilateral_rounds):
            result = cv2.bilateralFilter(result, diameter, sigma_color, sigma_space)
        for _ in range(guided_rounds):
            result = cv2.ximgproc.guidedFilter(source, result, radius, eps)
        cleaned = torch.from_numpy(np.ascontiguousarray(result)).permute(2, 0, 1).div(255.0)
        return _finish(cleaned, image)

    label = f"cleaner(bilateral={bilateral_rounds}x(d={diameter},{sigma_color:g},{sigma_space:g}),"
    label += f" guided={guided_rounds}x(r={radius},eps={eps:g}))"
    return _named(purify_cleaner, label)


@functools.cache
def _import_cv2_ximgproc() -> Any:
    """Import OpenCV and make sure the contrib ``ximgproc`` module is there."""
    try:
        import cv2
    except ImportError:
        raise ConfigError(
            "the cleaner purifier needs OpenCV: pip install opencv-contrib-python-headless"
        ) from None
    if not hasattr(cv2, "ximgproc"):
        raise ConfigError(
            "the cleaner purifier needs OpenCV's contrib modules: pip install opencv-contrib-python-headless"
        )
    return cv2


# --------------------------------------------------------------------------- DiffPure


class DiffPure:
    """DiffPure: diffuse the photo to t* and denoise it with an image diffusion model (diffusers UNet2DModel + DDPMScheduler).

    Nie et al., "Diffusion Models for Adversarial Purification" (ICML 2022): the
    photo is resized to the model's resolution, noised to timestep
    ``round(t_star * num_train_timesteps)`` with the forward process, then
    denoised back to timestep 0 with the model; the small adversarial
    perturbation drowns in the added noise and the model's prior replaces it.
    With ``steps=None`` every DDPM (ancestral) step is run; with ``steps=k`` the
    reverse process takes ``k`` evenly spaced deterministic DDIM steps
    (``DDIMScheduler`` built from the same config), which is much faster.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        t_star: float = 0.2,
        steps: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """Wrap a loaded ``unet`` and its noise ``scheduler``.

        ``t_star`` in (0, 1] is the fraction of the forward process to diffuse to
        (0.1-0.3 are the usual values; larger removes more but changes identity);
        ``steps`` (>= 1) switches to that many DDIM steps; the model is moved to
        ``device`` and set to eval mode.
        """
        self.t_star = _check_positive(t_star, "DiffPure t_star", upper=1.0)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"DiffPure steps must be a positive integer or None, got {steps!r}")
        self.steps = steps
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        sample_size = unet.config.sample_size
        size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        self.sample_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)

    def __repr__(self) -> str:
        return (
            f"DiffPure(t_star={self.t_star:g}, timestep={self.timestep}, steps={self.steps}, "
            f"sample_size={self.sample_size}, device={self.device})"
        )

    @property
    def timestep(self) -> int:
        """The timestep the photo is diffused to: ``round(t_star * num_train_timesteps)``, at most T - 1."""
        return min(self.num_train_timesteps - 1, round(self.t_star * self.num_train_timesteps))

    @classmethod
    def from_pretrained(
        cls,
        source: str = DEFAULT_DIFFPURE_MODEL,
        t_star: float = 0.2,
        device: str | torch.device | None = None,
    ) -> DiffPure:
        """Load an unconditional diffusers DDPM from a hub id or a local folder.

        ``source`` is a Hugging Face model id or a folder, either in diffusers
        pipeline layout (``unet/`` + ``scheduler/``, as ``save_pretrained``
        writes) or flat (``config.json`` + ``scheduler_config.json`` at the top,
        the layout of ``google/ddpm-*`` repositories). Downloads only when the
        hub is reachable and ``HF_HUB_OFFLINE`` is not set. ``device`` defaults to
        CUDA when available. Raises :class:`ModelError` when it cannot be loaded.
        """
        from diffusers import DDPMScheduler, UNet2DModel

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = Path(source).expanduser()
        looks_like_path = source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
        if looks_like_path and not folder.is_dir():
            raise ModelError(f"DiffPure model folder '{source}' does not exist; pass a folder with unet/ and scheduler/")
        if not folder.is_dir() and _hub_offline() and not diffpure_available(source):
            raise ModelError(
                f"DiffPure model '{source}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"run `hf download {source}` once online or pass a local folder"
            )
        try:
            if folder.is_dir():
                nested = (folder / "unet" / "config.json").is_file()
                unet = UNet2DModel.from_pretrained(str(folder), subfolder="unet" if nested else None)
                scheduler_nested = (folder / "scheduler" / "scheduler_config.json").is_file()
                scheduler = DDPMScheduler.from_pretrained(
                    str(folder), subfolder="scheduler" if scheduler_nested else None
                )
            else:
                unet, scheduler = _load_from_hub(source)
        except ModelError:
            raise
        except Exception as err:  # diffusers / hub raise OSError, ValueError, HTTP errors...
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            raise ModelError(
                f"DiffPure model '{source}' could not be loaded ({reason}); pass a folder with unet/ and "
                f"scheduler/ or download the model once online (e.g. hf download {DEFAULT_DIFFPURE_MODEL})"
            ) from None
        logger.info("loaded DiffPure model %s (t*=%g) on %s", source, t_star, device)
        return cls(unet, scheduler, t_star=t_star, device=device)

    @classmethod
    def tiny(cls, seed: int = 0, t_star: float = 0.2) -> DiffPure:
        """A small DiffPure with seeded random weights, for tests (CPU, well under a second).

        ``UNet2DModel`` with sample_size 32, 3 channels, ``block_out_channels``
        (32, 64), one layer per block; a ``DDPMScheduler`` with 100 training
        timesteps whose linear betas are 10x the usual 1e-4..0.02, so a given
        ``t_star`` reaches about the same noise level as with 1000 timesteps
        while the reverse pass takes 10x fewer model calls.
        """
        from diffusers import DDPMScheduler, UNet2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DModel(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8,
            )
        scheduler = DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2, beta_schedule="linear")
        return cls(unet, scheduler, t_star=t_star, device="cpu")

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """Purify a ``(3, H, W)`` float image in [0, 1]; returns float32 ``(3, H, W)`` in [0, 1].

        The image is resized (antialiased bicubic) to the model's sample size -
        non-square photos are stretched, as DiffPure does - scaled to [-1, 1],
        noised to :attr:`timestep` with ``scheduler.add_noise``, denoised to
        timestep 0, mapped back to [0, 1] and resized (bicubic) to ``(H, W)``.
        All randomness comes from a CPU ``torch.Generator`` seeded with ``seed``.
        """
        from diffusers.utils.torch_utils import randn_tensor

        _check_image(image)
        height, width = image.shape[-2:]
        dtype = self.unet.dtype
        batch = image.detach().to(self.device, torch.float32).clamp(0.0, 1.0).unsqueeze(0)
        x0 = _resize(batch, self.sample_size).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0).to(dtype)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = randn_tensor(tuple(x0.shape), generator=generator, device=self.device, dtype=dtype)
        t = self.timestep
        sample = self._forward_scheduler().add_noise(x0, noise, torch.tensor([t], device=self.device))
        if self.steps is None:
            sample = self._denoise_ddpm(sample, t, generator)
        else:
            sample = self._denoise_ddim(sample, t)
        restored = sample.to(torch.float32).add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        return _finish(_resize(restored, (height, width))[0], image)

    def _forward_scheduler(self) -> DDPMScheduler:
        """A fresh DDPM scheduler from the model's config (schedulers hold per-run state)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    def _denoise_ddpm(self, sample: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
        """Ancestral DDPM steps t, t-1, ..., 0."""
        scheduler = self._forward_scheduler()
        scheduler.set_timesteps(timesteps=list(range(t, -1, -1)))
        for timestep in scheduler.timesteps:
            output = self.unet(sample, timestep.to(self.device)).sample
            sample = scheduler.step(output, timestep, sample, generator=generator).prev_sample
        return sample

    def _denoise_ddim(self, sample: torch.Tensor, t: int) -> torch.Tensor:
        """``steps`` deterministic DDIM steps t, t-s, ..., ending on the clean estimate.

        The DDIM scheduler steps from timestep ``k`` to ``k - T // n``; ``n`` is set
        so that this stride ``s`` is about ``t / steps``. The last step's
        ``pred_original_sample`` (the jump to alpha_bar = 1) is the result.
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        wanted = max(1, t // self.steps)
        scheduler.set_timesteps(max(1, self.num_train_timesteps // wanted))
        stride = self.num_train_timesteps // scheduler.num_inference_steps
        timesteps = [t - k * stride for k in range(min(self.steps, t // stride + 1))]
        channels = sample.shape[1]
        for timestep in timesteps:
            output = self.unet(sample, torch.tensor([timestep], device=self.device)).sample
            if output.shape[1] == 2 * channels:  # learned variance: DDIM only needs the noise
                output = output[:, :channels]
            step = scheduler.step(output, timestep, sample, eta=0.0)
            sample = step.prev_sample
        return step.pred_original_sample


def _hub_offline() -> bool:
    """Whether Hugging Face downloads are switched off (HF_HUB_OFFLINE, read now or at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _load_from_hub(source: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a hub model in pipeline layout (unet/, scheduler/) or flat layout (google/ddpm-*)."""
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(source, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError:
        unet = UNet2DModel.from_pretrained(source)
        scheduler = DDPMScheduler.from_pretrained(source)
    return unet, scheduler


@functools.lru_cache(maxsize=2)
def _cached_diffpure(source: str, device: str) -> DiffPure:
    """Load a DiffPure model once per (source, device) and reuse it."""
    return DiffPure.from_pretrained(source, device=device)


def diffpure_available(source: str | None = None) -> bool:
    """Whether DiffPure weights for ``source`` (default model if None) are on this machine.

    True for a folder holding ``unet/config.json`` (or a flat ``config.json``) and
    a ``diffusion_pytorch_model`` weights file next to it, or for a hub id whose
    config and weights are in the local Hugging Face cache
    (``huggingface_hub.try_to_load_from_cache``). Never downloads.
    """
    from huggingface_hub import try_to_load_from_cache

    source = source or DEFAULT_DIFFPURE_MODEL
    folder = Path(source).expanduser()
    for prefix in ("unet/", ""):
        if folder.is_dir():
            if (folder / prefix / "config.json").is_file() and any(
                (folder / prefix / name).is_file() for name in _WEIGHT_FILES
            ):
                return True
            continue
        try:
            config = try_to_load_from_cache(source, f"{prefix}config.json")
            weights = [try_to_load_from_cache(source, f"{prefix}{name}") for name in _WEIGHT_FILES]
        except Exception:  # not a valid repo id, unreadable cache...
            return False
        if isinstance(config, str) and any(isinstance(path, str) for path in weights):
            return True
    return False


# --------------------------------------------------------------------------- registry


def _parse_number(name: str, prefix: str) -> float:
    return float(name[len(prefix) :])


def is_purifier_name(name: str) -> bool:
    """Whether :func:`build_purifier` knows ``name``: one of :data:`PURIFIER_NAMES`, or
    ``long<N>`` / ``social<N>`` with a whole long edge ``N >= 1`` (e.g. ``long720``)."""
    return name in PURIFIER_NAMES or _SIZED_NAME.fullmatch(name) is not None


def build_purifier(
    name: str,
    *,
    diffpure_model: str | None = None,
    device: str | torch.device | None = None,
) -> Purifier:
    """The purifier called ``name`` (one of :data:`PURIFIER_NAMES`).

    ``jpeg95``/``jpeg75``/``jpeg50``/``jpeg30`` -> :func:`jpeg` at that quality,
    ``webp`` -> :func:`webp` (quality 80), ``resize0.5`` -> :func:`resize_back`
    (0.5), ``blur`` -> :func:`gaussian_blur` (sigma 1 px), ``noise0.05`` /
    ``noise0.1`` -> :func:`gaussian_noise`, ``crop`` -> :func:`center_crop`
    (0.9), ``cleaner`` -> :func:`cleaner`, ``diffpure`` -> :class:`DiffPure`
    loaded from ``diffpure_model`` (default :data:`DEFAULT_DIFFPURE_MODEL`) on
    ``device``; ``long<N>`` (e.g. ``long1080``) -> :func:`resize_long_edge`
    (``N``), ``social<N>`` -> :func:`chain` of ``long<N>`` and JPEG 75 (4:2:0),
    ``social`` -> ``social1080``; loaded models are cached. Unknown names raise
    :class:`ConfigError`; missing DiffPure weights raise :class:`ModelError`.
    Every purifier maps a ``(3, H, W)`` float image in [0, 1] and a seed to a
    float32 image of the same shape in [0, 1].
    """
    if not is_purifier_name(name):
        raise ConfigError(
            f"unknown purifier '{name}'; choose from {', '.join(PURIFIER_NAMES)} (or long<N>, social<N>)"
        )
    if name == "diffpure":
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return _cached_diffpure(diffpure_model or DEFAULT_DIFFPURE_MODEL, str(torch.device(device)))
    return _build_simple(name)


@functools.cache
def _build_simple(name: str) -> Purifier:
    """Build (once) a purifier that needs no model."""
    if name.startswith("jpeg"):
        return jpeg(int(name[len("jpeg") :]))
    if name.startswith("noise"):
        return gaussian_noise(_parse_number(name, "noise"))
    if name.startswith("resize"):
        return resize_back(_parse_number(name, "resize"))
    if name == "social":
        return _build_simple(f"social{SOCIAL_LONG_EDGE}")
    sized = _SIZED_NAME.fullmatch(name)
    if sized is not None:
        long_edge = int(sized.group(2))
        if sized.group(1) == "long":
            return resize_long_edge(long_edge)
        return chain(_build_simple(f"long{long_edge}"), _build_simple(f"jpeg{SOCIAL_JPEG_QUALITY}"))
    builders: dict[str, Callable[[], Purifier]] = {
        "webp": webp,
        "blur": gaussian_blur,
        "crop": center_crop,
        "cleaner": cleaner,
    }
    return builders[name]()


def purify(name: str, image: torch.Tensor, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """Apply the purifier ``name`` to a ``(3, H, W)`` float image in [0, 1].

    Shorthand for ``build_purifier(name, **kwargs)(image, seed)``; returns the
    float32 ``(3, H, W)`` purified image in [0, 1].
    """
    return build_purifier(name, **kwargs)(image, seed)
