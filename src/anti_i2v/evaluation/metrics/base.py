"""Shared pieces of the metrics: the metric description, the skip signal, input checks.

Conventions used by every metric module:

* a **video** is a float tensor ``(F, 3, H, W)`` with values in ``[0, 1]``;
* an **image** is a float tensor ``(3, H, W)`` with values in ``[0, 1]``.

Every metric has one `MetricSpec` that states its range and which direction means
the protection worked, so a report never has to guess how to read a number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from anti_i2v.errors import InputError

logger = logging.getLogger(__name__)

#: the values `MetricSpec.protection_direction` may take
DIRECTIONS = ("lower", "higher", "none")


@dataclass(frozen=True)
class MetricSpec:
    """How to read one metric.

    Attributes:
        name: short key used in reports and in `ALL_METRICS`, e.g. ``"ism"``.
        description: one sentence saying what is measured.
        range: ``(low, high)``, the values the metric can take (``inf`` allowed).
        higher_means: what a higher value means, e.g. "more similar to the clean photo".
        protection_direction: ``"lower"`` or ``"higher"``: the direction that means the
            protection worked (for the fidelity metrics: that the protection is less
            visible). ``"none"`` only for informational metrics (motion, frozen) that
            must not be read as success or failure on their own.
    """

    name: str
    description: str
    range: tuple[float, float]
    higher_means: str
    protection_direction: str

    def __post_init__(self) -> None:
        if self.protection_direction not in DIRECTIONS:
            raise ValueError(f"protection_direction must be one of {DIRECTIONS}, not {self.protection_direction!r}")
        if not self.range[0] < self.range[1]:
            raise ValueError(f"range of {self.name} must be (low, high) with low < high")


class Skipped(Exception):
    """A metric cannot run because its model or weights are not available locally.

    The message is one line saying what to install or download. Evaluation code
    catches it, records the metric as skipped and carries on with the others.
    """


def check_video(video: torch.Tensor, what: str = "video") -> torch.Tensor:
    """Validate a video ``(F, 3, H, W)`` in ``[0, 1]``; return it as float32 on the CPU, clamped to ``[0, 1]``."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 1:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise InputError(f"the {what} must be a tensor (F, 3, H, W) in [0, 1], got {shape}; convert it first")
    if not video.is_floating_point():
        raise InputError(f"the {what} must be a float tensor in [0, 1], got {video.dtype}; divide uint8 frames by 255")
    return video.detach().to("cpu", torch.float32).clamp(0.0, 1.0)


def check_image(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Validate an image ``(3, H, W)`` in ``[0, 1]``; return it as float32 on the CPU, clamped to ``[0, 1]``."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"the {what} must be a tensor (3, H, W) in [0, 1], got {shape}; convert it first")
    if not image.is_floating_point():
        raise InputError(f"the {what} must be a float tensor in [0, 1], got {image.dtype}; divide uint8 pixels by 255")
    return image.detach().to("cpu", torch.float32).clamp(0.0, 1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """An image ``(3, H, W)`` in ``[0, 1]`` -> contiguous ``uint8`` RGB array ``(H, W, 3)`` in ``[0, 255]``."""
    array = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).numpy())
