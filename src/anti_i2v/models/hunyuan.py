"""HunyuanVideo-I2V, backed by diffusers' `HunyuanVideoImageToVideoPipeline`.

Conditioning, as the pipeline does it for ``image_condition_type="latent_concat"``
(the released ``hunyuanvideo-community/HunyuanVideo-I2V``, 33 input channels):

* VAE path: the photo (one pixel frame, in [-1, 1]) is encoded with the HunyuanVideo
  causal VAE (posterior mode, ``"argmax"``), scaled by ``scaling_factor`` and repeated
  over the latent frames (``pipe.prepare_latents``). The pipeline then zeroes latent
  frames 1.. IN PLACE (``image_latents[:, :, 1:] = 0``) and builds a one-channel mask
  (1 on latent frame 0). Here the repeated latents are multiplied by that mask instead,
  so autograd reaches the photo. `EncodedImage.latents` is ``cat([image_latents * mask,
  mask], 1)``, layout (B, C + 1, F_latent, h, w); the transformer sees
  ``cat([noisy, image_latents, mask], 1)`` (2 C + 1 channels).
* Text path: ``prompt_embeds`` (B, L, D) with ``prompt_attention_mask`` (B, L) and
  ``pooled_prompt_embeds`` (B, P). The released pipeline computes them in
  ``pipe.encode_prompt``: a LLaVA-Llama-3-8B (``text_encoder``, ``tokenizer``; the
  prompt template folds the image's LLaVA vision tokens into the sequence, hidden
  states of the third-to-last layer) and CLIP ViT-L text (``text_encoder_2``,
  ``tokenizer_2``; pooled output). That path is used by `condition` whenever the
  pipeline carries its text encoders; the image it shows LLaVA is
  `condition_image` (a black frame unless set), not differentiated (the pipeline
  reaches it through a PIL ``CLIPImageProcessor``). The tiny variant has no LLaVA/CLIP:
  a seeded embedding table over a tiny T5 tokenizer gives ``prompt_embeds`` and a
  seeded linear map of their mean gives ``pooled_prompt_embeds``. `use_prompt_embeds`
  accepts precomputed embeddings for either.
  There is no image-embedding path besides this (``image_embedding`` is None).

Training loss (flow matching, as for Wan): ``t`` in [0, num_train_timesteps) maps to
``s = t / num_train_timesteps``, shifted like the scheduler's sigmas,
``sigma = shift * s / (1 + (shift - 1) * s)`` (``shift`` of the
`FlowMatchEulerDiscreteScheduler` config). ``x_t = (1 - sigma) x0 + sigma noise`` over
all latent frames, the transformer runs at timestep ``sigma * num_train_timesteps`` (what
the pipeline feeds it), the target is the velocity ``noise - x0`` and the loss is the
MSE over all latent frames. The noise prediction (`DenoiserResult.eps`) is
``x_t + (1 - sigma) * v_pred``.

Block mapping: ``denoiser.<i>`` is ``transformer.transformer_blocks[i]`` (the dual-stream
blocks, 20 released) for ``i < N_dual`` and then
``transformer.single_transformer_blocks[i - N_dual]`` (the single-stream blocks, 40
released): the order in which the transformer's forward runs them (the token refiner
runs before both and is not exposed). Each block returns ``(hidden, encoder_hidden)``;
the tap records the video tokens. VAE taps are ``vae.down_blocks.<i>`` and
``vae.mid_block`` of the VAE encoder (recorded on the photo's own encoding).

Photo size: HunyuanVideo-I2V's reference code runs each photo at a size bucket
(``sizing="bucket"``, the default): buckets of 32-pixel patches whose count fits the base size
squared (960 for 720p, the released resolution's sqrt(720 x 1280)), sides at most 4:1; of
those the photo covers (aspect ratio at or below a portrait's, above a landscape's) the one of
nearest aspect ratio. The photo's short side is scaled to the bucket's short side and the
centre cropped, so a 3:4 portrait runs at 1088 x 832. ``sizing="fixed"``
stretches every photo to `resolution`, as the diffusers pipeline called without a size does.
Protection and `generate` both size each photo this way (`VideoModel.sized_for`).

Frames: the pipeline decodes the latents and drops the first 4 pixel frames (the
image-conditioned latent frame 0), so `generate` returns ``num_frames - 4`` frames
(5 for the tiny 9-frame variant, 125 for the released 129).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from PIL import Image
from torch import nn

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
from anti_i2v.models.diffusers_common import (
    drop_text_encoders,
    load_diffusers_pipeline,
    pipeline_image,
    place,
    standard_layers,
)
from anti_i2v.models.sampling import shifted_flow_sigmas
from anti_i2v.models.tiny_text import tiny_t5_tokenizer
from anti_i2v.photo import resize_short_side_and_crop

logger = logging.getLogger(__name__)

HUB_ID = "hunyuanvideo-community/HunyuanVideo-I2V"

# Released defaults (the HunyuanVideo-I2V model card / the pipeline's own defaults).
RELEASED_RESOLUTION = (720, 1280)
RELEASED_FRAMES = 129
RELEASED_GUIDANCE = 1.0  # true CFG off; guidance_embeds is False for the I2V release
RELEASED_MAX_SEQUENCE_LENGTH = 256
DROPPED_FRAMES = 4  # pixel frames the pipeline drops after decoding (latent frame 0)
SIZINGS = ("bucket", "fixed")
BUCKET_PATCH = 32  # the reference code's bucket stride, in pixels
BUCKET_MAX_RATIO = 4.0

# Tiny variant (diffusers' fast-test configs with two dual and two single blocks, so that
# the default deep block index 3 exists).
TINY_HEIGHT, TINY_WIDTH, TINY_FRAMES = 64, 64, 9
TINY_MAX_SEQUENCE_LENGTH = 16
_TINY_TRANSFORMER = {
    "in_channels": 2 * 4 + 1,  # noisy ++ image latents ++ 1 mask channel
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 10,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "patch_size": 1,
    "patch_size_t": 1,
    "guidance_embeds": False,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (2, 4, 4),
    "image_condition_type": "latent_concat",
}
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("HunyuanVideoDownBlock3D",) * 4,
    "up_block_types": ("HunyuanVideoUpBlock3D",) * 4,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 4,
    "scaling_factor": 0.476986,
    "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4,
    "mid_block_add_attention": True,
}
_TINY_SHIFT = 7.0


class TinyTextEncoder(nn.Module):
    """Stand-in for LLaVA + CLIP in the tiny variant: an embedding table and a pooled projection."""

    def __init__(self, vocab_size: int, dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pool = nn.Linear(dim, pooled_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(-1).float()
        embeds = self.embed(ids) * m
        pooled = self.pool(embeds.sum(1) / m.sum(1).clamp_min(1))
        return embeds, pooled


def tiny_pipeline(seed: int = 0) -> HunyuanVideoImageToVideoPipeline:
    """A HunyuanVideo-I2V pipeline with seeded random weights and no text encoders (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(**_TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo(**_TINY_VAE)
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=_TINY_SHIFT),
        text_encoder_2=None,
        tokenizer_2=None,
        image_processor=None,
    )


def tiny_text_path(seed: int = 0) -> tuple[object, TinyTextEncoder]:
    """The tiny variant's tokenizer and seeded `TinyTextEncoder`."""
    tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        encoder = TinyTextEncoder(
            len(tokenizer), _TINY_TRANSFORMER["text_embed_dim"], _TINY_TRANSFORMER["pooled_projection_dim"]
        )
    return tokenizer, encoder.eval().requires_grad_(False)


def load_pipeline(source: str, dtype: torch.dtype) -> HunyuanVideoImageToVideoPipeline:
    """Load a released pipeline from a hub id or a local folder in the diffusers layout."""
    return load_diffusers_pipeline(HunyuanVideoImageToVideoPipeline, source, dtype, "HunyuanVideo-I2V", HUB_ID, "tiny-hunyuan-i2v")


def size_buckets(base: int, patch: int = BUCKET_PATCH, max_ratio: float = BUCKET_MAX_RATIO) -> list[tuple[int, int]]:
    """HunyuanVideo-I2V's reference size buckets, in its order: for each count of patches along one
    side, the most along the other that keeps the patch count within ``(base / patch)^2``, where the
    sides are at most ``max_ratio`` apart; (height, width) in pixels."""
    budget = round((base / patch) ** 2)
    buckets = []
    first, second = budget, 1
    while first > 0:
        if max(first, second) / min(first, second) <= max_ratio:
            buckets.append((first * patch, second * patch))
        if (second + 1) * first <= budget:
            second += 1
        else:
            first -= 1
    return buckets


def nearest_bucket(height: int, width: int, base: int) -> tuple[int, int]:
    """The bucket (height, width) the reference code picks: among buckets no taller (for a portrait or
    square photo: aspect ratio at or below the photo's) or strictly less wide (for a landscape photo:
    above it) than the photo, the one whose aspect ratio (rounded to 5 decimals, as the reference
    compares them) is nearest; the first of equals. The photo then covers its bucket: the crop
    never pads."""
    aspect = height / width
    ratios = [(round(h / w, 5), (h, w)) for h, w in size_buckets(base)]
    fits = [(r, b) for r, b in ratios if (r <= aspect if aspect >= 1 else r > aspect)]
    return min(fits, key=lambda pair: abs(pair[0] - aspect))[1]


class HunyuanVideoI2V(VideoModel):
    """The `VideoModel` adapter for `HunyuanVideoImageToVideoPipeline` (latent_concat I2V).

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE and transformer run.
        dtype: compute dtype of the VAE and transformer.
        resolution: (height, width), multiples of 16; 720x1280 released.
        num_frames: pixel frames (129 released; must be 4k + 1).
        max_sequence_length: text tokens (256 released).
        text_path: (tokenizer, `TinyTextEncoder`) for pipelines without text encoders.
        gradient_checkpointing: recompute transformer blocks in backward to save memory.
        sizing: "bucket" (each photo cropped to its size bucket, `nearest_bucket`, as the reference
            code runs it; ``resolution`` sets the base size) or "fixed" (every photo stretched to ``resolution``).
    """

    family = "hunyuan"

    def __init__(
        self,
        pipe: HunyuanVideoImageToVideoPipeline,
        name: str = "hunyuan-i2v",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: tuple[int, int] = RELEASED_RESOLUTION,
        num_frames: int = RELEASED_FRAMES,
        max_sequence_length: int = RELEASED_MAX_SEQUENCE_LENGTH,
        text_path: tuple[object, TinyTextEncoder] | None = None,
        gradient_checkpointing: bool = False,
        sizing: str = "bucket",
    ) -> None:
        if sizing not in SIZINGS:
            raise ModelError(f"unknown sizing '{sizing}'; choose from {', '.join(SIZINGS)}")
        if pipe.transformer is None or pipe.transformer.config.image_condition_type != "latent_concat":
            raise ModelError(
                f"'{name}' is not a latent_concat HunyuanVideo-I2V checkpoint (token_replace and T2V "
                f"are not served by this adapter); use {HUB_ID}"
            )
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.vae = place(pipe.vae, self._device, dtype)
        self.transformer = place(pipe.transformer, self._device, dtype)
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            if enc is not None:
                enc.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.latent_channels = self.vae.config.latent_channels
        if self.transformer.config.in_channels != 2 * self.latent_channels + 1:
            raise ModelError(
                f"'{name}' does not take noisy + image latents + mask ({self.transformer.config.in_channels} "
                f"channels); use {HUB_ID}"
            )
        self.text_path = text_path
        self.sizing = sizing
        self.size_multiple = pipe.vae_scale_factor_spatial * self.transformer.config.patch_size
        self.set_resolution(resolution)
        # the bucket base size: the square root of the configured area, to 16 pixels (960 for 720x1280)
        self.bucket_base = round(math.sqrt(self.resolution[0] * self.resolution[1]) / 16) * 16
        self.num_frames = num_frames
        self.max_sequence_length = max_sequence_length
        sched = self.scheduler.config
        self.num_train_timesteps = sched.get("num_train_timesteps", 1000)
        self.shift = float(sched.get("shift", None) or 1.0)
        self.latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        self.condition_image: Image.Image | None = None  # what LLaVA sees in `condition` (real path)
        self._prompt: str | None = None
        self._prompt_embeds: torch.Tensor | None = None
        self._pooled_embeds: torch.Tensor | None = None
        self._attention_mask: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> HunyuanVideoI2V:
        """The ``tiny-hunyuan-i2v`` variant (64x64, 9 frames): demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", "tiny-hunyuan-i2v")
        kwargs.setdefault("resolution", (TINY_HEIGHT, TINY_WIDTH))
        kwargs.setdefault("num_frames", TINY_FRAMES)
        kwargs.setdefault("max_sequence_length", TINY_MAX_SEQUENCE_LENGTH)
        kwargs.setdefault("text_path", tiny_text_path(seed))
        return cls(tiny_pipeline(seed), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> HunyuanVideoI2V:
        """Load released weights (hub id or local diffusers folder); 720x1280, 129 frames by default."""
        kwargs.setdefault("name", "hunyuan-i2v")
        model = cls(load_pipeline(source, dtype), device=device, dtype=dtype, **kwargs)
        model.source = str(source)
        return model

    # --- the seam -------------------------------------------------------------------

    @property
    def crops_photo(self) -> bool:
        """Under bucket sizing the photo is cropped to its bucket (see `prepare_image`)."""
        return self.sizing == "bucket"

    def size_summary(self) -> str:
        """The frames and, under bucket sizing, the buckets' base size."""
        if self.sizing == "fixed":
            return super().size_summary()
        return f"{self.num_frames} frames, each photo cropped to its size bucket of base {self.bucket_base}"

    def resolution_for(self, height: int, width: int) -> tuple[int, int]:
        """The bucket the reference code runs a ``height x width`` photo at, else the configured `resolution`."""
        return nearest_bucket(height, width, self.bucket_base) if self.sizing == "bucket" else tuple(self.resolution)


    def prepare_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """Under bucket sizing the short side scaled to the bucket's and the centre cropped, as the
        reference code prepares it; else stretched, as the diffusers pipeline does."""
        if self.crops_photo:
            return resize_short_side_and_crop(rgb, *self.resolution)
        return super().prepare_image(rgb)

    @property
    def _n_dual(self) -> int:
        return len(self.transformer.transformer_blocks)

    def layers(self) -> ModelLayers:
        """``denoiser.<i>``: dual-stream blocks, then single-stream blocks; VAE down blocks and mid block."""
        return standard_layers(self._n_dual + len(self.transformer.single_transformer_blocks), self.vae.encoder)

    def module(self, name: str) -> nn.Module:
        try:
            if name.startswith(DENOISER_PREFIX):
                i = int(name[len(DENOISER_PREFIX) :])
                if i < 0:
                    raise IndexError(i)
                if i < self._n_dual:
                    return self.transformer.transformer_blocks[i]
                return self.transformer.single_transformer_blocks[i - self._n_dual]
            if name.startswith(VAE_PREFIX):
                return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
        except (ValueError, IndexError, AttributeError):
            pass
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """Encode ``prompt`` once and cache ``prompt_embeds``, the attention mask and the pooled embedding.

        Real weights: ``pipe.encode_prompt`` (LLaVA-Llama with `condition_image`, CLIP text).
        Tiny variant: the seeded `TinyTextEncoder` over the tiny tokenizer.
        """
        if prompt == self._prompt:
            return
        if self.text_path is not None:
            embeds, mask, pooled = self._encode_tiny(prompt)
        elif self.pipe.text_encoder is not None and self.pipe.text_encoder_2 is not None:
            embeds, mask, pooled = self._encode_released(prompt)
        else:
            raise ModelError(
                "the text encoders were released (or never loaded); create the model again to use "
                "another prompt, or pass precomputed embeddings with use_prompt_embeds"
            )
        self._prompt = prompt
        self._set(embeds, mask, pooled)

    @torch.no_grad()
    def _encode_tiny(self, prompt: str):
        tokenizer, encoder = self.text_path
        inputs = tokenizer(
            [prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        embeds, pooled = encoder(inputs.input_ids, inputs.attention_mask)
        return embeds, inputs.attention_mask, pooled

    @torch.no_grad()
    def _encode_released(self, prompt: str):
        text_device = self.text_device()
        for enc in (self.pipe.text_encoder, self.pipe.text_encoder_2):
            enc.to(text_device)
        height, width = self.resolution
        image = self.condition_image or Image.new("RGB", (width, height), 0)
        embeds, pooled, mask = self.pipe.encode_prompt(
            image=image, prompt=prompt, device=text_device, max_sequence_length=self.max_sequence_length
        )
        return embeds, mask, pooled

    def _set(self, embeds: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> None:
        self._prompt_embeds = embeds.to(self._device, self._dtype)
        self._attention_mask = mask.to(self._device, self._dtype)
        self._pooled_embeds = pooled.to(self._device, self._dtype)

    def use_prompt_embeds(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        label: str = "",
    ) -> None:
        """Condition on precomputed ``prompt_embeds`` (1, L, D) and ``pooled_prompt_embeds`` (1, P)."""
        self._prompt = label
        mask = attention_mask if attention_mask is not None else torch.ones(embeds.shape[:2])
        self._set(embeds, mask, pooled)

    def release_text_encoder(self) -> None:
        """Drop LLaVA-Llama (about 16 GB in bf16) and CLIP text, or the tiny text path, once a prompt is cached."""
        self.text_path = None
        drop_text_encoders(self.pipe, self._device, "text_encoder", "text_encoder_2")

    def _require_condition(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._prompt_embeds is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        return self._prompt_embeds, self._attention_mask, self._pooled_embeds

    def frame_mask(self, batch: int = 1) -> torch.Tensor:
        """The pipeline's mask (B, 1, F_latent, h, w): 1 on latent frame 0, 0 elsewhere."""
        h, w = (s // self.pipe.vae_scale_factor_spatial for s in self.resolution)
        mask = torch.zeros(batch, 1, self.latent_frames, h, w, device=self._device, dtype=self._dtype)
        mask[:, :, 0] = 1
        return mask

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """``cat([image_latents * mask, mask], 1)`` (B, C + 1, F_latent, h, w), differentiably.

        ``generator`` is unused: the pipeline encodes the photo with the posterior mode.
        """
        pixels = x.to(self._device, self._dtype) * 2 - 1  # the video processor's [-1, 1]
        height, width = self.resolution
        c = self.latent_channels
        shape = (1, c, self.latent_frames, height // self.pipe.vae_scale_factor_spatial,
                 width // self.pipe.vae_scale_factor_spatial)
        with FeatureTaps({n: self.module(n) for n in taps}).capture(first_only=True) as feats:
            latents = []
            for image in pixels.split(1):
                # zero `latents` keep the global RNG untouched
                _, image_latents = self.pipe.prepare_latents(
                    image, 1, c, height, width, self.num_frames, dtype=self._dtype, device=self._device,
                    latents=pixels.new_zeros(shape), image_condition_type="latent_concat",
                )
                latents.append(image_latents)
        mask = self.frame_mask(pixels.shape[0])
        cond = torch.cat([torch.cat(latents) * mask, mask], dim=1)
        return EncodedImage(cond, dict(feats))

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The scaled latent of the photo: latent frame 0 of the image-latent channels."""
        return encoded.latents[:, : self.latent_channels, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The image latent repeated over the latent frames: (B, C, F_latent, h, w)."""
        return latent.unsqueeze(2).expand(-1, -1, self.latent_frames, -1, -1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Scaled posterior-mode latents (1, C, F_latent, h, w) of frames (F, 3, H, W) in [0, 1]."""
        pixels = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents * self.pipe.vae_scaling_factor).detach()

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """Flow-matching noise level of integer timesteps ``t``: ``s = t / N`` shifted by ``shift``."""
        return shifted_flow_sigmas(t, self.shift, self.num_train_timesteps)

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
        """One transformer pass on ``(1 - sigma) x0 + sigma noise``; stops after the deepest tap
        unless the loss or the noise prediction is wanted."""
        embeds, mask, pooled = self._require_condition()
        batch = image.latents.shape[0]
        sigma = self.sigmas(t.to(self._device).reshape(-1)).expand(batch)
        s = sigma.view(-1, 1, 1, 1, 1)
        video_latents = video_latents.to(self._device, self._dtype).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, self._dtype).expand_as(video_latents)
        noisy = ((1 - s) * video_latents.float() + s * noise.float()).to(self._dtype)
        model_input = torch.cat([noisy, image.latents.to(self._dtype)], dim=1)
        timestep = (sigma * self.num_train_timesteps).to(self._dtype)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self.transformer(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=embeds.expand(batch, -1, -1),
                encoder_attention_mask=mask.expand(batch, -1),
                pooled_projections=pooled.expand(batch, -1),
                return_dict=False,
            ),
            taps,
            need_output,
        )
        result = DenoiserResult(feats)
        if need_output:
            prediction = output[0].float()
            if with_loss:
                result.loss = F.mse_loss(prediction, noise.float() - video_latents.float())
            if with_eps:
                result.eps = noisy.float() + (1 - s) * prediction
                result.x0 = noisy.float() - s * prediction
        return result

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline.

        Returns ``num_frames - 4`` frames: the pipeline drops the 4 pixel frames of latent
        frame 0. ``guidance_scale`` > 1 turns on true CFG against the empty prompt
        (released default 1.0: off).
        """
        with self.sized_for(*image.shape[-2:]):
            return self._generate(image, prompt, steps, seed, guidance_scale)

    def _generate(self, image: torch.Tensor, prompt: str, steps: int, seed: int, guidance_scale: float | None
                  ) -> torch.Tensor:
        self.condition(prompt)
        pil = pipeline_image(self, image)
        height, width = self.resolution
        scale = RELEASED_GUIDANCE if guidance_scale is None else guidance_scale
        extra = {}
        if scale > 1:
            saved = (self._prompt, self._prompt_embeds, self._attention_mask, self._pooled_embeds)
            self._prompt = None
            self.condition("")
            extra = {"negative_prompt_embeds": self._prompt_embeds,
                         "negative_prompt_attention_mask": self._attention_mask,
                         "negative_pooled_prompt_embeds": self._pooled_embeds, "true_cfg_scale": scale}
            self._prompt, self._prompt_embeds, self._attention_mask, self._pooled_embeds = saved
        output = self.pipe(
            image=pil,
            prompt_embeds=self._prompt_embeds,
            prompt_attention_mask=self._attention_mask,
            pooled_prompt_embeds=self._pooled_embeds,
            height=height,
            width=width,
            num_frames=self.num_frames,
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
            **extra,
        )
        return output.frames[0].float().cpu()
