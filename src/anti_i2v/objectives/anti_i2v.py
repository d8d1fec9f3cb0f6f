"""The Anti-I2V objective: ``L_IRC + L_IRA + L_aux - L_DM - L_div - L_latent``, minimised.

The paper's terms (IRC, IRA, the auxiliary CLIP term and the diffusion loss) and two of
ours, each with its weight in the config (0 turns a term off):

- ``L_div``, output divergence: the relative squared distance between the denoiser's
  noise prediction with the protected photo and with the clean photo, on the same
  noised reference video, timestep and text. It is the diffusion loss with the clean
  model's own prediction as the target: the same expected gradient once the prediction
  has moved, without the per-draw noise of the training target.
- ``L_latent``, image-latent push: the relative squared distance between the VAE latent
  of the protected photo and the clean photo's.

One VAE encoding and one denoiser pass of the protected image serve all terms but the
sampler divergence, which runs its own passes (the shared one is skipped when no other
term reads it); the IRA target's denoiser features and the clean prediction of ``L_div``
each need one extra pass without gradients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.models.base import VAE_PREFIX, DenoiserResult, EncodedImage, VideoModel
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, relative_sq_distance, scalar
from anti_i2v.objectives.diffusion import reference_latents
from anti_i2v.objectives.ira import default_target_image, ira_loss
from anti_i2v.objectives.irc import default_irc_blocks, irc_loss
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
        shallow, deep = irc_blocks(len(layers.denoiser), config, needed=bool(config.weight_irc or config.weight_ira))
        self.shallow = layers.resolve_denoiser([shallow])[0]
        self.deep = layers.resolve_denoiser(deep)
        if config.weight_irc and not set(self.deep) - {self.shallow}:
            raise ConfigError(
                f"IRC pulls deep blocks to block {shallow}: give --irc-deep blocks other than that one"
            )
        self.ira_blocks = layers.resolve_denoiser(config.ira_blocks if config.ira_blocks is not None else deep)
        self.vae_layers = [
            n if n.startswith(VAE_PREFIX) else VAE_PREFIX + n
            for n in (config.ira_vae_layers if config.ira_vae_layers is not None else layers.vae_encoder)
        ]
        self.video_latents: torch.Tensor | None = None
        self.pool_noises: list[torch.Tensor] = []
        self._pool_runs: dict[int, torch.Tensor] = {}
        self.t_last = model.num_train_timesteps - 1

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
        if cfg.weight_div or cfg.weight_latent or cfg.weight_sampler:
            with torch.no_grad():  # one posterior draw of the clean photo, fixed for the whole run
                self.clean_encoded = model.encode_image(x, (), torch.Generator().manual_seed(cfg.seed))
        self.pool_noises = self._pool_draws() if cfg.weight_sampler and cfg.sampler_noise_pool else []
        self._pool_runs = {}

    def _pool_draws(self) -> list[torch.Tensor]:
        """``sampler_noise_pool`` seeded noises; the clean photo's run from each waits for its first pick."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        return [torch.randn(self.latent_shape(), generator=generator) for _ in range(self.config.sampler_noise_pool)]

    def pooled(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool entry ``pick``: its noise and the clean photo's sampler run from it, run the first
        time a step picks it (a short run of steps pays only for the noises it draws)."""
        noise = self.pool_noises[pick]
        if pick not in self._pool_runs:
            self._pool_runs[pick] = self._clean_run(noise)
        return noise, self._pool_runs[pick]

    def _clean_run(self, noise: torch.Tensor) -> torch.Tensor:
        """The clean photo's sampler run from ``noise``, without gradients."""
        cfg = self.config
        with torch.no_grad():
            return sampler_run(self.model, self.clean_encoded, noise, cfg.sampler_steps, self.t_last,
                               cfg.sampler_guidance, guided_steps=cfg.sampler_guided_steps)

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

    def reads_denoiser_pass(self) -> bool:
        """Whether a term reads the denoiser pass on the noised reference video (IRC, IRA, L_DM, L_div)."""
        cfg = self.config
        return bool(cfg.weight_irc or cfg.weight_ira or cfg.weight_dm or cfg.weight_div)

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        cfg, model = self.config, self.model
        assert self.video_latents is not None, "call prepare() first"
        encoded = model.encode_image(x_adv, self.vae_layers if cfg.weight_ira else (), draw.generator)
        result = DenoiserResult()
        if self.reads_denoiser_pass():  # the sampler term runs its own passes
            # beside the sampler, recomputed in the backward pass like the sampler's passes, so that its
            # activations do not wait on the accelerator through the sampler's backward pass
            args = (encoded, self.video_latents, draw.t, draw.noise, self.denoiser_taps())
            options = {"with_loss": bool(cfg.weight_dm), "with_eps": bool(cfg.weight_div)}
            result = (recomputed_pass(model, model.denoise, *args, **options) if cfg.weight_sampler
                      else model.denoise(*args, **options))
        loss = torch.zeros((), device=model.device)
        parts: dict[str, float] = {}
        if cfg.weight_irc:
            irc = irc_loss(result.features, self.shallow, self.deep)
            loss = loss + cfg.weight_irc * irc
            parts["irc"] = scalar(irc)
        if cfg.weight_ira:
            with torch.no_grad():
                target = model.denoise(self.psi_encoded, self.video_latents, draw.t, draw.noise, self.ira_blocks)
            features = {**result.features, **encoded.features}
            targets = {**target.features, **self.psi_encoded.features}
            ira = ira_loss(features, targets, self.ira_blocks + self.vae_layers)
            loss = loss + cfg.weight_ira * ira
            parts["ira"] = scalar(ira)
        if cfg.weight_dm:
            assert result.loss is not None
            loss = loss - cfg.weight_dm * result.loss
            parts["dm"] = scalar(result.loss)
        if cfg.weight_div:
            with torch.no_grad():
                clean = model.denoise(self.clean_encoded, self.video_latents, draw.t, draw.noise, with_eps=True)
            assert result.eps is not None and clean.eps is not None
            div = relative_sq_distance(result.eps, clean.eps)
            loss = loss - cfg.weight_div * div
            parts["div"] = scalar(div)
        if cfg.weight_latent:
            push = relative_sq_distance(model.image_latent(encoded), model.image_latent(self.clean_encoded))
            loss = loss - cfg.weight_latent * push
            parts["latent"] = scalar(push)
        if cfg.weight_sampler:
            if self.pool_noises:
                noise, clean = self.pooled(int(torch.randint(len(self.pool_noises), (1,), generator=draw.generator)))
            else:
                noise = draw.noise
                clean = self._clean_run(noise)
            adv = sampler_run(model, encoded, noise, cfg.sampler_steps, self.t_last, cfg.sampler_guidance,
                              cfg.sampler_grad_steps, cfg.sampler_unconditional, cfg.sampler_guided_steps)
            run = relative_sq_distance(adv, clean)
            loss = loss - cfg.weight_sampler * run
            parts["sampler"] = scalar(run)
        if self.aux is not None:
            aux = self.aux(x_adv)
            loss = loss + cfg.weight_aux * aux
            parts["aux"] = scalar(aux)
        parts["total"] = scalar(loss)
        return ObjectiveOutput(loss=loss, parts=parts)


def irc_blocks(depth: int, config: ProtectConfig, needed: bool = True) -> tuple[int, tuple[int, ...]]:
    """The IRC shallow block and deep blocks: the config's where given, else `default_irc_blocks`.

    Explicit indices are checked against the model's depth later (`ModelLayers.resolve_denoiser`).
    When neither IRC nor IRA is on (``needed`` False), a one-block model gets (0, (0,)), unused.
    """
    if config.irc_shallow is not None and config.irc_deep is not None:
        return config.irc_shallow, tuple(config.irc_deep)
    if depth < 2:
        if needed:
            raise ConfigError(
                f"IRC/IRA need at least two denoiser blocks and this model has {depth}; set their weights to 0"
            )
        return 0, (0,)
    shallow, deep = default_irc_blocks(depth)
    return (
        config.irc_shallow if config.irc_shallow is not None else shallow,
        tuple(config.irc_deep) if config.irc_deep is not None else deep,
    )


def checkpoints_passes(model: VideoModel) -> bool:
    """Whether differentiated denoiser passes are gradient-checkpointed as a whole (`recomputed_pass`):
    on an accelerator, where memory is short (not in memory mode ``max``, which keeps their
    activations), and on the meta device, which stands in for one when memory is estimated."""
    return model.device.type != "cpu" and model.memory_mode != "max"


def recomputed_pass(model: VideoModel, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` (a denoiser pass of ``model``), recomputed in the backward pass
    where `checkpoints_passes` says so: then only its inputs wait for the backward pass, and one
    pass's activations are held at a time."""
    if torch.is_grad_enabled() and checkpoints_passes(model):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


def sampler_run(
    model: VideoModel,
    image: EncodedImage,
    noise: torch.Tensor,
    steps: int,
    t_last: int,
    guided: bool = True,
    grad_steps: int = 0,
    unconditional: str = "tracked",
    guided_steps: int = 0,
) -> torch.Tensor:
    """Clean-latent prediction after ``steps`` deterministic sampler steps from ``noise``.

    Each step noises the previous prediction ``x0`` with the previous noise prediction
    ``eps`` at the next timestep (trailing spacing from ``t_last``), which is the
    deterministic DDIM step in any parametrisation the adapter noises with. With
    ``guided`` and a model that states its sampling guidance, each prediction is the
    classifier-free-guided one its pipeline samples with: guidance amplifies what the
    photo changes in the prediction, and so it does here. With ``grad_steps`` k > 0 only the
    last k steps are differentiated through; the earlier ones run without gradients.
    ``unconditional`` "detached" runs the guidance branch without gradients (the same loss,
    a cheaper and different gradient); "tracked" differentiates through it. ``guided_steps`` k > 0
    guides the first k steps only, k < 0 the last -k, 0 every step.
    """
    guidance = model.sampling_guidance() if guided else None
    timesteps = [round(t_last * (1 - k / steps)) for k in range(steps)]
    guided_at = range(steps)
    if guided_steps > 0:
        guided_at = range(guided_steps)
    elif guided_steps < 0:
        guided_at = range(steps + guided_steps, steps)

    def guidance_branch(x0: torch.Tensor, eps: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        free = model.denoise_unconditional(image, x0, torch.tensor([t]), eps)
        assert free.x0 is not None and free.eps is not None
        return free.x0, free.eps

    def conditional(x0: torch.Tensor, eps: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        result = model.denoise(image, x0, torch.tensor([t]), eps, with_eps=True)
        if result.x0 is None or result.eps is None:
            raise ConfigError(f"'{model.name}' does not give clean-latent predictions, so the sampler term does not apply")
        return result.x0, result.eps

    def sampler_step(
        x0: torch.Tensor, eps: torch.Tensor, t: int, guided_here: bool, free: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # each pass recomputed on its own, not the guided step as a whole: half the block inputs held at once
        cond_x0, cond_eps = recomputed_pass(model, conditional, x0, eps, t)
        if guidance is None or not guided_here:
            return cond_x0, cond_eps
        free_x0, free_eps = free if free is not None else recomputed_pass(model, guidance_branch, x0, eps, t)
        weight = guidance.to(cond_x0.device, cond_x0.dtype)
        return free_x0 + weight * (cond_x0 - free_x0), free_eps + weight * (cond_eps - free_eps)

    x0, eps = torch.zeros_like(noise), noise
    untracked = steps - grad_steps if 0 < grad_steps < steps else 0
    for index, t in enumerate(timesteps):
        free = None
        guided_here = index in guided_at
        if guidance is not None and guided_here and unconditional == "detached":
            with torch.no_grad():
                free = guidance_branch(x0, eps, t)
        with torch.no_grad() if index < untracked else contextlib.nullcontext():
            x0, eps = sampler_step(x0, eps, t, guided_here, free)
    return x0
