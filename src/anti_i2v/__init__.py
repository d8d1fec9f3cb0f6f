"""anti-i2v: protect photos of people from image-to-video diffusion models.

Implements Anti-I2V (CVPR 2026): a small perturbation, optimised in Lab chroma and
low-frequency DCT space against a video model's internal representations, so that
videos generated from the protected photo lose identity and quality.

    >>> import anti_i2v
    >>> result = anti_i2v.protect("me.jpg", model="tiny-cogvideox", out="protected")
    >>> result.budget.linf * 255  # measured on the saved file, [0, 255] levels
"""

from __future__ import annotations

__version__ = "0.1.0"

from anti_i2v.api import ProtectResult, protect, sample_photo  # noqa: E402
from anti_i2v.config import PRESETS, ProtectConfig  # noqa: E402
from anti_i2v.errors import AntiI2VError  # noqa: E402
from anti_i2v.models.registry import load_model  # noqa: E402

__all__ = [
    "AntiI2VError",
    "PRESETS",
    "ProtectConfig",
    "ProtectResult",
    "__version__",
    "load_model",
    "protect",
    "sample_photo",
]
