"""Open-Sora 1.2 through the `VideoModel` seam (our own port, official checkpoints).

Conditioning, as the released I2V inference and the masked training do it: the
condition image is prepared by cover-and-crop, VAE-encoded on its own, and written
into latent frame 0; that frame is given to the denoiser clean (its tokens modulated
as t = 0 through ``x_mask``) and left out of the rectified-flow loss, which is the
MSE between the velocity and ``x0 - noise`` on the other frames.

Block mapping, as the paper counts: ``denoiser.<i>``, i = 0..27, is the i-th pair of
a spatial and a temporal block, tapped on the temporal block's output (B, T*S, C).
``vae.down_blocks.<i>`` and ``vae.mid_block`` are the spatial VAE encoder's blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from anti_i2v.errors import ModelError
from anti_i2v.models.base import (
    DENOISER_PREFIX,
    VAE_PREFIX,
    DenoiserResult,
    EncodedImage,
    FeatureTaps,
    ModelLayers,
    VideoModel,
)
from anti_i2v.models.diffusers_common import place
from anti_i2v.models.opensora.checkpoint import STDIT3_HUB_ID, VAE_HUB_ID, build_stdit3, build_vae, load_stdit3, load_vae
from anti_i2v.models.opensora.configs import OpenSoraConfig, get_config
from anti_i2v.models.opensora.sampler import RFlowSampler, apply_reference, rf_noisy, rf_training_loss
from anti_i2v.models.opensora.text import T5TextEncoder
from anti_i2v.models.tiny import randomise_zero_initialised
from anti_i2v.photo import resize_to_fill

logger = logging.getLogger(__name__)


class OpenSoraI2V(VideoModel):
    """The `VideoModel` adapter for Open-Sora 1.2 (STDiT3, its video VAE, T5 text).

    Args:
        stdit3, vae: the loaded (or tiny) modules.
        text: the T5 text encoder (freed after encoding when asked).
        config: resolution, length, fps and sampling settings.
        name: registry name, recorded in reports.
        device, dtype: where and in which precision STDiT3 and the VAE run (T5 stays fp32).
        gradient_checkpointing: recompute STDiT3 blocks in backward (saves memory).
    """

    family = "opensora"
    crops_photo = True

    def __init__(
        self,
        stdit3: torch.nn.Module,
        vae: torch.nn.Module,
        text: T5TextEncoder | None,
        config: OpenSoraConfig,
        name: str = "opensora",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        sample_posterior: bool = True,
    ) -> None:
        self.name = name
        self.config = config
        self._device = torch.device(device)
        self._dtype = dtype
        self.stdit3 = place(stdit3, self._device, dtype)
        self.stdit3.set_gradient_checkpointing(gradient_checkpointing)
        self.vae = place(vae, self._device, dtype)
        self.text = text
        self.sample_posterior = sample_posterior
        self.resolution = tuple(config.image_size)
        self.num_frames = config.num_frames
        self.num_train_timesteps = config.num_timesteps
        self.sampler = RFlowSampler(
            num_sampling_steps=config.num_sampling_steps,
            num_timesteps=config.num_timesteps,
            cfg_scale=config.cfg_scale,
            use_timestep_transform=config.use_timestep_transform,
        )
        self._prompt: str | None = None
        self._y: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> OpenSoraI2V:
        """``tiny-opensora``: the full architecture, small, seeded random weights, in-memory T5."""
        kwargs.setdefault("name", "tiny-opensora")
        config = get_config("tiny")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stdit3 = build_stdit3(config.stdit3)
            vae = build_vae(config.vae)
            randomise_zero_initialised(stdit3)
            text = T5TextEncoder.tiny(
                d_model=config.text["d_model"], model_max_length=config.model_max_length, seed=seed
            )
        return cls(stdit3, vae, text, config, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str | None = None,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        vae_source: str | None = None,
        text_source: str | None = None,
        resolution: str = "240p",
        length: str = "2s",
        **kwargs,
    ) -> OpenSoraI2V:
        """Load STDiT3, the VAE and T5 from hub ids or local folders, for one released
        resolution (240p, 360p, 480p, 720p; 9:16) and length ("2s" = 51 frames, "4s", ...).

        ``source`` is the STDiT3 folder, or a folder holding ``stdit3/``, ``vae/`` and ``t5/``
        (then all three load from it); otherwise the VAE and T5 come from ``vae_source`` /
        ``text_source`` or their hub ids.
        """
        config = get_config("opensora-v1.2").with_overrides(resolution=resolution, length=length)
        root = Path(source) if source is not None else None
        if root is not None and (root / "stdit3").is_dir():
            source = str(root / "stdit3")
            vae_source = vae_source or (str(root / "vae") if (root / "vae").is_dir() else None)
            text_source = text_source or (str(root / "t5") if (root / "t5").is_dir() else None)
        stdit3 = load_stdit3(source or STDIT3_HUB_ID, device=device, dtype=dtype)
        vae = load_vae(vae_source or VAE_HUB_ID, device=device, dtype=dtype)
        text = T5TextEncoder.from_pretrained(text_source or config.text_hub_id, model_max_length=config.model_max_length)
        return cls(stdit3, vae, text, config, device=device, dtype=dtype, **kwargs)

    # --- the seam -------------------------------------------------------------------

    def layers(self) -> ModelLayers:
        """``denoiser.0..27`` (spatial+temporal pairs) and the spatial VAE encoder's blocks."""
        encoder = self.vae.spatial_vae.module.encoder
        return ModelLayers(
            denoiser=[f"{DENOISER_PREFIX}{i}" for i in range(len(self.stdit3.temporal_blocks))],
            vae_encoder=[f"{VAE_PREFIX}down_blocks.{i}" for i in range(len(encoder.down_blocks))]
            + [f"{VAE_PREFIX}mid_block"],
        )

    def module(self, name: str) -> torch.nn.Module:
        if name.startswith(DENOISER_PREFIX):
            return self.stdit3.temporal_blocks[int(name[len(DENOISER_PREFIX) :])]
        if name.startswith(VAE_PREFIX):
            return self.vae.spatial_vae.module.encoder.get_submodule(name[len(VAE_PREFIX) :])
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """T5-encode ``prompt`` (with the released aesthetic-score suffix) once and cache it."""
        if prompt == self._prompt:
            return
        if self.text is None:
            raise ModelError(
                "the text encoder was released after encoding the first prompt; "
                "create the model again to use another prompt"
            )
        with torch.no_grad():
            encoded = self.text.encode([prompt], aes=self.config.aes)
        self._prompt = prompt
        self._y = encoded.y.to(self._device, self._dtype)
        self._mask = encoded.mask.to(self._device)

    def use_prompt_embeds(self, y: torch.Tensor, mask: torch.Tensor, label: str = "") -> None:
        """Condition on precomputed T5 features ``y`` (1, 1, L, D) and their mask (1, L)."""
        self._prompt = label
        self._y = y.to(self._device, self._dtype)
        self._mask = mask.to(self._device)

    def release_text_encoder(self) -> None:
        """Drop T5-XXL (about 19 GB in fp32) once the prompt is encoded."""
        if self.text is not None:
            self.text.free()
            self.text = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def prepare_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """As the released inference: scaled to cover the resolution, centre crop."""
        return resize_to_fill(rgb, *self.resolution)

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """The image latent (B, 4, 1, h, w), encoded on its own as the released I2V path does."""
        pixels = (x.to(self._device, self._dtype) * 2 - 1).unsqueeze(2)
        tapper = FeatureTaps({n: self.module(n) for n in taps})
        with tapper.capture() as feats:
            latent = self.vae.encode(pixels, sample_posterior=self.sample_posterior, generator=generator)
        return EncodedImage(latent.float(), dict(feats))

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        return encoded.latents[:, :, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        frames = self.config.latent_size(self.num_frames, self.resolution)[0]
        return latent.unsqueeze(2).expand(-1, -1, frames, -1, -1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Posterior-mean latents (1, 4, T_latent, h, w) of frames (F, 3, H, W) in [0, 1]."""
        video = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        return self.vae.encode(video).float()

    def _size_info(self, batch: int) -> dict[str, torch.Tensor]:
        height, width = self.resolution
        full = lambda v: torch.full((batch,), float(v), device=self._device)  # noqa: E731
        return {"fps": full(self.config.fps), "height": full(height), "width": full(width)}

    def denoise(
        self,
        image: EncodedImage,
        video_latents: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        taps: Sequence[str] = (),
        with_loss: bool = False,
        with_eps: bool = False,
    ) -> DenoiserResult:
        """One STDiT3 pass with the image latent as clean frame 0 (masked as in training)."""
        if self._y is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        batch = image.latents.shape[0]
        x0 = video_latents.to(self._device, torch.float32).expand(batch, -1, -1, -1, -1)
        x0 = torch.cat([image.latents.float(), x0[:, :, 1:]], dim=2)
        noise = noise.to(self._device, torch.float32).expand_as(x0)
        t = t.to(self._device).float().reshape(-1).expand(batch)
        frame_mask = torch.ones(batch, x0.shape[2], dtype=torch.bool, device=self._device)
        frame_mask[:, 0] = False  # the condition frame: clean input, modulated as t = 0, not in the loss
        noisy = rf_noisy(x0, noise, t, frame_mask=frame_mask, num_timesteps=self.num_train_timesteps)
        output, feats = self.tapped_forward(
            lambda: self.stdit3(
                noisy.to(self._dtype),
                t,
                self._y.expand(batch, -1, -1, -1),
                mask=self._mask.expand(batch, -1),
                x_mask=frame_mask,
                **self._size_info(batch),
            ),
            taps,
            with_loss or with_eps,
        )
        result = DenoiserResult(feats)
        if output is not None:
            velocity = output[:, : x0.shape[1]].float()
            if with_loss:
                result.loss = rf_training_loss(velocity, x0, noise, t, frame_mask)
            if with_eps:  # x_t = (1 - s) x0 + s noise and v = x0 - noise give noise = x_t - (1 - s) v
                s = (t / self.num_train_timesteps).view(-1, 1, 1, 1, 1)
                trained = frame_mask[:, None, :, None, None]
                # the clean condition frame has no noise to predict: its residual is zero, as its loss
                result.eps = torch.where(trained, noisy - (1 - s) * velocity, noise)
                result.x0 = torch.where(trained, noisy + s * velocity, x0)
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """The released guidance, which `generate` uses."""
        return torch.tensor(float(self.config.cfg_scale))

    def denoise_unconditional(self, image, video_latents, t, noise):
        """The released guidance branch: the model's null caption, the same photo."""
        if self._y is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        caption = self._y
        null = self.stdit3.y_embedder.y_embedding
        self._y = null.to(caption.device, caption.dtype).expand(caption.shape[0], 1, *null.shape[-2:])
        try:
            return self.denoise(image, video_latents, t, noise, with_eps=True)
        finally:
            self._y = caption

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video as the released I2V inference does (RF Euler, CFG, mask "0")."""
        self.condition(prompt)
        generator = torch.Generator().manual_seed(seed)
        photo = (self.prepare_image(image.float()) * 255).round() / 255  # the attacker reads an 8-bit image
        pixels = (photo.to(self._device, self._dtype) * 2 - 1).unsqueeze(2)
        reference = self.vae.encode(pixels, sample_posterior=True, generator=generator).float()
        shape = (1, reference.shape[1], *self.config.latent_size(self.num_frames, self.resolution))
        z = torch.randn(shape, generator=generator).to(self._device)
        z, mask = apply_reference(z, reference)
        sampler = self.sampler if steps is None else RFlowSampler(
            num_sampling_steps=steps,
            num_timesteps=self.config.num_timesteps,
            cfg_scale=self.config.cfg_scale,
            use_timestep_transform=self.config.use_timestep_transform,
        )
        height, width = self.resolution
        latents = sampler.sample(
            self.stdit3,
            z,
            self._y,
            self._mask,
            height=height,
            width=width,
            num_frames=self.num_frames,
            fps=self.config.fps,
            mask=mask,
            guidance_scale=guidance_scale,
            noise=lambda *args: torch.randn(z.shape, generator=generator).to(self._device),
        )
        video = self.vae.decode(latents.to(self._dtype), num_frames=self.num_frames)[0]
        return ((video.float().permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1).cpu()
