"""Reading, resizing, perturbing and writing the user's photo.

The attack itself runs at the image-to-video model's resolution. This module
is the bridge between that and the user's file:

* :func:`load_photo` reads any image Pillow can open (plus numpy arrays and
  torch tensors) into a full-resolution ``(3, H, W)`` float tensor, with EXIF
  orientation applied and alpha, ICC profile, EXIF and bit depth remembered.
* :func:`resize_for_model` stretches it to the model resolution the way the
  diffusers image-to-video pipelines prepare their condition image.
* :func:`carry_perturbation` brings a perturbation found at model resolution
  back onto the full-resolution photo without leaving the L-infinity budget.
* :func:`quantize_protected` / :func:`save_protected` write the result so the
  budget still holds after rounding to integer pixels, atomically and without
  ever overwriting the input.
* :func:`measure_budget` re-reads the written file and reports how much it
  really differs from the original.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from anti_i2v.errors import ConfigError, InputError, OutputError

logger = logging.getLogger(__name__)

MIN_SIDE: int = 64
"""Photos smaller than this many pixels on either side are refused."""

_ORIENTATION_TAG = 0x0112

# Output formats by file suffix; the value is the Pillow format name.
_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})
_EXTENSIONS: dict[str, str] = {
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
    "webp": "webp",
    "tif": "tif",
    "tiff": "tif",
}

# A float original counts as "on the integer grid" when it is this close to
# k / maxval (covers float32 rounding of k / 65535, far below the 1e-6 budget
# tolerance used by measure_budget).
_GRID_TOL = 2.5e-7
# Work on blocks of about this many values to bound float64 / SSIM memory.
_BLOCK_VALUES = 1 << 22
# Pillow's 8-bit reading of 16-bit colour values keeps their high byte: within 1/257 (0.99/255) of them
READING_ERROR_16BIT = 1 / 255
_LEVEL_BLOCK_VALUES = 1 << 19  # the floor's rounding passes: blocks that stay in cache
_SSIM_WINDOW = 11


@dataclass
class Photo:
    """A photo ready to be protected, plus what is needed to write it back.

    ``rgb`` is always a CPU ``(3, H, W)`` float32 tensor in [0, 1] at full
    resolution with EXIF orientation already applied (gray sources have three
    equal channels). Everything else describes the source so that
    :func:`save_protected` can reproduce it: alpha channel, bit depth,
    grayness, ICC profile and EXIF (with Orientation reset to 1).

    ``reading_error`` bounds how far ``rgb`` may be from the source file's own values:
    0, except for 16-bit colour files, which Pillow reads at 8 bits (`READING_ERROR_16BIT`).
    The protection keeps its budget against the source by spending that much less of it.
    """

    rgb: torch.Tensor
    alpha: np.ndarray | None
    bit_depth: int
    is_gray: bool
    source_mode: str
    source_format: str | None
    icc_profile: bytes | None
    exif: bytes | None
    path: Path | None
    reading_error: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """Return ``(H, W)`` of the photo."""
        return int(self.rgb.shape[-2]), int(self.rgb.shape[-1])


@dataclass
class BudgetReport:
    """How far a saved protected photo is from its original."""

    linf: float
    linf_255: float
    psnr: float
    ssim: float
    eps: float
    within_budget: bool
    # how far the photo as read may be from its file's values (`Photo.reading_error`); the budget
    # holds against the file when linf + source_error <= eps
    source_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a plain, JSON-safe dict (``psnr`` is None for identical images)."""
        record = asdict(self)
        if math.isinf(record["psnr"]):
            record["psnr"] = None
        return record


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_photo(source: str | Path | Image.Image | np.ndarray | torch.Tensor) -> Photo:
    """Load a photo from a file path, a PIL image, a numpy array or a torch tensor.

    Files: anything Pillow opens (JPEG, PNG, WebP, TIFF, ...). EXIF orientation
    is applied, palette images become RGB(A), CMYK becomes RGB (its ICC profile
    is dropped with a warning), 16-bit gray keeps its 16-bit precision, alpha is
    split off and kept unchanged. Only the first frame of animations is used.

    Arrays: ``HxWx3`` / ``HxW`` (or ``HxWx4`` with alpha) of uint8 (8-bit),
    uint16 (16-bit) or float in [0, 1]. Tensors: ``(3, H, W)`` or
    ``(1, 3, H, W)`` float in [0, 1].

    Raises:
        InputError: missing path, folder, unreadable / corrupt / truncated
            image, image smaller than ``MIN_SIDE``, bad array shape or range.
    """
    if isinstance(source, torch.Tensor):
        return _photo_from_tensor(source)
    if isinstance(source, np.ndarray):
        return _photo_from_array(source)
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "") or ""
        return _photo_from_pil(source, Path(filename) if filename else None)
    if isinstance(source, (str, os.PathLike)):
        return _photo_from_path(Path(source).expanduser())
    raise InputError(
        f"cannot load a photo from a {type(source).__name__}; "
        "pass a file path, a PIL image, a numpy array or a torch tensor"
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_min_side(width: int, height: int, what: str) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(
            f"{what} is {width}x{height} pixels; use a photo at least "
            f"{MIN_SIDE}x{MIN_SIDE} pixels"
        )


# how Pillow reports unreadable, damaged or truncated data
_PILLOW_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


def _photo_from_path(path: Path) -> Photo:
    _check_path(path)
    try:
        with Image.open(path) as im:
            return _photo_from_pil(im, path)
    except _PILLOW_ERRORS as exc:
        raise _open_error(path, exc) from None


def check_photo_file(path: Path) -> None:
    """Raise the `InputError` `load_photo` would for a file that cannot be a photo (missing, a
    folder, unreadable, no image header), reading only its header: a cheap check before a batch."""
    _check_path(path)
    try:
        with Image.open(path):
            return
    except _PILLOW_ERRORS as exc:
        raise _open_error(path, exc) from None


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"photo not found: {path}; check the path and try again")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass an image file (JPEG, PNG or WebP)")


def _open_error(path: Path, exc: BaseException) -> InputError:
    """The one-line `InputError` for a Pillow error ``exc`` on ``path``."""
    if isinstance(exc, UnidentifiedImageError):
        return InputError(f"{path} is not an image Pillow can read; use a JPEG, PNG or WebP photo")
    if isinstance(exc, Image.DecompressionBombError):
        return InputError(f"{path} is too large to open safely ({_one_line(exc)}); downscale it first")
    if isinstance(exc, PermissionError):
        return InputError(f"cannot read {path}: permission denied; check the file permissions")
    return InputError(f"{path} is truncated or corrupt ({_one_line(exc)}); re-export or re-download it")


def _raw_mode(im: Image.Image) -> str | None:
    """Return the decoder's raw mode (e.g. ``RGB;16B``), known only before load()."""
    tile = getattr(im, "tile", None)  # only file-backed images have one
    if not tile:
        return None
    args = tile[0].args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _exif_upright(im: Image.Image) -> bytes | None:
    """Return the image's EXIF with Orientation reset to 1, or None if it has none."""
    try:
        exif = im.getexif()
        if len(exif) == 0:
            return None
        data = exif.tobytes()
        if _ORIENTATION_TAG not in exif:
            return data
        upright = Image.Exif()  # a copy, so the caller's image is not modified
        upright.load(data)
        upright[_ORIENTATION_TAG] = 1
        return upright.tobytes()
    except Exception as exc:  # damaged EXIF must not make the photo unusable
        logger.warning("ignoring unreadable EXIF data (%s)", _one_line(exc))
        return None


def _photo_from_pil(im: Image.Image, path: Path | None) -> Photo:
    what = str(path) if path is not None else "the image"
    _check_min_side(im.width, im.height, what)
    raw_mode = _raw_mode(im)
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        logger.warning("%s has %d frames; only the first one is protected", what, n_frames)
    try:
        im.load()  # full decode now, so truncated files fail here and not later
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{what} is truncated or corrupt ({_one_line(exc)}); re-export or re-download it") from None

    source_mode = im.mode
    source_format = im.format
    icc = im.info.get("icc_profile") or None

    # Pillow 13 decodes 16-bit colour PNG/TIFF (and 16-bit gray+alpha PNG) to
    # 8-bit RGB(A); the extra precision is gone before we see the pixels.
    gray_hint = False
    reading_error = 0.0
    if raw_mode is not None and ";16" in raw_mode and source_mode in ("RGB", "RGBA"):
        gray_hint = raw_mode.startswith("LA")
        reading_error = READING_ERROR_16BIT
        logger.warning(
            "%s is a 16-bit %s image that Pillow reads at 8-bit precision (within 1/255 of its values); "
            "the protected copy will be 8-bit and spends 1/255 less of the budget, so that it stays within "
            "eps of the 16-bit values",
            what,
            "gray+alpha" if gray_hint else "colour",
        )

    try:
        upright = ImageOps.exif_transpose(im)
    except Exception as exc:
        logger.warning("could not apply EXIF orientation of %s (%s); using it as stored", what, _one_line(exc))
        upright = im
    if upright is None:  # only with in_place=True, kept for type checkers
        upright = im
    exif = _exif_upright(im)

    mode = upright.mode
    alpha: np.ndarray | None = None
    bit_depth = 8
    is_gray = False

    if mode == "CMYK":
        if icc is not None:
            logger.warning(
                "%s is CMYK; converted to RGB and its CMYK ICC profile dropped "
                "(colours may shift slightly)",
                what,
            )
            icc = None
        upright = upright.convert("RGB")
        mode = "RGB"
    elif mode == "P":
        mode = "RGBA" if "transparency" in upright.info else "RGB"
        upright = upright.convert(mode)
    elif mode in ("PA", "RGBa"):
        upright = upright.convert("RGBA")
        mode = "RGBA"
    elif mode == "La":
        upright = upright.convert("LA")
        mode = "LA"
    elif mode == "1":
        upright = upright.convert("L")
        mode = "L"

    if mode in ("L", "LA"):
        is_gray = True
        arr = np.asarray(upright)
        if mode == "LA":
            alpha = np.array(arr[..., 1])
            arr = arr[..., 0]
        gray = torch.from_numpy(arr.astype(np.float32)).div_(255.0)
        rgb = gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    elif mode.startswith("I;16") or mode == "I":
        is_gray = True
        bit_depth = 16
        arr = np.asarray(upright)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            logger.warning("%s has 32-bit values outside 0..65535; they are clipped", what)
        arr = np.clip(arr, 0, 65535).astype(np.float32)
        gray = torch.from_numpy(arr).div_(65535.0)
        rgb = gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    elif mode == "F":
        arr = np.asarray(upright, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise InputError(
                f"{what} is a floating-point image with values outside [0, 1]; "
                "convert it to an 8- or 16-bit image first"
            )
        is_gray = True
        bit_depth = 16
        rgb = torch.from_numpy(np.array(arr)).unsqueeze(0).expand(3, -1, -1).contiguous()
    else:
        if mode not in ("RGB", "RGBA"):
            try:
                upright = upright.convert("RGBA" if "A" in mode else "RGB")
            except ValueError as exc:
                raise InputError(
                    f"{what} uses the unsupported image mode {mode} ({_one_line(exc)}); "
                    "convert it to RGB first"
                ) from None
            mode = upright.mode
        arr = np.asarray(upright)
        if mode == "RGBA":
            alpha = np.array(arr[..., 3])
            arr = arr[..., :3]
        if gray_hint:
            is_gray = True
            arr = np.repeat(arr[..., :1], 3, axis=2)
        rgb = torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32, order="C")).div_(255.0)

    return Photo(
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        is_gray=is_gray,
        source_mode=source_mode,
        source_format=source_format,
        icc_profile=icc,
        exif=exif,
        path=path,
        reading_error=reading_error,
    )


def _float_to_unit(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr.astype(np.float32)  # always a copy: the photo must not alias the caller's array
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise InputError(
            f"{what} has float values outside [0, 1]; scale it to [0, 1] "
            "(or pass uint8 / uint16 pixels)"
        )
    return arr


def _photo_from_array(arr: np.ndarray) -> Photo:
    what = f"the {arr.dtype} array of shape {tuple(arr.shape)}"
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InputError(
            f"{what} is not an image; pass an HxWx3 (RGB), HxWx4 (RGBA) or HxW (gray) array"
        )
    _check_min_side(arr.shape[1], arr.shape[0], what)

    alpha: np.ndarray | None = None
    if arr.ndim == 3 and arr.shape[2] == 4:
        alpha_raw = arr[..., 3]
        arr = arr[..., :3]
        if np.issubdtype(alpha_raw.dtype, np.floating):
            alpha = np.rint(_float_to_unit(alpha_raw, what) * 255.0).astype(np.uint8)
        else:
            alpha = np.array(alpha_raw)

    if arr.dtype == np.uint8:
        bit_depth, unit = 8, arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        bit_depth, unit = 16, arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        bit_depth, unit = 8, _float_to_unit(arr, what)
    else:
        raise InputError(f"{what} has an unsupported dtype; pass uint8, uint16 or float pixels in [0, 1]")
    if alpha is not None and alpha.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{what} has an unsupported alpha dtype; pass uint8 or uint16 pixels")

    is_gray = unit.ndim == 2
    if is_gray:
        rgb = torch.from_numpy(np.ascontiguousarray(unit)).unsqueeze(0).expand(3, -1, -1).contiguous()
        mode = "I;16" if bit_depth == 16 else "L"
    else:
        rgb = torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))
        mode = "RGBA" if alpha is not None else "RGB"
    return Photo(
        rgb=rgb.to(torch.float32),
        alpha=alpha,
        bit_depth=bit_depth,
        is_gray=is_gray,
        source_mode=mode,
        source_format=None,
        icc_profile=None,
        exif=None,
        path=None,
    )


def _photo_from_tensor(t: torch.Tensor) -> Photo:
    what = f"the tensor of shape {tuple(t.shape)}"
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise InputError(f"{what} is not an image; pass a (3, H, W) or (1, 3, H, W) tensor")
    if not t.is_floating_point():
        raise InputError(f"{what} has dtype {t.dtype}; pass a float tensor with values in [0, 1]")
    _check_min_side(int(t.shape[2]), int(t.shape[1]), what)
    rgb = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(rgb).all() or rgb.min() < 0.0 or rgb.max() > 1.0:
        raise InputError(f"{what} has values outside [0, 1]; scale it to [0, 1]")
    if rgb.data_ptr() == t.data_ptr():
        rgb = rgb.clone()  # never alias the caller's tensor
    return Photo(
        rgb=rgb,
        alpha=None,
        bit_depth=8,
        is_gray=False,
        source_mode="RGB",
        source_format=None,
        icc_profile=None,
        exif=None,
        path=None,
    )


# --------------------------------------------------------------------------- #
# Model resolution <-> full resolution
# --------------------------------------------------------------------------- #


def resize_for_model(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Stretch ``(3, H, W)`` or ``(B, 3, H, W)`` images to ``(B, 3, height, width)``.

    Mimics how the diffusers image-to-video pipelines prepare their condition
    image: the whole photo is resized to the model resolution without cropping
    (aspect ratio not preserved), with antialiased bicubic interpolation, and
    clamped to [0, 1]. Differentiable.
    """
    if int(height) < 1 or int(width) < 1:
        raise ConfigError(f"model resolution {height}x{width} is invalid; use positive height and width")
    x = rgb.unsqueeze(0) if rgb.dim() == 3 else rgb
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(rgb.shape)}")
    y = F.interpolate(x, size=(int(height), int(width)), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0.0, 1.0)


def resize_to_fill(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale ``(3, H, W)`` or ``(B, 3, H, W)`` images to cover ``height x width``, then crop the centre.

    How DynamiCrafter and Open-Sora prepare their condition image (aspect kept, the
    overflow cropped). Antialiased bilinear, clamped to [0, 1], differentiable.
    """
    x = rgb.unsqueeze(0) if rgb.dim() == 3 else rgb
    scale = max(height / x.shape[-2], width / x.shape[-1])
    size = (max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[..., top : top + height, left : left + width].clamp(0.0, 1.0)


def resize_short_side_and_crop(rgb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale the photo's short side to ``min(height, width)``, then centre-crop to ``height x width``.

    The torchvision ``Resize(min(h, w))`` + ``CenterCrop((h, w))`` preparation of
    DynamiCrafter: where the scaled photo is smaller than the crop, it is padded with
    zeros (black bars). Antialiased bilinear, clamped to [0, 1], differentiable.
    """
    x = rgb.unsqueeze(0) if rgb.dim() == 3 else rgb
    scale = min(height, width) / min(x.shape[-2], x.shape[-1])
    size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)
    pad_h, pad_w = max(0, height - size[0]), max(0, width - size[1])
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


def carry_perturbation(
    original: torch.Tensor, x_model: torch.Tensor, x_model_adv: torch.Tensor, eps: float
) -> torch.Tensor:
    """Apply a perturbation found at model resolution to the full-resolution photo.

    ``delta = x_model_adv - x_model`` (``(1, 3, h, w)``) is upsampled to the
    photo's ``(H, W)`` with bilinear interpolation (``align_corners=False``, no
    antialias). Bilinear upsampling is a convex combination of neighbouring
    delta values, so ``|delta|`` stays within ``eps``; and unlike placing the
    delta on a sparse grid, every pixel of the original receives a share of it.
    The result is clamped to ``[original - eps, original + eps]`` and to
    [0, 1] (so pixels already at 0 or 1 may saturate and stay unchanged).

    Returns a ``(3, H, W)`` tensor on ``original``'s device.
    """
    if eps < 0:
        raise ConfigError(f"eps={eps} is negative; use a budget >= 0 (for example 8/255)")
    if original.dim() != 3 or original.shape[0] != 3:
        raise ValueError(f"original must be (3, H, W), got shape {tuple(original.shape)}")
    if x_model.shape != x_model_adv.shape:
        raise ValueError(
            f"x_model {tuple(x_model.shape)} and x_model_adv {tuple(x_model_adv.shape)} differ in shape"
        )
    delta = x_model_adv - x_model
    if delta.dim() == 3:
        delta = delta.unsqueeze(0)
    if delta.dim() != 4 or delta.shape[:2] != (1, 3):
        raise ValueError(f"x_model must be (1, 3, h, w), got shape {tuple(x_model.shape)}")
    delta = delta.to(device=original.device, dtype=original.dtype)
    height, width = original.shape[-2:]
    up = F.interpolate(delta, size=(height, width), mode="bilinear", align_corners=False)[0]
    out = torch.minimum(torch.maximum(original + up, original - eps), original + eps)
    return out.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def output_path_for(
    input_path: Path | None, out_dir: Path, fmt: str = "png", stem: str | None = None
) -> Path:
    """Return ``out_dir / f"{stem}_protected.{ext}"``.

    ``fmt`` is png, jpg/jpeg, webp or tif/tiff (``jpeg`` gives ``.jpg``). ``stem``
    defaults to the input file's stem, or ``"photo"`` when there is no path.
    """
    key = fmt.lower().lstrip(".")
    if key not in _EXTENSIONS:
        raise ConfigError(f"output format {fmt!r} is not supported; use png, jpg, webp or tif")
    if stem is None:
        stem = Path(input_path).stem if input_path is not None else "photo"
    return Path(out_dir) / f"{stem}_protected.{_EXTENSIONS[key]}"


def quantize_protected(
    photo: Photo, protected: torch.Tensor, eps: float, *, bit_depth: int | None = None
) -> np.ndarray:
    """Round a protected ``(3, H, W)`` float image to integer pixels within ``eps``.

    Returns uint8 (8-bit) or uint16 (16-bit) pixels, ``HxWx3``, or ``HxW`` for
    gray sources (channel mean). ``bit_depth`` overrides ``photo.bit_depth``
    (used when a format cannot store 16 bits).

    Each value is rounded to nearest and then clipped to the integers ``q`` with
    ``|q / maxval - orig| <= eps``. When ``orig`` lies on the grid (every file
    loaded at this bit depth) that is ``orig_q +- floor(eps * maxval + 1e-6)``,
    so the saved file keeps the budget exactly. For an off-grid original (float
    input, or 16-bit written as 8-bit) the same interval is used as long as it
    holds an integer, i.e. ``eps >= 0.5 / maxval``.
    """
    bits = photo.bit_depth if bit_depth is None else bit_depth
    if bits not in (8, 16):
        raise ConfigError(f"bit depth {bits} is not supported; use 8 or 16")
    if eps < 0:
        raise ConfigError(f"eps={eps} is negative; use a budget >= 0 (for example 8/255)")
    if tuple(protected.shape) != tuple(photo.rgb.shape):
        raise ValueError(
            f"protected image {tuple(protected.shape)} does not match the photo {tuple(photo.rgb.shape)}"
        )
    maxval = (1 << bits) - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    prot = protected.detach().to("cpu", torch.float32)
    orig = photo.rgb
    if photo.is_gray:
        prot = prot.mean(dim=0, keepdim=True)
        orig = orig[:1]
    channels, height, width = prot.shape
    out = np.empty((height, width, channels), dtype=dtype)
    rows = max(1, _BLOCK_VALUES // max(1, channels * width))
    for r0 in range(0, height, rows):
        o, lo, hi = _level_bounds(orig[:, r0 : r0 + rows].numpy(), eps, maxval)
        q = _round_within(prot[:, r0 : r0 + rows].numpy(), o, lo, hi, maxval)
        out[r0 : r0 + rows] = q.transpose(1, 2, 0).astype(dtype)
    return out[..., 0] if photo.is_gray else out


def _level_bounds(original: np.ndarray, eps: float, maxval: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original in levels (snapped to the grid when within float error of it) and, per value,
    the lowest and highest integer level within ``eps`` of it, both clipped to [0, maxval]."""
    o = original.astype(np.float64) * maxval
    near = np.rint(o)
    o = np.where(np.abs(o - near) <= _GRID_TOL * maxval, near, o)
    budget = eps * maxval
    lo = np.ceil(o - budget - 1e-6)
    hi = np.floor(o + budget + 1e-6)
    empty = lo > hi
    if empty.any():  # budget below half a step around an off-grid value
        lo = np.where(empty, np.rint(o), lo)
        hi = np.where(empty, np.rint(o), hi)
    return o, np.clip(lo, 0, maxval), np.clip(hi, 0, maxval)


def _round_within(protected: np.ndarray, o: np.ndarray, lo: np.ndarray, hi: np.ndarray, maxval: int) -> np.ndarray:
    """``protected`` (in [0, 1]) rounded to the nearest level inside [lo, hi] (non-finite values: the original)."""
    p = protected.astype(np.float64) * maxval
    p = np.where(np.isfinite(p), p, o)
    return np.clip(np.rint(p), lo, hi)


class _SavedLevels:
    """The 8-bit levels `save_protected` writes for ``photo + scale * (protected - photo)``, and their
    PSNR, for any scale. What does not depend on the scale (the bounds of the budget per value) is
    computed once, and each scale is one rounding pass over row blocks small enough to stay in
    cache, so the bisection of `limit_saved_psnr` stays cheap on large photos."""

    def __init__(self, photo: Photo, protected: torch.Tensor, eps: float) -> None:
        self.photo = photo
        delta = protected.detach().to("cpu", torch.float32) - photo.rgb
        channels = 1 if photo.is_gray else 3
        height, width = photo.rgb.shape[1:]
        self.shape = (channels, height, width)
        self.rows = max(1, _LEVEL_BLOCK_VALUES // (channels * width))
        self.lo = np.empty(self.shape, np.uint8)
        self.hi = np.empty(self.shape, np.uint8)
        for rows in self._blocks():
            _, self.lo[:, rows], self.hi[:, rows] = _level_bounds(self._original(rows), eps, 255)
        # a non-finite value is saved at the original's level (as `quantize_protected` does)
        broken = ~torch.isfinite(delta)
        if photo.is_gray:  # one broken channel breaks the saved mean
            broken = broken.any(dim=0, keepdim=True)
        self.broken = np.flatnonzero(broken.numpy())
        original, lo, hi = _level_bounds(photo.rgb[:channels].numpy().ravel()[self.broken], eps, 255)
        self.broken_levels = np.clip(np.rint(original), lo, hi).astype(np.uint8)
        # no change there, so that the scaled photo `limit_saved_psnr` returns saves those levels too
        self.delta = torch.nan_to_num(delta, 0.0, 0.0, 0.0).masked_fill(broken, 0.0)

    def _blocks(self) -> list[slice]:
        return [slice(r, r + self.rows) for r in range(0, self.shape[1], self.rows)]

    def _original(self, rows: slice) -> np.ndarray:
        """The original's values of ``rows`` in [0, 1] (gray photos: one channel)."""
        return self.photo.rgb[: self.shape[0], rows].numpy()

    def levels(self, scale: float) -> np.ndarray:
        """The saved pixels at ``scale``: (C, H, W) uint8 levels."""
        out = np.empty(self.shape, np.uint8)
        for rows in self._blocks():
            scaled = torch.mul(self.delta[:, rows], scale).add_(self.photo.rgb[:, rows])
            if self.photo.is_gray:  # saved as the channel mean, as `quantize_protected` does
                scaled = scaled.mean(dim=0, keepdim=True)
            p = np.multiply(scaled.numpy(), 255, dtype=np.float64)
            out[:, rows] = np.clip(np.rint(p, out=p), self.lo[:, rows], self.hi[:, rows], out=p)
        out.ravel()[self.broken] = self.broken_levels
        return out

    def squared_error(self, levels: np.ndarray) -> float:
        """Sum of squared differences of ``levels`` (in [0, 1] units) to the original."""
        total = 0.0
        for rows in self._blocks():
            diff = levels[:, rows] / 255.0 - self._original(rows)
            total += float(np.square(diff, out=diff).sum())
        return total

    def psnr(self, levels: np.ndarray) -> float:
        """PSNR in dB (data range 1) of ``levels`` to the original; inf when equal."""
        mse = self.squared_error(levels) / levels.size
        return math.inf if mse == 0 else -10 * math.log10(mse)


def saved_psnr(photo: Photo, protected: torch.Tensor, eps: float) -> float:
    """PSNR in dB (data range 1) of ``protected`` against the photo once rounded to 8-bit levels,
    as `save_protected` writes most photos (16-bit gray PNGs round finer); inf when nothing changes."""
    saved = _SavedLevels(photo, protected, eps)
    return saved.psnr(saved.levels(1.0))


# Decisions on the floor keep this margin, so that a sum taken in another order cannot tip them.
_FLOOR_MARGIN_DB = 1e-9


def limit_saved_psnr(photo: Photo, protected: torch.Tensor, eps: float, min_psnr: float | None) -> torch.Tensor:
    """``protected`` with its perturbation scaled toward the photo, as little as needed, so that the
    saved file's PSNR (`saved_psnr`) is at least ``min_psnr`` dB; unchanged when it already is or
    when ``min_psnr`` is None or 0.

    The scale is found by bisection on the rounded pixels. Rounding makes the PSNR a staircase of
    the scale (where most of the perturbation sits at one level, a small change of scale moves many
    pixels at once), so on 8-bit photos the budget left below the floor is then filled: pixels that
    the next larger scale would move are moved, in a seeded random order, while the floor holds.
    """
    if not min_psnr:
        return protected
    saved = _SavedLevels(photo, protected, eps)
    floor = min_psnr + _FLOOR_MARGIN_DB
    if saved.psnr(saved.levels(1.0)) >= floor:
        return protected
    low, high = 0.0, 1.0  # low always meets the floor (0 is the photo itself)
    for _ in range(16):
        mid = (low + high) / 2
        if saved.psnr(saved.levels(mid)) >= floor:
            low = mid
        else:
            high = mid
    limited = photo.rgb + low * saved.delta
    if photo.bit_depth != 8:
        return limited
    filled = _fill_to_floor(saved, saved.levels(low), saved.levels(high), floor)
    if filled is None:
        return limited
    return torch.from_numpy(filled / 255.0).to(limited.dtype).expand_as(limited).clone()


def _fill_to_floor(saved: _SavedLevels, low: np.ndarray, high: np.ndarray, floor: float) -> np.ndarray | None:
    """The levels ``low`` (meets the floor) with some of the pixels where ``high`` (does not) differs
    taken from ``high``, as many as the floor allows, in a seeded random order (8-bit photos); None
    when none fits. The result holds exact 8-bit levels, which saving keeps as they are."""
    allowed = low.size * 10 ** (-floor / 10)  # total squared error at the floor
    spent = saved.squared_error(low)
    where = np.flatnonzero(low != high)
    original = saved.photo.rgb[: saved.shape[0]].numpy().ravel()[where].astype(np.float64)
    cost = (high.ravel()[where] / 255.0 - original) ** 2 - (low.ravel()[where] / 255.0 - original) ** 2
    order = np.random.default_rng(0).permutation(where.size)
    fits = np.cumsum(cost[order]) <= allowed - spent
    taken = where[order[: where.size if fits.all() else int(np.argmin(fits))]]  # the longest prefix that fits
    if taken.size == 0:
        return None
    filled = low.copy()
    filled.ravel()[taken] = high.ravel()[taken]
    return filled if saved.psnr(filled) >= floor else None


def _icc_colour_space(icc: bytes) -> bytes | None:
    return icc[16:20] if len(icc) >= 20 else None


def _current_umask() -> int:
    # Reading /proc avoids os.umask()'s set-and-restore race with other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _refuse_input_path(photo: Photo, out_path: Path) -> None:
    if photo.path is None:
        return
    same = Path(photo.path).resolve() == out_path.resolve()
    if not same and out_path.exists() and Path(photo.path).exists():
        try:
            same = os.path.samefile(photo.path, out_path)
        except OSError:
            pass
    if same:
        raise OutputError(
            f"{out_path} is the input photo itself; choose another output name or folder"
        )


def save_protected(
    photo: Photo,
    protected: torch.Tensor,
    out_path: Path,
    eps: float,
    *,
    quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Write the protected photo to ``out_path`` and return the path.

    The format follows the suffix: ``.png`` (lossless, recommended), ``.tif`` /
    ``.tiff`` (lossless), ``.jpg`` / ``.jpeg`` and ``.webp`` (lossy, with
    ``quality``; a warning is logged because compression changes pixels, may
    weaken the protection and can push the measured change above ``eps``).

    Pixels are quantized with :func:`quantize_protected`. Size, alpha channel
    (unchanged), ICC profile, EXIF (Orientation 1), grayness and 16-bit gray
    precision are kept where the format allows; 16-bit colour is written as
    8-bit with a warning because Pillow cannot write it. The write is atomic
    (hidden temporary file in the same folder, fsync, rename) and PNG output is
    byte-for-byte deterministic.

    Raises:
        OutputError: unsupported suffix, ``out_path`` is the input photo, it
            exists and ``overwrite`` is False, alpha would go to JPEG, or the
            folder cannot be created / written.
        ConfigError: ``quality`` outside 1..100.
    """
    out_path = Path(out_path).expanduser()
    fmt = _FORMATS.get(out_path.suffix.lower())
    if fmt is None:
        raise OutputError(
            f"cannot write {out_path}: unsupported format {out_path.suffix or '(no suffix)'}; "
            "use .png, .jpg, .webp or .tif"
        )
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"quality={quality} is out of range; use a value from 1 to 100")
    _refuse_input_path(photo, out_path)
    if out_path.is_dir():
        raise OutputError(f"{out_path} is a folder; give a file name such as photo_protected.png")
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path} already exists; choose another name or allow overwriting")
    if fmt == "JPEG" and photo.alpha is not None:
        raise OutputError(
            f"cannot write {out_path}: JPEG cannot store the photo's transparency; save as .png instead"
        )
    if fmt in _LOSSY_FORMATS:
        logger.warning(
            "%s is lossy: compression changes pixels, may weaken the protection and the "
            "measured change may exceed eps; save as .png to keep it exact",
            fmt,
        )

    image = _build_output_image(photo, protected, eps, fmt)
    options: dict[str, Any] = {}
    icc = photo.icc_profile
    if icc is not None:
        wanted = b"GRAY" if image.mode in ("L", "LA", "I;16") else b"RGB "
        if _icc_colour_space(icc) == wanted:
            options["icc_profile"] = icc
        else:
            logger.warning("dropping the ICC profile: it does not describe a %s image", image.mode)
    if photo.exif is not None:
        options["exif"] = photo.exif
    if fmt == "JPEG":
        # 4:4:4 keeps the colour detail of the perturbation that 4:2:0 would average away.
        options.update(quality=int(quality), subsampling=0)
    elif fmt == "WEBP":
        options.update(quality=int(quality), lossless=False, exact=True)

    _atomic_save(image, out_path, fmt, options, overwrite=overwrite)
    logger.info("saved protected photo to %s", out_path)
    return out_path


def _build_output_image(photo: Photo, protected: torch.Tensor, eps: float, fmt: str) -> Image.Image:
    bits = photo.bit_depth
    alpha = photo.alpha
    if bits == 16:
        reason = None
        if not photo.is_gray:
            reason = "Pillow cannot write 16-bit colour images"
        elif alpha is not None:
            reason = "Pillow cannot write 16-bit images with alpha"
        elif fmt in ("JPEG", "WEBP"):
            reason = f"{fmt} cannot store 16 bits"
        if reason is not None:
            logger.warning("saving as 8-bit: %s; use .png for 16-bit gray photos", reason)
            bits = 8
    q = quantize_protected(photo, protected, eps, bit_depth=bits)

    gray_out = photo.is_gray and fmt != "WEBP"  # WebP has no gray mode
    if photo.is_gray and not gray_out:
        q = np.repeat(q[..., None], 3, axis=2)
    if alpha is not None:
        if alpha.shape != q.shape[:2]:
            raise ValueError(f"alpha {alpha.shape} does not match the photo {q.shape[:2]}")
        if alpha.dtype != np.uint8:
            logger.warning("alpha channel reduced to 8 bits to fit the output format")
            alpha = np.rint(alpha.astype(np.float64) / 257.0).astype(np.uint8)
        q = np.concatenate([q[..., None] if q.ndim == 2 else q, alpha[..., None]], axis=2)
    # fromarray infers L, I;16, LA, RGB or RGBA from dtype and channel count.
    return Image.fromarray(np.ascontiguousarray(q))


def _atomic_save(image: Image.Image, out_path: Path, fmt: str, options: dict[str, Any], *, overwrite: bool) -> None:
    folder = out_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder {folder} ({_one_line(exc.strerror or exc)}); "
            "choose a writable folder"
        ) from None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"cannot write in {folder} ({_one_line(exc.strerror or exc)}); choose a writable folder"
        ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=fmt, **options)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600
        if overwrite:
            os.replace(tmp, out_path)
        else:
            _link_no_clobber(tmp, out_path)
    except OutputError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {out_path} ({_one_line(exc.strerror or exc)}); "
            "check free space and permissions or choose another folder"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _link_no_clobber(tmp: Path, out_path: Path) -> None:
    """Move tmp to out_path, failing if out_path appeared meanwhile (no silent overwrite)."""
    try:
        os.link(tmp, out_path)
    except FileExistsError:
        raise OutputError(f"{out_path} already exists; choose another name or allow overwriting") from None
    except OSError:
        # File systems without hard links: check-then-rename is the best we can do.
        if out_path.exists():
            raise OutputError(f"{out_path} already exists; choose another name or allow overwriting") from None
        os.replace(tmp, out_path)
        return
    tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #


def _ssim_mean(a: torch.Tensor, b: torch.Tensor, block_rows: int | None = None) -> float:
    """Mean SSIM (gaussian window 11) of two (3, H, W) images, computed in row blocks.

    SSIM is a pointwise function of local means/variances over an 11x11 window,
    so blocks with a halo of more than 5 rows give exactly the full-image values
    while only a block's worth of float32 temporaries is alive at a time. All
    channels go through kornia together: its CPU path is several times faster
    per pixel that way than channel by channel.
    """
    from kornia.metrics import ssim

    channels, height, width = a.shape
    halo = _SSIM_WINDOW // 2 + 3
    if block_rows is None:
        block_rows = max(1, _BLOCK_VALUES // max(1, channels * width))
    total = 0.0
    for r0 in range(0, height, block_rows):
        r1 = min(height, r0 + block_rows)
        s0, s1 = max(0, r0 - halo), min(height, r1 + halo)
        ta = a[:, s0:s1].unsqueeze(0).to(torch.float32).contiguous()
        tb = b[:, s0:s1].unsqueeze(0).to(torch.float32).contiguous()
        with torch.no_grad():
            smap = ssim(ta, tb, _SSIM_WINDOW, max_val=1.0)
        total += float(smap[..., r0 - s0 : r1 - s0, :].to(torch.float64).sum())
    return total / (channels * height * width)


def measure_budget(photo: Photo, saved_path: Path, eps: float) -> BudgetReport:
    """Re-read a saved protected photo and measure how far it is from the original.

    The file is loaded with :func:`load_photo` (same orientation handling) and
    its RGB compared with ``photo.rgb``: L-infinity distance, PSNR (data range
    1) and mean SSIM (gaussian window 11). Works in blocks so large photos do
    not need several full-size float copies.

    Raises:
        OutputError: the saved file cannot be read or has a different size.
    """
    saved_path = Path(saved_path)
    try:
        saved = load_photo(saved_path)
    except InputError as exc:
        raise OutputError(f"cannot check the saved photo: {exc}") from None
    if saved.size != photo.size:
        raise OutputError(
            f"{saved_path} is {saved.size[1]}x{saved.size[0]} but the original is "
            f"{photo.size[1]}x{photo.size[0]}; save it again without resizing"
        )
    a, b = photo.rgb, saved.rgb
    height, width = photo.size
    rows = max(1, _BLOCK_VALUES // max(1, 3 * width))
    linf = 0.0
    sq_sum = 0.0
    for r0 in range(0, height, rows):
        d = (b[:, r0 : r0 + rows] - a[:, r0 : r0 + rows]).to(torch.float64)
        linf = max(linf, float(d.abs().max()))
        sq_sum += float((d * d).sum())
    # Both images hold whole levels; float32 storage adds ~1e-8 noise, so snap to the grid.
    levels = float(2 ** min(photo.bit_depth, saved.bit_depth) - 1)
    snapped = round(linf * levels) / levels
    if abs(snapped - linf) < 1e-4 / levels:
        linf = snapped
    mse = sq_sum / a.numel()
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    ssim_value = _ssim_mean(a, b)
    return BudgetReport(
        linf=linf,
        linf_255=linf * 255.0,
        psnr=psnr,
        ssim=ssim_value,
        eps=float(eps),
        within_budget=linf + photo.reading_error <= eps + 1e-6,
        source_error=photo.reading_error,
    )
