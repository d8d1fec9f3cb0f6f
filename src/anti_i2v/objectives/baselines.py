"""Baseline protections as objectives, run by the same engine under the same budget.

Each is a loss to minimise over the protected image, seen through `VideoModel`:

- `DiffusionLossAttack` (AdvDM): maximise the model's own training loss.
- `EncoderAttack` (PhotoGuard's encoder attack): pull the VAE latent of the photo
  toward that of a target image (mid-gray by default, as PhotoGuard).
- `MistAttack` (Mist, "fused" mode): maximise ``w * L_DM`` while pulling the VAE
  latent toward a textured target (the Anti-I2V default target); ``w = 1e4`` with
  the latent distance summed over elements, as in the authors' scripts.
- `ScoreDistillationAttack` (SDS(-)): the gradient only flows through the VAE
  encoder, ``grad = (eps_pred - eps) dz/dx`` with the denoiser's noise prediction
  held fixed; minimised, which works better than maximising (Xue et al., 2023).
- `ImageEmbeddingAttack` (VGMShield-style): push the model's own image-encoder
  embedding (e.g. CLIP) away from the clean photo's. Models that see the image
  only through the VAE (CogVideoX) have none; the attack then refuses to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.models.base import EncodedImage, VideoModel
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, scalar
from anti_i2v.objectives.diffusion import reference_latents
from anti_i2v.objectives.ira import default_target_image


def _target_latent(model: VideoModel, target: torch.Tensor, seed: int) -> torch.Tensor:
    psi = F.interpolate(target.float(), size=model.resolution, mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        return model.image_latent(model.encode_image(psi, (), torch.Generator().manual_seed(seed)))


class _ReferenceObjective(Objective):
    """Shared set-up: text condition and reference-video latents from the config."""

    def __init__(self, model: VideoModel, config: ProtectConfig) -> None:
        self.model = model
        self.config = config
        self.video_latents: torch.Tensor | None = None

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        cfg = self.config
        model.condition(cfg.prompt)
        self.video_latents = reference_latents(model, x, cfg.reference, cfg.prompt, cfg.seed, cfg.reference_steps)

    def latent_shape(self) -> torch.Size:
        assert self.video_latents is not None, "call prepare() first"
        return self.video_latents.shape


class DiffusionLossAttack(_ReferenceObjective):
    """AdvDM: minimise ``-L_DM`` (the model's training loss on the reference video)."""

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        assert self.video_latents is not None, "call prepare() first"
        dm = self.model.training_loss(x_adv, self.video_latents, draw.t, draw.noise, draw.generator)
        return ObjectiveOutput(-dm, {"dm": scalar(dm), "total": -scalar(dm)})


class EncoderAttack(_ReferenceObjective):
    """PhotoGuard encoder attack: minimise ``||E(x') - E(target)||^2`` (mean over latent elements)."""

    def __init__(self, model: VideoModel, config: ProtectConfig, target: torch.Tensor | None = None) -> None:
        super().__init__(model, config)
        self.target = target if target is not None else torch.full((1, 3, *model.resolution), 0.5)

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        super().prepare(model, x)
        self.target_latent = _target_latent(model, self.target, self.config.seed)

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        latent = self.model.image_latent(self.model.encode_image(x_adv, (), draw.generator))
        distance = (latent.float() - self.target_latent.float()).pow(2).mean()
        return ObjectiveOutput(distance, {"encoder": scalar(distance), "total": scalar(distance)})


class MistAttack(EncoderAttack):
    """Mist (fused): minimise ``sum ||E(x') - E(target)||^2 - dm_weight * L_DM``."""

    def __init__(
        self,
        model: VideoModel,
        config: ProtectConfig,
        target: torch.Tensor | None = None,
        dm_weight: float = 1e4,
    ) -> None:
        super().__init__(model, config, target if target is not None else default_target_image(*model.resolution))
        self.dm_weight = dm_weight

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        assert self.video_latents is not None, "call prepare() first"
        encoded = self.model.encode_image(x_adv, (), draw.generator)
        textural = (self.model.image_latent(encoded).float() - self.target_latent.float()).pow(2).sum()
        dm = self.model.denoise(encoded, self.video_latents, draw.t, draw.noise, with_loss=True).loss
        loss = textural - self.dm_weight * dm
        parts = {"encoder": scalar(textural), "dm": scalar(dm), "total": scalar(loss)}
        return ObjectiveOutput(loss, parts)


class ScoreDistillationAttack(_ReferenceObjective):
    """SDS(-): minimise the score-distillation surrogate, gradient through the VAE encoder only.

    The still video made of the photo's own latent (`VideoModel.still_video`) is
    noised; the denoiser's noise prediction is computed without gradient, and
    ``(eps_pred - eps)`` is back-propagated through the encoder alone.
    """

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        encoded = self.model.encode_image(x_adv, (), draw.generator)
        still = self.model.still_video(self.model.image_latent(encoded))
        with torch.no_grad():
            context = None if encoded.context is None else encoded.context.detach()
            frozen = EncodedImage(encoded.latents.detach(), context=context)
            eps = self.model.denoise(frozen, still.detach(), draw.t, draw.noise, with_eps=True).eps
        residual = (eps - draw.noise.to(eps.device)).detach()
        surrogate = (residual * still.float()).sum() / residual.numel()
        return ObjectiveOutput(surrogate, {"sds": scalar(surrogate), "total": scalar(surrogate)})


class ImageEmbeddingAttack(_ReferenceObjective):
    """VGMShield-style: minimise the cosine similarity of the model's image embedding to the clean one."""

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        with torch.no_grad():
            clean = model.image_embedding(x)
        if clean is None:
            raise ConfigError(
                f"'{model.name}' has no image encoder (it sees the photo through its VAE only), "
                "so the clip-embed attack does not apply to it"
            )
        self.clean = clean.detach().float()
        super().prepare(model, x)

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        embedding = self.model.image_embedding(x_adv)
        assert embedding is not None
        similarity = F.cosine_similarity(embedding.float().flatten(1), self.clean.flatten(1), dim=-1).mean()
        return ObjectiveOutput(similarity, {"clip": scalar(similarity), "total": scalar(similarity)})
