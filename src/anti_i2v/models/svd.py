"""Stable Video Diffusion (SVD / SVD-XT) image-to-video, backed by diffusers.

Conditioning, as `StableVideoDiffusionPipeline` does it, on two paths:

* CLIP path (``EncodedImage.context``): the image is resized to 224x224 (the
  pipeline's own anti-aliased torch resize), normalised with the CLIP mean/std and
  embedded by the CLIP vision encoder: ``image_embeds`` (B, 1, D), the U-Net's
  cross-attention context. The pipeline's `CLIPImageProcessor` step is replaced by
  the same arithmetic in torch, so it is differentiable.
* VAE path (``EncodedImage.latents``): the image in [-1, 1] plus
  ``noise_aug_strength * noise`` goes through ``pipe._encode_vae_image`` (posterior
  mode, *unscaled*, as the pipeline passes it) and is repeated over the frames:
  (B, F, C, h, w), concatenated on channels to the noisy video latents.

Micro-conditioning: ``pipe._get_add_time_ids(fps - 1, motion_bucket_id, noise_aug_strength)``
with the pipeline defaults fps 7 (the pipeline passes fps - 1, as SVD was trained
on it), motion bucket 127 and noise augmentation 0.02.

Training loss (`denoise` with ``with_loss``), following the SVD training recipe
(EDM preconditioning with v-prediction, Karras et al. 2022; Blattmann et al. 2023,
"Stable Video Diffusion", sec. D / the ``generative-models`` ``VScaling`` +
``EDMWeighting`` denoiser) with the noise levels of the released
`EulerDiscreteScheduler` config. The integer training timestep t in
[0, num_train_timesteps - 1] is mapped to the scheduler's sigma for that training
timestep, ``sigma_t = sqrt((1 - abar_t) / abar_t)``, and::

    x_t      = x0 + sigma * noise                      (variance exploding)
    c_in     = 1 / sqrt(sigma^2 + 1)                   (= scheduler.scale_model_input)
    c_noise  = 0.25 * log(sigma)                       (the continuous timestep the pipeline passes)
    c_skip   = 1 / (sigma^2 + 1)
    c_out    = -sigma / sqrt(sigma^2 + 1)              (v-prediction, as EulerDiscreteScheduler.step)
    D(x_t)   = c_skip * x_t + c_out * unet(c_in * x_t ++ image latents, c_noise, ...)
    lambda   = (sigma^2 + 1) / sigma^2
    loss     = mean(lambda * (D(x_t) - x0)^2)

The noise prediction for score-based attacks (``with_eps``) is
``eps = (x_t - D(x_t)) / sigma``.

Block mapping (``denoiser.<i>`` in forward order; 4 + 1 + 4 = 9 for the released
U-Net, 2 + 1 + 2 = 5 for tiny-svd):

* ``denoiser.0 .. denoiser.{D-1}``: ``unet.down_blocks[0 .. D-1]`` (tapped on the
  hidden states, the first element of their output tuple),
* ``denoiser.D``: ``unet.mid_block``,
* ``denoiser.{D+1} .. denoiser.{D+U}``: ``unet.up_blocks[0 .. U-1]``.

Tapped U-Net features are (B * F, C, h, w). ``vae.down_blocks.<i>`` and
``vae.mid_block`` are the VAE encoder's blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.models.base import (
    DENOISER_PREFIX,
    VAE_PREFIX,
    DenoiserResult,
    EncodedImage,
    FeatureTaps,
    ModelLayers,
    VideoModel,
)
from anti_i2v.models.diffusers_common import (
    checkpoint_calls,
    load_diffusers_pipeline,
    place,
    standard_layers,
    to_pil_8bit,
)

logger = logging.getLogger(__name__)

HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt"
ENCODE_FRAMES = 8  # frames the VAE encodes at once in `encode_video`

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Scheduler of the released SVD / SVD-XT (scheduler/scheduler_config.json).
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    trained_betas=None,
    use_karras_sigmas=True,
)

# Tiny variant: diffusers' fast-test U-Net with a cheaper VAE and CLIP.
TINY_SIZE, TINY_FRAMES = 64, 8
_TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=TINY_SIZE // 8,  # latent size: resolution = sample_size * vae scale factor (8)
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    cross_attention_dim=32,
    num_attention_heads=8,
    projection_class_embeddings_input_dim=96,  # 3 * addition_time_embed_dim
    addition_time_embed_dim=32,
    num_frames=TINY_FRAMES,
)
_TINY_VAE = dict(
    block_out_channels=[32, 32, 32, 32],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    latent_channels=4,
)
_TINY_CLIP = dict(
    hidden_size=32,
    projection_dim=32,  # == unet cross_attention_dim
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    intermediate_size=37,
    patch_size=32,
)


def tiny_pipeline(seed: int = 0) -> StableVideoDiffusionPipeline:
    """A complete SVD pipeline (64x64, 8 frames) with seeded random weights (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(**_TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLTemporalDecoder(**_TINY_VAE)
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_TINY_CLIP))
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )


def load_pipeline(source: str, dtype: torch.dtype) -> StableVideoDiffusionPipeline:
    """Load a released pipeline from a hub id or a local folder in the diffusers layout."""
    return load_diffusers_pipeline(StableVideoDiffusionPipeline, source, dtype, "Stable Video Diffusion", HUB_ID, "tiny-svd")


class StableVideoDiffusionI2V(VideoModel):
    """The `VideoModel` adapter for `StableVideoDiffusionPipeline` (SVD, SVD-XT).

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE, CLIP encoder and U-Net run.
        dtype: compute dtype (fp16/bf16 on GPU for the released model).
        gradient_checkpointing: recompute U-Net blocks in backward to save memory.
        fps, motion_bucket_id, noise_aug_strength: the micro-conditioning, as the
            pipeline's defaults (7, 127, 0.02); `generate` uses the same values.
    """

    family = "svd"

    checkpoints_whole_blocks = False  # its U-Net checkpoints parts of blocks

    def __init__(
        self,
        pipe: StableVideoDiffusionPipeline,
        name: str = "svd",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.fps = fps
        self.motion_bucket_id = motion_bucket_id
        self.noise_aug_strength = noise_aug_strength
        self.vae = place(pipe.vae, self._device, dtype)
        self.unet = place(pipe.unet, self._device, dtype)
        self.image_encoder = place(pipe.image_encoder, self._device, dtype)
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            # diffusers checkpoints the U-Net's resnets only; at 576x1024 and 25 frames the spatio-temporal
            # transformers' activations are most of a pass's memory (about 45 GiB), so recompute them too
            checkpoint_calls(m for m in self.unet.modules() if isinstance(m, TransformerSpatioTemporalModel))

        cfg = self.unet.config
        if cfg.in_channels != 2 * self.vae.config.latent_channels:
            raise ModelError(
                f"'{name}' is not an image-to-video SVD checkpoint (its U-Net takes {cfg.in_channels} "
                f"channels, not noisy + image latents); use {HUB_ID} or a copy of it"
            )
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        scale = pipe.vae_scale_factor
        # The released U-Net config says sample_size 96 (square) while the model card's
        # resolution is 576x1024, which is what the pipeline defaults to.
        self.resolution = (576, 1024) if (h, w) == (96, 96) else (h * scale, w * scale)
        self.num_frames = int(cfg.num_frames)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        # Training sigmas, indexed by the integer training timestep (fixed at construction:
        # `set_timesteps` in `generate` replaces `scheduler.sigmas`, not `alphas_cumprod`).
        abar = self.scheduler.alphas_cumprod.double()
        self._train_sigmas = ((1 - abar) / abar).sqrt().float()
        extractor = pipe.feature_extractor
        mean = getattr(extractor, "image_mean", None) or CLIP_MEAN
        std = getattr(extractor, "image_std", None) or CLIP_STD
        self._clip_mean = torch.tensor(mean, device=self._device).view(1, 3, 1, 1)
        self._clip_std = torch.tensor(std, device=self._device).view(1, 3, 1, 1)

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> StableVideoDiffusionI2V:
        """The ``tiny-svd`` variant: demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", "tiny-svd")
        return cls(tiny_pipeline(seed), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.float16,
        **kwargs,
    ) -> StableVideoDiffusionI2V:
        """Load released weights from a hub id or a local folder (diffusers layout)."""
        return cls(load_pipeline(source, dtype), device=device, dtype=dtype, **kwargs)

    # --- the seam -------------------------------------------------------------------

    def _denoiser_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def layers(self) -> ModelLayers:
        """``denoiser.<i>``: down blocks, mid block, up blocks; and the VAE encoder's blocks."""
        return standard_layers(len(self._denoiser_blocks()), self.vae.encoder)

    def module(self, name: str) -> torch.nn.Module:
        if name.startswith(DENOISER_PREFIX):
            blocks = self._denoiser_blocks()
            index = name[len(DENOISER_PREFIX) :]
            if index.isdigit() and int(index) < len(blocks):
                return blocks[int(index)]
        elif name.startswith(VAE_PREFIX):
            try:
                return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
            except AttributeError:
                pass
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """SVD takes no text: any prompt is accepted and nothing is cached."""

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (B, 1, D) of ``x`` in [0, 1], as the pipeline computes it, differentiable."""
        pixels = x.to(self._device, torch.float32) * 2 - 1
        pixels = (_resize_with_antialiasing(pixels, (224, 224)) + 1) / 2
        pixels = (pixels - self._clip_mean) / self._clip_std
        return self.image_encoder(pixels.to(self._dtype)).image_embeds.unsqueeze(1)

    def _added_time_ids(self, batch: int) -> torch.Tensor:
        ids = self.pipe._get_add_time_ids(
            self.fps - 1, self.motion_bucket_id, self.noise_aug_strength, self._dtype, batch, 1, False
        )
        return ids.to(self._device)

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """Both image paths, differentiable: image latents repeated over the frames
        (B, F, C, h, w), unscaled as the pipeline passes them, and the CLIP embedding (B, 1, D)."""
        pixels = x.to(self._device, self._dtype) * 2 - 1
        noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
        pixels = pixels + self.noise_aug_strength * noise.to(self._device, self._dtype)
        tapper = FeatureTaps({n: self.module(n) for n in taps})
        with tapper.capture() as feats:
            latent = self.pipe._encode_vae_image(pixels, self._device, 1, False)
        latents = latent.unsqueeze(1).repeat(1, self.num_frames, 1, 1, 1)
        return EncodedImage(latents, dict(feats), context=self.image_embedding(x))

    def frame_count_for(self, share: float) -> int:
        """About ``share`` of the frames, at least 2 (the U-Net's temporal layers take any count)."""
        return max(2, min(self.num_frames, round(share * self.num_frames)))

    def set_num_frames(self, num_frames: int, spread: bool | None = False) -> None:
        """Run with the first ``num_frames`` frames (guidance ramps over them as over the full count).

        SVD's temporal layers number the frames they get from 0, so frames spread over the video
        cannot keep their positions: ``spread=True`` is refused (None takes the first frames)."""
        if spread:
            raise ConfigError(f"'{self.name}' can only optimise on its first frames (--first-frames)")
        self.num_frames = num_frames

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The condition image's latent (B, C, h, w): every frame of ``encoded.latents`` holds it."""
        return encoded.latents[:, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The (unscaled) image latent, scaled to the video-latent space and repeated: (B, F, C, h, w)."""
        scaled = latent * self.vae.config.scaling_factor
        return scaled.unsqueeze(1).expand(-1, self.num_frames, -1, -1, -1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Scaled posterior-mode latents (1, F, C, h, w) of frames (F, 3, H, W) in [0, 1].

        The VAE encodes each frame on its own, so frames go through it a few at a time: the
        same latents, a third of the memory of all 25 at 576x1024 (about 18 GiB at once)."""
        pixels = frames.to(self._device, self._dtype) * 2 - 1
        latents = torch.cat([self.vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(ENCODE_FRAMES)])
        return (latents * self.vae.config.scaling_factor).unsqueeze(0).detach()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's sigma of integer training timesteps ``t`` (float32, on the device)."""
        return self._train_sigmas[t.long().cpu()].to(self._device)

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
        """One U-Net pass under EDM preconditioning (module docstring); stops after the deepest
        tap unless the loss or the noise prediction is wanted."""
        if image.context is None:
            raise ModelError("SVD needs the CLIP image embedding: pass the output of encode_image")
        batch = image.latents.shape[0]
        sigma = self.sigma(t.reshape(-1)).expand(batch).view(-1, 1, 1, 1, 1)
        video_latents = video_latents.to(self._device, self._dtype).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, self._dtype).expand_as(video_latents)
        noisy = video_latents.float() + sigma * noise.float()
        c_in = 1 / (sigma**2 + 1).sqrt()
        model_input = torch.cat([(c_in * noisy).to(self._dtype), image.latents.to(self._dtype)], dim=2)
        timestep = (0.25 * sigma.flatten().log()).to(self._dtype)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self.unet(
                model_input,
                timestep,
                encoder_hidden_states=image.context.to(self._dtype),
                added_time_ids=self._added_time_ids(batch),
                return_dict=False,
            ),
            taps,
            need_output,
        )
        result = DenoiserResult(feats)
        if need_output:
            prediction = output[0].float()
            c_skip = 1 / (sigma**2 + 1)
            c_out = -sigma / (sigma**2 + 1).sqrt()
            denoised = c_skip * noisy + c_out * prediction
            if with_loss:
                weight = (sigma**2 + 1) / sigma**2
                result.loss = (weight * (denoised - video_latents.float()) ** 2).mean()
            if with_eps:
                result.eps = (noisy - denoised) / sigma
                result.x0 = denoised
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """The pipeline's per-frame guidance, from 1 on the first frame to 3 on the last (as `generate`)."""
        return torch.linspace(1.0, 3.0, self.num_frames).view(1, -1, 1, 1, 1)

    def denoise_unconditional(self, image, video_latents, t, noise):
        """The pipeline's guidance branch: zero image latents and a zero CLIP embedding."""
        assert image.context is not None
        empty = EncodedImage(torch.zeros_like(image.latents), context=torch.zeros_like(image.context))
        return self.denoise(empty, video_latents, t, noise, with_eps=True)

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 25,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline.

        ``prompt`` is ignored (SVD has no text). Guidance ramps over the frames from 1 to
        ``guidance_scale`` (the pipeline's min/max guidance; 3 by default).
        """
        pil = to_pil_8bit(image)
        height, width = self.resolution
        max_guidance = 3.0 if guidance_scale is None else guidance_scale
        output = self.pipe(
            image=pil,
            height=height,
            width=width,
            num_frames=self.num_frames,
            num_inference_steps=steps,
            min_guidance_scale=min(1.0, max_guidance),
            max_guidance_scale=max_guidance,
            fps=self.fps,
            motion_bucket_id=self.motion_bucket_id,
            noise_aug_strength=self.noise_aug_strength,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        )
        return output.frames[0].float().cpu().clamp(0, 1)
