"""IRA, Internal Representation Anchor.

The features of the protected image are pulled toward those of an unrelated target
image psi, at denoiser blocks (same noisy latents, timestep and text: only the
image condition differs) and at VAE-encoder blocks:

    L_IRA = sum_m d(f_m(x'), f_m(psi)) + sum_n d(E_n(x'), E_n(psi)).

Without a user target, psi is a colourful high-frequency pattern generated here
(ours: the paper does not publish its target).
"""

from __future__ import annotations

import math

import torch

from anti_i2v.objectives.base import relative_sq_distance


def default_target_image(height: int, width: int) -> torch.Tensor:
    """A deterministic target psi (1, 3, H, W) in [0, 1]: crossed colour gratings and checks.

    Far from any face in content and in frequency, so anchoring to it drags the
    features away from the photo's semantics.
    """
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    channels = []
    for k, phase in enumerate((0.0, 2.1, 4.2)):
        grating = torch.sin(2 * math.pi * (11 + 4 * k) * (xs * math.cos(k) + ys * math.sin(k + 0.5)) + phase)
        rings = torch.cos(2 * math.pi * 9 * torch.sqrt((xs - 0.5) ** 2 + (ys - 0.5) ** 2) + phase)
        channels.append(0.5 + 0.25 * grating + 0.25 * rings)
    pattern = torch.stack(channels)
    checks = ((torch.arange(height).view(-1, 1) // 8 + torch.arange(width).view(1, -1) // 8) % 2).float()
    pattern = 0.8 * pattern + 0.2 * checks
    return pattern.clamp(0, 1).unsqueeze(0)


def ira_loss(
    features: dict[str, torch.Tensor], target_features: dict[str, torch.Tensor], names: list[str]
) -> torch.Tensor:
    """Sum over ``names`` of the relative squared distance to the target's features."""
    return torch.stack([relative_sq_distance(features[n], target_features[n].detach()) for n in names]).sum()
