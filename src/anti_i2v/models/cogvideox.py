"""CogVideoX image-to-video (the paper's main backbone), backed by diffusers.

Conditioning, as `CogVideoXImageToVideoPipeline` does it: the condition image is
VAE-encoded (posterior sample, scaled), zero-padded over the remaining latent
frames and concatenated on channels to the noisy video latents. The transformer
is trained with v-prediction, so the training loss is the MSE between its output
and ``v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (the x0-space loss with the
``1 / (1 - a_t)`` weighting used in CogVideoX fine-tuning is the same quantity).

Block mapping: ``denoiser.<i>`` is ``transformer.transformer_blocks[i]`` (42 for
CogVideoX-5B-I2V), tapped on its video-token output. ``vae.down_blocks.<i>`` and
``vae.mid_block`` are the VAE encoder's blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXTransformer3DModel,
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
    CachedPromptEmbeds,
    drop_text_encoders,
    load_diffusers_pipeline,
    place,
    standard_layers,
    to_pil_8bit,
)
from anti_i2v.models.tiny_text import tiny_t5_encoder, tiny_t5_tokenizer

logger = logging.getLogger(__name__)

HUB_ID = "THUDM/CogVideoX-5b-I2V"

# Scheduler of the released CogVideoX-5b-I2V (scheduler/scheduler_config.json).
_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=1.0,
    timestep_spacing="trailing",
)

# Full-size CogVideoX-5b-I2V configs (from its transformer/ and vae/ config.json), used to
# build random-weight models of the real size for speed and memory measurements.
FULL_TRANSFORMER = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=32,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=48,
    num_layers=42,
    out_channels=16,
    patch_size=2,
    sample_frames=49,
    sample_height=60,
    sample_width=90,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    use_learned_positional_embeddings=True,
    use_rotary_positional_embeddings=True,
)
FULL_VAE = dict(scaling_factor=0.7)  # the other defaults of AutoencoderKLCogVideoX are the released ones

# Tiny variant: the 5b-I2V layout (learned positional embeddings, 2:3 frame) shrunk.
TINY_HEIGHT, TINY_WIDTH, TINY_FRAMES = 64, 96, 9
_TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,  # the 3-D RoPE needs a multiple of 16
    in_channels=8,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=8,
    sample_height=TINY_HEIGHT // 8,
    sample_width=TINY_WIDTH // 8,
    sample_frames=TINY_FRAMES,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=16,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=True,
)
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
)


def tiny_pipeline(seed: int = 0) -> CogVideoXImageToVideoPipeline:
    """A complete CogVideoX-I2V pipeline with seeded random weights (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**_TINY_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCogVideoX(**_TINY_VAE)
        tokenizer = tiny_t5_tokenizer()
        torch.manual_seed(seed + 2)
        text_encoder = tiny_t5_encoder(len(tokenizer), _TINY_TRANSFORMER["text_embed_dim"])
    return CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**_SCHEDULER),
    )


def random_pipeline(
    transformer_config: dict, vae_config: dict, seed: int = 0
) -> CogVideoXImageToVideoPipeline:
    """A pipeline of the given configs with seeded random weights and no text encoder.

    Build it under ``torch.device("cuda")`` for full-size configs; condition it with
    `CogVideoXI2V.use_prompt_embeds`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**transformer_config)
        vae = AutoencoderKLCogVideoX(**vae_config)
    return CogVideoXImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=CogVideoXDDIMScheduler(**_SCHEDULER)
    )


def load_pipeline(source: str, dtype: torch.dtype) -> CogVideoXImageToVideoPipeline:
    """Load a released pipeline from a hub id or a local folder in the diffusers layout."""
    return load_diffusers_pipeline(CogVideoXImageToVideoPipeline, source, dtype, "CogVideoX-I2V", HUB_ID, "tiny-cogvideox")


def _frames_at(tensor: torch.Tensor, dim: int, positions: list[int], frames: int, prefix: int = 0) -> torch.Tensor:
    """``tensor``'s first ``prefix`` entries along ``dim`` (text tokens), then the entries of the latent
    frames at ``positions`` of ``frames`` (frames outermost, equal blocks)."""
    per_frame = (tensor.shape[dim] - prefix) // frames
    index = torch.cat([torch.arange(prefix), *(prefix + p * per_frame + torch.arange(per_frame) for p in positions)])
    return tensor.index_select(dim, index.to(tensor.device))


class CogVideoXI2V(CachedPromptEmbeds, VideoModel):
    """The `VideoModel` adapter for `CogVideoXImageToVideoPipeline`.

    Args:
        pipe: a loaded (or tiny) pipeline.
        name: registry name, recorded in reports.
        device: where the VAE and transformer run.
        dtype: compute dtype (bf16 on GPU for the 5B model).
        gradient_checkpointing: recompute transformer blocks in backward to save memory.
        sample_posterior: encode the condition image with a posterior sample, as the
            pipeline does (otherwise the posterior mode).
    """

    family = "cogvideox"

    def __init__(
        self,
        pipe: CogVideoXImageToVideoPipeline,
        name: str = "cogvideox",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        sample_posterior: bool = True,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self._device = torch.device(device)
        self._dtype = dtype
        self.sample_posterior = sample_posterior
        self.vae = place(pipe.vae, self._device, dtype)
        self.transformer = place(pipe.transformer, self._device, dtype)
        pipe.set_progress_bar_config(disable=True)
        self.scheduler = pipe.scheduler
        if pipe.text_encoder is not None:
            pipe.text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.vae.enable_slicing()

        cfg = self.transformer.config
        if cfg.patch_size_t is not None:
            raise ModelError(
                f"'{name}' is a CogVideoX 1.5 checkpoint; this adapter serves the CogVideoX 1.0 "
                f"I2V layout ({HUB_ID})"
            )
        if cfg.in_channels != 2 * self.vae.config.latent_channels:
            raise ModelError(
                f"'{name}' is not an image-to-video CogVideoX checkpoint (its transformer takes "
                f"{cfg.in_channels} channels, not noisy + image latents); use {HUB_ID} or a copy of it"
            )
        scale = pipe.vae_scale_factor_spatial
        self.resolution = (cfg.sample_height * scale, cfg.sample_width * scale)
        self.num_frames = cfg.sample_frames
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.latent_frames = (self.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        self._latent_positions = tuple(range(self.latent_frames))  # where they sit in the full video
        self._prompt: str | None = None
        self._prompt_embeds: torch.Tensor | None = None
        self._negative_embeds: torch.Tensor | None = None
        self._rope = (
            pipe._prepare_rotary_positional_embeddings(*self.resolution, self.latent_frames, self._device)
            if cfg.use_rotary_positional_embeddings
            else None
        )
        # the full video's frame count and positions (table, rotary), which `set_num_frames` cuts
        patch = self.transformer.patch_embed
        self._full_positions = (patch.sample_frames, getattr(patch, "pos_embedding", None), self._rope)

    # --- construction -------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs) -> CogVideoXI2V:
        """The ``tiny-cogvideox`` variant: demonstrates the pipeline, protects against nothing."""
        kwargs.setdefault("name", "tiny-cogvideox")
        return cls(tiny_pipeline(seed), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> CogVideoXI2V:
        """Load released weights from a hub id or a local folder (diffusers layout)."""
        return cls(load_pipeline(source, dtype), device=device, dtype=dtype, **kwargs)

    # --- the seam -------------------------------------------------------------------

    def layers(self) -> ModelLayers:
        """``denoiser.0..N-1`` (transformer blocks) and the VAE encoder's blocks."""
        return standard_layers(len(self.transformer.transformer_blocks), self.vae.encoder)

    def module(self, name: str) -> torch.nn.Module:
        if name.startswith(DENOISER_PREFIX):
            return self.transformer.transformer_blocks[int(name[len(DENOISER_PREFIX) :])]
        if name.startswith(VAE_PREFIX):
            return self.vae.encoder.get_submodule(name[len(VAE_PREFIX) :])
        raise ModelError(f"unknown layer '{name}'; `layers()` lists this model's layers")

    def condition(self, prompt: str) -> None:
        """Encode ``prompt`` (and the empty negative prompt for guidance) once and cache it."""
        if prompt == self._prompt:
            return
        if self.pipe.text_encoder is None:
            raise ModelError(
                "the text encoder was released after encoding the first prompt; "
                "create the model again to use another prompt"
            )
        text_device = self.text_device()
        self.pipe.text_encoder.to(text_device)
        with torch.no_grad():
            pos, neg = self.pipe.encode_prompt(
                prompt,
                negative_prompt="",
                do_classifier_free_guidance=True,
                max_sequence_length=self.transformer.config.max_text_seq_length,
                device=text_device,
                dtype=self._dtype,
            )
        self._prompt = prompt
        self._prompt_embeds = pos.to(self._device)
        self._negative_embeds = neg.to(self._device)

    def release_text_encoder(self) -> None:
        """Drop the T5 encoder (about 9 GB in bf16 for the 5B model) once a prompt is cached."""
        drop_text_encoders(self.pipe, self._device, "text_encoder")

    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """Image latents as the pipeline builds them: (B, F_latent, C, h, w), frame 0 the image."""
        pixels = (x.to(self._device, self._dtype) * 2 - 1).unsqueeze(2)  # (B, 3, 1, H, W) in [-1, 1]
        tapper = FeatureTaps({n: self.module(n) for n in taps})
        with tapper.capture() as feats:
            dist = self.vae.encode(pixels).latent_dist
        latent = dist.sample(generator) if self.sample_posterior else dist.mode()
        latent = self._scale(latent.permute(0, 2, 1, 3, 4))  # (B, 1, C, h, w)
        padding = latent.new_zeros(latent.shape[0], self.latent_frames - 1, *latent.shape[2:])
        return EncodedImage(torch.cat([latent, padding], dim=1), dict(feats))

    def frame_count_for(self, share: float) -> int:
        """About ``share`` of the latent frames (at least 2), as a pixel frame count 1 + 4k."""
        latent = max(2, min(self.latent_frames, round(share * self.latent_frames)))
        return (latent - 1) * self.pipe.vae_scale_factor_temporal + 1

    def spread_frames_kept(self, share: float) -> int:
        """The latent frames a run on ``share`` of them keeps: each keeps its position when spread."""
        return (self.frame_count_for(share) - 1) // self.pipe.vae_scale_factor_temporal + 1

    def frame_layout(self) -> str:
        """The frame count and the positions of its latent frames in the full video (spread or first)."""
        return f"{self.num_frames}@{','.join(map(str, self._latent_positions))}"

    def set_num_frames(self, num_frames: int, spread: bool | None = False) -> None:
        """Run with ``num_frames`` (1 + 4k) frames: latent frame count, rotary embeddings and the
        patch embedding's positional table follow.

        The latent frames keep the positions they have in the full video: the first ones, or with
        ``spread`` (or None) ones spaced evenly over the whole video (the first and the last
        included), as a video at a lower frame rate. The table is cut to those positions rather
        than rebuilt: diffusers rebuilds it as plain sin-cos values for another frame count, which
        would throw away a learned table (CogVideoX-5B-I2V has one) and attack a different model.
        """
        patch = self.transformer.patch_embed
        full_frames, table, rope = self._full_positions
        full_latent = (full_frames - 1) // patch.temporal_compression_ratio + 1
        self.num_frames = num_frames
        self.latent_frames = (num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        if spread is not False and self.latent_frames > 1:
            step = (full_latent - 1) / (self.latent_frames - 1)
            positions = [round(i * step) for i in range(self.latent_frames)]
        else:
            positions = list(range(self.latent_frames))
        self._latent_positions = tuple(positions)
        if table is not None:  # cut where the table now is: an ensemble may have parked the model
            cut = _frames_at(table, 1, positions, full_latent, prefix=patch.max_text_seq_length)
            patch.pos_embedding = cut.to(patch.pos_embedding.device)
        patch.sample_frames = (self.latent_frames - 1) * patch.temporal_compression_ratio + 1
        if rope is not None:
            self._rope = tuple(_frames_at(r, 0, positions, full_latent) for r in rope)

    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """Frame 0 of the condition latents (the rest is zero padding)."""
        return encoded.latents[:, 0]

    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """The image latent repeated over the latent frames: (B, F_latent, C, h, w)."""
        return latent.unsqueeze(1).expand(-1, self.latent_frames, -1, -1, -1)

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        factor = self.vae.config.scaling_factor
        return latents / factor if self.vae.config.invert_scale_latents else latents * factor

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Scaled posterior-mode latents (1, F_latent, C, h, w) of frames (F, 3, H, W) in [0, 1]."""
        pixels = (frames.to(self._device, self._dtype) * 2 - 1).permute(1, 0, 2, 3).unsqueeze(0)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self._scale(latents.permute(0, 2, 1, 3, 4)).detach()

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
        """One transformer pass; stops after the deepest tap unless the output is wanted."""
        prompt_embeds = self._require_condition()
        batch = image.latents.shape[0]
        t = t.to(self._device).long().reshape(-1).expand(batch)
        video_latents = video_latents.to(self._device, self._dtype).expand(batch, -1, -1, -1, -1)
        noise = noise.to(self._device, self._dtype).expand_as(video_latents)
        noisy = self.scheduler.add_noise(video_latents, noise, t)
        model_input = torch.cat([noisy, image.latents.to(self._dtype)], dim=2)

        need_output = with_loss or with_eps
        output, feats = self.tapped_forward(
            lambda: self.transformer(
                hidden_states=model_input,
                encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                timestep=t,
                image_rotary_emb=self._rope,
                return_dict=False,
            ),
            taps,
            need_output,
        )
        result = DenoiserResult(feats)
        if need_output:
            prediction = output[0].float()
            if with_loss:
                target = self.scheduler.get_velocity(video_latents.float(), noise.float(), t)
                result.loss = F.mse_loss(prediction, target)
            if with_eps:
                alpha = self.scheduler.alphas_cumprod.to(prediction.device, prediction.dtype)[t].view(-1, 1, 1, 1, 1)
                result.eps = alpha.sqrt() * prediction + (1 - alpha).sqrt() * noisy.float()
                result.x0 = alpha.sqrt() * noisy.float() - (1 - alpha).sqrt() * prediction
        return result

    def sampling_guidance(self) -> torch.Tensor:
        """Guidance 6, the pipeline's default, which `generate` uses."""
        return torch.tensor(6.0)

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video from an 8-bit copy of ``image`` with the diffusers pipeline (guidance 6 by default)."""
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
            guidance_scale=6.0 if guidance_scale is None else guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            max_sequence_length=self.transformer.config.max_text_seq_length,
        )
        return output.frames[0].float().cpu()
