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


def default_irc_blocks(depth: int) -> tuple[int, tuple[int, ...]]:
    """The IRC blocks for a denoiser of ``depth`` blocks: (shallow, deep indices).

    The paper's choice, block 3 and the last three blocks, whenever the model has three
    blocks after block 3; on shallower models the anchor moves down so that it still has
    them, and the deep blocks are those of the last three that come after it
    (42 blocks: 3 and 39-41; 7: 3 and 4-6; 5: 1 and 2-4; 3: 0 and 1-2; 2: 0 and 1).
    """
    if depth < 2:
        raise ValueError(f"IRC needs at least two denoiser blocks; this model has {depth}")
    shallow = max(0, min(3, depth - 4))
    return shallow, tuple(range(max(shallow + 1, depth - 3), depth))
