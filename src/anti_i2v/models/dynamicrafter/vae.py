"""DynamiCrafter's first stage: the LDM ``AutoencoderKL`` (SD kl-f8) as diffusers' ``AutoencoderKL``.

The original (``lvdm.models.autoencoder.AutoencoderKL``, checkpoint prefix ``first_stage_model.``) is
the Stable Diffusion VAE: ``ch 128``, ``ch_mult (1, 2, 4, 4)``, 2 res blocks per level, ``z_channels 4``
(``double_z``: the encoder outputs mean and log-variance), one single-head attention block in each
mid-block, GroupNorm(32, eps 1e-6), ``quant_conv``/``post_quant_conv`` 1x1, latents scaled by
``scale_factor = 0.18215``. diffusers' ``AutoencoderKL`` with ``block_out_channels = ch * ch_mult`` and
``layers_per_block = num_res_blocks`` computes the same function (same padding of the stride-2
downsampling conv, nearest-neighbour upsampling, same attention scale); only the names differ.

Key map (LDM name -> diffusers name; ``L = len(ch_mult)``):

* ``encoder.down.i.block.j.{norm1,conv1,norm2,conv2}`` -> ``encoder.down_blocks.i.resnets.j.<same>``;
  ``nin_shortcut`` -> ``conv_shortcut``
* ``encoder.down.i.downsample.conv`` -> ``encoder.down_blocks.i.downsamplers.0.conv``
* ``decoder.up.i.block.j`` -> ``decoder.up_blocks.(L-1-i).resnets.j`` (**reversed** level order);
  ``decoder.up.i.upsample.conv`` -> ``decoder.up_blocks.(L-1-i).upsamplers.0.conv``
* ``{en,de}coder.mid.block_1`` / ``mid.block_2`` -> ``{en,de}coder.mid_block.resnets.0`` / ``.1``
* ``{en,de}coder.mid.attn_1.norm`` -> ``...mid_block.attentions.0.group_norm``;
  ``attn_1.{q,k,v,proj_out}`` -> ``attentions.0.{to_q,to_k,to_v,to_out.0}`` (1x1 conv -> linear)
* ``{en,de}coder.norm_out`` -> ``{en,de}coder.conv_norm_out``
* ``{en,de}coder.conv_in``, ``{en,de}coder.conv_out``, ``quant_conv``, ``post_quant_conv``: unchanged

The attention weights are stored as ``[C, C, 1, 1]`` convolution kernels in the checkpoint and as
``[C, C]`` linear weights in diffusers (:class:`~anti_i2v.models.dynamicrafter.checkpoint.KeyRule`
``"conv1x1"``). No checkpoint key is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL

from anti_i2v.models.dynamicrafter.checkpoint import KeyRule

__all__ = [
    "build_vae",
    "decode_video",
    "diffusers_to_ldm_vae_key",
    "encode_video",
    "ldm_to_diffusers_vae_key",
    "vae_key_rules",
]


def build_vae(
    *,
    ch: int = 128,
    ch_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    z_channels: int = 4,
    embed_dim: int = 4,
    in_channels: int = 3,
    out_ch: int = 3,
    double_z: bool = True,
    attn_resolutions: Sequence[int] = (),
    dropout: float = 0.0,
    resolution: int = 256,
    scale_factor: float = 0.18215,
    norm_num_groups: int = 32,
) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` from the LDM ``ddconfig`` names (the YAML's ``first_stage_config``).

    ``attn_resolutions`` must be empty (the LDM VAE then has attention only in the mid-blocks, which is
    what diffusers builds); ``embed_dim`` must equal ``z_channels`` and ``double_z`` must be true.
    """
    if list(attn_resolutions):
        raise ValueError("attention outside the mid-block (attn_resolutions) is not supported by diffusers' AutoencoderKL")
    if embed_dim != z_channels or not double_z:
        raise ValueError("the port needs embed_dim == z_channels and double_z=True (as in every DynamiCrafter VAE)")
    if dropout:
        raise ValueError("VAE dropout must be 0 (inference port)")
    levels = len(ch_mult)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[ch * m for m in ch_mult],
        layers_per_block=num_res_blocks,
        latent_channels=z_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
        scaling_factor=scale_factor,
    )


# ---------------------------------------------------------------------------------------------------
# key map
# ---------------------------------------------------------------------------------------------------

_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PARTS_INV = {v: k for k, v in _ATTN_PARTS.items()}


def ldm_to_diffusers_vae_key(key: str, levels: int) -> tuple[str, str]:
    """``(diffusers key, transform)`` of an LDM VAE key (relative to ``first_stage_model.``)."""
    m = re.fullmatch(r"(encoder)\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part = _RESNET_PARTS.get(m[4], m[4])
        return f"encoder.down_blocks.{m[2]}.resnets.{m[3]}.{part}.{m[5]}", "copy"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", "copy"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part = _RESNET_PARTS.get(m[3], m[3])
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{part}.{m[4]}", "copy"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", "copy"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m:
        part = _RESNET_PARTS.get(m[3], m[3])
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{part}.{m[4]}", "copy"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{m[3]}", ("copy" if m[2] == "norm" else "conv1x1")
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}", "copy"
    if re.fullmatch(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key, "copy"
    raise KeyError(f"not an LDM AutoencoderKL key: {key!r}")


def diffusers_to_ldm_vae_key(key: str, levels: int) -> str:
    """The LDM name of a diffusers ``AutoencoderKL`` key (inverse of :func:`ldm_to_diffusers_vae_key`)."""
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"encoder.down.{m[1]}.block.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", key)
    if m:
        part = "nin_shortcut" if m[3] == "conv_shortcut" else m[3]
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{part}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN_PARTS_INV[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    raise KeyError(f"not a diffusers AutoencoderKL key: {key!r}")


def vae_key_rules(vae: AutoencoderKL) -> list[KeyRule]:
    """Rules official LDM key -> diffusers key for every tensor of ``vae`` (relative names; meta OK)."""
    levels = len(vae.config.block_out_channels)
    rules = []
    for ours in vae.state_dict().keys():
        official = diffusers_to_ldm_vae_key(ours, levels)
        mapped, transform = ldm_to_diffusers_vae_key(official, levels)
        if mapped != ours:  # pragma: no cover - guards the two tables against drifting apart
            raise AssertionError(f"VAE key map is not invertible at {ours!r} -> {official!r} -> {mapped!r}")
        rules.append(KeyRule(official, (ours,), transform))  # type: ignore[arg-type]
    return rules


# ---------------------------------------------------------------------------------------------------
# video helpers (differentiable; no torch.no_grad anywhere)
# ---------------------------------------------------------------------------------------------------


def _frames(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if x.dim() != 5:
        raise ValueError(f"expected a video [B, C, T, H, W], got {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), b, t


def _unframes(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def encode_video(
    vae: AutoencoderKL,
    video: torch.Tensor,
    *,
    scale_factor: float = 0.18215,
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 1,
) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, z, T, H/f, W/f]``, frame by frame.

    The original samples the posterior (``posterior.sample() * scale_factor``); ``sample_posterior=False``
    (default) uses its mean, which is deterministic. ``chunk_size`` frames are encoded per call
    (1 = ``perframe_ae``; ``None`` = all at once).
    """
    frames, b, t = _frames(video)
    size = frames.shape[0] if not chunk_size else int(chunk_size)
    outs = []
    for start in range(0, frames.shape[0], size):
        dist = vae.encode(frames[start : start + size]).latent_dist
        outs.append(dist.sample(generator) if sample_posterior else dist.mean)
    return _unframes(torch.cat(outs) * scale_factor, b, t)


def decode_video(
    vae: AutoencoderKL, latents: torch.Tensor, *, scale_factor: float = 0.18215, chunk_size: int | None = 1
) -> torch.Tensor:
    """Scaled latents ``[B, z, T, h, w]`` -> video ``[B, 3, T, h*f, w*f]`` (roughly ``[-1, 1]``), frame by frame."""
    frames, b, t = _frames(latents / scale_factor)
    size = frames.shape[0] if not chunk_size else int(chunk_size)
    outs = [vae.decode(frames[s : s + size]).sample for s in range(0, frames.shape[0], size)]
    return _unframes(torch.cat(outs), b, t)
