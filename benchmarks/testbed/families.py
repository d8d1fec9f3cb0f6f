"""The testbed architectures, each in an official diffusers layout.

- `CogVideoXFamily`: the CogVideoX-5b-I2V layout (MM-DiT, 3-D causal VAE, T5 text),
  trained on four prompted camera moves.
- `SVDFamily`: the Stable Video Diffusion layout (spatio-temporal U-Net, temporal-decoder
  VAE, CLIP image encoder); SVD takes no text, so it learns one camera move.
- `WanFamily`: the Wan 2.1 I2V layout (DiT with image cross-attention, causal Wan VAE
  whose condition is encoded with the posterior mode, UMT5 text, CLIP image tokens,
  flow matching), trained on the four prompted camera moves.

Each family builds fresh components from a small config, gives the VAE's training loss,
encodes a bank of clips once, gives the denoiser's training loss on that bank in the
parametrisation its scheduler samples with, and assembles the pipeline that
``save_pretrained`` writes and ``from_pretrained`` loads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXTransformer3DModel,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from anti_i2v.models.cogvideox import _SCHEDULER as COGVIDEOX_SCHEDULER
from anti_i2v.models.sampling import shifted_flow_sigmas
from anti_i2v.models.svd import SCHEDULER as SVD_SCHEDULER

from testbed.data import MOTIONS

HEIGHT, WIDTH, FRAMES = 96, 128, 9
SIZE = (HEIGHT, WIDTH)


KL_WEIGHT = 1e-6  # 1e-4 collapsed most latent channels to the prior (15-20 dB reconstructions)


def vae_reconstruction_loss(
    target: torch.Tensor, decoded: torch.Tensor, kl: torch.Tensor, kl_weight: float = KL_WEIGHT
) -> torch.Tensor:
    """L1 + L2 + a small KL term (images in [-1, 1])."""
    return F.l1_loss(decoded, target) + F.mse_loss(decoded, target) + kl_weight * kl.mean()


def video_vae_loss(vae: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
    """`vae_reconstruction_loss` of a 3-D VAE (CogVideoX, Wan) on videos (B, F, 3, H, W) in [0, 1]."""
    pixels = videos.permute(0, 2, 1, 3, 4) * 2 - 1
    dist = vae.encode(pixels).latent_dist
    decoded = vae.decode(dist.sample()).sample
    return vae_reconstruction_loss(pixels, decoded, dist.kl())


@dataclass
class LatentBank:
    """Posterior means and standard deviations of encoded clips, sampled afresh each step."""

    video_mean: torch.Tensor
    video_std: torch.Tensor
    image_mean: torch.Tensor
    image_std: torch.Tensor
    prompts: list[int]  # index into the family's prompt list
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.video_mean.shape[0]


# --------------------------------------------------------------------------------- CogVideoX

_COG_WORDS = "pan left right zoom in out camera a the of video photo person moving slowly".split()


def cogvideox_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over the testbed's words, built in memory."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(dict.fromkeys(_COG_WORDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def frozen_text_encoder(model: type, config: type, vocab_size: int, width: int) -> torch.nn.Module:
    """A 2-layer (UM)T5 text encoder of random weights, frozen: the testbeds learn its embeddings."""
    return model(config(
        vocab_size=vocab_size, d_model=width, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, is_encoder_decoder=False, decoder_start_token_id=0,
    )).eval().requires_grad_(False)


class CogVideoXFamily:
    """CogVideoX-I2V layout: 12 DiT blocks (so block 3 and the last three are distinct regions)."""

    name = "cogvideox"
    motions: tuple[str, ...] = MOTIONS
    text_dim = 64
    text_length = 16

    def __init__(self, layers: int = 12, latent_channels: int = 16, frames: int = FRAMES) -> None:
        self.layers = layers
        self.latent_channels = latent_channels  # 16 as in CogVideoX-5b-I2V
        self.frames = frames  # 1 + 4k; 49 gives CogVideoX-5b-I2V's 13 latent frames

    def build(self, seed: int) -> dict[str, Any]:
        """Fresh components (seeded); the text encoder is random and stays frozen."""
        torch.manual_seed(seed)
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(16, 32, 32, 32), latent_channels=self.latent_channels,
            layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4,
        )
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=2 * self.latent_channels,
            out_channels=self.latent_channels, time_embed_dim=128,
            text_embed_dim=self.text_dim, num_layers=self.layers, sample_height=HEIGHT // 8,
            sample_width=WIDTH // 8, sample_frames=self.frames, patch_size=2, temporal_compression_ratio=4,
            max_text_seq_length=self.text_length, use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        )
        tokenizer = cogvideox_tokenizer()
        text_encoder = frozen_text_encoder(T5EncoderModel, T5Config, len(tokenizer), self.text_dim)
        return {"vae": vae, "transformer": transformer, "tokenizer": tokenizer, "text_encoder": text_encoder,
                "scheduler": CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)}

    def pipeline(self, parts: dict[str, Any]) -> CogVideoXImageToVideoPipeline:
        """The diffusers pipeline of these components."""
        return CogVideoXImageToVideoPipeline(**{k: parts[k] for k in
                                                ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})

    def vae_loss(self, vae: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of videos (B, F, 3, H, W) in [0, 1] (F = 1 for single frames)."""
        return video_vae_loss(vae, videos)

    @torch.no_grad()
    def encode(self, vae: torch.nn.Module, videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unscaled posterior mean/std of the clips (B, F', C, h, w) and of their first frames."""
        pixels = videos.permute(0, 2, 1, 3, 4) * 2 - 1
        video = vae.encode(pixels).latent_dist
        image = vae.encode(pixels[:, :, :1]).latent_dist
        swap = lambda t: t.permute(0, 2, 1, 3, 4).contiguous()  # noqa: E731
        return swap(video.mean), swap(video.std), swap(image.mean), swap(image.std)

    @torch.no_grad()
    def prompt_table(self, parts: dict[str, Any]) -> torch.Tensor:
        """T5 embeddings (P + 1, L, D) of every motion prompt and, last, the empty prompt (guidance)."""
        pipe = self.pipeline(parts)
        rows = [pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=self.text_length,
                                   device=torch.device("cpu"))[0] for p in (*self.motions, "")]
        return torch.cat(rows)

    def denoiser_loss(
        self, parts: dict[str, Any], bank: LatentBank, index: torch.Tensor, table: torch.Tensor,
        scale: float, drop: float, generator: torch.Generator,
    ) -> torch.Tensor:
        """v-prediction MSE on clips ``index`` of the bank, conditioned as the pipeline conditions."""
        transformer, scheduler = parts["transformer"], parts["scheduler"]
        sample = lambda m, s: scale * (m + s * torch.randn(m.shape, generator=generator))  # noqa: E731
        x0 = sample(bank.video_mean[index].float(), bank.video_std[index].float())
        image = sample(bank.image_mean[index].float(), bank.image_std[index].float())
        image = torch.cat([image, image.new_zeros(image.shape[0], x0.shape[1] - 1, *image.shape[2:])], dim=1)
        prompts = torch.tensor([bank.prompts[i] for i in index.tolist()])
        dropped = torch.rand(len(index), generator=generator) < drop
        prompts[dropped] = len(self.motions)  # the empty prompt
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        rope = self._rope(parts)
        out = transformer(hidden_states=torch.cat([noisy, image], dim=2), encoder_hidden_states=table[prompts],
                          timestep=t, image_rotary_emb=rope, return_dict=False)[0]
        return F.mse_loss(out, scheduler.get_velocity(x0, noise, t))

    def _rope(self, parts: dict[str, Any]):
        pipe = self.pipeline(parts)
        return pipe._prepare_rotary_positional_embeddings(HEIGHT, WIDTH, (self.frames - 1) // 4 + 1, torch.device("cpu"))

    def set_scaling(self, parts: dict[str, Any], factor: float) -> None:
        parts["vae"].register_to_config(scaling_factor=factor)

    def scaling(self, parts: dict[str, Any]) -> float:
        return float(parts["vae"].config.scaling_factor)

    def denoiser(self, parts: dict[str, Any]) -> torch.nn.Module:
        return parts["transformer"]


# --------------------------------------------------------------------------------- SVD

FPS, MOTION_BUCKET, NOISE_AUG = 7, 127, 0.02  # the pipeline's defaults, which the adapter uses too
P_MEAN, P_STD = 0.7, 1.6  # EDM log-normal noise levels of SVD's training
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0


class SVDFamily:
    """Stable Video Diffusion layout: a 3-level spatio-temporal U-Net (7 blocks); one camera move."""

    name = "svd"

    def __init__(self, motion: str = "zoom in", latent_channels: int = 8, frames: int = FRAMES) -> None:
        self.motions = (motion,)
        self.latent_channels = latent_channels
        self.frames = frames

    def build(self, seed: int) -> dict[str, Any]:
        """Fresh components (seeded); the CLIP image encoder is random and stays frozen."""
        torch.manual_seed(seed)
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=self.latent_channels,
            sample_size=HEIGHT,
        )
        unet = UNetSpatioTemporalConditionModel(
            sample_size=(HEIGHT // 8, WIDTH // 8), in_channels=2 * self.latent_channels,
            out_channels=self.latent_channels,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                              "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                            "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64, 64), addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
            layers_per_block=2, cross_attention_dim=32, num_attention_heads=(2, 4, 4), num_frames=self.frames,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            intermediate_size=64, patch_size=32,
        )).eval().requires_grad_(False)
        return {"vae": vae, "unet": unet, "image_encoder": image_encoder,
                "scheduler": EulerDiscreteScheduler(**SVD_SCHEDULER),
                "feature_extractor": CLIPImageProcessor(crop_size=224, size=224)}

    def pipeline(self, parts: dict[str, Any]) -> StableVideoDiffusionPipeline:
        """The diffusers pipeline of these components."""
        return StableVideoDiffusionPipeline(**{k: parts[k] for k in
                                               ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")})

    def vae_loss(self, vae: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of videos (B, F, 3, H, W) in [0, 1]; the decoder mixes the F frames."""
        batch, frames = videos.shape[:2]
        pixels = videos.flatten(0, 1) * 2 - 1
        dist = vae.encode(pixels).latent_dist
        decoded = vae.decode(dist.sample(), num_frames=frames).sample
        return vae_reconstruction_loss(pixels, decoded, dist.kl())

    @torch.no_grad()
    def encode(self, vae: torch.nn.Module, videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unscaled posterior mean/std of every frame (B, F, C, h, w) and of the noise-augmented first frame."""
        batch, frames = videos.shape[:2]
        pixels = videos.flatten(0, 1) * 2 - 1
        dist = vae.encode(pixels).latent_dist
        first = videos[:, 0] * 2 - 1
        first = first + NOISE_AUG * torch.randn_like(first)
        image = vae.encode(first).latent_dist
        unflat = lambda t: t.view(batch, frames, *t.shape[1:])  # noqa: E731
        return unflat(dist.mean), unflat(dist.std), image.mean.unsqueeze(1), image.std.unsqueeze(1)

    @torch.no_grad()
    def image_embeddings(self, parts: dict[str, Any], first_frames: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (B, 1, D) of first frames (B, 3, H, W) in [0, 1], as the pipeline computes them."""
        from anti_i2v.models.svd import StableVideoDiffusionI2V

        adapter = StableVideoDiffusionI2V(self.pipeline(parts), name="svd-testbed")
        return adapter.image_embedding(first_frames)

    def prompt_table(self, parts: dict[str, Any]) -> torch.Tensor:
        return torch.zeros(1)

    def denoiser_loss(
        self, parts: dict[str, Any], bank: LatentBank, index: torch.Tensor, table: torch.Tensor,
        scale: float, drop: float, generator: torch.Generator,
    ) -> torch.Tensor:
        """EDM v-prediction loss (the adapter's, with continuous log-normal noise levels)."""
        unet = parts["unet"]
        batch = len(index)
        x0 = scale * (bank.video_mean[index].float()
                      + bank.video_std[index].float() * torch.randn(bank.video_mean[index].shape, generator=generator))
        # the pipeline passes the image latent unscaled, as the mode of the posterior
        image = bank.image_mean[index].float().expand(-1, x0.shape[1], -1, -1, -1)
        context = bank.extra["clip"][index].float()
        dropped = (torch.rand(batch, generator=generator) < drop).float().view(-1, 1, 1, 1, 1)
        image = image * (1 - dropped)
        context = context * (1 - dropped.view(-1, 1, 1))
        log_sigma = torch.randn(batch, generator=generator) * P_STD + P_MEAN
        uniform = torch.rand(batch, generator=generator) < 0.2  # also cover the sampler's whole range
        log_sigma[uniform] = (math.log(SIGMA_MIN) + torch.rand(int(uniform.sum()), generator=generator)
                              * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)))
        sigma = log_sigma.exp().view(-1, 1, 1, 1, 1)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=generator)
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1).sqrt()
        ids = torch.tensor([[FPS - 1, MOTION_BUCKET, NOISE_AUG]], dtype=torch.float32).expand(batch, -1)
        out = unet(torch.cat([c_in * noisy, image], dim=2), 0.25 * log_sigma, encoder_hidden_states=context,
                   added_time_ids=ids, return_dict=False)[0]
        # with the EDM weight (sigma^2 + 1) / sigma^2 this is a unit-weight MSE on the network output
        return F.mse_loss(out, (x0 - c_skip * noisy) / c_out)

    def set_scaling(self, parts: dict[str, Any], factor: float) -> None:
        parts["vae"].register_to_config(scaling_factor=factor)

    def scaling(self, parts: dict[str, Any]) -> float:
        return float(parts["vae"].config.scaling_factor)

    def denoiser(self, parts: dict[str, Any]) -> torch.nn.Module:
        return parts["unet"]


# --------------------------------------------------------------------------------- Wan

# Wan 2.1 I2V 480P's sampler: UniPC on flow sigmas shifted by 3, which training draws from too
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                     num_train_timesteps=1000, solver_order=2)


class WanFamily:
    """Wan 2.1 I2V layout: 12 DiT blocks with image cross-attention, a causal Wan VAE (8x, 4x time).

    The pipeline conditions on the posterior mode of the video ``[photo, 0, ..., 0]`` (the VAE
    sees the photo and gray frames after it), with 4 mask channels that mark the photo's
    latent frame, and on CLIP's penultimate tokens of the photo: the bank stores exactly that.
    """

    name = "wan"
    motions: tuple[str, ...] = MOTIONS
    text_dim = 64
    text_length = 16
    clip_size = 224

    def __init__(self, layers: int = 12, latent_channels: int = 16, frames: int = FRAMES) -> None:
        self.layers = layers
        self.latent_channels = latent_channels  # 16 as in Wan 2.1's VAE
        self.frames = frames  # 1 + 4k

    def build(self, seed: int) -> dict[str, Any]:
        """Fresh components (seeded); the text and CLIP encoders are random and stay frozen."""
        torch.manual_seed(seed)
        z = self.latent_channels
        vae = AutoencoderKLWan(base_dim=16, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.0] * z, latents_std=[1.0] * z)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=self.clip_size,
            intermediate_size=64, patch_size=32,
        )).eval().requires_grad_(False)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=2 * z + 4,
            out_channels=z, text_dim=self.text_dim, freq_dim=256, ffn_dim=256, num_layers=self.layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
            image_dim=image_encoder.config.hidden_size,
        )
        tokenizer = cogvideox_tokenizer()
        text_encoder = frozen_text_encoder(UMT5EncoderModel, UMT5Config, len(tokenizer), self.text_dim)
        return {"vae": vae, "transformer": transformer, "tokenizer": tokenizer, "text_encoder": text_encoder,
                "image_encoder": image_encoder,
                "image_processor": CLIPImageProcessor(size={"shortest_edge": self.clip_size},
                                                      crop_size={"height": self.clip_size, "width": self.clip_size}),
                "scheduler": UniPCMultistepScheduler(**WAN_SCHEDULER)}

    def pipeline(self, parts: dict[str, Any]) -> WanImageToVideoPipeline:
        """The diffusers pipeline of these components."""
        return WanImageToVideoPipeline(**{k: parts[k] for k in (
            "tokenizer", "text_encoder", "vae", "transformer", "scheduler", "image_encoder", "image_processor")})

    def vae_loss(self, vae: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of videos (B, F, 3, H, W) in [0, 1] (F = 1 for single frames)."""
        return video_vae_loss(vae, videos)

    @torch.no_grad()
    def encode(self, vae: torch.nn.Module, videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unscaled posterior mean/std of the clips (B, F', C, h, w), and the mode of each clip's
        condition video ``[first frame, 0, ...]`` (B, F', C, h, w) with a zero std."""
        pixels = videos.permute(0, 2, 1, 3, 4) * 2 - 1
        video = vae.encode(pixels).latent_dist
        condition = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
        swap = lambda t: t.permute(0, 2, 1, 3, 4).contiguous()  # noqa: E731
        condition = swap(vae.encode(condition).latent_dist.mode())
        return swap(video.mean), swap(video.std), condition, torch.zeros_like(condition)

    def _adapter(self, parts: dict[str, Any]):
        from anti_i2v.models.wan import WanI2V

        return WanI2V(self.pipeline(parts), name="wan-testbed", resolution=SIZE, num_frames=self.frames,
                      max_sequence_length=self.text_length)

    @torch.no_grad()
    def image_embeddings(self, parts: dict[str, Any], first_frames: torch.Tensor) -> torch.Tensor:
        """CLIP penultimate tokens (B, T, D) of first frames (B, 3, H, W) in [0, 1], as the adapter computes them."""
        return self._adapter(parts).image_embedding(first_frames)

    @torch.no_grad()
    def prompt_table(self, parts: dict[str, Any]) -> torch.Tensor:
        """UMT5 embeddings (P + 1, L, D) of every motion prompt and, last, the empty prompt (guidance),
        encoded as the adapter encodes them (zeros past the prompt's tokens)."""
        adapter = self._adapter(parts)
        return torch.cat([adapter._encode_text(p, torch.device("cpu")) for p in (*self.motions, "")])

    def denoiser_loss(
        self, parts: dict[str, Any], bank: LatentBank, index: torch.Tensor, table: torch.Tensor,
        scale: float, drop: float, generator: torch.Generator,
    ) -> torch.Tensor:
        """Flow-matching velocity MSE, the text dropped for guidance (the image condition stays, as in
        the pipeline's unconditional pass)."""
        transformer = parts["transformer"]
        mean = bank.video_mean[index].float()
        x0 = scale * (mean + bank.video_std[index].float() * torch.randn(mean.shape, generator=generator))
        x0 = x0.permute(0, 2, 1, 3, 4)  # (B, C, F', h, w)
        condition = scale * bank.image_mean[index].float().permute(0, 2, 1, 3, 4)
        mask = torch.zeros(len(index), 4, *condition.shape[2:])
        mask[:, :, 0] = 1  # the photo's latent frame
        prompts = torch.tensor([bank.prompts[i] for i in index.tolist()])
        prompts[torch.rand(len(index), generator=generator) < drop] = len(self.motions)  # the empty prompt
        steps = WAN_SCHEDULER["num_train_timesteps"]
        t = torch.rand(len(index), generator=generator) * steps  # continuous, as flow matching trains
        sigma = shifted_flow_sigmas(t, WAN_SCHEDULER["flow_shift"], steps).view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        out = transformer(hidden_states=torch.cat([noisy, mask, condition], dim=1),
                          timestep=sigma.flatten() * steps,
                          encoder_hidden_states=table[prompts], encoder_hidden_states_image=bank.extra["clip"][index].float(),
                          return_dict=False)[0]
        return F.mse_loss(out, noise - x0)

    def set_scaling(self, parts: dict[str, Any], factor: float) -> None:
        """Wan normalises latents per channel by ``latents_mean`` / ``latents_std``: one std for all here."""
        z = self.latent_channels
        parts["vae"].register_to_config(latents_mean=[0.0] * z, latents_std=[1.0 / factor] * z)

    def scaling(self, parts: dict[str, Any]) -> float:
        return 1.0 / float(parts["vae"].config.latents_std[0])

    def denoiser(self, parts: dict[str, Any]) -> torch.nn.Module:
        return parts["transformer"]


FAMILIES = {"cogvideox": CogVideoXFamily, "svd": SVDFamily, "wan": WanFamily}


def seeded_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
