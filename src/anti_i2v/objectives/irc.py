"""IRC, Internal Representation Collapse (Anti-I2V, section on layer semantics).

Semantics appear only in a denoiser's deep blocks, while an early block (block 3)
carries almost none. IRC pulls the features of the last blocks toward those of the
early block, so the deep blocks stop carrying the photo's semantics:

    L_IRC = sum_j d(f_j(x'), sg[f_shallow(x')]),   j in deep blocks,

with ``d`` the relative squared distance and ``sg`` stop-gradient (ours: the shallow
features are the fixed point the deep ones collapse onto, not pulled in turn).
"""

from __future__ import annotations

import torch

from anti_i2v.objectives.base import relative_sq_distance


def irc_loss(features: dict[str, torch.Tensor], shallow: str, deep: list[str]) -> torch.Tensor:
    """Sum over ``deep`` of the relative squared distance to the (detached) ``shallow`` features."""
    anchor = features[shallow].detach()
    terms = [relative_sq_distance(features[name], anchor) for name in deep if name != shallow]
    if not terms:
        raise ValueError("IRC needs at least one deep block other than the shallow one")
    return torch.stack(terms).sum()
