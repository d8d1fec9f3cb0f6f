"""The full Anti-I2V objective: ``L_IRC + L_IRA + L_aux - L_DM``, minimised.

One VAE encoding and one denoiser pass of the protected image serve all terms;
the IRA target's denoiser features need one extra pass without gradients.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.models.base import VAE_PREFIX, VideoModel
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw
from anti_i2v.objectives.diffusion import reference_latents
from anti_i2v.objectives.ira import default_target_image, ira_loss
from anti_i2v.objectives.irc import irc_loss
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity

logger = logging.getLogger(__name__)


class AntiI2VObjective(Objective):
    """IRC + IRA + auxiliary - diffusion loss, weighted as in ``config``.

    Args:
        model: the backbone, seen only through the `VideoModel` seam.
        config: weights, layer choices, prompt, reference video and seed.
        target: IRA target psi (1, 3, H, W) in [0, 1]; None uses `default_target_image`.
        aux: the auxiliary CLIP term, required when ``config.weight_aux`` is non-zero.
    """

    def __init__(
        self,
        model: VideoModel,
        config: ProtectConfig,
        target: torch.Tensor | None = None,
        aux: ClipEmbeddingSimilarity | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.target = target
        if config.weight_aux and aux is None:
            raise ConfigError("weight_aux > 0 needs the auxiliary CLIP model (see resolve_aux_weight)")
        self.aux = aux if config.weight_aux else None
        layers = model.layers()
        self.shallow = layers.resolve_denoiser([config.irc_shallow])[0]
        self.deep = layers.resolve_denoiser(config.irc_deep)
        if config.weight_irc and not set(self.deep) - {self.shallow}:
            raise ConfigError(
                f"IRC pulls deep blocks to block {config.irc_shallow}: give --irc-deep blocks other than that one"
            )
        self.ira_blocks = layers.resolve_denoiser(config.ira_blocks if config.ira_blocks is not None else config.irc_deep)
        self.vae_layers = [
            n if n.startswith(VAE_PREFIX) else VAE_PREFIX + n
            for n in (config.ira_vae_layers if config.ira_vae_layers is not None else layers.vae_encoder)
        ]
        self.video_latents: torch.Tensor | None = None

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        """Cache the text condition, reference latents and the target's VAE encoding."""
        cfg = self.config
        model.condition(cfg.prompt)
        self.video_latents = reference_latents(model, x, cfg.reference, cfg.prompt, cfg.seed, cfg.reference_steps)
        psi = self.target if self.target is not None else default_target_image(*model.resolution)
        psi = F.interpolate(psi.float(), size=model.resolution, mode="bicubic", antialias=True).clamp(0, 1)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(cfg.seed)
            self.psi_encoded = model.encode_image(psi, self.vae_layers if cfg.weight_ira else (), generator)
        if self.aux is not None:
            self.aux.prepare(x.to(model.device))

    def latent_shape(self) -> torch.Size:
        assert self.video_latents is not None, "call prepare() first"
        return self.video_latents.shape

    def denoiser_taps(self) -> list[str]:
        """The denoiser blocks the active terms read: IRC's shallow and deep blocks, IRA's blocks."""
        taps: list[str] = []
        if self.config.weight_irc:
            taps += [self.shallow, *self.deep]
        if self.config.weight_ira:
            taps += self.ira_blocks
        return list(dict.fromkeys(taps))

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        cfg, model = self.config, self.model
        assert self.video_latents is not None, "call prepare() first"
        encoded = model.encode_image(x_adv, self.vae_layers if cfg.weight_ira else (), draw.generator)
        result = model.denoise(
            encoded, self.video_latents, draw.t, draw.noise, self.denoiser_taps(), with_loss=bool(cfg.weight_dm)
        )
        loss = torch.zeros((), device=model.device)
        parts: dict[str, float] = {}
        if cfg.weight_irc:
            irc = irc_loss(result.features, self.shallow, self.deep)
            loss = loss + cfg.weight_irc * irc
            parts["irc"] = float(irc.detach())
        if cfg.weight_ira:
            with torch.no_grad():
                target = model.denoise(self.psi_encoded, self.video_latents, draw.t, draw.noise, self.ira_blocks)
            features = {**result.features, **encoded.features}
            targets = {**target.features, **self.psi_encoded.features}
            ira = ira_loss(features, targets, self.ira_blocks + self.vae_layers)
            loss = loss + cfg.weight_ira * ira
            parts["ira"] = float(ira.detach())
        if cfg.weight_dm:
            assert result.loss is not None
            loss = loss - cfg.weight_dm * result.loss
            parts["dm"] = float(result.loss.detach())
        if self.aux is not None:
            aux = self.aux(x_adv)
            loss = loss + cfg.weight_aux * aux
            parts["aux"] = float(aux.detach())
        parts["total"] = float(loss.detach())
        return ObjectiveOutput(loss=loss, parts=parts)
