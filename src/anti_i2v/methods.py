"""Protection methods by name: Anti-I2V, its ablations and the baselines.

A method is a config preset (space and loss weights) plus the objective the engine
minimises; every method runs in the same engine under the same budget, steps and
seed. ``random`` is uniform noise of the full budget, for reference.

| name | objective | space |
|---|---|---|
| anti-i2v | sampler divergence: a guided 4-step sampler run pushed away from the clean photo's (the default, chosen by measurement); on Stable Video Diffusion also - L_DM | rgb, steps of 5 eps / steps, at most eps and at least 1/255 |
| anti-i2v-paper | IRC + IRA + aux - L_DM | dual (the paper's method) |
| anti-i2v-paper-rgb | - L_DM | rgb (ablation: "RGB only") |
| anti-i2v-paper-lab | - L_DM | lab (ablation: "+ Lab") |
| anti-i2v-paper-dct | - L_DM | dual (ablation: "+ DCT") |
| anti-i2v-paper-irc | IRC - L_DM | dual (ablation: "+ IRC") |
| anti-i2v-paper-ira | IRC + IRA - L_DM | dual (ablation: "+ IRA", no aux term) |
| advdm | - L_DM, generated reference | rgb, 1/255 steps |
| mist | VAE latent to target - 1e4 L_DM, generated reference | rgb, 1/255 steps |
| photoguard | VAE latent to gray | rgb, 1/255 steps |
| sds | SDS(-), gradient through the VAE encoder only | rgb, 1/255 steps |
| clip-embed | image-encoder embedding away from the clean one | rgb, 1/255 steps |
| random | uniform noise in [-eps, eps] | - |

Baselines run at their strongest fair settings (RGB sign-PGD, 1/255 steps, the clean
photo's generated video as the diffusion loss's reference), so that beating them means
something.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from anti_i2v.config import ProtectConfig, parse_eps
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
from anti_i2v.spaces import rgb_step_size

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
    # a value may be a function of the merged settings, resolved last (a step that follows the steps)
    overrides: dict[str, Any] = field(default_factory=dict)
    # settings that measured stronger on one model family (`VideoModel.family`), over `overrides`
    family_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # whether the presets take their long-video route (`config.LONG_VIDEO_PRESETS`) with this method
    long_video_route: bool = False

    def overrides_for(self, families: Sequence[str]) -> dict[str, Any]:
        """The family's own settings when every targeted model is of that one family, else none
        (an ensemble of families keeps the method's common settings)."""
        kinds = set(families)
        return dict(self.family_overrides.get(kinds.pop(), {})) if len(kinds) == 1 else {}


_PAPER = {"space": "dual", "reference": "repeat"}


def step_for_run_length(settings: dict[str, Any]) -> float:
    """The default's RGB step: twice Madry et al.'s ``2.5 * eps / steps``, between 1/255 and eps.

    Enough to cross the budget in a fifth of the steps: eps itself for 5 steps at 8/255, 4/255
    for 10, 2/255 for 20, the tuned 1/255 from 40 on. On both trained testbeds short runs gained
    from larger steps up to eps (docs/results/speed.md, "Shorter runs"); long runs did not need them.
    With a share of the frames, the run is its steps on that share: the full-frame steps after
    them (`ProtectConfig.full_frame_steps`) finish it at the same step, which on the 49-frame
    testbed gained more at eps than at half of it (docs/results/speed.md).
    """
    eps = parse_eps(settings["eps"])
    steps = settings["steps"]
    if settings.get("frame_share", 1.0) < 1 and steps > settings.get("full_frame_steps", 0):
        steps -= settings.get("full_frame_steps", 0)
    return min(eps, max(1 / 255, 2 * rgb_step_size(eps, steps)))


# The default, chosen on the trained testbeds (docs/results/strength.md): the sampler divergence
# alone, RGB sign-PGD with steps that follow the run length (1/255 on long runs, up to eps on short
# ones: `step_for_run_length`); the saved photo is then kept at
# 31.35 dB PSNR or more, no more visible than AdvDM's at the same eps and 50 to 200 steps on
# either testbed (at most 31.30 dB). The reference video only sizes the noise: "repeat" is free.
# Two pooled sampler noises (the clean photo's run from each computed once, on its first pick) held
# the strength at a fifth to a third less per step, and cost a short run half the clean runs of four. Guidance in the first
# two of the four sampler steps only (six denoiser passes instead of eight) held it on CogVideoX.
_DEFAULT = {
    "space": "rgb", "step_size": step_for_run_length, "reference": "repeat", "weight_irc": 0.0, "weight_ira": 0.0,
    "weight_dm": 0.0, "weight_aux": 0.0, "weight_sampler": 1.0, "sampler_steps": 4, "sampler_guidance": True,
    "sampler_noise_pool": 2, "sampler_guided_steps": 2, "min_psnr": 31.35,
}
# On the Stable Video Diffusion testbed (a U-Net) the diffusion loss added to the sampler
# divergence is the strongest setting measured; on CogVideoX it costs about an eighth of the effect.
# There, guiding two sampler steps of four cost 2 to 3% of the effect: SVD keeps every step guided.
_DEFAULT_BY_FAMILY = {"svd": {"weight_dm": 1.0, "sampler_guided_steps": 0}}
# Baselines at their strongest fair settings: RGB sign-PGD with 1/255 steps and, for the
# diffusion loss, the clean photo's own generated video as the reference.
_TUNED = {**_BASELINE, "step_size": 1 / 255}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("anti-i2v", "the default: push the model's own guided few-step sampler away from the clean "
               "photo's video, in RGB (chosen by measurement on trained models, docs/method.md)", _anti_i2v,
               _DEFAULT, _DEFAULT_BY_FAMILY, long_video_route=True),
        Method("anti-i2v-paper", "Anti-I2V as published: IRC + IRA + aux - L_DM in the dual Lab/DCT space",
               _anti_i2v, dict(_PAPER)),
        Method("anti-i2v-paper-rgb", "paper ablation: L_DM only, RGB space", _anti_i2v,
               {**_PAPER, **_DM_ONLY, "space": "rgb"}),
        Method("anti-i2v-paper-lab", "paper ablation: L_DM only, Lab space", _anti_i2v,
               {**_PAPER, **_DM_ONLY, "space": "lab"}),
        Method("anti-i2v-paper-dct", "paper ablation: L_DM only, dual Lab/DCT space", _anti_i2v,
               {**_PAPER, **_DM_ONLY}),
        Method("anti-i2v-paper-irc", "paper ablation: IRC - L_DM, dual space", _anti_i2v,
               {**_PAPER, **_DM_ONLY, "weight_irc": 1.0}),
        Method(
            "anti-i2v-paper-ira", "paper ablation: IRC + IRA - L_DM, dual space (no aux term)", _anti_i2v,
            {**_PAPER, **_DM_ONLY, "weight_irc": 1.0, "weight_ira": 1.0},
        ),
        Method("advdm", "AdvDM: maximise the diffusion loss on the clean photo's generated video",
               lambda m, c, t, a: DiffusionLossAttack(m, c), {**_TUNED, "reference": "generate"}),
        Method("mist", "Mist (fused): VAE latent to a textured target + 1e4 L_DM",
               lambda m, c, t, a: MistAttack(m, c, t), {**_TUNED, "reference": "generate"}),
        Method("photoguard", "PhotoGuard encoder attack: VAE latent to a gray image",
               lambda m, c, t, a: EncoderAttack(m, c, t), _TUNED),
        Method("sds", "SDS(-): score distillation through the VAE encoder, minimised",
               lambda m, c, t, a: ScoreDistillationAttack(m, c), _TUNED),
        Method("clip-embed", "VGMShield-style: image-encoder embedding away from the clean photo",
               lambda m, c, t, a: ImageEmbeddingAttack(m, c), _TUNED),
        Method("random", "uniform random noise of the same budget (no optimisation)", None),
    )
}
DEFAULT_METHOD = "anti-i2v"


def get_method(name: str) -> Method:
    """The method called ``name``, or a ConfigError listing them."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def unused_settings(config: ProtectConfig, given: Iterable[str]) -> list[str]:
    """The settings among ``given`` that ``config``'s Anti-I2V objective never reads, because the terms
    that would are off (the default's sampler divergence reads no target, reference, timestep range,
    IRC/IRA blocks or CLIP model); baselines read theirs, so none is listed for them."""
    if get_method(config.method).build is not _anti_i2v:
        return []
    denoiser_pass = bool(config.weight_irc or config.weight_ira or config.weight_dm or config.weight_div)
    read = {
        "target": bool(config.weight_ira),
        "ira_blocks": bool(config.weight_ira),
        "irc_shallow": bool(config.weight_irc),
        "irc_deep": bool(config.weight_irc),
        "aux_model": config.weight_aux is None or bool(config.weight_aux),
        "reference": denoiser_pass,
        "t_min": denoiser_pass,
        "t_max": denoiser_pass,
    }
    return [name for name in given if read.get(name, True) is False]


def parse_methods(text: str) -> list[Method]:
    """``"anti-i2v,advdm"`` -> the methods, checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods needs at least one name, e.g. anti-i2v,advdm,random")
    return [get_method(n) for n in names]
