"""Protection methods by name: Anti-I2V, its ablations and the baselines.

A method is a config preset (space and loss weights) plus the objective the engine
minimises; every method runs in the same engine under the same budget, steps and
seed. ``random`` is uniform noise of the full budget, for reference.

| name | objective | space |
|---|---|---|
| anti-i2v | IRC + IRA + aux - L_DM | dual |
| anti-i2v-rgb | - L_DM | rgb (ablation: "RGB only") |
| anti-i2v-lab | - L_DM | lab (ablation: "+ Lab") |
| anti-i2v-dct | - L_DM | dual (ablation: "+ DCT") |
| anti-i2v-irc | IRC - L_DM | dual (ablation: "+ IRC") |
| anti-i2v-ira | IRC + IRA - L_DM | dual (ablation: "+ IRA", no aux term) |
| advdm | - L_DM | rgb |
| mist | VAE latent to target - 1e4 L_DM | rgb |
| photoguard | VAE latent to gray | rgb |
| sds | SDS(-), gradient through the VAE encoder only | rgb |
| clip-embed | image-encoder embedding away from the clean one | rgb |
| random | uniform noise in [-eps, eps] | - |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.models.base import VideoModel
from anti_i2v.objectives.anti_i2v import AntiI2VObjective
from anti_i2v.objectives.base import Objective
from anti_i2v.objectives.baselines import (
    DiffusionLossAttack,
    EncoderAttack,
    ImageEmbeddingAttack,
    MistAttack,
    ScoreDistillationAttack,
)
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity

ObjectiveFactory = Callable[[VideoModel, ProtectConfig, "torch.Tensor | None", "ClipEmbeddingSimilarity | None"], Objective]

_DM_ONLY = {"weight_irc": 0.0, "weight_ira": 0.0, "weight_dm": 1.0, "weight_aux": 0.0}
_BASELINE = {"space": "rgb", "weight_aux": 0.0}  # baselines never load the auxiliary CLIP model


def _anti_i2v(model, config, target, aux) -> Objective:
    return AntiI2VObjective(model, config, target=target, aux=aux)


@dataclass(frozen=True)
class Method:
    """One protection method: what it sets in the config and which objective it optimises."""

    name: str
    description: str
    build: ObjectiveFactory | None  # None: no optimisation (random noise)
    overrides: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("anti-i2v", "Anti-I2V: IRC + IRA + aux - L_DM in the dual Lab/DCT space", _anti_i2v),
        Method("anti-i2v-rgb", "ablation: L_DM only, RGB space", _anti_i2v, {**_DM_ONLY, "space": "rgb"}),
        Method("anti-i2v-lab", "ablation: L_DM only, Lab space", _anti_i2v, {**_DM_ONLY, "space": "lab"}),
        Method("anti-i2v-dct", "ablation: L_DM only, dual Lab/DCT space", _anti_i2v, {**_DM_ONLY, "space": "dual"}),
        Method("anti-i2v-irc", "ablation: IRC - L_DM, dual space", _anti_i2v, {**_DM_ONLY, "weight_irc": 1.0}),
        Method(
            "anti-i2v-ira", "ablation: IRC + IRA - L_DM, dual space", _anti_i2v,
            {**_DM_ONLY, "weight_irc": 1.0, "weight_ira": 1.0},
        ),
        Method("advdm", "AdvDM: maximise the diffusion loss", lambda m, c, t, a: DiffusionLossAttack(m, c),
               _BASELINE),
        Method("mist", "Mist (fused): VAE latent to a textured target + 1e4 L_DM",
               lambda m, c, t, a: MistAttack(m, c, t), _BASELINE),
        Method("photoguard", "PhotoGuard encoder attack: VAE latent to a gray image",
               lambda m, c, t, a: EncoderAttack(m, c, t), _BASELINE),
        Method("sds", "SDS(-): score distillation through the VAE encoder, minimised",
               lambda m, c, t, a: ScoreDistillationAttack(m, c), _BASELINE),
        Method("clip-embed", "VGMShield-style: image-encoder embedding away from the clean photo",
               lambda m, c, t, a: ImageEmbeddingAttack(m, c), _BASELINE),
        Method("random", "uniform random noise of the same budget (no optimisation)", None),
    )
}
DEFAULT_METHOD = "anti-i2v"


def get_method(name: str) -> Method:
    """The method called ``name``, or a ConfigError listing them."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(text: str) -> list[Method]:
    """``"anti-i2v,advdm"`` -> the methods, checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods needs at least one name, e.g. anti-i2v,advdm,random")
    return [get_method(n) for n in names]
