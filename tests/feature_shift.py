"""The effect check shared by the protection tests of every backbone."""

from __future__ import annotations

import torch

from anti_i2v.config import ProtectConfig
from anti_i2v.engine import run_pgd
from anti_i2v.models.base import VideoModel
from anti_i2v.objectives import AntiI2VObjective, draw_step
from anti_i2v.spaces import project, space_from_config


def deep_feature_shift(model: VideoModel, objective: AntiI2VObjective, x, candidate, draws) -> float:
    """Mean relative L2 change of the objective's deep-block features from ``x`` to ``candidate``."""
    shifts = []
    with torch.no_grad():
        for d in draws:
            clean, moved = (
                model.features(img, d.t, d.noise, objective.deep, objective.video_latents,
                               torch.Generator().manual_seed(0))
                for img in (x, candidate)
            )
            shifts += [((moved[n] - clean[n]).norm() / clean[n].norm()).item() for n in objective.deep]
    return sum(shifts) / len(shifts)


def protection_vs_random_noise(model: VideoModel, x: torch.Tensor, prompt: str, steps: int = 30) -> tuple[float, float]:
    """Deep-feature shift of an Anti-I2V perturbation and of uniform noise of the same L-inf budget."""
    config = ProtectConfig(prompt=prompt, steps=steps)
    objective = AntiI2VObjective(model, config)
    objective.prepare(model, x)
    x_adv = run_pgd(objective, space_from_config(config), x, config, t_range=(0, 999)).x_adv
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * config.eps
    random_adv = project(x + noise, x, config.eps)
    g = torch.Generator().manual_seed(11)
    draws = [draw_step(g, objective.latent_shape(), (0, 999)) for _ in range(4)]
    return (deep_feature_shift(model, objective, x, x_adv, draws),
            deep_feature_shift(model, objective, x, random_adv, draws))
