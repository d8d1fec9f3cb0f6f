"""Helpers for the tiny model variants (seeded random weights, built in code)."""

from __future__ import annotations

import torch


@torch.no_grad()
def randomise_zero_initialised(net: torch.nn.Module) -> None:
    """Give random values to the layers the original initialises to zero.

    Released video models zero-initialise output layers, temporal mixing and several
    projections so that training starts from an identity; left at zero, a random-weight
    model ignores its condition image or never mixes its frames. Weights get
    N(0, clamp(1/sqrt(fan_in), 0.02, 0.2)) and 1-D tensors N(0, 0.05), as in the
    fixtures of the original code.
    """
    for param in net.parameters():
        if param.count_nonzero() > 0:
            continue
        if param.dim() >= 2:
            fan_in = param[0].numel()
            param.normal_(0, min(max(fan_in**-0.5, 0.02), 0.2))
        else:
            param.normal_(0, 0.05)
