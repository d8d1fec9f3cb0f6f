"""What every objective shares: the per-step random draw and the output record."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from anti_i2v.models.base import VideoModel


@dataclass
class StepDraw:
    """The randomness of one optimisation step: a timestep, latent noise, a generator."""

    t: torch.Tensor
    noise: torch.Tensor
    generator: torch.Generator


def draw_step(
    generator: torch.Generator, latent_shape: torch.Size, t_range: tuple[int, int]
) -> StepDraw:
    """Draw t ~ U{t_min..t_max} and standard-normal noise of ``latent_shape`` on the CPU.

    Drawing on the CPU keeps results identical across devices for a given seed.
    """
    t = torch.randint(t_range[0], t_range[1] + 1, (1,), generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    return StepDraw(t=t, noise=noise, generator=generator)


def match_shapes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two block outputs to one shape so that they can be compared.

    Transformer blocks all give (B, tokens, width) of one shape. U-Net blocks give
    (N, C, H, W) maps of different sizes: both are average-pooled to the smaller grid,
    and when their channel counts differ each is reduced to its channel mean (ours:
    IRC compares a deep block with block 3, which a U-Net keeps at another scale).
    """
    if a.shape == b.shape:
        return a, b
    if a.dim() == b.dim() == 4 and a.shape[0] == b.shape[0]:
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
        a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
        if a.shape[1] != b.shape[1]:
            a, b = a.mean(dim=1, keepdim=True), b.mean(dim=1, keepdim=True)
        return a, b
    raise ValueError(f"cannot compare features of shapes {tuple(a.shape)} and {tuple(b.shape)}")


def relative_sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||^2 / ||b||^2`` in float32: a scale-free feature distance, >= 0.

    Feature magnitudes differ by orders of magnitude across blocks and models, so
    every feature term is normalised by its target's energy (ours; the paper writes
    plain squared distances with unit weights). Features of different shapes are
    first brought to one by `match_shapes`.
    """
    a, b = match_shapes(a.float(), b.float())
    return (a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12)


def scalar(value: torch.Tensor) -> float:
    """A loss term as a float for the reports; NaN on the meta device, where objectives run only
    to be measured (operations counted, shapes checked) and no value exists."""
    return math.nan if value.device.type == "meta" else float(value.detach())


@dataclass
class ObjectiveOutput:
    """A loss to minimise and its named parts (floats, for progress and reports)."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Objective(ABC):
    """A loss over the protected image, minimised by the engine.

    `prepare` caches whatever depends only on the clean image (reference latents,
    target features); `__call__` is evaluated once per step.
    """

    @abstractmethod
    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        """Cache what depends on the clean image ``x`` (1, 3, H, W) in [0, 1]."""

    @abstractmethod
    def latent_shape(self) -> torch.Size:
        """Shape of the noise this objective needs each step (after `prepare`)."""

    @abstractmethod
    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        """Loss of the protected image ``x_adv`` (1, 3, H, W) for this step's draw."""
