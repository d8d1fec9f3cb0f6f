"""Metrics measuring how well a protection works against image-to-video models.

Conventions: a video is a float tensor ``(F, 3, H, W)`` in ``[0, 1]``, an image
``(3, H, W)`` in ``[0, 1]``. Every metric has a `MetricSpec` (range, what higher
means, which direction means the protection worked); `ALL_METRICS` maps names to
them. Metrics whose weights are not available locally raise `Skipped`.

* identity (dlib, offline): `ism`, `fdfr` (`identity_scores` computes both in one pass)
* DINO similarity (needs DINOv2 weights): `DinoSimilarity`
* quality (needs weights we cannot ship): `QAlign`, `FaceQuality`
* temporal (OpenCV, offline): `warp_error`, `motion_magnitude`, `is_frozen`
* fidelity of the protected photo (offline): `fidelity`, `flip_difference` (NVIDIA FLIP)
"""

from __future__ import annotations

from anti_i2v.evaluation.metrics.base import MetricSpec, Skipped
from anti_i2v.evaluation.metrics.dino import DINO, DinoSimilarity, dino_available
from anti_i2v.evaluation.metrics.fidelity import CIEDE2000, FLIP, LINF, LINF_255, PSNR, SSIM, fidelity, flip_difference
from anti_i2v.evaluation.metrics.identity import (
    FDFR,
    ISM,
    ArcFaceIdentity,
    FaceIdentity,
    arcface_available,
    fdfr,
    identity_scores,
    ism,
    shared_faces,
)
from anti_i2v.evaluation.metrics.quality import (
    FACE_QUALITY,
    QALIGN_FRAME,
    QALIGN_VIDEO,
    FaceQuality,
    QAlign,
    face_quality_available,
    qalign_available,
)
from anti_i2v.evaluation.metrics.temporal import (
    FROZEN,
    MOTION,
    WARP_ERROR,
    frame_difference,
    is_frozen,
    motion_magnitude,
    warp_error,
)

#: every metric's spec, by name
ALL_METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        ISM, FDFR, DINO, QALIGN_FRAME, QALIGN_VIDEO, FACE_QUALITY,
        WARP_ERROR, MOTION, FROZEN, LINF, LINF_255, PSNR, SSIM, CIEDE2000, FLIP,
    )
}

__all__ = [
    "ALL_METRICS", "CIEDE2000", "DINO", "FACE_QUALITY", "FDFR", "FLIP", "FROZEN", "ISM", "LINF", "LINF_255",
    "MOTION", "PSNR", "QALIGN_FRAME", "QALIGN_VIDEO", "SSIM", "WARP_ERROR",
    "ArcFaceIdentity", "DinoSimilarity", "FaceIdentity", "FaceQuality", "MetricSpec", "QAlign", "Skipped",
    "arcface_available", "dino_available", "face_quality_available", "fdfr", "fidelity", "flip_difference", "frame_difference",
    "identity_scores", "is_frozen", "ism", "motion_magnitude", "qalign_available", "shared_faces", "warp_error",
]
