"""DynamiCrafter through the `VideoModel` seam (our own port, official checkpoints).

Conditioning, as the released inference does it: the condition image takes two paths.
The VAE path encodes it (posterior sample x 0.18215) and repeats the latent over the 16
frames (the interpolation model puts it at the first and the last frame, zeros between);
it is concatenated on channels to the noisy latents. The image-embedding path runs
OpenCLIP ViT-H/14 on it (all 257 tokens) and the Resampler (16 tokens per frame), appended
to the 77 text tokens for the U-Net's image cross-attention. The training loss is the
v-prediction MSE (eps for the 256 model) on the dynamically rescaled x0.

Block mapping: ``denoiser.<i>`` counts the U-Net's blocks in forward order:
``input_blocks[0..11]`` are 0-11, ``middle_block`` is 12, ``output_blocks[0..11]`` are
13-24 (each tapped on its output, shape (B*T, C, h, w); block 0 is the input
convolution, before the U-Net's initial temporal attention). ``vae.down_blocks.<i>`` and
``vae.mid_block`` are the VAE encoder's blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
from anti_i2v.models.dynamicrafter.checkpoint import load_checkpoint
from anti_i2v.models.dynamicrafter.configs import get_config
from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel
from anti_i2v.models.dynamicrafter.sampler import DDIMSampler, hybrid_model_fn
from anti_i2v.models.dynamicrafter.schedule import DynamiCrafterSchedule
from anti_i2v.models.tiny import randomise_zero_initialised
from anti_i2v.photo import resize_short_side_and_crop

logger = logging.getLogger(__name__)


class DynamiCrafterI2V(VideoModel):
    """The `VideoModel` adapter for a `DynamiCrafterModel`.

    Args:
        net: the assembled model (tiny, or loaded from an official checkpoint).
        name: registry name, recorded in reports.
        device, dtype: where and in which precision it runs.
        gradient_checkpointing: recompute U-Net blocks in backward (saves memory).
        sample_posterior: encode the condition image with a posterior sample, as the
            released inference does (otherwise the posterior mean).
    """

    family = "dynamicrafter"
    crops_photo = True

    checkpoints_whole_blocks = False  # its U-Net checkpoints parts of blocks

    def __init__(
        self,
        net: DynamiCrafterModel,
        name: str = "dynamicrafter",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        sample_posterior: bool = True,
    ) -> None:
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.net = net.to(self._device, dtype).eval().requires_grad_(False)
        self.config = cfg = net.config
        self.unet = net.model.diffusion_model
        self.unet.set_gradient_checkpointing(gradient_checkpointing)
        self.vae = net.first_stage_model
        self.sample_posterior = sample_posterior
        self.resolution = tuple(cfg.resolution)
        self.num_frames = cfg.frames
        self.num_train_timesteps = cfg.timesteps
        self.schedule = DynamiCrafterSchedule(
            timesteps=cfg.timesteps,
            linear_start=cfg.linear_start,
            linear_end=cfg.linear_end,
            parameterization=cfg.parameterization,
            rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
            use_dynamic_rescale=cfg.use_dynamic_rescale,
            base_scale=cfg.base_scale if cfg.base_scale is not None else 1.0,
            turning_step=cfg.turning_step,
        )
        self._prompt: str | None = None
        self._text: torch.Tensor | None = None
        self._negative_text: torch.Tensor | None = None
        self._empty_tokens: torch.Tensor | None = None  # image tokens of a blank image, for guidance

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> DynamiCrafterI2V:
        """``tiny-dynamicrafter``: the full architecture, small, seeded random weights."""
        kwargs.setdefault("name", "tiny-dynamicrafter")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DynamiCrafterModel("tiny")
            randomise_zero_initialised(net)
        return cls(net, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        variant: str,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> DynamiCrafterI2V:
        """Load an official ``model.ckpt`` (hub id, folder or file) of ``variant`` (256, 512, 1024, 512_interp)."""
        state = load_checkpoint(source, variant)
        net = DynamiCrafterModel.from_official(state, get_config(variant), dtype=dtype, device=device)
        return cls(net, device=device, dtype=dtype, **kwargs)

    # --- the seam -------------------------------------------------------------------

    def _blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]

    def layers(self) -> ModelLayers:
        """``denoiser.0..`` (input, middle, output blocks in forward order) and the VAE encoder's blocks."""
        n_down = len(self.vae.encoder.down_blocks)
        return ModelLayers(
            denoiser=[f"{DENOISER_PREFIX}{i}" for i in range(len(self._blocks()))],
            vae_encoder=[f"{VAE_PREFIX}down_blocks.{i}" for i in range(n_down)] + [f"{VAE_PREFIX}mid_block"],
        )

    def module(self, name: str) -> torch.nn.Module:
        if name.startswith(DENOISER_PREFIX):
            return self._blocks()[int(name[len(DENOISER_PREFIX) :])]
        if name.startswith(VAE_PREFIX):
            return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """Encode ``prompt`` and the empty prompt (for guidance) once with the OpenCLIP text tower."""
        if prompt == self._prompt:
            return
        if self.net.cond_stage_model is None:
            raise ModelError(
                "the text encoder was released after encoding the first prompt; "
                "create the model again to use another prompt"
            )
        with torch.no_grad():  # the text tower may run on the CPU (memory modes other than full)
            self._text = self.net.encode_text(prompt).to(self._device, self._dtype)
            self._negative_text = self.net.encode_text("").to(self._device, self._dtype)
        self._prompt = prompt

    def use_prompt_embeds(self, embeds: torch.Tensor, negative: torch.Tensor | None = None, label: str = "") -> None:
        """Condition on a precomputed text context (1, 77, D) instead of a prompt string.

        Without ``negative``, the empty prompt's context is used when the text encoder
        can make it (as the released models' ``empty_seq`` guidance), else zeros.
        """
        if negative is None:
            try:
                with torch.no_grad():
                    negative = self.net.encode_text("")
            except (OSError, ValueError, ModelError, AttributeError):  # no tokenizer files, or encoder released
                negative = torch.zeros_like(embeds)
        self._prompt = label
        self._text = embeds.to(self._device, self._dtype)
        self._negative_text = negative.to(self._device, self._dtype)

    def text_encoders(self) -> list[torch.nn.Module]:
        """The OpenCLIP text tower, while it is kept."""
        return [self.net.cond_stage_model] if self.net.cond_stage_model is not None else []

    def release_text_encoder(self) -> None:
        """Drop the OpenCLIP text tower (354 M parameters) once the prompt is encoded."""
        if self.net.cond_stage_model is not None:
            self.net.cond_stage_model = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def _require_text(self) -> torch.Tensor:
        if self._text is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        return self._text

    def _concat_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) image latent -> (B, C, T, h, w) as the model's c_concat."""
        frames = latent.unsqueeze(2).expand(-1, -1, self.num_frames, -1, -1)
        if self.config.interp:  # first and last frame, zeros between
            keep = torch.zeros(self.num_frames, device=latent.device, dtype=latent.dtype)
            keep[0] = keep[-1] = 1
            frames = frames * keep.view(1, 1, -1, 1, 1)
        return frames

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """Both image paths, differentiable: c_concat latents (B, 4, T, h, w) and image tokens."""
        pixels = x.to(self._device, self._dtype) * 2 - 1
        tapper = FeatureTaps({n: self.module(n) for n in taps})
        with tapper.capture() as feats:
            dist = self.vae.encode(pixels).latent_dist
        latent = (dist.sample(generator) if self.sample_posterior else dist.mode()) * self.net.scale_factor
        tokens = self.net.encode_image_tokens(pixels)
        return EncodedImage(self._concat_latents(latent), dict(feats), context=tokens)

    def prepare_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """As the released inference: short side scaled to the resolution's, centre crop (black bars
        where the photo is too narrow)."""
        return resize_short_side_and_crop(rgb, *self.resolution)

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The image latent (frame 0 of c_concat)."""
        return encoded.latents[:, :, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The image latent on every frame: (B, C, T, h, w)."""
        return latent.unsqueeze(2).expand(-1, -1, self.num_frames, -1, -1)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The OpenCLIP ViT-H/14 tokens (B, 257, 1280) of ``x`` in [0, 1], differentiable."""
        return self.net.embedder(x.to(self._device, self._dtype) * 2 - 1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Posterior-mean latents (1, 4, T, h, w) of frames (F, 3, H, W) in [0, 1]."""
        video = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        return self.net.encode_first_stage(video).detach()

    def _fs(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.config.default_fs, device=self._device, dtype=torch.long)

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
        """One U-Net pass; stops after the deepest tap unless the output is wanted."""
        text = self._require_text()
        batch = image.latents.shape[0]
        t = t.to(self._device).long().reshape(-1).expand(batch)
        # latents stay fp32 as in the original's autocast; the U-Net casts its input itself
        video_latents = video_latents.to(self._device, torch.float32).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, torch.float32).expand_as(video_latents)
        noisy = self.schedule.q_sample(video_latents, t, noise)
        model_input = torch.cat([noisy, image.latents.float()], dim=1)
        context = torch.cat([text.expand(batch, -1, -1), image.context.to(self._dtype)], dim=1)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self.unet(model_input, t, context=context, fs=self._fs(batch)), taps, need_output
        )
        result = DenoiserResult(feats)
        if need_output:
            output = output.float()
            if with_loss:
                result.loss = self.schedule.training_loss(output, video_latents, noise, t)
            if with_eps:
                v_model = self.config.parameterization == "v"
                result.eps = self.schedule.predict_eps_from_v(noisy, t, output) if v_model else output
                x0 = (self.schedule.predict_x0_from_v(noisy, t, output) if v_model
                      else self.schedule.predict_x0_from_eps(noisy, t, output))
                # back from the dynamically rescaled x0 space to the latents `denoise` takes
                result.x0 = x0 / self.schedule.rescale_x0(torch.ones_like(x0), t)
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """The release's guidance (without its guidance rescale), which `generate` uses."""
        return torch.tensor(float(self.config.guidance_scale))

    def denoise_unconditional(self, image, video_latents, t, noise):
        """The released guidance branch: the empty prompt and the image tokens of a blank image,
        the same concatenated latents."""
        text = self._require_text()
        if self._empty_tokens is None:
            with torch.no_grad():
                blank = torch.zeros(1, 3, *self.resolution, device=self._device, dtype=self._dtype)
                self._empty_tokens = self.net.encode_image_tokens(blank)
        assert image.context is not None
        empty = EncodedImage(image.latents, context=self._empty_tokens.expand(image.context.shape[0], -1, -1))
        self._text = self._negative_text
        try:
            return self.denoise(empty, video_latents, t, noise, with_eps=True)
        finally:
            self._text = text

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video as the released inference does (DDIM, eta, CFG, guidance rescale)."""
        self.condition(prompt)
        generator = torch.Generator().manual_seed(seed)
        photo = self.prepare_image(image.float())
        photo = (photo * 255).round() / 255  # the attacker's pipeline reads an 8-bit image
        pixels = photo.to(self._device, self._dtype) * 2 - 1
        latent = self.vae.encode(pixels).latent_dist.sample(generator).float() * self.net.scale_factor
        c_concat = self._concat_latents(latent)  # fp32 latents through the whole DDIM loop
        tokens = self.net.encode_image_tokens(pixels)
        empty_tokens = self.net.encode_image_tokens(torch.zeros_like(pixels))
        cond = {"c_concat": [c_concat], "c_crossattn": [torch.cat([self._text, tokens], dim=1)]}
        uncond = {"c_concat": [c_concat], "c_crossattn": [torch.cat([self._negative_text, empty_tokens], dim=1)]}
        sampler = DDIMSampler(self.schedule, num_steps=steps, timestep_spacing=self.config.timestep_spacing,
                              eta=self.config.ddim_eta)
        x_t = torch.randn(c_concat.shape, generator=generator).to(self._device)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        samples = sampler.sample(
            hybrid_model_fn(self.unet, fs=self._fs(1)),
            x_t,
            cond,
            uncond,
            guidance_scale=scale,
            guidance_rescale=self.config.guidance_rescale,
            noise=lambda i, t, x: torch.randn(x.shape, generator=generator).to(x),  # CPU draws: same on any device
        )
        video = self.net.decode_first_stage(samples.to(self._dtype))[0]  # (3, T, H, W) in about [-1, 1]
        return ((video.float().permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1).cpu()
