"""Temporal metrics from OpenCV optical flow (always offline).

* `WARP_ERROR`: temporal incoherence. For each pair of consecutive frames, dense
  Farneback flow is estimated from frame t+1 back to frame t (on grey uint8 frames),
  frame t is warped onto frame t+1 with ``cv2.remap`` and the mean absolute RGB error
  against frame t+1 is taken, in ``[0, 1]`` intensity units; the mean over pairs is
  reported. No occlusion mask is used. Range ``[0, 1]``; higher = less coherent
  video = better protection.
* `MOTION`: mean optical-flow magnitude (pixels per frame) divided by the frame
  diagonal, in ``[0, 1]``. Informational.
* `FROZEN`: 1.0 when the video is near-static (mean absolute frame-to-frame
  difference below 0.01 **and** motion below 0.002), else 0.0. A frozen video has a
  warp error near 0 and may also have low ISM by accident: count frozen videos
  separately, never as a success or failure of the protection.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from anti_i2v.errors import InputError
from anti_i2v.evaluation.metrics.base import MetricSpec, check_video, to_uint8

logger = logging.getLogger(__name__)

WARP_ERROR = MetricSpec(
    name="warp_error",
    description=(
        "temporal incoherence: mean absolute error between frame t+1 and frame t warped onto it "
        "by Farneback optical flow, in [0, 1] intensity units"
    ),
    range=(0.0, 1.0),
    higher_means="consecutive frames agree less with each other (flicker, broken motion)",
    protection_direction="higher",
)

MOTION = MetricSpec(
    name="motion",
    description="mean Farneback optical-flow magnitude per frame, divided by the frame diagonal",
    range=(0.0, 1.0),
    higher_means="more motion between consecutive frames",
    protection_direction="none",
)

FROZEN = MetricSpec(
    name="frozen",
    description=(
        "1 if the video is near-static (mean abs frame difference < 0.01 and motion < 0.002), "
        "else 0; count frozen videos separately, not as protection success"
    ),
    range=(0.0, 1.0),
    higher_means="the video is frozen (no real motion)",
    protection_direction="none",
)

# Farneback parameters: pyramid scale, levels, window, iterations, poly_n, poly_sigma, flags
_FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def _frames(video: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB float32 ``(H, W, 3)`` frames in [0, 1] and grey uint8 frames of a checked video."""
    import cv2

    video = check_video(video)
    if video.shape[0] < 2:
        raise InputError("temporal metrics need a video of at least 2 frames")
    uint8 = [to_uint8(frame) for frame in video]
    grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in uint8]
    rgb = [np.ascontiguousarray(frame.permute(1, 2, 0).numpy()) for frame in video]
    return rgb, grey


def _flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Farneback flow ``(H, W, 2)`` with ``source(y, x) ~ target(y + v, x + u)``."""
    import cv2

    return cv2.calcOpticalFlowFarneback(source, target, None, *_FARNEBACK)


def warp_error(video: torch.Tensor) -> float:
    """Mean flow-warping error of ``video`` ``(F >= 2, 3, H, W)`` in ``[0, 1]``.

    Returns a value in ``[0, 1]`` (intensity units); higher = less coherent = better protection.
    """
    import cv2

    rgb, grey = _frames(video)
    height, width = grey[0].shape
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    errors = []
    for t in range(len(rgb) - 1):
        flow = _flow(grey[t + 1], grey[t])  # where each pixel of frame t+1 comes from in frame t
        warped = cv2.remap(rgb[t], xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        errors.append(float(np.abs(rgb[t + 1] - warped).mean()))
    logger.debug("warp error per pair: %s", ["%.4f" % e for e in errors])
    return float(np.mean(errors))


def motion_magnitude(video: torch.Tensor) -> float:
    """Mean optical-flow magnitude of ``video`` ``(F >= 2, 3, H, W)`` in ``[0, 1]``, divided by the frame diagonal.

    Returns a value in ``[0, 1]`` (in practice well below 0.1); informational.
    """
    _, grey = _frames(video)
    height, width = grey[0].shape
    diagonal = float(np.hypot(height, width))
    magnitudes = [float(np.linalg.norm(_flow(grey[t], grey[t + 1]), axis=-1).mean()) for t in range(len(grey) - 1)]
    return min(1.0, float(np.mean(magnitudes)) / diagonal)


def frame_difference(video: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames of ``video`` ``(F >= 2, 3, H, W)``, in ``[0, 1]``."""
    video = check_video(video)
    if video.shape[0] < 2:
        raise InputError("temporal metrics need a video of at least 2 frames")
    return float((video[1:] - video[:-1]).abs().mean())


def is_frozen(video: torch.Tensor, diff_threshold: float = 0.01, motion_threshold: float = 0.002) -> bool:
    """Whether ``video`` ``(F >= 2, 3, H, W)`` in ``[0, 1]`` is near-static.

    True when the mean absolute frame-to-frame difference is below ``diff_threshold``
    (``[0, 1]`` units) and `motion_magnitude` is below ``motion_threshold`` (fraction
    of the diagonal). Report frozen videos separately (see `FROZEN`).
    """
    return frame_difference(video) < diff_threshold and motion_magnitude(video) < motion_threshold
