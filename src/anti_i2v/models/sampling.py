"""What the samplers and losses of several backbones share: each step's noise, flow-matching noise levels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: per-step noise: a stacked tensor [S, ...], a sequence of tensors, or ``fn(step, t, x)``
NoiseSource = torch.Tensor | Sequence[torch.Tensor] | Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def step_noise(
    noise: NoiseSource | None,
    i: int,
    t: torch.Tensor,
    x: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The noise of step ``i`` shaped like ``x``: recorded or given, else drawn from ``generator``.

    Draws happen on the generator's device (a CPU generator gives the same noise whatever
    device the model runs on).
    """
    if noise is None:
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    n = noise(i, t, x) if callable(noise) and not isinstance(noise, torch.Tensor) else noise[i]
    if tuple(n.shape) != tuple(x.shape):
        raise ValueError(f"noise for step {i} has shape {tuple(n.shape)}, expected {tuple(x.shape)}")
    return n.to(device=x.device, dtype=x.dtype)


def shifted_flow_sigmas(t: torch.Tensor, shift: float, num_train_timesteps: int) -> torch.Tensor:
    """Flow-matching noise level of integer timesteps ``t``: ``s = t / N``, shifted as the
    schedulers' training sigmas are, ``shift * s / (1 + (shift - 1) * s)``."""
    s = t.float() / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)
