"""Perturbation spaces: the coordinates a sign-PGD step moves.

Anti-I2V does not optimise the perturbation directly in RGB. It alternates
between a CIELAB stage (only a* and b* move, L* is pinned to the original
photo's L*) and a DCT stage (only low-frequency coefficients of the
perturbation move). Whatever the space, every image handed back is projected
onto the RGB L-infinity ball of radius ``eps`` around the original and onto
``[0, 1]``.

Conventions, used everywhere below:

* Images are float tensors of shape :math:`(B, 3, H, W)` with values in
  :math:`[0, 1]`; ``eps`` is in the same pixel units.
* Parameters live in float32 (float64 when the input is float64) even for
  half-precision inputs, so that small steps are not rounded away; ``to_rgb``
  and ``step`` return the dtype of the original image ``x``. For half-precision
  inputs the ball therefore holds only up to that dtype's rounding.

The PGD engine uses a space like this::

    space = build_space("dual")
    x_adv = x.clone()
    for t in range(steps):
        p = space.parametrise(x_adv, x, eps, t)
        loss = objective(p.to_rgb())
        (grad,) = torch.autograd.grad(loss, p.params)
        step_size = space.default_step_size(eps, steps, space.stage(t))
        x_adv = p.step(grad, step_size)   # sign-gradient descent
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import Tensor

from anti_i2v.errors import ConfigError

if TYPE_CHECKING:
    from anti_i2v.config import ProtectConfig

__all__ = [
    "DCT_STEP_GAIN",
    "LAB_STEP_PER_RGB",
    "SPACE_NAMES",
    "DCTSpace",
    "DualSpace",
    "LabSpace",
    "Parametrisation",
    "PerturbationSpace",
    "RGBSpace",
    "build_space",
    "is_colourless",
    "dct_2d",
    "dct_matrix",
    "idct_2d",
    "low_band_mask",
    "project",
    "rgb_step_size",
    "space_from_config",
]

SPACE_NAMES: tuple[str, ...] = ("rgb", "lab", "dct", "dual")

# --- step-size calibration ---------------------------------------------------
# A default Lab or DCT step is the default RGB step converted so that one sign
# step moves the RGB image by about the same mean absolute amount as one RGB
# sign step (which moves every pixel by exactly its size). Measured with
# x_adv = x, one sign step WITHOUT projection, images resized to 64x96
# (area), signs from random gradients ("rand") and from the gradient of a
# small random conv encoder loss ("enc"); numbers are mean |delta RGB| per
# unit of step size:
#
# * Lab (a*/b* units): astronaut 0.00581 (rand) / 0.00578 (enc); skimage
#   chelsea 0.00504, coffee 0.00576, rocket 0.00545, immunohistochemistry
#   0.00541, retina 0.00602 (rand); linear within 2 % for s = 0.05 .. 4.
#   Synthetic images move more: smooth random colours 0.0066 / 0.0070,
#   uniform noise 0.0095 / 0.0110, skimage colorwheel 0.0114. We use the
#   natural-photo value 0.0056, i.e. LAB_STEP_PER_RGB = 1 / 0.0056 ~ 179
#   (the 0.5/255 RGB floor becomes 0.35 a*/b* units).
# * DCT (coefficient units): a sign step of size s on the kept fraction
#   f = (k/n)^2 of each n x n tile (k kept per axis) moves pixels by
#   s * sqrt(f) = s * k/n in RMS, so we report mean |delta| / (s * k/n),
#   which does not depend on the image (the DCT is linear):
#   block 8: band 0.25 0.771-0.786 (rand) / 0.700-0.717 (enc),
#            band 0.5 0.789 / 0.729-0.743;
#   block 16: bands 0.125-0.5 0.777-0.793 (rand) / 0.706-0.783 (enc);
#   global: bands 0.125-0.5 0.788-0.798 (rand) / 0.713-0.805 (enc);
#   only when one coefficient per tile is kept (e.g. block 8, band 0.125) it is
#   exactly 1. We use DCT_STEP_GAIN = 0.78, so with the defaults (block 8,
#   band 0.25, k/n = 1/4) one DCT unit ~ 0.195 RGB units and the default DCT
#   step is ~ 5.1 x the RGB one.
LAB_STEP_PER_RGB: float = 1.0 / 0.0056
DCT_STEP_GAIN: float = 0.78
# * Lab on an image without colour (its channels equal, as every gray photo): a*/b* must
#   stay 0, so the stage moves L* instead. Mean |delta RGB| per unit of L* of one sign
#   step, 64x96, s = 0.1 and 1: 0.0094 .. 0.0106 on six skimage photos (camera, moon,
#   coins, page, text, astronaut in gray), about 0.0100. One coordinate unit is
#   LIGHTNESS_PER_UNIT L* units, so that a step moves the pixels as much as a chroma step does.
LIGHTNESS_PER_UNIT: float = 0.0056 / 0.0100

_RGB_STEP_FLOOR = 0.5 / 255.0


def rgb_step_size(eps: float, steps: int) -> float:
    """Default RGB sign-step size: ``max(0.5/255, 2.5 * eps / steps)``.

    The Madry et al. rule (2.5 eps / steps) with the paper's 0.5/255 floor.

    Args:
        eps: L-infinity budget in :math:`[0, 1]` pixel units, ``>= 0``.
        steps: number of PGD steps, ``>= 1``.

    Returns:
        The step size in RGB pixel units.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be a number >= 0 in [0, 1] pixel units (e.g. 8/255), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    return max(_RGB_STEP_FLOOR, 2.5 * float(eps) / steps)


# --- projection --------------------------------------------------------------


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the RGB L-infinity ball of radius ``eps`` around ``x`` and onto ``[0, 1]``.

    Differentiable almost everywhere (gradient 1 inside, 0 where a bound is active).

    Args:
        x_adv: image of shape :math:`(B, 3, H, W)` (any real values).
        x: original image, same shape, values in :math:`[0, 1]`.
        eps: radius in :math:`[0, 1]` pixel units, ``>= 0``.

    Returns:
        Tensor of the shape and dtype of ``x_adv`` with ``|out - x| <= eps`` and
        ``0 <= out <= 1``.
    """
    x = x.to(x_adv.dtype)
    # min/max against x -/+ eps (instead of x + clamp(x_adv - x)) so the bound is exact in float.
    out = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    return out.clamp(0.0, 1.0)


# --- DCT ---------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_block(block: int | None) -> int | None:
    """Normalise ``block``: None or 0 -> None (global), positive int -> itself."""
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ConfigError(f"DCT block must be a positive integer, or None/0 for one global DCT; got {block!r}")
    return block or None


def _check_band(band: float) -> float:
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not (0.0 < band <= 1.0):
        raise ConfigError(f"DCT band must be a fraction in (0, 1] of each tile's frequencies (e.g. 0.25), got {band!r}")
    return float(band)


def _tile_sizes(n: int, block: int | None) -> list[int]:
    """Sizes of the tiles along one axis of length ``n``; the last one may be shorter."""
    if block is None or block >= n:
        return [n]
    sizes = [block] * (n // block)
    if n % block:
        sizes.append(n % block)
    return sizes


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal DCT-II matrix.

    ``D @ v`` is the DCT-II of a length-``n`` vector ``v`` with orthonormal
    scaling (``scipy.fft.dct(v, norm="ortho")``), and ``D.T @ c`` inverts it.

    Args:
        n: transform length, ``>= 1``.
        dtype: dtype of the result (computed in float64, then cast).
        device: device of the result.

    Returns:
        Tensor of shape :math:`(n, n)`; row ``k`` is the ``k``-th cosine basis vector.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"DCT length must be an integer >= 1, got {n!r}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    mat = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
    mat[0] /= math.sqrt(2.0)
    return mat.to(dtype=dtype, device=device)


@lru_cache(maxsize=32)
def _dct_operator(n: int, block: int | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, n) block-diagonal orthonormal DCT: one DCT per tile along an axis of length n."""
    sizes = _tile_sizes(n, block)
    if len(sizes) == 1:
        return dct_matrix(n, dtype, device)
    return torch.block_diag(*[dct_matrix(s, torch.float64) for s in sizes]).to(dtype=dtype, device=device)


def _separable(x: Tensor, block: int | None, inverse: bool) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"expected a tensor with at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    block = _check_block(block)
    work = _compute_dtype(x.dtype)
    xw = x.to(work)
    h, w = x.shape[-2:]
    mh = _dct_operator(h, block, work, x.device)
    mw = _dct_operator(w, block, work, x.device)
    out = mh.T @ xw @ mw if inverse else mh @ xw @ mw.T
    return out.to(x.dtype)


def dct_2d(x: Tensor, block: int | None) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims, global or per tile.

    With ``block=None`` (or 0) one DCT covers the whole ``H x W`` plane. With
    ``block=b`` the plane is cut into non-overlapping ``b x b`` tiles starting
    at the top-left, each transformed on its own, and its coefficients stored
    in place (coefficient ``(u, v)`` of the tile at ``(i, j)`` sits at
    ``(i*b + u, j*b + v)``). When ``H`` or ``W`` is not a multiple of ``b`` the
    last row/column of tiles is shorter and gets a DCT of its own (shorter)
    length, instead of being padded: the transform stays orthonormal, keeps the
    shape, and needs no crop in :func:`idct_2d`.

    Computed as matrix products in float32 (float64 for float64 input) and
    returned in the input dtype. Differentiable.

    Args:
        x: tensor of shape :math:`(*, H, W)`.
        block: tile size ``>= 1``, or None/0 for one global DCT.

    Returns:
        Coefficients of shape :math:`(*, H, W)`.
    """
    return _separable(x, block, inverse=False)


def idct_2d(c: Tensor, block: int | None) -> Tensor:
    """Inverse of :func:`dct_2d` (same ``block``), over the last two dims.

    Args:
        c: coefficients of shape :math:`(*, H, W)` as produced by :func:`dct_2d`.
        block: tile size ``>= 1``, or None/0 for one global DCT.

    Returns:
        Tensor of shape :math:`(*, H, W)` with ``idct_2d(dct_2d(x, b), b) == x``
        up to float rounding.
    """
    return _separable(c, block, inverse=True)


def _band_count(size: int, band: float) -> int:
    # The small slack keeps e.g. 0.3 * 10 = 3.0000000000000004 at 3, not 4.
    return max(1, math.ceil(band * size - 1e-9))


def _axis_low_band(n: int, band: float, block: int | None) -> Tensor:
    keep: list[Tensor] = []
    for size in _tile_sizes(n, block):
        keep.append(torch.arange(size) < _band_count(size, band))
    return torch.cat(keep)


def low_band_mask(
    height: int,
    width: int,
    band: float,
    block: int | None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask of the low-frequency DCT coefficients, laid out like :func:`dct_2d`.

    Global (``block=None``/0): ``u < ceil(band*H)`` and ``v < ceil(band*W)``.
    Blocked: inside each ``b x b`` tile ``u < ceil(band*b)`` and
    ``v < ceil(band*b)``; a shorter edge tile of size ``r`` keeps
    ``ceil(band*r)`` frequencies along that axis (the same fraction of its
    spectrum). At least the DC coefficient is always kept.

    Args:
        height: ``H`` of the coefficient plane.
        width: ``W`` of the coefficient plane.
        band: kept fraction of each axis' frequencies, in :math:`(0, 1]`.
        block: tile size ``>= 1``, or None/0 for one global DCT.
        device: device of the mask.

    Returns:
        Bool tensor of shape :math:`(H, W)`, True where the coefficient is in the low band.
    """
    band = _check_band(band)
    block = _check_block(block)
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"mask {name} must be an integer >= 1, got {n!r}")
    rows = _axis_low_band(height, band, block)
    cols = _axis_low_band(width, band, block)
    return (rows[:, None] & cols[None, :]).to(device)


# --- parametrisations --------------------------------------------------------


def _check_images(x_adv: Tensor, x: Tensor, eps: float) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv shape {tuple(x_adv.shape)} differs from x shape {tuple(x.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be a number >= 0 in [0, 1] pixel units (e.g. 8/255), got {eps!r}")


class Parametrisation(ABC):
    """The coordinates one PGD step moves, around the current adversarial image.

    Attributes:
        params: leaf tensor with ``requires_grad=True``; the coordinates
            (RGB pixels, a*/b* channels or DCT coefficients).
        stage: ``"rgb"``, ``"lab"`` or ``"dct"``.
        x: the original image :math:`(B, 3, H, W)` in :math:`[0, 1]`.
        eps: the L-infinity budget.
        mask: bool tensor broadcastable to ``params`` marking the coordinates
            a step may move, or None when all move.
    """

    stage: str = ""

    def __init__(self, params: Tensor, x: Tensor, eps: float, mask: Tensor | None = None) -> None:
        self.params = params.detach().clone().requires_grad_(True)
        self.x = x.detach()
        self.eps = float(eps)
        self.mask = mask

    @abstractmethod
    def _decode(self, params: Tensor) -> Tensor:
        """Map coordinates to an (unprojected) RGB image in the dtype of ``x``."""

    def to_rgb(self) -> Tensor:
        """Differentiable map ``params -> RGB``, projected onto the ball and ``[0, 1]``.

        Returns:
            Image of shape :math:`(B, 3, H, W)` in the dtype of ``x``, with
            ``|out - x| <= eps`` and values in :math:`[0, 1]`.
        """
        return project(self._decode(self.params), self.x, self.eps)

    @torch.no_grad()
    def step(self, grad: Tensor, step_size: float) -> Tensor:
        """One sign-gradient descent step on the active coordinates.

        Computes ``params - step_size * sign(grad)`` (only where ``mask`` is
        True), maps it back to RGB and projects.

        Args:
            grad: gradient of the loss w.r.t. ``params``, same shape.
            step_size: step in this stage's own units (see
                :meth:`PerturbationSpace.default_step_size`).

        Returns:
            The new adversarial image :math:`(B, 3, H, W)`, detached, in the
            dtype of ``x``, inside the ball and :math:`[0, 1]`.
        """
        if grad.shape != self.params.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} differs from params shape {tuple(self.params.shape)}")
        direction = torch.sign(grad.to(self.params.dtype))
        if self.mask is not None:
            direction = torch.where(self.mask, direction, torch.zeros_like(direction))
        new = self.params.detach() - float(step_size) * direction
        return project(self._decode(new), self.x, self.eps).detach()


class _RGBParametrisation(Parametrisation):
    stage = "rgb"

    def _decode(self, params: Tensor) -> Tensor:
        return params.to(self.x.dtype)


def is_colourless(x: Tensor) -> bool:
    """Whether every pixel of ``x`` (B, 3, H, W) has three equal channels (a gray photo)."""
    return bool(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]))


class _LabParametrisation(Parametrisation):
    stage = "lab"

    def __init__(self, x_adv: Tensor, x: Tensor, eps: float) -> None:
        work = _compute_dtype(x.dtype)
        # chroma is all a colourless image has to lose: there the stage moves L* and keeps a* = b* = 0
        self.colourless = is_colourless(x)
        with torch.no_grad():
            if self.colourless:
                params = rgb_to_lab(x_adv.detach().to(work))[:, :1] / LIGHTNESS_PER_UNIT
            else:
                self.lightness = rgb_to_lab(x.detach().to(work))[:, :1]
                params = rgb_to_lab(x_adv.detach().to(work))[:, 1:]
        super().__init__(params, x, eps)

    def _decode(self, params: Tensor) -> Tensor:
        if self.colourless:
            lightness = params * LIGHTNESS_PER_UNIT
            lab = torch.cat([lightness, torch.zeros_like(lightness).expand(-1, 2, -1, -1)], dim=1)
        else:
            lab = torch.cat([self.lightness, params], dim=1)
        return lab_to_rgb(lab, clip=False).to(self.x.dtype)


class _DCTParametrisation(Parametrisation):
    stage = "dct"

    def __init__(self, x_adv: Tensor, x: Tensor, eps: float, band: float, block: int | None) -> None:
        work = _compute_dtype(x.dtype)
        self.block = block
        self._x_work = x.detach().to(work)
        with torch.no_grad():
            coeffs = dct_2d(x_adv.detach().to(work) - self._x_work, block)
        mask = low_band_mask(x.shape[-2], x.shape[-1], band, block, device=x.device)
        super().__init__(coeffs, x, eps, mask)

    def _decode(self, params: Tensor) -> Tensor:
        return (self._x_work + idct_2d(params, self.block)).to(self.x.dtype)


# --- spaces ------------------------------------------------------------------


class PerturbationSpace(ABC):
    """Where sign-PGD moves the perturbation; see the module docstring for the loop.

    Attributes:
        name: one of :data:`SPACE_NAMES`.
        stages: the stages this space can be in (``"rgb"``, ``"lab"``, ``"dct"``).
    """

    name: str = ""
    stages: tuple[str, ...] = ()

    @abstractmethod
    def parametrise(self, x_adv: Tensor, x: Tensor, eps: float, step: int) -> Parametrisation:
        """Coordinates around ``x_adv`` for PGD step number ``step``.

        Args:
            x_adv: current adversarial image :math:`(B, 3, H, W)` in :math:`[0, 1]`,
                inside the ball around ``x``.
            x: original image :math:`(B, 3, H, W)` in :math:`[0, 1]`.
            eps: L-infinity budget in :math:`[0, 1]` pixel units.
            step: 0-based PGD step index (selects the stage in :class:`DualSpace`).

        Returns:
            A fresh :class:`Parametrisation` whose ``params`` require grad.
        """

    def stage(self, step: int) -> str:
        """The stage (``"rgb"``, ``"lab"`` or ``"dct"``) active at 0-based step ``step``."""
        return self.stages[0]

    def default_step_size(self, eps: float, steps: int, stage: str) -> float:
        """Default sign-step size for ``stage``, in that stage's own units.

        RGB: ``max(0.5/255, 2.5 * eps / steps)`` pixel units. Lab: that RGB step
        times :data:`LAB_STEP_PER_RGB`, in a*/b* units. DCT: that RGB step
        divided by ``DCT_STEP_GAIN * sqrt(kept fraction)``, in coefficient units.
        Both conversions make one default step change the RGB image by about
        the same mean absolute amount as one RGB step (calibration in the
        comments above :data:`LAB_STEP_PER_RGB`).

        Args:
            eps: L-infinity budget in :math:`[0, 1]` pixel units.
            steps: total number of PGD steps, ``>= 1``.
            stage: one of this space's ``stages``.

        Returns:
            The step size to pass to :meth:`Parametrisation.step`.
        """
        if stage not in self.stages:
            raise ConfigError(f"stage {stage!r} is not used by the {self.name!r} space; use one of {self.stages}")
        return rgb_step_size(eps, steps) * self._stage_factor(stage)

    def _stage_factor(self, stage: str) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RGBSpace(PerturbationSpace):
    """Plain RGB PGD: ``params`` is the adversarial image itself, :math:`(B, 3, H, W)`."""

    name = "rgb"
    stages = ("rgb",)

    def parametrise(self, x_adv: Tensor, x: Tensor, eps: float, step: int = 0) -> Parametrisation:
        """RGB coordinates: ``params = x_adv`` (float32 for half inputs); see :meth:`PerturbationSpace.parametrise`."""
        _check_images(x_adv, x, eps)
        return _RGBParametrisation(x_adv.to(_compute_dtype(x.dtype)), x, eps)


class LabSpace(PerturbationSpace):
    """CIELAB chroma stage: ``params`` are a* and b* of ``x_adv``, shape :math:`(B, 2, H, W)`.

    On an image without colour (three equal channels: a gray photo, which the protection keeps
    gray) a*/b* must stay 0, so there ``params`` are L* of ``x_adv`` in units of
    ``LIGHTNESS_PER_UNIT``, :math:`(B, 1, H, W)`, calibrated to move pixels as a chroma step does.

    L* is pinned to the ORIGINAL image's L* (not ``x_adv``'s), so a Lab stage
    also pulls back any luminance change an earlier stage (e.g. DCT) made,
    up to what the RGB projection allows. ``to_rgb`` is
    ``project(lab_to_rgb(cat(L0, a, b), clip=False))`` with kornia's D65
    conversion, computed in float32 (float64 for float64 input). a*/b* are in
    kornia's units (roughly :math:`[-128, 127]`).

    Step-size calibration (``LAB_STEP_PER_RGB``): mean |delta RGB| of one
    unprojected sign step of size s on a*/b*, per unit s, with x_adv = x, on
    64x96 images: 0.00581 skimage astronaut, 0.00504 .. 0.00602 on five
    other skimage photos, 0.0066 smooth random colours, 0.0095 uniform noise;
    linear within 2 % for s in 0.05 .. 4, the same for random and
    encoder-gradient signs. Factor used: 1 / 0.0056 (natural photos).
    """

    name = "lab"
    stages = ("lab",)

    def parametrise(self, x_adv: Tensor, x: Tensor, eps: float, step: int = 0) -> Parametrisation:
        """Lab chroma coordinates around ``x_adv``; see :meth:`PerturbationSpace.parametrise`."""
        _check_images(x_adv, x, eps)
        return _LabParametrisation(x_adv, x, eps)

    def _stage_factor(self, stage: str) -> float:
        return LAB_STEP_PER_RGB


class DCTSpace(PerturbationSpace):
    """Low-frequency DCT stage: ``params`` are the DCT coefficients of ``delta = x_adv - x``.

    Coefficients have shape :math:`(B, 3, H, W)` (per channel, laid out as in
    :func:`dct_2d`); a step only moves those in :func:`low_band_mask`.

    Args:
        band: kept fraction of each axis' frequencies per tile, in :math:`(0, 1]`.
        block: tile size (default 8, like JPEG), or None/0 for one global DCT.

    Step-size calibration (``DCT_STEP_GAIN``): a sign step of size s on the
    kept fraction f of coefficients moves each pixel by s*sqrt(f) in RMS; the
    measured mean |delta RGB| / (s*sqrt(f)) on astronaut and random 64x96
    images was 0.771 .. 0.798 for random signs and 0.700 .. 0.805 for
    encoder-gradient signs (blocks 8, 16, global; bands 0.125 .. 0.5), and
    exactly 1 when a tile keeps only its DC coefficient. Gain used: 0.78, so
    with the defaults (f = 1/16) one DCT unit ~ 0.195 RGB units.
    """

    name = "dct"
    stages = ("dct",)

    def __init__(self, band: float = 0.25, block: int | None = 8) -> None:
        self.band = _check_band(band)
        self.block = _check_block(block)

    def parametrise(self, x_adv: Tensor, x: Tensor, eps: float, step: int = 0) -> Parametrisation:
        """DCT coordinates of ``x_adv - x``; see :meth:`PerturbationSpace.parametrise`."""
        _check_images(x_adv, x, eps)
        return _DCTParametrisation(x_adv, x, eps, self.band, self.block)

    def _stage_factor(self, stage: str) -> float:
        # Nominal kept fraction for full tiles; edge tiles keep about the same fraction.
        tile = self.block
        if tile is None:
            kept = self.band
        else:
            kept = _band_count(tile, self.band) / tile
        return 1.0 / (DCT_STEP_GAIN * kept)

    def __repr__(self) -> str:
        return f"DCTSpace(band={self.band}, block={self.block})"


class DualSpace(PerturbationSpace):
    """Anti-I2V's dual space: alternate Lab and DCT stages.

    ``stage(step) = "lab" if (step // period) % 2 == 0 else "dct"``, so with
    ``period=1`` even steps are Lab and odd steps DCT.

    Args:
        lab: the Lab stage.
        dct: the DCT stage.
        period: consecutive steps per stage, ``>= 1``.
    """

    name = "dual"
    stages = ("lab", "dct")

    def __init__(self, lab: LabSpace | None = None, dct: DCTSpace | None = None, period: int = 1) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ConfigError(f"dual period must be an integer >= 1 (steps per stage), got {period!r}")
        self.lab = lab if lab is not None else LabSpace()
        self.dct = dct if dct is not None else DCTSpace()
        if not isinstance(self.lab, LabSpace) or not isinstance(self.dct, DCTSpace):
            raise ConfigError("DualSpace needs a LabSpace and a DCTSpace; build it with build_space('dual')")
        self.period = period

    def stage(self, step: int) -> str:
        """``"lab"`` if ``(step // period) % 2 == 0`` else ``"dct"``."""
        return "lab" if (step // self.period) % 2 == 0 else "dct"

    def parametrise(self, x_adv: Tensor, x: Tensor, eps: float, step: int) -> Parametrisation:
        """Coordinates of the stage active at ``step``; see :meth:`PerturbationSpace.parametrise`."""
        sub = self.lab if self.stage(step) == "lab" else self.dct
        return sub.parametrise(x_adv, x, eps, step)

    def _stage_factor(self, stage: str) -> float:
        sub = self.lab if stage == "lab" else self.dct
        return sub._stage_factor(stage)

    def __repr__(self) -> str:
        return f"DualSpace({self.lab!r}, {self.dct!r}, period={self.period})"


def build_space(
    name: str,
    *,
    dct_band: float = 0.25,
    dct_block: int | None = 8,
    dual_period: int = 1,
) -> PerturbationSpace:
    """Build a perturbation space by name.

    Args:
        name: one of ``"rgb"``, ``"lab"``, ``"dct"``, ``"dual"`` (case-insensitive).
        dct_band: kept fraction of DCT frequencies per axis, in :math:`(0, 1]`.
        dct_block: DCT tile size, or None/0 for one global DCT over the whole image.
        dual_period: consecutive steps per stage in the dual space, ``>= 1``.

    Returns:
        The space. Options that do not apply to ``name`` are still validated, then unused.
    """
    # Validate every option up front, so a typo fails whatever the space.
    _check_band(dct_band)
    _check_block(dct_block)
    if isinstance(dual_period, bool) or not isinstance(dual_period, int) or dual_period < 1:
        raise ConfigError(f"dual period must be an integer >= 1 (steps per stage), got {dual_period!r}")
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "rgb":
        return RGBSpace()
    if key == "lab":
        return LabSpace()
    if key == "dct":
        return DCTSpace(band=dct_band, block=dct_block)
    if key == "dual":
        return DualSpace(LabSpace(), DCTSpace(band=dct_band, block=dct_block), period=dual_period)
    raise ConfigError(f"unknown perturbation space {name!r}; choose one of {', '.join(SPACE_NAMES)}")


def space_from_config(config: ProtectConfig) -> PerturbationSpace:
    """The space a `ProtectConfig` asks for (its space, DCT band and block, dual period)."""
    return build_space(
        config.space, dct_band=config.dct_band, dct_block=config.dct_block, dual_period=config.dual_period
    )
