"""LTX-Video image-to-video, backed by diffusers' `LTXImageToVideoPipeline`.

Conditioning, as the pipeline does it (``prepare_latents``): the photo alone (one pixel
frame, [-1, 1]) is encoded with the LTX VAE (the posterior is sampled with the
pipeline's generator; here with ``generator``, or its mode when none is given),
normalised with the VAE's ``latents_mean`` / ``latents_std`` and written into latent
frame 0 of the video latents (the conditioning mask ``cmask`` is 1 on frame 0, 0
elsewhere). There is no channel concatenation and no image encoder: the transformer
sees the photo only as the clean first frame, whose tokens get timestep 0 through
``timestep = t * (1 - cmask)``.

Layouts: `EncodedImage.latents` is the unpacked video-shaped condition (B, C, F_latent,
h, w): the photo's normalised latent in frame 0, zeros elsewhere. Video latents
(`encode_video`, `still_video`, the noise) are unpacked (B, C, F_latent, h, w) too;
`denoise` packs them into the transformer's tokens (``pipe._pack_latents``).

Training loss (flow matching, the rectified-flow objective LTX-Video was trained with):
``t`` in [0, num_train_timesteps) maps to ``s = t / N``; it is shifted as the scheduler
shifts its sigmas: the released scheduler uses dynamic shifting, ``sigma = e^mu / (e^mu
+ 1/s - 1)`` with ``mu`` from the video's token count (the pipeline's
``calculate_shift``); a static ``shift`` otherwise. ``x_t = (1 - sigma) x0 + sigma
noise`` on frames 1.., frame 0 stays the clean photo latent; the transformer is called
with per-token timestep ``sigma * N * (1 - cmask)``; the target is the velocity ``noise
- x0`` and the MSE is taken over frames 1.. only (the conditioning frame is not
denoised). The noise prediction (`DenoiserResult.eps`) is ``x_t + (1 - sigma) v_pred``
on frames 1.. and the drawn noise itself on frame 0 (zero residual there).

Block mapping: ``denoiser.<i>`` is ``transformer.transformer_blocks[i]`` (28 in the 2B
model). The VAE encoder's ``down_blocks`` and ``mid_block`` are ``vae.down_blocks.<i>``
and ``vae.mid_block`` (features of the photo's single-frame encoding).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXVideoTransformer3DModel,
)

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
    place,
    standard_layers,
    to_pil_8bit,
)
from anti_i2v.models.tiny_text import tiny_t5_encoder, tiny_t5_tokenizer

logger = logging.getLogger(__name__)

HUB_ID = "Lightricks/LTX-Video"

# Released defaults (the pipeline's __call__ defaults): 512x704, 161 frames at 25 fps,
# guidance 3, 128 text tokens.
RELEASED_RESOLUTION = (512, 704)
RELEASED_FRAMES = 161
RELEASED_FRAME_RATE = 25
RELEASED_GUIDANCE = 3.0
RELEASED_MAX_SEQUENCE_LENGTH = 128

# Tiny variant (configs from diffusers' own fast test of the pipeline).
TINY_HEIGHT, TINY_WIDTH, TINY_FRAMES = 64, 64, 9
TINY_MAX_SEQUENCE_LENGTH = 16
_TINY_TRANSFORMER = dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
    attention_head_dim=8, cross_attention_dim=32, num_layers=4, caption_channels=32,
)
_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
    decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
    upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
    patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
)


def tiny_pipeline(seed: int = 0) -> LTXImageToVideoPipeline:
    """A complete LTX-Video I2V pipeline with seeded random weights (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = LTXVideoTransformer3DModel(**_TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLLTXVideo(**_TINY_VAE)
        vae.use_framewise_encoding = False
        vae.use_framewise_decoding = False
        tokenizer = tiny_t5_tokenizer()
        torch.manual_seed(seed + 3)
        text_encoder = tiny_t5_encoder(len(tokenizer), _TINY_TRANSFORMER["caption_channels"])
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def load_pipeline(source: str, dtype: torch.dtype) -> LTXImageToVideoPipeline:
    """Load a released pipeline from a hub id or a local folder in the diffusers layout."""
    return load_diffusers_pipeline(LTXImageToVideoPipeline, source, dtype, "LTX-Video", HUB_ID, "tiny-ltx-i2v")


def _calculate_shift(seq_len: int, base_seq: int, max_seq: int, base_shift: float, max_shift: float) -> float:
    """The pipeline's ``calculate_shift``: ``mu`` linear in the token count."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + base_shift - m * base_seq


class LTXVideoI2V(VideoModel):
    """The `VideoModel` adapter for `LTXImageToVideoPipeline` (LTX-Video I2V).

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE and transformer run.
        dtype: compute dtype of the VAE and transformer (bf16 on GPU).
        resolution: (height, width), multiples of 32; the released default is 512x704.
        num_frames: pixel frames (161 released; must be 8k + 1).
        frame_rate: frames per second, for the RoPE interpolation scale (25 released).
        max_sequence_length: text tokens (128 released).
        gradient_checkpointing: recompute transformer blocks in backward to save memory.
    """

    family = "ltx"

    def __init__(
        self,
        pipe: LTXImageToVideoPipeline,
        name: str = "ltx-i2v",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: tuple[int, int] = RELEASED_RESOLUTION,
        num_frames: int = RELEASED_FRAMES,
        frame_rate: int = RELEASED_FRAME_RATE,
        max_sequence_length: int = RELEASED_MAX_SEQUENCE_LENGTH,
        gradient_checkpointing: bool = False,
    ) -> None:
        if pipe.transformer is None or pipe.vae is None:
            raise ModelError(f"'{name}' has no transformer or VAE; use {HUB_ID} or a copy of it")
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.vae = place(pipe.vae, self._device, dtype)
        self.transformer = place(pipe.transformer, self._device, dtype)
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        if pipe.text_encoder is not None:
            pipe.text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if self.transformer.config.in_channels != self.vae.config.latent_channels * (
            self.transformer.config.patch_size ** 2 * self.transformer.config.patch_size_t
        ):
            raise ModelError(f"'{name}' transformer and VAE channels do not match; use {HUB_ID}")

        self.resolution = tuple(resolution)
        self.num_frames = num_frames
        self.frame_rate = frame_rate
        self.max_sequence_length = max_sequence_length
        self.spatial_ratio = pipe.vae_spatial_compression_ratio
        self.temporal_ratio = pipe.vae_temporal_compression_ratio
        height, width = self.resolution
        if height % self.spatial_ratio or width % self.spatial_ratio or (num_frames - 1) % self.temporal_ratio:
            raise ModelError(
                f"'{name}' needs height and width that are multiples of {self.spatial_ratio} and "
                f"{self.temporal_ratio}k + 1 frames; got {height}x{width}, {num_frames} frames"
            )
        self.latent_frames = (num_frames - 1) // self.temporal_ratio + 1
        self.latent_height = height // self.spatial_ratio
        self.latent_width = width // self.spatial_ratio
        sched = self.scheduler.config
        self.num_train_timesteps = sched.get("num_train_timesteps", 1000)
        self.dynamic_shift = bool(sched.get("use_dynamic_shifting", False))
        self.shift = float(sched.get("shift", 1.0) or 1.0)
        seq = self.latent_frames * self.latent_height * self.latent_width
        self.mu = _calculate_shift(
            seq, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
            sched.get("base_shift", 0.5), sched.get("max_shift", 1.15),
        )
        self._prompt: str | None = None
        self._prompt_embeds: torch.Tensor | None = None
        self._prompt_mask: torch.Tensor | None = None
        self._negative_embeds: torch.Tensor | None = None
        self._negative_mask: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> LTXVideoI2V:
        """The ``tiny-ltx-i2v`` variant (64x64, 9 frames): demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", "tiny-ltx-i2v")
        kwargs.setdefault("resolution", (TINY_HEIGHT, TINY_WIDTH))
        kwargs.setdefault("num_frames", TINY_FRAMES)
        kwargs.setdefault("max_sequence_length", TINY_MAX_SEQUENCE_LENGTH)
        return cls(tiny_pipeline(seed), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> LTXVideoI2V:
        """Load released weights from a hub id or a local folder (diffusers layout); 512x704, 161 frames."""
        kwargs.setdefault("name", "ltx-i2v")
        model = cls(load_pipeline(str(source), dtype), device=device, dtype=dtype, **kwargs)
        model.source = str(source)
        return model

    # --- the seam -------------------------------------------------------------------

    def layers(self) -> ModelLayers:
        """``denoiser.0..N-1`` (transformer blocks) and the VAE encoder's down blocks and mid block."""
        return standard_layers(len(self.transformer.transformer_blocks), self.vae.encoder)

    def module(self, name: str) -> torch.nn.Module:
        try:
            if name.startswith(DENOISER_PREFIX):
                index = int(name[len(DENOISER_PREFIX) :])
                if index < 0:
                    raise IndexError(index)
                return self.transformer.transformer_blocks[index]
            if name.startswith(VAE_PREFIX):
                return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
        except (ValueError, IndexError, AttributeError):
            pass
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """Encode ``prompt`` and the empty negative prompt with T5 once and cache them (with
        their attention masks), as the pipeline's ``_get_t5_prompt_embeds`` does."""
        if prompt == self._prompt:
            return
        if self.pipe.text_encoder is None:
            raise ModelError(
                "the text encoder was released after encoding the first prompt; "
                "create the model again to use another prompt"
            )
        text_device = self.text_device()
        self.pipe.text_encoder.to(text_device)
        (pos, pos_mask), (neg, neg_mask) = (self._encode_text(p, text_device) for p in (prompt, ""))
        self._prompt = prompt
        self._prompt_embeds, self._prompt_mask = pos.to(self._device, self._dtype), pos_mask.to(self._device)
        self._negative_embeds, self._negative_mask = neg.to(self._device, self._dtype), neg_mask.to(self._device)

    @torch.no_grad()
    def _encode_text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.pipe.tokenizer(
            [prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        embeds = self.pipe.text_encoder(inputs.input_ids.to(device))[0]
        return embeds, inputs.attention_mask.bool()

    def use_prompt_embeds(
        self,
        embeds: torch.Tensor,
        negative: torch.Tensor | None = None,
        label: str = "",
        mask: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> None:
        """Condition on precomputed T5 embeddings (1, L, D) (all tokens attended unless ``mask``)."""
        negative = negative if negative is not None else torch.zeros_like(embeds)
        self._prompt = label
        self._prompt_embeds = embeds.to(self._device, self._dtype)
        self._negative_embeds = negative.to(self._device, self._dtype)
        self._prompt_mask = (mask if mask is not None else torch.ones(embeds.shape[:2])).bool().to(self._device)
        self._negative_mask = (
            negative_mask if negative_mask is not None else torch.ones(negative.shape[:2])
        ).bool().to(self._device)

    def release_text_encoder(self) -> None:
        """Drop the T5-XXL encoder (about 9 GB in bf16) once a prompt is cached."""
        drop_text_encoders(self.pipe, self._device, "text_encoder")

    def _require_condition(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prompt_embeds is None or self._prompt_mask is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        return self._prompt_embeds, self._prompt_mask

    def _normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._normalize_latents(latents, self.vae.latents_mean, self.vae.latents_std)

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """The photo's normalised latent in latent frame 0 of a (B, C, F_latent, h, w) tensor
        (zeros elsewhere), differentiably; the posterior is sampled with ``generator`` as the
        pipeline does, or its mode is used when ``generator`` is None."""
        pixels = (x.to(self._device, torch.float32) * 2 - 1).to(self._dtype)  # the video processor's [-1, 1]
        with FeatureTaps({n: self.module(n) for n in taps}).capture(first_only=True) as feats:
            dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist
            latent = dist.mode() if generator is None else dist.sample(generator)
        latent = self._normalize(latent.to(self._dtype))  # (B, C, 1, h, w)
        rest = latent.new_zeros(
            latent.shape[0], latent.shape[1], self.latent_frames - 1, latent.shape[3], latent.shape[4]
        )
        return EncodedImage(torch.cat([latent, rest], dim=2), dict(feats))

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The normalised latent of frame 0 (the photo): (B, C, h, w)."""
        return encoded.latents[:, :, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The image latent repeated over the latent frames: (B, C, F_latent, h, w)."""
        return latent.unsqueeze(2).expand(-1, -1, self.latent_frames, -1, -1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised posterior-mode latents (1, C, F_latent, h, w) of frames (F, 3, H, W) in [0, 1]."""
        pixels = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self._normalize(latents).detach()

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """Flow-matching noise level of integer timesteps ``t``, shifted as the scheduler shifts."""
        s = (t.float() / self.num_train_timesteps).clamp(1e-6, 1.0)
        if self.dynamic_shift:
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _cmask(self, batch: int) -> torch.Tensor:
        mask = torch.zeros(batch, 1, self.latent_frames, self.latent_height, self.latent_width, device=self._device)
        mask[:, :, 0] = 1.0
        return mask

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.transformer.config
        return self.pipe._pack_latents(latents, cfg.patch_size, cfg.patch_size_t)

    def _unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.transformer.config
        return self.pipe._unpack_latents(
            tokens, self.latent_frames // cfg.patch_size_t, self.latent_height // cfg.patch_size,
            self.latent_width // cfg.patch_size, cfg.patch_size, cfg.patch_size_t,
        )

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
        """One transformer pass on ``(1 - sigma) x0 + sigma noise`` with the clean photo latent
        in frame 0 (timestep 0 there); stops after the deepest tap unless the loss or the noise
        prediction is wanted."""
        prompt_embeds, prompt_mask = self._require_condition()
        batch = image.latents.shape[0]
        sigma = self.sigmas(t.to(self._device).reshape(-1)).expand(batch)
        s = sigma.view(-1, 1, 1, 1, 1)
        video_latents = video_latents.to(self._device, self._dtype).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, self._dtype).expand_as(video_latents)
        cmask = self._cmask(batch)
        noisy = (1 - s) * video_latents.float() + s * noise.float()
        model_input = image.latents.float() * cmask + noisy * (1 - cmask)  # as prepare_latents mixes
        tokens = self._pack(model_input.to(self._dtype))
        token_mask = self._pack(cmask).squeeze(-1)
        timestep = ((sigma * self.num_train_timesteps).unsqueeze(-1) * (1 - token_mask)).to(self._dtype)
        rope_scale = (self.temporal_ratio / self.frame_rate, self.spatial_ratio, self.spatial_ratio)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                timestep=timestep,
                encoder_attention_mask=prompt_mask.expand(batch, -1),
                num_frames=self.latent_frames,
                height=self.latent_height,
                width=self.latent_width,
                rope_interpolation_scale=rope_scale,
                return_dict=False,
            ),
            taps,
            need_output,
        )
        result = DenoiserResult(feats)
        if need_output:
            prediction = self._unpack(output[0].float())
            if with_loss:
                target = noise.float() - video_latents.float()
                result.loss = F.mse_loss(prediction[:, :, 1:], target[:, :, 1:])
            if with_eps:
                eps = model_input + (1 - s) * prediction
                result.eps = torch.cat([noise.float()[:, :, :1], eps[:, :, 1:]], dim=2)
                result.x0 = image.latents.float() * cmask + (model_input - s * prediction) * (1 - cmask)
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """The released guidance, which `generate` uses."""
        return torch.tensor(float(RELEASED_GUIDANCE))

    def denoise_unconditional(self, image, video_latents, t, noise):
        """The pipeline's guidance branch: the negative (empty) prompt and its mask, the same photo."""
        saved = self._require_condition()
        self._prompt_embeds, self._prompt_mask = self._negative_embeds, self._negative_mask
        try:
            return self.denoise(image, video_latents, t, noise, with_eps=True)
        finally:
            self._prompt_embeds, self._prompt_mask = saved

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline (guidance 3 by default)."""
        self.condition(prompt)
        pil = to_pil_8bit(image)
        height, width = self.resolution
        output = self.pipe(
            image=pil,
            prompt_embeds=self._prompt_embeds,
            prompt_attention_mask=self._prompt_mask,
            negative_prompt_embeds=self._negative_embeds,
            negative_prompt_attention_mask=self._negative_mask,
            height=height,
            width=width,
            num_frames=self.num_frames,
            frame_rate=self.frame_rate,
            num_inference_steps=steps,
            guidance_scale=RELEASED_GUIDANCE if guidance_scale is None else guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
        )
        return output.frames[0].float().cpu()

    def image_embedding(self, x: torch.Tensor) -> None:
        """None: LTX-Video sees the photo through its VAE only."""
        return
