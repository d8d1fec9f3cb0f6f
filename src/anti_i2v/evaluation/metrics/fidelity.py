"""Imperceptibility of a protected photo: how far it is from the original.

All functions take the original and the protected photo as ``(3, H, W)`` float
tensors in ``[0, 1]`` of the same size. For every metric here,
``protection_direction`` is the direction of a *less visible* protection.

`flip_difference` is NVIDIA's FLIP (LDR-FLIP, Andersson et al., "FLIP: A Difference
Evaluator for Alternating Images", HPG 2020) from the ``flip-evaluator`` package: a
per-pixel estimate of how visible the difference is when a viewer flips between the
two images, from colour and edge differences weighted by the eye's contrast
sensitivity at a given viewing distance.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from anti_i2v.errors import ConfigError, InputError
from anti_i2v.evaluation.metrics.base import MetricSpec, check_image

logger = logging.getLogger(__name__)

LINF = MetricSpec(
    name="linf",
    description="largest absolute per-channel pixel change between original and protected photo, in [0, 1] units",
    range=(0.0, 1.0),
    higher_means="a larger perturbation somewhere in the photo",
    protection_direction="lower",
)

LINF_255 = MetricSpec(
    name="linf_255",
    description="the L-inf perturbation in 8-bit steps (linf * 255), e.g. 8 for an 8/255 budget",
    range=(0.0, 255.0),
    higher_means="a larger perturbation somewhere in the photo",
    protection_direction="lower",
)

PSNR = MetricSpec(
    name="psnr",
    description="peak signal-to-noise ratio of the protected photo against the original, in dB (inf if identical)",
    range=(0.0, math.inf),
    higher_means="the protected photo is closer to the original",
    protection_direction="higher",
)

SSIM = MetricSpec(
    name="ssim",
    description="structural similarity (11x11 Gaussian window, kornia) of the protected photo to the original",
    range=(0.0, 1.0),  # SSIM can dip below 0 for unrelated images; never for a protected photo
    higher_means="the protected photo is structurally closer to the original",
    protection_direction="higher",
)

CIEDE2000 = MetricSpec(
    name="ciede2000",
    description="mean CIEDE2000 colour difference (CIELAB, D65); about 1 is just noticeable, 2-3 visible side by side",
    range=(0.0, 100.0),
    higher_means="a more visible colour change",
    protection_direction="lower",
)

FLIP_PIXELS_PER_DEGREE = 67.0
"""FLIP's default viewing condition: 67 pixels per degree, a 0.7 m wide 3840-pixel screen seen
from 0.7 m, with the photo shown pixel for pixel."""

FLIP = MetricSpec(
    name="flip",
    description="mean LDR-FLIP error (NVIDIA FLIP, sRGB, 67 pixels per degree) between original and protected "
    "photo: how visible the change is when flipping between them; 0 identical, 1 maximal",
    range=(0.0, 1.0),
    higher_means="a more visible change",
    protection_direction="lower",
)


def _flip_module():
    """The ``flip_evaluator`` package, or a ConfigError saying how to install it."""
    try:
        import flip_evaluator
    except ImportError:
        raise ConfigError("the FLIP metric needs the flip-evaluator package: pip install 'anti-i2v[eval]'") from None
    return flip_evaluator


def flip_difference(
    reference: torch.Tensor, test: torch.Tensor, pixels_per_degree: float = FLIP_PIXELS_PER_DEGREE
) -> float:
    """Mean LDR-FLIP error in [0, 1] of ``test`` against ``reference``, both ``(3, H, W)`` sRGB in [0, 1].

    0 for identical images; differences near the threshold of visibility score a few
    hundredths, clearly visible ones tenths. ``pixels_per_degree`` (> 0) sets the
    viewing condition (default: FLIP's 67). Raises :class:`InputError` for
    mismatched or malformed images, :class:`ConfigError` when ``flip-evaluator`` is
    not installed.
    """
    reference = check_image(reference, "reference image")
    test = check_image(test, "test image")
    if reference.shape != test.shape:
        raise InputError(
            f"FLIP compares images of one size, got {tuple(reference.shape)} and {tuple(test.shape)}; resize first"
        )
    if not (isinstance(pixels_per_degree, (int, float)) and math.isfinite(pixels_per_degree) and pixels_per_degree > 0):
        raise ConfigError(f"FLIP pixels per degree must be a positive number, got {pixels_per_degree!r}")
    flip = _flip_module()
    ref = np.ascontiguousarray(reference.permute(1, 2, 0).numpy(), dtype=np.float32)
    out = np.ascontiguousarray(test.permute(1, 2, 0).numpy(), dtype=np.float32)
    _, mean_error, _ = flip.evaluate(ref, out, "LDR", inputsRGB=True, applyMagma=False, computeMeanError=True,
                                     parameters={"ppd": float(pixels_per_degree)})
    return float(mean_error)


def fidelity(original: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """Imperceptibility metrics of ``protected`` against ``original``, both ``(3, H, W)`` in ``[0, 1]``.

    Returns ``{"linf": [0, 1], "linf_255": [0, 255], "psnr": dB or inf, "ssim": [0, 1],
    "ciede2000": >= 0, "flip": [0, 1]}`` (see the specs for directions).
    """
    import kornia
    from skimage.color import deltaE_ciede2000, rgb2lab

    original = check_image(original, "original photo")
    protected = check_image(protected, "protected photo")
    if original.shape != protected.shape:
        raise InputError(
            f"original {tuple(original.shape)} and protected {tuple(protected.shape)} photos differ in size; "
            "compare the protected photo with the original at the same resolution"
        )
    # float64 differences; linf_255 is rounded to 1e-4 so float32 inputs report 8/255 as 8, not 8.000007
    a, b = original.double(), protected.double()
    diff = b - a
    linf = float(diff.abs().max())
    mse = float(diff.pow(2).mean())
    psnr = float("inf") if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    ssim = float(kornia.metrics.ssim(a[None], b[None], window_size=11, max_val=1.0).mean())
    lab_a = rgb2lab(a.permute(1, 2, 0).numpy())
    lab_b = rgb2lab(b.permute(1, 2, 0).numpy())
    ciede = float(np.mean(deltaE_ciede2000(lab_a, lab_b)))
    flip = flip_difference(original, protected)
    return {"linf": linf, "linf_255": round(linf * 255.0, 4), "psnr": psnr, "ssim": ssim, "ciede2000": ciede,
            "flip": flip}
