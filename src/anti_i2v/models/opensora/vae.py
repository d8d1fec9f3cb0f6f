"""Open-Sora 1.2's video VAE ("OpenSoraVAE_V1_2"): a per-frame 2-D VAE followed by a causal temporal VAE.

Clean re-implementation, state-dict compatible with the official ``hpcai-tech/OpenSora-VAE-v1.2``
checkpoint (517 tensors, 393.3 M parameters):

* ``spatial_vae.module.*``: a diffusers :class:`~diffusers.AutoencoderKL` (the SDXL-VAE architecture,
  ``block_out_channels [128, 256, 512, 512]``, 2 resnets per down block, latent 4). Frames are encoded
  one by one (in micro-batches of ``micro_batch_size``) and the posterior is multiplied by **0.18215**,
  a constant of the original code; the ``scaling_factor`` of the AutoencoderKL config is ignored.
* ``temporal_vae.*``: :class:`VAETemporal`, a MAGVIT-v2-style VAE that is causal in time and does not
  touch H/W. Its encoder turns ``4k`` frames into ``k`` latent frames (the input is front-padded with
  zeros to a multiple of 4); the decoder makes ``4k`` frames and drops the padding frames at the front.
* ``scale``, ``shift``: buffers ``[1, 4, 1, 1, 1]``; the pipeline latent is ``(z - shift) / scale``.

Time is processed in chunks: the encoder cuts the spatial latent into chunks of ``micro_frame_size``
(17) frames, the decoder cuts the latent into chunks of the matching latent length (5) and gives each
the number of frames it has to produce. Every path is differentiable (no ``torch.no_grad``).

Temporal VAE building blocks (all convolutions are :class:`CausalConv3d`, whose ``nn.Conv3d`` sits at
``.conv``; time is zero-padded only at the front, by ``k - 1`` frames, or ``k - 2`` for a stride-2
conv; H and W are zero-padded by ``k // 2`` on both sides):

* :class:`ResBlock`: GroupNorm, SiLU, conv 3x3x3, GroupNorm, SiLU, conv 3x3x3, plus the input (through
  a 1x1x1 ``conv3`` when the width changes). No conv biases.
* encoder: ``conv_in`` (no bias); per level ``i`` ``num_res_blocks`` ResBlocks
  (``block_res_blocks.i.j``) at width ``filters * channel_multipliers[i]``; between levels a conv in
  ``conv_blocks.i`` (stride 2 in time where ``temporal_downsample[i]``, otherwise an ``nn.Identity``);
  ``res_blocks`` at the last width; ``norm1``, SiLU, ``conv2`` (1x1x1) to ``2 * latent_embed_dim``.
* ``quant_conv`` (1x1x1) gives mean and log-variance (clamped to [-30, 20]); ``post_quant_conv``
  (1x1x1) maps the latent back before decoding.
* decoder: ``conv1``; ``res_blocks``; levels from the deepest to the first, ``block_res_blocks.i``
  indexed like the encoder's level ``i``; after level ``i > 0`` the conv ``conv_blocks.(i-1)`` makes
  ``2 * C`` channels and a depth-to-space step turns them into twice the frames (channel ``2 c + s``
  becomes sub-frame ``s`` of channel ``c``); ``norm1``, SiLU, ``conv_out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

__all__ = [
    "SPATIAL_SCALING",
    "CausalConv3d",
    "DiagonalGaussian",
    "ResBlock",
    "SpatialVAE",
    "TemporalDecoder",
    "TemporalEncoder",
    "VAETemporal",
    "VideoAutoencoderPipeline",
    "full_size_vae_config",
    "sdxl_vae_config",
    "tiny_vae_config",
]

SPATIAL_SCALING = 0.18215
"""Latent scaling of the spatial VAE, hard-coded in the original (not the SDXL config's 0.13025)."""

OFFICIAL_SCALE = (3.85, 2.32, 2.33, 3.06)
OFFICIAL_SHIFT = (-0.10, 0.34, 0.27, 0.98)


# ---------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------



def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (a CPU generator
    gives the same draws whatever device the model runs on)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sdxl_vae_config() -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs of the SDXL VAE (the spatial VAE of OpenSora-VAE-v1.2)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def full_size_vae_config() -> dict[str, Any]:
    """Constructor kwargs of :class:`VideoAutoencoderPipeline` for the official OpenSora-VAE-v1.2.

    ``scale``/``shift`` are the published constants; a loaded checkpoint's buffers replace them.
    """
    return {
        "spatial_config": sdxl_vae_config(),
        "temporal_config": {
            "in_out_channels": 4,
            "latent_embed_dim": 4,
            "embed_dim": 4,
            "filters": 128,
            "num_res_blocks": 4,
            "channel_multipliers": (1, 2, 2, 4),
            "temporal_downsample": (False, True, True),
            "num_groups": 32,
            "activation_fn": "swish",
        },
        "micro_batch_size": 4,
        "micro_frame_size": 17,
        "scale": OFFICIAL_SCALE,
        "shift": OFFICIAL_SHIFT,
    }


def tiny_vae_config() -> dict[str, Any]:
    """A small :class:`VideoAutoencoderPipeline` with the official structure (tests, smoke runs)."""
    return {
        "spatial_config": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 16, 16],
            "layers_per_block": 1,
            "act_fn": "silu",
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 32,
        },
        "temporal_config": {
            "in_out_channels": 4,
            "latent_embed_dim": 4,
            "embed_dim": 4,
            "filters": 8,
            "num_res_blocks": 1,
            "channel_multipliers": (1, 2, 2, 4),
            "temporal_downsample": (False, True, True),
            "num_groups": 4,
            "activation_fn": "swish",
        },
        "micro_batch_size": 4,
        "micro_frame_size": 17,
        "scale": OFFICIAL_SCALE,
        "shift": OFFICIAL_SHIFT,
    }


# ---------------------------------------------------------------------------------------------------
# posterior
# ---------------------------------------------------------------------------------------------------


@dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior; ``logvar`` is already clamped to [-30, 20]."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, torch.clamp(logvar, -30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``mean + std * noise``; ``noise`` defaults to a standard normal draw from ``generator``."""
        if noise is None:
            noise = _randn(self.mean, generator)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != posterior shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(self.mean)


# ---------------------------------------------------------------------------------------------------
# temporal VAE
# ---------------------------------------------------------------------------------------------------


def _activation(name: str) -> nn.Module:
    name = name.lower()
    if name in ("swish", "silu"):
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported activation {name!r} (swish/silu or relu)")


def _triple(k: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(k, int):
        return (k, k, k)
    k = tuple(int(v) for v in k)
    if len(k) != 3:
        raise ValueError(f"expected 3 kernel sizes, got {k}")
    return k  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """``nn.Conv3d`` (at ``.conv``) on an input zero-padded causally in time and symmetrically in H/W.

    The time axis gets ``k_t - stride_t`` zero frames in front (and none behind), so output frame ``n``
    sees input frames up to ``(n + 1) * stride_t - 1`` only. Note that the temporal VAE as a whole is
    not causal: its GroupNorms pool statistics over all frames of the chunk.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        time_stride: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError("spatial kernel sizes must be odd")
        self.time_pad = kt - time_stride
        if self.time_pad < 0:
            raise ValueError("time stride larger than the time kernel")
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self._padding = (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self._padding):
            x = F.pad(x, self._padding)
        return self.conv(x)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm eps 1e-5, no conv biases)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, activation_fn: str = "swish") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-5)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-5)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False)
        self.act = _activation(activation_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv3(x) if self.in_channels != self.out_channels else x
        return h + skip


def _check_levels(channel_multipliers: Sequence[int], temporal_downsample: Sequence[bool]) -> None:
    if len(temporal_downsample) != len(channel_multipliers) - 1:
        raise ValueError("temporal_downsample needs one entry per level transition (len(channel_multipliers) - 1)")


class TemporalEncoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation_fn: str,
    ) -> None:
        super().__init__()
        _check_levels(channel_multipliers, temporal_downsample)
        block = dict(num_groups=num_groups, activation_fn=activation_fn)
        self.conv_in = CausalConv3d(in_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        width = filters
        levels = len(channel_multipliers)
        for i, mult in enumerate(channel_multipliers):
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(ResBlock(width, filters * mult, **block))
                width = filters * mult
            self.block_res_blocks.append(level)
            if i < levels - 1:
                if temporal_downsample[i]:
                    self.conv_blocks.append(CausalConv3d(width, width, 3, time_stride=2))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(width, width, **block) for _ in range(num_res_blocks))
        self.norm1 = nn.GroupNorm(num_groups, width, eps=1e-5)
        self.act = _activation(activation_fn)
        self.conv2 = CausalConv3d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for blk in level:
                x = blk(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for blk in self.res_blocks:
            x = blk(x)
        return self.conv2(self.act(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation_fn: str,
    ) -> None:
        super().__init__()
        _check_levels(channel_multipliers, temporal_downsample)
        block = dict(num_groups=num_groups, activation_fn=activation_fn)
        self.time_strides = [2 if d else 1 for d in temporal_downsample]
        levels = len(channel_multipliers)
        width = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(in_channels, width, 3)
        self.res_blocks = nn.ModuleList(ResBlock(width, width, **block) for _ in range(num_res_blocks))
        blocks: list[nn.ModuleList] = [nn.ModuleList()] * levels
        convs: list[nn.Module] = [nn.Identity()] * (levels - 1)
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(ResBlock(width, filters * channel_multipliers[i], **block))
                width = filters * channel_multipliers[i]
            blocks[i] = level
            if i > 0 and temporal_downsample[i - 1]:
                convs[i - 1] = CausalConv3d(width, width * 2, 3)
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(num_groups, width, eps=1e-5)
        self.act = _activation(activation_fn)
        self.conv_out = CausalConv3d(width, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for blk in self.res_blocks:
            x = blk(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for blk in self.block_res_blocks[i]:
                x = blk(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                ts = self.time_strides[i - 1]
                if ts > 1:  # depth-to-space in time: channel (c * ts + s) -> sub-frame s of channel c
                    b, c, t, h, w = x.shape
                    x = x.reshape(b, c // ts, ts, t, h, w).transpose(2, 3).reshape(b, c // ts, t * ts, h, w)
        return self.conv_out(self.act(self.norm1(x)))


class VAETemporal(nn.Module):
    """Open-Sora 1.2's ``VAE_Temporal`` (the official model: filters 128, 4 res blocks, 32 groups).

    ``encode(x)`` takes a spatial latent video ``[B, in_out_channels, T, H, W]`` and returns the
    :class:`DiagonalGaussian` posterior over ``[B, embed_dim, ceil(T / f), H, W]`` (``f = 2 **
    sum(temporal_downsample)``). ``decode(z, num_frames)`` returns ``[B, in_out_channels, num_frames, H, W]``.
    """

    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ) -> None:
        super().__init__()
        self.in_out_channels = self.out_channels = in_out_channels
        self.latent_embed_dim = latent_embed_dim
        self.embed_dim = embed_dim
        self.time_downsample_factor = 2 ** sum(bool(d) for d in temporal_downsample)
        common = dict(
            filters=filters,
            num_res_blocks=num_res_blocks,
            channel_multipliers=tuple(channel_multipliers),
            temporal_downsample=tuple(bool(d) for d in temporal_downsample),
            num_groups=num_groups,
            activation_fn=activation_fn,
        )
        self.encoder = TemporalEncoder(in_channels=in_out_channels, out_channels=2 * latent_embed_dim, **common)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(in_channels=latent_embed_dim, out_channels=in_out_channels, **common)

    def _front_pad(self, num_frames: int) -> int:
        return (-num_frames) % self.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        """Latent length of ``num_frames`` input frames (``ceil(num_frames / f)``)."""
        return (num_frames + self._front_pad(num_frames)) // self.time_downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        pad = self._front_pad(x.shape[2])
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Decode ``z``; keep the last ``num_frames`` of the ``f * T_latent`` frames (default: all)."""
        full = z.shape[2] * self.time_downsample_factor
        if num_frames is None:
            num_frames = full
        if self.latent_frames(int(num_frames)) != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} does not match {z.shape[2]} latent frames")
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self._front_pad(int(num_frames)) :]

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = False, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mean
        return self.decode(z, num_frames=x.shape[2]), posterior, z


# ---------------------------------------------------------------------------------------------------
# spatial VAE + pipeline
# ---------------------------------------------------------------------------------------------------


def _to_frames(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _from_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class SpatialVAE(nn.Module):
    """Per-frame 2-D VAE (``VideoAutoencoderKL``): a diffusers ``AutoencoderKL`` at ``.module``."""

    def __init__(self, config: Mapping[str, Any], micro_batch_size: int | None = 4) -> None:
        super().__init__()
        self.module = AutoencoderKL(**dict(config))
        self.micro_batch_size = micro_batch_size
        self.out_channels = self.module.config.latent_channels
        self.downsample = 2 ** (len(self.module.config.block_out_channels) - 1)

    def _batches(self, n: int) -> list[slice]:
        size = self.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def encode(
        self,
        x: torch.Tensor,
        *,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, 3, T, H, W]`` -> ``[B, 4, T, H/8, W/8]`` (posterior mean or sample, times 0.18215).

        ``noise`` (``[B, 4, T, H/8, W/8]``, frame ``t`` at ``[:, :, t]``) makes the sample
        ``mean + std * noise``; otherwise a sample draws one standard normal tensor per micro-batch.
        """
        b = x.shape[0]
        frames = _to_frames(x)
        eps = _to_frames(noise) if noise is not None else None
        outs = []
        for sl in self._batches(frames.shape[0]):
            dist = self.module.encode(frames[sl]).latent_dist
            if sample_posterior or eps is not None:
                z = dist.mean + dist.std * (
                    eps[sl].to(dist.mean)
                    if eps is not None
                    else _randn(dist.mean, generator)
                )
            else:
                z = dist.mean
            outs.append(z * SPATIAL_SCALING)
        return _from_frames(torch.cat(outs), b)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, 4, T, h, w]`` -> ``[B, 3, T, 8h, 8w]``."""
        b = z.shape[0]
        frames = _to_frames(z)
        outs = [self.module.decode(frames[sl] / SPATIAL_SCALING).sample for sl in self._batches(frames.shape[0])]
        return _from_frames(torch.cat(outs), b)


class VideoAutoencoderPipeline(nn.Module):
    """OpenSora-VAE-v1.2: pixels ``[B, 3, T, H, W]`` <-> normalised latents ``[B, 4, T_lat, H/8, W/8]``.

    ``spatial_config`` are diffusers ``AutoencoderKL`` kwargs, ``temporal_config`` :class:`VAETemporal`
    kwargs (see :func:`full_size_vae_config` and :func:`tiny_vae_config`).
    """

    def __init__(
        self,
        spatial_config: Mapping[str, Any],
        temporal_config: Mapping[str, Any],
        *,
        micro_batch_size: int | None = 4,
        micro_frame_size: int | None = 17,
        scale: Sequence[float] = OFFICIAL_SCALE,
        shift: Sequence[float] = OFFICIAL_SHIFT,
    ) -> None:
        super().__init__()
        self.spatial_vae = SpatialVAE(spatial_config, micro_batch_size=micro_batch_size)
        self.temporal_vae = VAETemporal(**dict(temporal_config))
        if self.temporal_vae.in_out_channels != self.spatial_vae.out_channels:
            raise ValueError("temporal in_out_channels must equal the spatial latent_channels")
        self.micro_frame_size = micro_frame_size
        self.micro_z_frame_size = (
            self.temporal_vae.latent_frames(micro_frame_size) if micro_frame_size is not None else None
        )
        self.out_channels = self.temporal_vae.embed_dim
        c = self.out_channels
        if len(scale) != c or len(shift) != c:
            raise ValueError(f"scale and shift need {c} values")
        self.register_buffer("scale", torch.tensor([float(v) for v in scale]).view(1, c, 1, 1, 1))
        self.register_buffer("shift", torch.tensor([float(v) for v in shift]).view(1, c, 1, 1, 1))

    # --- sizes ---------------------------------------------------------------------------------------

    def _frame_chunks(self, num_frames: int) -> list[int]:
        size = self.micro_frame_size or num_frames
        return [min(size, num_frames - s) for s in range(0, num_frames, size)]

    def latent_frames(self, num_frames: int) -> int:
        return sum(self.temporal_vae.latent_frames(n) for n in self._frame_chunks(num_frames))

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """``[T, H, W]`` (entries may be None) -> the latent ``[T_lat, H / 8, W / 8]``."""
        t, h, w = input_size
        f = self.spatial_vae.downsample
        return [
            None if t is None else self.latent_frames(int(t)),
            None if h is None else int(h) // f,
            None if w is None else int(w) // f,
        ]

    # --- encode / decode -----------------------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        *,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        eps_spatial: torch.Tensor | None = None,
        eps_temporal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` (about [-1, 1]) -> ``(z - shift) / scale``, ``[B, 4, T_lat, H/8, W/8]``.

        ``sample_posterior=False`` (default) uses the posterior means (deterministic). The original
        samples both posteriors: ``sample_posterior=True`` draws the noise from ``generator`` (per
        spatial micro-batch, then per temporal chunk, in the original's order), or pass the recorded noise:
        ``eps_spatial`` ``[B, 4, T, H/8, W/8]`` and ``eps_temporal`` ``[B, 4, T_lat, H/8, W/8]`` (laid out
        like the concatenated temporal latent). Given noise implies sampling for that stage.
        """
        if x.dim() != 5:
            raise ValueError(f"expected a video [B, C, T, H, W], got {tuple(x.shape)}")
        x_z = self.spatial_vae.encode(x, sample_posterior=sample_posterior, generator=generator, noise=eps_spatial)
        if eps_temporal is not None and eps_temporal.shape[2] != self.latent_frames(x_z.shape[2]):
            raise ValueError("eps_temporal must have one entry per latent frame")
        zs = []
        start, z_start = 0, 0
        for n in self._frame_chunks(x_z.shape[2]):
            posterior = self.temporal_vae.encode(x_z[:, :, start : start + n])
            n_lat = posterior.mean.shape[2]
            if eps_temporal is not None:
                zs.append(posterior.sample(noise=eps_temporal[:, :, z_start : z_start + n_lat]))
            elif sample_posterior:
                zs.append(posterior.sample(generator))
            else:
                zs.append(posterior.mean)
            start, z_start = start + n, z_start + n_lat
        z = torch.cat(zs, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents ``[B, 4, T_lat, h, w]`` -> pixels ``[B, 3, num_frames, 8h, 8w]``."""
        num_frames = int(num_frames)
        if self.latent_frames(num_frames) != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} does not match {z.shape[2]} latent frames")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        outs = []
        z_start = 0
        for n in self._frame_chunks(num_frames):
            n_lat = self.temporal_vae.latent_frames(n)
            outs.append(self.temporal_vae.decode(z[:, :, z_start : z_start + n_lat], num_frames=n))
            z_start += n_lat
        return self.spatial_vae.decode(torch.cat(outs, dim=2))

    def forward(self, x: torch.Tensor, **encode_kwargs: Any) -> torch.Tensor:
        """Reconstruction ``decode(encode(x), T)``."""
        return self.decode(self.encode(x, **encode_kwargs), num_frames=x.shape[2])
