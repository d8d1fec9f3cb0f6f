"""Wan 2.1 image-to-video (480P / 720P), backed by diffusers' `WanImageToVideoPipeline`.

Conditioning, as the pipeline does it, on two paths:

* VAE path: the condition video ``[image, 0, ..., 0]`` (F pixel frames) is encoded
  with the Wan VAE (posterior mode, ``sample_mode="argmax"``), normalised with the
  VAE's ``latents_mean`` / ``latents_std``, and prefixed with 4 mask channels (1 on the
  first pixel frame, 0 elsewhere, folded to latent frames). This 20-channel tensor
  (``pipe.prepare_latents``'s condition) is concatenated on channels to the 16 noisy
  latent channels. It is `EncodedImage.latents`, layout (B, 4 + C, F_latent, h, w).
* Image-embedding path: CLIP ViT-H vision tower, ``hidden_states[-2]`` (the
  penultimate layer's tokens), fed to the transformer as ``encoder_hidden_states_image``.
  It is `EncodedImage.context` and `image_embedding`. The pipeline reaches it through
  a PIL ``CLIPImageProcessor``; here it is rebuilt in torch (bicubic resize of the short
  side to the CLIP size, centre crop, CLIP mean/std) so that it is differentiable.

Training loss (flow matching, the rectified-flow objective Wan was trained with):
``t`` in [0, num_train_timesteps) maps to ``s = t / num_train_timesteps`` and is shifted
as the scheduler's training sigmas are, ``sigma = shift * s / (1 + (shift - 1) * s)``
(``shift`` from the scheduler config: ``shift`` of `FlowMatchEulerDiscreteScheduler`,
``flow_shift`` of the `UniPCMultistepScheduler` the released 2.1 repos ship; 3.0 for
480P, 5.0 for 720P). Then ``x_t = (1 - sigma) * x0 + sigma * noise``, the transformer is
called at timestep ``sigma * num_train_timesteps`` (what the pipeline feeds it), its
target is the velocity ``noise - x0``, and the loss is the MSE. The noise prediction
(`DenoiserResult.eps`) is ``x_t + (1 - sigma) * v_pred``.

Block mapping: ``denoiser.<i>`` is ``transformer.blocks[i]`` (40 for the 14B models).
The Wan VAE encoder exposes ``down_blocks`` (residual and resample blocks in forward
order) and a ``mid_block``; they are ``vae.down_blocks.<i>`` and ``vae.mid_block``. The
Wan VAE encodes the video causally in chunks (frame 0, then 4 frames at a time); a VAE
tap records the first chunk, i.e. the features of the photo itself.

Wan 2.2: diffusers runs Wan 2.2 I2V-A14B with this same pipeline (two experts,
``transformer`` for high noise and ``transformer_2`` below ``boundary_ratio``, and no CLIP
image encoder) and TI2V-5B with ``expand_timesteps=True`` (a 48-channel VAE, the image
latent written into frame 0 instead of concatenated). This adapter refuses both with
a `ModelError`: their conditioning and expert switch are not implemented here yet.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

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
from anti_i2v.models.diffusers_common import load_diffusers_pipeline, place, to_pil_8bit
from anti_i2v.models.tiny_text import tiny_t5_tokenizer

logger = logging.getLogger(__name__)

HUB_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
HUB_ID_720P = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"

# Released defaults (the Wan 2.1 I2V model cards / generate.py): 81 frames at 16 fps.
RELEASED_480P = (480, 832)
RELEASED_720P = (720, 1280)
RELEASED_FRAMES = 81
RELEASED_GUIDANCE = 5.0
RELEASED_MAX_SEQUENCE_LENGTH = 512

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny variant (configs from diffusers' own fast test of the pipeline, 4 blocks).
TINY_HEIGHT, TINY_WIDTH, TINY_FRAMES = 64, 64, 9
TINY_MAX_SEQUENCE_LENGTH = 16
_TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
_TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=36,  # 16 noisy + 4 mask + 16 image-condition latents
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
    image_dim=4,  # CLIP vision hidden_size
)
_TINY_CLIP = dict(
    hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
    intermediate_size=16, patch_size=1,
)
_TINY_SHIFT = 7.0


def _tiny_umt5_encoder(vocab_size: int, d_model: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, is_encoder_decoder=False, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _clip_processor(size: int):
    """A CLIP image processor built in code (the PIL backend: torchvision is not required)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """A complete Wan 2.1 I2V pipeline with seeded random weights (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**_TINY_VAE)
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**_TINY_CLIP)).eval()
        tokenizer = tiny_t5_tokenizer()
        torch.manual_seed(seed + 3)
        text_encoder = _tiny_umt5_encoder(len(tokenizer), _TINY_TRANSFORMER["text_dim"])
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=_TINY_SHIFT),
        image_processor=_clip_processor(_TINY_CLIP["image_size"]),
        image_encoder=image_encoder,
        transformer=transformer,
    )


def load_pipeline(source: str, dtype: torch.dtype) -> WanImageToVideoPipeline:
    """Load a released pipeline from a hub id or a local folder in the diffusers layout."""
    pipe = load_diffusers_pipeline(WanImageToVideoPipeline, source, dtype, "Wan-I2V", HUB_ID, "tiny-wan-i2v")
    if pipe.image_encoder is not None and next(pipe.image_encoder.parameters()).dtype != torch.float32:
        pipe.image_encoder.to(torch.float32)  # the released repos keep CLIP in fp32
    return pipe


def _prompt_clean(text: str) -> str:
    """The pipeline's ``prompt_clean`` (ftfy fix when installed, HTML unescape, whitespace)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanI2V(VideoModel):
    """The `VideoModel` adapter for `WanImageToVideoPipeline` (Wan 2.1 I2V).

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE, CLIP and transformer run.
        dtype: compute dtype of the VAE and transformer (bf16 on GPU for 14B); CLIP
            keeps its own dtype.
        resolution: (height, width); the released 480P default is 480x832.
        num_frames: pixel frames (81 released; must be 4k + 1).
        max_sequence_length: text tokens (512 released).
        gradient_checkpointing: recompute transformer blocks in backward to save memory.
    """

    def __init__(
        self,
        pipe: WanImageToVideoPipeline,
        name: str = "wan-i2v",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: tuple[int, int] = RELEASED_480P,
        num_frames: int = RELEASED_FRAMES,
        max_sequence_length: int = RELEASED_MAX_SEQUENCE_LENGTH,
        gradient_checkpointing: bool = False,
    ) -> None:
        if pipe.config.expand_timesteps or pipe.transformer_2 is not None:
            raise ModelError(
                f"'{name}' is a Wan 2.2 checkpoint (two experts or expand_timesteps); this adapter "
                f"serves the Wan 2.1 I2V layout ({HUB_ID})"
            )
        if pipe.transformer is None or pipe.image_encoder is None or pipe.transformer.config.image_dim is None:
            raise ModelError(
                f"'{name}' is not a Wan 2.1 image-to-video checkpoint (no CLIP image encoder / image "
                f"cross-attention); use {HUB_ID} or a copy of it"
            )
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.vae = place(pipe.vae, self._device, dtype)
        self.transformer = place(pipe.transformer, self._device, dtype)
        self.image_encoder = pipe.image_encoder.to(self._device).eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        if pipe.text_encoder is not None:
            pipe.text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

        cfg = self.transformer.config
        if cfg.in_channels != 2 * self.vae.config.z_dim + pipe.vae_scale_factor_temporal:
            raise ModelError(
                f"'{name}' is not an image-to-video Wan checkpoint (its transformer takes "
                f"{cfg.in_channels} channels, not noisy + mask + image latents); use {HUB_ID}"
            )
        self.resolution = tuple(resolution)
        self.num_frames = num_frames
        self.max_sequence_length = max_sequence_length
        sched = self.scheduler.config
        self.num_train_timesteps = sched.get("num_train_timesteps", 1000)
        self.shift = float(sched.get("shift", None) or sched.get("flow_shift", None) or 1.0)
        self.latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        size = self.image_encoder.config.image_size
        proc = pipe.image_processor
        self._clip_size = size
        self._clip_mean = torch.tensor(getattr(proc, "image_mean", None) or _CLIP_MEAN).view(1, 3, 1, 1)
        self._clip_std = torch.tensor(getattr(proc, "image_std", None) or _CLIP_STD).view(1, 3, 1, 1)
        z = self.vae.config.z_dim
        self._lat_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(self._device, dtype)
        self._lat_std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(self._device, dtype)
        self._prompt: str | None = None
        self._prompt_embeds: torch.Tensor | None = None
        self._negative_embeds: torch.Tensor | None = None

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", **kwargs) -> WanI2V:
        """The ``tiny-wan-i2v`` variant (64x64, 9 frames): demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", "tiny-wan-i2v")
        kwargs.setdefault("resolution", (TINY_HEIGHT, TINY_WIDTH))
        kwargs.setdefault("num_frames", TINY_FRAMES)
        kwargs.setdefault("max_sequence_length", TINY_MAX_SEQUENCE_LENGTH)
        return cls(tiny_pipeline(seed), device=device, dtype=torch.float32, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> WanI2V:
        """Load released weights from a hub id or a local folder (diffusers layout).

        The resolution defaults to the release's: 720x1280 when ``source`` names a 720P
        model, else 480x832; 81 frames.
        """
        kwargs.setdefault("resolution", RELEASED_720P if "720p" in str(source).lower() else RELEASED_480P)
        kwargs.setdefault("name", "wan-i2v")
        model = cls(load_pipeline(source, dtype), device=device, dtype=dtype, **kwargs)
        model.source = str(source)
        return model

    # --- the seam -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def layers(self) -> ModelLayers:
        """``denoiser.0..N-1`` (transformer blocks) and the VAE encoder's down blocks and mid block."""
        n_blocks = len(self.transformer.blocks)
        n_down = len(self.vae.encoder.down_blocks)
        return ModelLayers(
            denoiser=[f"{DENOISER_PREFIX}{i}" for i in range(n_blocks)],
            vae_encoder=[f"{VAE_PREFIX}down_blocks.{i}" for i in range(n_down)] + [f"{VAE_PREFIX}mid_block"],
        )

    def module(self, name: str) -> torch.nn.Module:
        try:
            if name.startswith(DENOISER_PREFIX):
                return self.transformer.blocks[int(name[len(DENOISER_PREFIX) :])]
            if name.startswith(VAE_PREFIX):
                return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
        except (ValueError, IndexError, AttributeError):
            pass
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """Encode ``prompt`` and the empty negative prompt with UMT5 once and cache them.

        Mirrors the pipeline's ``_get_t5_prompt_embeds`` (padded to ``max_sequence_length``,
        zeros past the prompt's tokens); ftfy is used for cleaning only when installed.
        """
        if prompt == self._prompt:
            return
        if self.pipe.text_encoder is None:
            raise ModelError(
                "the text encoder was released after encoding the first prompt; "
                "create the model again to use another prompt"
            )
        text_device = self._device if self._device.type == "cuda" else torch.device("cpu")
        self.pipe.text_encoder.to(text_device)
        pos, neg = (self._encode_text(p, text_device) for p in (prompt, ""))
        self._prompt = prompt
        self._prompt_embeds = pos.to(self._device, self._dtype)
        self._negative_embeds = neg.to(self._device, self._dtype)

    @torch.no_grad()
    def _encode_text(self, prompt: str, device: torch.device) -> torch.Tensor:
        length = self.max_sequence_length
        inputs = self.pipe.tokenizer(
            [_prompt_clean(prompt)], padding="max_length", max_length=length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        embeds = self.pipe.text_encoder(ids, mask).last_hidden_state
        n = int(mask.gt(0).sum())
        out = torch.zeros_like(embeds)
        out[:, :n] = embeds[:, :n]
        return out

    def use_prompt_embeds(self, embeds: torch.Tensor, negative: torch.Tensor | None = None, label: str = "") -> None:
        """Condition on precomputed UMT5 embeddings (1, L, D) instead of a prompt string."""
        self._prompt = label
        self._prompt_embeds = embeds.to(self._device, self._dtype)
        self._negative_embeds = (negative if negative is not None else torch.zeros_like(embeds)).to(
            self._device, self._dtype
        )

    def release_text_encoder(self) -> None:
        """Drop the UMT5-XXL encoder (about 11 GB in bf16) once a prompt is cached."""
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def _require_condition(self) -> torch.Tensor:
        if self._prompt_embeds is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        return self._prompt_embeds

    def _clip_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """``CLIPImageProcessor`` in torch: short side to the CLIP size (bicubic), centre crop, normalise."""
        enc_dtype = next(self.image_encoder.parameters()).dtype
        x = x.to(self._device, torch.float32)
        h, w = x.shape[-2:]
        size = self._clip_size
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
        x = (x - self._clip_mean.to(x.device)) / self._clip_std.to(x.device)
        return x.to(enc_dtype)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP penultimate hidden states (B, tokens, D) of ``x`` in [0, 1], differentiable."""
        out = self.image_encoder(pixel_values=self._clip_pixels(x), output_hidden_states=True)
        return out.hidden_states[-2]

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """The pipeline's condition (B, 4 + C, F_latent, h, w) and the CLIP tokens, differentiably.

        ``generator`` is unused: Wan encodes the condition with the posterior mode.
        """
        pixels = x.to(self._device, torch.float32) * 2 - 1  # the video processor's [-1, 1]
        height, width = self.resolution
        z = self.vae.config.z_dim
        with FeatureTaps({n: self.module(n) for n in taps}).capture(first_only=True) as feats:
            conds = []
            # zero `latents` keep the global RNG untouched; one image at a time, because
            # prepare_latents repeats its VAE output batch_size times
            shape = (1, z, self.latent_frames, height // self.pipe.vae_scale_factor_spatial,
                     width // self.pipe.vae_scale_factor_spatial)
            for image in pixels.split(1):
                _, cond = self.pipe.prepare_latents(
                    image, 1, z, height, width, self.num_frames, dtype=self._dtype, device=self._device,
                    latents=pixels.new_zeros(shape),
                )
                conds.append(cond.to(self._dtype))
        context = self.image_embedding(x).to(self._dtype)
        return EncodedImage(torch.cat(conds), dict(feats), context=context)

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The normalised latent of frame 0 (the photo), after the 4 mask channels."""
        return encoded.latents[:, self.pipe.vae_scale_factor_temporal :, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The image latent repeated over the latent frames: (B, C, F_latent, h, w)."""
        return latent.unsqueeze(2).expand(-1, -1, self.latent_frames, -1, -1)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised posterior-mode latents (1, C, F_latent, h, w) of frames (F, 3, H, W) in [0, 1]."""
        pixels = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return ((latents - self._lat_mean) / self._lat_std).detach()

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """Flow-matching noise level of integer timesteps ``t``: ``s = t / N`` shifted by ``shift``."""
        s = t.float() / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

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
        prompt_embeds = self._require_condition()
        if image.context is None:
            raise ModelError("Wan 2.1 I2V needs the CLIP image tokens (EncodedImage.context)")
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
                encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                encoder_hidden_states_image=image.context.to(self._dtype).expand(batch, -1, -1),
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
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline (guidance 5 by default)."""
        self.condition(prompt)
        pil = to_pil_8bit(image)
        height, width = self.resolution
        output = self.pipe(
            image=pil,
            prompt_embeds=self._prompt_embeds,
            negative_prompt_embeds=self._negative_embeds,
            height=height,
            width=width,
            num_frames=self.num_frames,
            num_inference_steps=steps,
            guidance_scale=RELEASED_GUIDANCE if guidance_scale is None else guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
        )
        return output.frames[0].float().cpu()
