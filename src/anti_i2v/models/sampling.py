"""What the samplers of our ported backbones share: where each step's noise comes from."""

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
