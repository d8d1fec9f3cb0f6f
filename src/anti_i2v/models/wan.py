"""Wan image-to-video: 2.1 (480P / 720P) and 2.2 (I2V-A14B, TI2V-5B), backed by diffusers'
`WanImageToVideoPipeline`.

Wan 2.1 conditioning, as the pipeline does it, on two paths:

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

Photo size: the pipeline runs at whatever height and width it is given, and Wan's reference
code and diffusers' documented example choose them per photo (``sizing="area"``, the
default): the photo's aspect ratio kept within the release's pixel area (480 x 832 or
720 x 1280), each side rounded to a pixel and then down to the VAE stride times the patch
(16), as the diffusers example does (Wan's own script rounds the exact value down: 16 pixels
less on one side for about 6% of aspect ratios), and the photo resized to it, so a 3:4
portrait runs at 720 x 544 rather than 480 x 832. Wan 2.2 TI2V-5B's
reference takes whichever of the two roundings (to 32) keeps the aspect ratio closer, covers
it and crops the centre. ``sizing="fixed"`` stretches every photo to `resolution`, as a
pipeline called without height and width does. Protection and `generate` both size each
photo this way (`VideoModel.sized_for`).

Wan 2.2, as diffusers runs it with this same pipeline:

* I2V-A14B (``wan2.2-i2v``): two experts of the 2.1 layout without CLIP (the image enters
  through the VAE path only). ``transformer`` denoises timesteps at or above
  ``boundary_ratio * num_train_timesteps`` (0.9 released), ``transformer_2`` those below.
  Each pass goes to the expert of its timestep, and ``denoiser.<i>`` is block ``i`` of
  that expert: IRC and IRA then act on whichever expert denoises at the drawn timestep.
* TI2V-5B (``wan2.2-ti2v``, ``expand_timesteps=True``): a 48-channel VAE with 16x spatial
  compression; the photo's latent is not concatenated but written into latent frame 0,
  whose tokens get timestep 0 (the others the drawn one). `EncodedImage.latents` is that
  single-frame latent (B, C, 1, h, w); the loss covers the generated frames 1.. only, as
  frame 0 is given. No CLIP path either.
"""

from __future__ import annotations

import html
import logging
import math
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
from anti_i2v.models.diffusers_common import (
    CachedPromptEmbeds,
    drop_text_encoders,
    load_diffusers_pipeline,
    pipeline_image,
    place,
    standard_layers,
)
from anti_i2v.models.sampling import shifted_flow_sigmas
from anti_i2v.models.tiny_text import tiny_t5_tokenizer
from anti_i2v.photo import resize_to_fill

logger = logging.getLogger(__name__)

HUB_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
HUB_ID_720P = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
HUB_ID_22_A14B = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
HUB_ID_22_TI2V = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

# Released defaults (the Wan 2.1 I2V model cards / generate.py): 81 frames at 16 fps.
RELEASED_480P = (480, 832)
RELEASED_720P = (720, 1280)
RELEASED_FRAMES = 81
RELEASED_GUIDANCE = 5.0
RELEASED_MAX_SEQUENCE_LENGTH = 512
# Wan 2.2 (its generate.py configs): A14B guidance 3.5 for both experts, boundary 0.9;
# TI2V-5B 704x1280, 121 frames at 24 fps, guidance 5.
RELEASED_GUIDANCE_22_A14B = 3.5
RELEASED_BOUNDARY_22_A14B = 0.9
RELEASED_TI2V = (704, 1280)
RELEASED_TI2V_FRAMES = 121

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
# TI2V-5B layout: a 48-channel residual VAE that patchifies 2x2 (16x spatial compression)
_TINY_VAE_TI2V = dict(
    base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2, dim_mult=[1, 1, 1, 1],
    num_res_blocks=1, temperal_downsample=[False, True, True], scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)
SIZINGS = ("area", "fixed")
TINY_NAMES = {"2.1": "tiny-wan-i2v", "2.2-a14b": "tiny-wan2.2-i2v", "2.2-ti2v": "tiny-wan2.2-ti2v"}
TINY_VARIANTS = tuple(TINY_NAMES)


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


def tiny_pipeline(seed: int = 0, variant: str = "2.1") -> WanImageToVideoPipeline:
    """A complete Wan I2V pipeline with seeded random weights (no download).

    ``variant``: "2.1" (CLIP + concatenated condition), "2.2-a14b" (two experts, no CLIP)
    or "2.2-ti2v" (48-channel VAE, first-frame condition, ``expand_timesteps``).
    """
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny Wan variant '{variant}'; choose from {', '.join(TINY_VARIANTS)}")
    ti2v = variant == "2.2-ti2v"
    transformer_config = dict(_TINY_TRANSFORMER)
    if variant != "2.1":
        transformer_config["image_dim"] = None
    if ti2v:
        transformer_config.update(in_channels=48, out_channels=48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**transformer_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**(_TINY_VAE_TI2V if ti2v else _TINY_VAE))
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**_TINY_CLIP)).eval() if variant == "2.1" else None
        tokenizer = tiny_t5_tokenizer()
        torch.manual_seed(seed + 3)
        text_encoder = _tiny_umt5_encoder(len(tokenizer), _TINY_TRANSFORMER["text_dim"])
        torch.manual_seed(seed + 4)
        transformer_2 = WanTransformer3DModel(**transformer_config) if variant == "2.2-a14b" else None
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=_TINY_SHIFT),
        image_processor=_clip_processor(_TINY_CLIP["image_size"]) if image_encoder is not None else None,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=RELEASED_BOUNDARY_22_A14B if transformer_2 is not None else None,
        expand_timesteps=ti2v,
    )


def area_resolution(height: int, width: int, area: int, multiple: int) -> tuple[int, int]:
    """Wan 2.1's sizing as diffusers' documented example does it: the aspect ratio of ``height x width``
    kept within ``area`` pixels, each side rounded to a pixel and then down to ``multiple`` (and at
    least one multiple). Wan's own script rounds the exact side down instead."""
    aspect = height / width
    return (max(multiple, round(math.sqrt(area * aspect)) // multiple * multiple),
            max(multiple, round(math.sqrt(area / aspect)) // multiple * multiple))


def closest_aspect_resolution(height: int, width: int, area: int, multiple: int) -> tuple[int, int]:
    """Wan 2.2 TI2V's reference sizing: within ``area`` pixels, round one side down to ``multiple`` and
    fit the other under the area, both ways; keep the way whose aspect ratio is nearer the photo's."""
    aspect = width / height
    ideal_w = math.sqrt(area * aspect)
    ideal_h = area / ideal_w
    w1 = max(multiple, int(ideal_w // multiple * multiple))
    first = (max(multiple, int(area / w1 // multiple * multiple)), w1)
    h2 = max(multiple, int(ideal_h // multiple * multiple))
    second = (h2, max(multiple, int(area / h2 // multiple * multiple)))

    def mismatch(size: tuple[int, int]) -> float:
        ratio = size[1] / size[0]
        return max(aspect / ratio, ratio / aspect)

    return first if mismatch(first) < mismatch(second) else second


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


class WanI2V(CachedPromptEmbeds, VideoModel):
    """The `VideoModel` adapter for `WanImageToVideoPipeline`: Wan 2.1 I2V and Wan 2.2 I2V-A14B / TI2V-5B.

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE, CLIP and transformer(s) run.
        dtype: compute dtype of the VAE and transformers (bf16 on GPU); CLIP keeps its own dtype.
        resolution: (height, width); the released 480P default is 480x832. With ``sizing="area"`` it
            sets the pixel area each photo is sized within, else the size every photo is stretched to.
        num_frames: pixel frames (81 released; must be 4k + 1).
        max_sequence_length: text tokens (512 released).
        gradient_checkpointing: recompute transformer blocks in backward to save memory.
        sizing: "area" (each photo's aspect ratio within the resolution's area, as the reference
            code sizes it) or "fixed" (every photo stretched to ``resolution``).
    """

    family = "wan"

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
        sizing: str = "area",
    ) -> None:
        if sizing not in SIZINGS:
            raise ModelError(f"unknown sizing '{sizing}'; choose from {', '.join(SIZINGS)}")
        if pipe.transformer is None:
            raise ModelError(f"'{name}' has no (high-noise) transformer; load a complete Wan I2V checkpoint")
        self.expand_timesteps = bool(pipe.config.expand_timesteps)
        self.uses_clip = pipe.transformer.config.image_dim is not None
        if self.uses_clip and pipe.image_encoder is None:
            raise ModelError(
                f"'{name}' has image cross-attention but no CLIP image encoder; use {HUB_ID} or a complete copy of it"
            )
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.vae = place(pipe.vae, self._device, dtype)
        self.transformer = place(pipe.transformer, self._device, dtype)
        self.transformer_2 = place(pipe.transformer_2, self._device, dtype) if pipe.transformer_2 is not None else None
        self.image_encoder = (
            pipe.image_encoder.to(self._device).eval().requires_grad_(False) if self.uses_clip else None
        )
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        if pipe.text_encoder is not None:
            pipe.text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            for expert in self.experts:
                expert.enable_gradient_checkpointing()

        cfg = self.transformer.config
        z = self.vae.config.z_dim
        expected = z if self.expand_timesteps else 2 * z + pipe.vae_scale_factor_temporal
        if cfg.in_channels != expected:
            raise ModelError(
                f"'{name}' is not an image-to-video Wan checkpoint (its transformer takes {cfg.in_channels} "
                f"channels, not {expected}); use {HUB_ID}, {HUB_ID_22_A14B} or {HUB_ID_22_TI2V}"
            )
        self.sizing = sizing
        self.size_multiple = pipe.vae_scale_factor_spatial * cfg.patch_size[1]
        self.set_resolution(resolution)
        self.max_area = self.resolution[0] * self.resolution[1]
        self.num_frames = num_frames
        self.max_sequence_length = max_sequence_length
        sched = self.scheduler.config
        self.num_train_timesteps = sched.get("num_train_timesteps", 1000)
        self.shift = float(sched.get("shift", None) or sched.get("flow_shift", None) or 1.0)
        ratio = pipe.config.boundary_ratio if self.transformer_2 is not None else None
        # experts switch on the timestep fed to the transformer (sigma * N), as the pipeline's loop does
        self.boundary_timestep = None if ratio is None else ratio * self.num_train_timesteps
        self.latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        self._expert = self.transformer  # the expert whose blocks `module` names (set per pass)
        if self.uses_clip:
            proc = pipe.image_processor
            self._clip_size = self.image_encoder.config.image_size
            self._clip_mean = torch.tensor(getattr(proc, "image_mean", None) or _CLIP_MEAN).view(1, 3, 1, 1)
            self._clip_std = torch.tensor(getattr(proc, "image_std", None) or _CLIP_STD).view(1, 3, 1, 1)
        self._lat_mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(self._device, dtype)
        self._lat_std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(self._device, dtype)
        self._prompt: str | None = None
        self._prompt_embeds: torch.Tensor | None = None
        self._negative_embeds: torch.Tensor | None = None

    @property
    def released_guidance(self) -> float:
        """The classifier-free guidance of the release this checkpoint belongs to."""
        return RELEASED_GUIDANCE_22_A14B if self.transformer_2 is not None else RELEASED_GUIDANCE

    @property
    def experts(self) -> list[torch.nn.Module]:
        """The transformer(s): one for Wan 2.1 and TI2V-5B, high- then low-noise for A14B."""
        return [self.transformer] + ([self.transformer_2] if self.transformer_2 is not None else [])

    def expert_for(self, timestep: float) -> torch.nn.Module:
        """The transformer that denoises at ``timestep`` (the value fed to it, sigma * N)."""
        if self.boundary_timestep is None or timestep >= self.boundary_timestep:
            return self.transformer
        return self.transformer_2

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", variant: str = "2.1", dtype: torch.dtype = torch.float32, **kwargs) -> WanI2V:
        """A tiny variant (64x64, 9 frames) of the given layout: demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", TINY_NAMES.get(variant, "tiny-wan-i2v"))
        kwargs.setdefault("resolution", (TINY_HEIGHT, TINY_WIDTH))
        kwargs.setdefault("num_frames", TINY_FRAMES)
        kwargs.setdefault("max_sequence_length", TINY_MAX_SEQUENCE_LENGTH)
        return cls(tiny_pipeline(seed, variant), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        release: tuple[int, int] | None = None,
        **kwargs,
    ) -> WanI2V:
        """Load released weights from a hub id or a local folder (diffusers layout).

        Resolution and frames default to the release's: TI2V-5B 704x1280 and 121 frames;
        otherwise ``release`` (480x832 or 720x1280 for Wan 2.1 and 2.2 A14B; None: 720x1280 when
        ``source`` names a 720P model, else 480x832), and 81 frames. ``resolution`` overrides both.
        """
        pipe = load_pipeline(source, dtype)
        if pipe.config.expand_timesteps:
            kwargs.setdefault("resolution", RELEASED_TI2V)
            kwargs.setdefault("num_frames", RELEASED_TI2V_FRAMES)
        if release is None:
            release = RELEASED_720P if "720p" in str(source).lower() else RELEASED_480P
        kwargs.setdefault("resolution", release)
        kwargs.setdefault("name", "wan-i2v")
        model = cls(pipe, device=device, dtype=dtype, **kwargs)
        model.source = str(source)
        return model

    # --- the seam -------------------------------------------------------------------

    def resolution_for(self, height: int, width: int) -> tuple[int, int]:
        """The size the reference code runs a ``height x width`` photo at (``sizing="area"``), else
        the configured `resolution`."""
        if self.sizing == "fixed":
            return tuple(self.resolution)
        fit = closest_aspect_resolution if self.expand_timesteps else area_resolution
        return fit(height, width, self.max_area, self.size_multiple)

    def size_summary(self) -> str:
        """The frames and, under area sizing, the area each photo is sized within."""
        if self.sizing == "fixed":
            return super().size_summary()
        fit = "cropped to" if self.crops_photo else "at"
        height, width = self.resolution
        return f"{self.num_frames} frames, each photo {fit} its aspect ratio within {height}x{width} pixels"


    @property
    def crops_photo(self) -> bool:
        """TI2V-5B under area sizing crops the photo (see `prepare_image`)."""
        return self.expand_timesteps and self.sizing == "area"

    def prepare_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """Stretched to `resolution` (Wan 2.1, A14B: a resize that keeps the aspect ratio to within the
        rounding under area sizing); TI2V-5B's reference covers it and crops the centre instead."""
        if self.crops_photo:
            return resize_to_fill(rgb, *self.resolution)
        return super().prepare_image(rgb)

    def layers(self) -> ModelLayers:
        """``denoiser.0..N-1`` (blocks of the expert at work) and the VAE encoder's down blocks and mid block."""
        return standard_layers(len(self.transformer.blocks), self.vae.encoder)

    def token_grid(self) -> tuple[int, int]:
        """Tokens per frame: the latent grid (VAE factor 8, or 16 for TI2V-5B) over the 2x2 patches."""
        _, ph, pw = self.transformer.config.patch_size
        stride = self.pipe.vae_scale_factor_spatial
        return self.resolution[0] // stride // ph, self.resolution[1] // stride // pw

    def module(self, name: str) -> torch.nn.Module:
        try:
            if name.startswith(DENOISER_PREFIX):
                return self._expert.blocks[int(name[len(DENOISER_PREFIX) :])]
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
        text_device = self.text_device()
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

    def release_text_encoder(self) -> None:
        """Drop the UMT5-XXL encoder (about 11 GB in bf16) once a prompt is cached."""
        drop_text_encoders(self.pipe, self._device, "text_encoder")

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

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """CLIP penultimate hidden states (B, tokens, D) of ``x`` in [0, 1], differentiable (Wan 2.1);
        None for Wan 2.2, which sees the image through the VAE only."""
        if not self.uses_clip:
            return None
        out = self.image_encoder(pixel_values=self._clip_pixels(x), output_hidden_states=True)
        return out.hidden_states[-2]

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """The pipeline's condition and, for Wan 2.1, the CLIP tokens, differentiably.

        The condition is (B, 4 + C, F_latent, h, w) (mask + latents of ``[image, 0, ...]``),
        or for TI2V-5B the photo's own latent (B, C, 1, h, w). ``generator`` is unused:
        Wan encodes the condition with the posterior mode.
        """
        pixels = x.to(self._device, torch.float32) * 2 - 1  # the video processor's [-1, 1]
        height, width = self.resolution
        z = self.vae.config.z_dim
        spatial = self.pipe.vae_scale_factor_spatial
        with FeatureTaps({n: self.module(n) for n in taps}).capture(first_only=True) as feats:
            conds = []
            # zero `latents` keep the global RNG untouched; one image at a time, because
            # prepare_latents repeats its VAE output batch_size times
            shape = (1, z, self.latent_frames, height // spatial, width // spatial)
            for image in pixels.split(1):
                prepared = self.pipe.prepare_latents(
                    image, 1, z, height, width, self.num_frames, dtype=self._dtype, device=self._device,
                    latents=pixels.new_zeros(shape),
                )
                conds.append(prepared[1].to(self._dtype))
        context = self.image_embedding(x)
        return EncodedImage(torch.cat(conds), dict(feats), context=None if context is None else context.to(self._dtype))

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The normalised latent of frame 0 (the photo), after the 4 mask channels where there are any."""
        channels = 0 if self.expand_timesteps else self.pipe.vae_scale_factor_temporal
        return encoded.latents[:, channels:, 0]

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
        """One pass of the timestep's expert on ``(1 - sigma) x0 + sigma noise``; stops after the
        deepest tap unless the loss or the noise prediction is wanted."""
        prompt_embeds = self._require_condition()
        if self.uses_clip and image.context is None:
            raise ModelError("Wan 2.1 I2V needs the CLIP image tokens (EncodedImage.context)")
        batch = image.latents.shape[0]
        sigma = self.sigmas(t.to(self._device).reshape(-1)).expand(batch)
        s = sigma.view(-1, 1, 1, 1, 1)
        video_latents = video_latents.to(self._device, self._dtype).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, self._dtype).expand_as(video_latents)
        noisy = ((1 - s) * video_latents.float() + s * noise.float()).to(self._dtype)
        timestep = (sigma * self.num_train_timesteps).to(self._dtype)
        generated = torch.ones_like(noisy[:1, :1])  # 1 on the frames being generated
        if self.expand_timesteps:
            # TI2V: frame 0 is the photo's latent at timestep 0, the others are noised
            generated[:, :, 0] = 0
            model_input = (1 - generated) * image.latents.to(self._dtype) + generated * noisy
            patch = self.transformer.config.patch_size
            per_token = generated[0, 0][:, :: patch[1], :: patch[2]].flatten()
            timestep = per_token.unsqueeze(0) * timestep.view(-1, 1)
        else:
            model_input = torch.cat([noisy, image.latents.to(self._dtype)], dim=1)
        # the expert follows the drawn timestep, read on the CPU (no device sync)
        self._expert = self.expert_for(float(self.sigmas(t.detach().reshape(-1)[:1].cpu())[0]) * self.num_train_timesteps)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self._expert(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                encoder_hidden_states_image=None if image.context is None else image.context.to(self._dtype).expand(
                    batch, -1, -1),
                return_dict=False,
            ),
            taps,
            need_output,
        )
        result = DenoiserResult(feats)
        if need_output:
            prediction = output[0].float()
            if with_loss:
                error = (prediction - (noise.float() - video_latents.float())).pow(2) * generated
                result.loss = error.sum() / (generated.sum() * error.numel() / generated.numel())
            if with_eps:
                eps = noisy.float() + (1 - s) * prediction
                x0 = noisy.float() - s * prediction
                if self.expand_timesteps:  # frame 0 is the clean photo latent: nothing to predict there
                    eps = generated * eps + (1 - generated) * noise.float()
                    x0 = generated * x0 + (1 - generated) * image.latents.float()
                result.eps, result.x0 = eps, x0
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """The released guidance, which `generate` uses."""
        return torch.tensor(float(self.released_guidance))

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline (released guidance:
        5, or 3.5 for both Wan 2.2 A14B experts), at the size `resolution_for` gives the image."""
        with self.sized_for(*image.shape[-2:]):
            return self._generate(image, prompt, steps, seed, guidance_scale)

    def _generate(self, image: torch.Tensor, prompt: str, steps: int, seed: int, guidance_scale: float | None
                  ) -> torch.Tensor:
        self.condition(prompt)
        pil = pipeline_image(self, image)
        height, width = self.resolution
        output = self.pipe(
            image=pil,
            prompt_embeds=self._prompt_embeds,
            negative_prompt_embeds=self._negative_embeds,
            height=height,
            width=width,
            num_frames=self.num_frames,
            num_inference_steps=steps,
            guidance_scale=self.released_guidance if guidance_scale is None else guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
        )
        return output.frames[0].float().cpu()
