"""Open-Sora 1.2's denoiser STDiT3 (``hpcai-tech/OpenSora-STDiT-v3``), written from its description.

Sources: the original release and the notes of the ``opensora_stdit3`` golden fixture. The
constructor takes the original ``STDiT3Config`` field names, and ``state_dict()`` has the official
key names, shapes and order, so the official ``model.safetensors`` loads with ``strict=True``. That
includes the parameter ``rope.freqs`` (``requires_grad=False``) and the persistent buffer
``y_embedder.y_embedding`` (the learned null caption). ``pos_embed.inv_freq`` is a non-persistent
buffer.

Data flow of :meth:`STDiT3.forward` for ``x [B, C, T, H, W]``:

* Patchify. ``x`` is zero-padded at the end of T/H/W up to multiples of ``patch_size``, then goes through
  ``x_embedder.proj`` (Conv3d, kernel = stride = patch). The result has ``T' * S`` tokens (``S = H' * W'``,
  frame outer, then rows, then columns).
* A 2-D sin-cos position embedding over the ``H' x W'`` grid is added once. Per axis it is
  ``[sin, cos]`` with ``inv_freq = 1 / 10000^(2i / (C/2))``. The first ``C/2`` channels encode the
  column (w) coordinate and the last ``C/2`` the row (h) coordinate. The coordinates are
  ``arange(n) / scale * (base_size / n)`` with ``scale = sqrt(height[0] * width[0]) / input_sq_size``
  and ``base_size = round(sqrt(S))``.
* ``t = t_embedder(timestep) + fps_embedder(fps)``. Both use 256-wide sinusoids in ``[cos, sin]`` order
  with max period 1e4. Then ``t_mod = t_block(t)`` (``[B, 6C]``). With ``x_mask`` the same is built for
  ``timestep = 0`` (``t0``, ``t0_mod``).
* Caption: ``y [B, 1, L, caption_channels] -> y_embedder.y_proj`` (Linear, GELU(tanh), Linear). Every
  cross-attention of sample ``b`` sees only the tokens with ``mask[b] != 0``, done here as a key-padding
  mask. The original packs them with ``masked_select`` and uses a block-diagonal attention, and the
  results are identical. With no mask, all ``L`` tokens are used.
* Blocks are called in the order ``spatial_blocks[0], temporal_blocks[0], spatial_blocks[1], ...``. Each
  takes and returns ``[B, T' * S, C]``:
  ``x += gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)``, then ``x += CrossAttn(x, y)``
  (no modulation, no qk-norm), then ``x += gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)``.
  The six modulation vectors are ``scale_shift_table + t_mod.reshape(B, 6, C)``. For the tokens of frames
  where ``x_mask`` is False, ``t0_mod`` is used instead. Spatial blocks attend over the ``S`` tokens of
  each frame. Temporal blocks attend over the ``T'`` frames of each patch position, and they apply
  rotary embeddings to q and k (interleaved pairs, positions ``0..T'-1``, ``rope.freqs``). Both kinds
  RMS-normalise q and k per head (``qk_norm``) and use scale ``head_dim ** -0.5``.
* Final layer: ``shift, scale = final_layer.scale_shift_table + t`` (``t``, not ``t_mod``), then
  ``x1 = LN(x) * (1 + scale) + shift``. With ``x_mask``, the masked frames get
  ``LN(x1) * (1 + scale0) + shift0``. That branch normalises the already modulated ``x1``, which is a
  quirk of the original and is kept on purpose. Then comes ``final_layer.linear``, and the unpatchify
  crops the padding.
* Output ``[B, out_channels, T, H, W]`` in float32. ``out_channels = 2 * in_channels`` with ``pred_sigma``,
  and only the first ``in_channels`` (the velocity) are used by the sampler.

Precision follows the original. ``x``, ``timestep`` and ``y`` are cast to the weights' dtype first, so a
bfloat16 model rounds the timestep. Sinusoids and position embeddings are computed in float32 and then
cast. RMSNorm computes in float32. Attention uses
:func:`torch.nn.functional.scaled_dot_product_attention`. For float16/bfloat16 it runs in float32 by
default (``attention_upcast``), which matches the original's float32 softmax.

Feature taps and gradients: a forward hook on ``spatial_blocks[i]`` or ``temporal_blocks[i]`` receives
that block's output ``[B, T' * S, C]``, and the hooks fire in the order s0, t0, s1, t1, .... Gradient
checkpointing (:meth:`STDiT3.set_gradient_checkpointing`, off by default) wraps each block in
non-reentrant :func:`torch.utils.checkpoint.checkpoint` while autograd records. The hooks then run again
during the backward recomputation. Nothing in the module detaches or uses ``no_grad``, so gradients reach
``x``, ``y``, ``timestep`` and ``fps`` (the original's parameter freezing flags only change
``requires_grad`` of parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from anti_i2v.models.dynamicrafter.attention import scaled_dot_product_attention

__all__ = [
    "DEFAULT_FPS",
    "VAE_SPATIAL_FACTOR",
    "CaptionEmbedder",
    "FinalLayer",
    "MultiHeadCrossAttention",
    "PatchEmbed3D",
    "PositionEmbedding2D",
    "RMSNorm",
    "RotaryEmbedding",
    "STDiT3",
    "STDiT3Block",
    "STDiT3Config",
    "SelfAttention",
    "SizeEmbedder",
    "TimestepEmbedder",
    "timestep_embedding",
]

#: ``fps`` used by :meth:`STDiT3.forward` when none is given (Open-Sora 1.2's inference default).
DEFAULT_FPS = 24.0
#: Pixels per latent pixel, used only to derive ``height``/``width`` when they are not given.
VAE_SPATIAL_FACTOR = 8

# Keys in a transformers ``config.json`` that describe the file, not the model.
_HF_BOOKKEEPING = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "auto_map",
        "_attn_implementation_autoset",
    }
)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class STDiT3Config:
    """Constructor arguments of STDiT3, with the original ``STDiT3Config`` names and defaults.

    ``enable_flash_attn``, ``enable_layernorm_kernel`` and ``enable_sequence_parallelism`` are kept for
    compatibility and ignored: this port always uses torch SDPA and ``F.layer_norm`` in one process.
    ``input_size`` is stored but, as in the original, not used.
    """

    input_size: tuple[int | None, int | None, int | None] = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False
    model_type: str = field(default="STDiT3", repr=False)

    def __post_init__(self) -> None:
        self.input_size = tuple(self.input_size)  # type: ignore[assignment]
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (2-D sin-cos position embedding)")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head dimension must be even (rotary embedding)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> STDiT3Config:
        """Build from a mapping such as a HF ``config.json``; transformers bookkeeping keys are dropped.

        Unknown keys other than those bookkeeping entries are ignored with a warning.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            if key in names and key != "model_type":
                kwargs[key] = value
            elif key == "model_type":
                if value not in (None, "STDiT3"):
                    raise ValueError(f"not an STDiT3 config: model_type={value!r}")
            elif key not in _HF_BOOKKEEPING:
                unknown.append(key)
        if unknown:
            warnings.warn(f"STDiT3Config: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> STDiT3Config:
        """Read a HF ``config.json`` (e.g. that of ``hpcai-tech/OpenSora-STDiT-v3``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["patch_size"] = list(self.patch_size)
        return out


# --------------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t f_i), sin(t f_i)]`` with ``f_i = exp(-ln(max_period) i / (dim // 2))``, float32 ``[N, dim]``.

    The frequencies are rounded once from float64: the timestep gradient sums terms much larger than
    itself, and float32 ``exp`` differs by an ulp between machines.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half).float()
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid (256 channels) followed by ``mlp = [Linear, SiLU, Linear]``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(dtype or self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds a per-sample scalar (here fps) like a timestep; a batch of one is repeated to ``batch_size``."""

    def forward(self, s: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:  # type: ignore[override]
        s = s.reshape(-1)
        if batch_size is not None and s.shape[0] != batch_size:
            if batch_size % s.shape[0]:
                raise ValueError(f"cannot repeat {s.shape[0]} values to a batch of {batch_size}")
            s = s.repeat(batch_size // s.shape[0])
        return super().forward(s)


class CaptionEmbedder(nn.Module):
    """``y_proj = Mlp(caption_channels -> hidden -> hidden, GELU(tanh))`` and the null caption ``y_embedding``.

    In training mode with ``uncond_prob > 0`` whole captions are replaced by ``y_embedding`` at random
    (classifier-free-guidance dropout), as in the original; ``force_drop_ids`` selects them explicitly.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.y_proj = _Mlp(in_channels, hidden_size, hidden_size)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.uncond_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            else:
                drop = force_drop_ids.to(caption.device) == 1
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class _Mlp(nn.Module):
    """timm-style ``Mlp``: ``fc1``, GELU (tanh approximation), ``fc2``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed3D(nn.Module):
    """Zero-pad T/H/W at the end to patch multiples, Conv3d (kernel = stride = patch), flatten to ``[B, N, C]``."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        t, h, w = x.shape[-3:]
        pad = (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt)  # F.pad order: W, H, T; zeros at the end
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x).flatten(2).transpose(1, 2)


class PositionEmbedding2D(nn.Module):
    """2-D sin-cos embedding of the patch grid; buffer ``inv_freq`` is not persistent."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError("dim must be a multiple of 4")
        self.dim = dim
        half = dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _sin_cos(self, pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * self.inv_freq[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(
        self, h: int, w: int, scale: float = 1.0, base_size: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``[1, h * w, dim]`` for a row-major ``h x w`` grid: first half column coordinate, second half row."""
        device = self.inv_freq.device
        rows = torch.arange(h, device=device) / scale
        cols = torch.arange(w, device=device) / scale
        if base_size is not None:
            rows = rows * (base_size / h)
            cols = cols * (base_size / w)
        col_pos = cols[None, :].expand(h, w).reshape(-1)
        row_pos = rows[:, None].expand(h, w).reshape(-1)
        emb = torch.cat([self._sin_cos(col_pos), self._sin_cos(row_pos)], dim=-1)[None]
        return emb if dtype is None else emb.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary embedding with interleaved pairs ``(x[2i], x[2i+1])`` rotated by ``pos * freqs[i]``.

    ``freqs = 1 / theta^(2i / dim)`` is an ``nn.Parameter`` with ``requires_grad=False`` (key ``rope.freqs``).
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., N, dim]`` by the positions ``0..N-1`` along dim -2."""
        n = x.shape[-2]
        pos = torch.arange(n, device=x.device, dtype=x.dtype).to(self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # [N, dim]: f0 f0 f1 f1 ...
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 (Llama style); key ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# --------------------------------------------------------------------------------------------------
# attention and blocks
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` (bias), optional RMS qk-norm, optional RoPE, ``proj``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # Not a submodule: the rotary embedding is shared and its state lives at ``rope.freqs``.
        self._rope = [rope] if rope is not None else []
        self.upcast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._rope:
            q, k = self._rope[0].rotate(q), self._rope[0].rotate(k)
        out = scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, upcast=self.upcast)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from the caption, optional key-padding mask per sample."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.upcast = True

    def forward(self, x: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]``, ``cond [B, L, C]``, ``key_mask [B, L]`` bool (True = attended) or None."""
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = scaled_dot_product_attention(q, k, v, mask, scale=self.head_dim**-0.5, upcast=self.upcast)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _select_frames(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, t: int) -> torch.Tensor:
    """Per frame: ``x`` where ``x_mask`` is True, ``x_zero`` elsewhere; tensors are ``[B, T * S, C]``."""
    b, n, c = x.shape
    keep = x_mask[:, :, None, None]
    return torch.where(keep, x.view(b, t, n // t, c), x_zero.view(b, t, n // t, c)).view(b, n, c)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class STDiT3Block(nn.Module):
    """One spatial (``temporal=False``) or temporal transformer block with adaLN-single modulation."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qk_norm: bool = True,
        temporal: bool = False,
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.drop_path = drop_path
        # state order as in the checkpoint: scale_shift_table, attn, cross_attn, mlp
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, rope=rope if temporal else None)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = _Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def _mod(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.scale_shift_table[None] + t_mod.reshape(t_mod.shape[0], 6, -1)).chunk(6, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t_mod: torch.Tensor,
        y_mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        t0_mod: torch.Tensor | None = None,
        T: int | None = None,
        S: int | None = None,
    ) -> torch.Tensor:
        """``x [B, T*S, C]``, ``y [B, L, C]`` (projected caption), ``t_mod``/``t0_mod [B, 6C]``, ``x_mask [B, T]``."""
        b, n, c = x.shape
        if T is None and S is None:
            raise ValueError("T or S is required")
        T = n // S if T is None else T
        S = n // T if S is None else S
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mod(t_mod)
        zero = self._mod(t0_mod) if x_mask is not None else None

        # modulated self-attention
        h = self.norm1(x)
        h_m = _modulate(h, shift_msa, scale_msa)
        if zero is not None:
            h_m = _select_frames(x_mask, h_m, _modulate(h, zero[0], zero[1]), T)
        if self.temporal:
            h_m = h_m.view(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
            h_m = self.attn(h_m)
            h_m = h_m.view(b, S, T, c).transpose(1, 2).reshape(b, n, c)
        else:
            h_m = self.attn(h_m.reshape(b * T, S, c)).view(b, n, c)
        res = gate_msa * h_m
        if zero is not None:
            res = _select_frames(x_mask, res, zero[2] * h_m, T)
        x = x + _drop_path(res, self.drop_path, self.training)

        # cross-attention: no modulation, plain residual
        x = x + self.cross_attn(x, y, y_mask)

        # modulated MLP
        h = self.norm2(x)
        h_m = _modulate(h, shift_mlp, scale_mlp)
        if zero is not None:
            h_m = _select_frames(x_mask, h_m, _modulate(h, zero[3], zero[4]), T)
        h_m = self.mlp(h_m)
        res = gate_mlp * h_m
        if zero is not None:
            res = _select_frames(x_mask, res, zero[5] * h_m, T)
        return x + _drop_path(res, self.drop_path, self.training)


class FinalLayer(nn.Module):
    """``norm_final`` (LayerNorm without affine), ``t``-modulation from ``scale_shift_table [2, C]``, ``linear``.

    With ``x_mask``, the masked frames use ``LN(modulated x)`` with the t = 0 shift/scale: the original
    overwrites ``x`` before building that branch, and this port keeps that behaviour.
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        t0: torch.Tensor | None = None,
        T: int | None = None,
    ) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = _modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x = _select_frames(x_mask, x, _modulate(self.norm_final(x), shift0, scale0), T)
        return self.linear(x)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


def _first_value(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.reshape(-1)[0].item())
    if isinstance(v, (list, tuple)):
        return float(v[0])
    return float(v)


class STDiT3(nn.Module):
    """STDiT3 denoiser. ``STDiT3(config)``, ``STDiT3(**config_fields)`` or ``STDiT3(config, **overrides)``."""

    def __init__(self, config: STDiT3Config | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = STDiT3Config(**kwargs)
        elif isinstance(config, Mapping):
            config = STDiT3Config.from_dict({**config, **kwargs})
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.hidden_size = c.hidden_size
        self.num_heads = c.num_heads
        self.patch_size = tuple(c.patch_size)
        self.depth = c.depth
        self.gradient_checkpointing = False

        self.pos_embed = PositionEmbedding2D(c.hidden_size)
        self.rope = RotaryEmbedding(c.head_dim)
        self.x_embedder = PatchEmbed3D(self.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.fps_embedder = SizeEmbedder(c.hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size))
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.class_dropout_prob, c.model_max_length)
        rates = [float(r) for r in torch.linspace(0, c.drop_path, c.depth, device="cpu")]
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(c.hidden_size, c.num_heads, c.mlp_ratio, rates[i], c.qk_norm, temporal=False)
            for i in range(c.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(c.hidden_size, c.num_heads, c.mlp_ratio, rates[i], c.qk_norm, temporal=True, rope=self.rope)
            for i in range(c.depth)
        )
        self.final_layer = FinalLayer(c.hidden_size, math.prod(self.patch_size), self.out_channels)
        self._init_weights()
        if c.freeze_y_embedder:
            self.y_embedder.requires_grad_(False)
        if c.only_train_temporal:
            for name, p in self.named_parameters():
                if not name.startswith("temporal_blocks."):
                    p.requires_grad_(False)

    # ---- construction helpers -------------------------------------------------------------------

    @classmethod
    def from_config_file(cls, path: str | Path, **overrides: Any) -> STDiT3:
        """Build (random weights) from a HF ``config.json``."""
        return cls(STDiT3Config.from_json_file(path), **overrides)

    def _init_weights(self) -> None:
        """Initialisation in the spirit of the original (weights are normally loaded from a checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.temporal_blocks:
            for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # ---- switches ---------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block in the backward pass (non-reentrant checkpointing); off by default."""
        self.gradient_checkpointing = bool(enabled)

    def set_attention_upcast(self, enabled: bool = True) -> None:
        """Compute float16/bfloat16 attention in float32 (default True); no effect on a float32 model."""
        for m in self.modules():
            if isinstance(m, (SelfAttention, MultiHeadCrossAttention)):
                m.upcast = bool(enabled)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    # ---- pieces of the forward pass -------------------------------------------------------------

    def get_dynamic_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Patch-grid size ``(T', H', W')`` of a latent ``[B, C, T, H, W]`` (ceil division)."""
        t, h, w = x.shape[-3:]
        pt, ph, pw = self.patch_size
        return -(-t // pt), -(-h // ph), -(-w // pw)

    def null_caption(self, batch_size: int) -> torch.Tensor:
        """The learned unconditional caption ``y_embedding`` as ``[batch_size, 1, L, caption_channels]``."""
        return self.y_embedder.y_embedding[None, None].expand(batch_size, 1, -1, -1)

    def encode_text(
        self, y: torch.Tensor, mask: torch.Tensor | Sequence[int] | None = None, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project the caption: ``(y [B, L, C], key_mask [B, L] bool or None)``.

        ``y`` is ``[B, 1, L, caption_channels]`` (or ``[B, L, caption_channels]``) and ``mask`` the T5
        attention mask ``[B', L]`` (``B'`` dividing ``B`` is repeated). With ``skip_y_embedder`` the
        original receives an already projected, packed caption ``[1, sum(lens), C]`` and ``mask`` holds
        the per-sample lengths; that form is unpacked here.
        """
        if self.config.skip_y_embedder:
            return self._unpack(y, mask, batch_size)
        if y.dim() == 3:
            y = y[:, None]
        y = self.y_embedder(y)[:, 0]  # [B, L, C]
        if mask is None:
            return y, None
        mask = torch.as_tensor(mask, device=y.device)
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != y.shape[0]:
            if y.shape[0] % mask.shape[0]:
                raise ValueError(f"mask batch {mask.shape[0]} does not divide caption batch {y.shape[0]}")
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        if mask.shape[1] != y.shape[1]:
            raise ValueError(f"mask length {mask.shape[1]} != caption length {y.shape[1]}")
        key_mask = mask != 0
        if not bool(key_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token")
        if bool(key_mask.all()):
            key_mask = None
        return y, key_mask

    def _unpack(
        self, y: torch.Tensor, lens: torch.Tensor | Sequence[int] | None, batch_size: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if y.dim() == 4:
            y = y[:, 0]
        if lens is None:
            return y, None
        lens = [int(v) for v in (lens.tolist() if isinstance(lens, torch.Tensor) else lens)]
        if y.shape[0] == len(lens):  # already padded per sample: lengths are a prefix
            key_mask = torch.arange(y.shape[1], device=y.device)[None] < torch.tensor(lens, device=y.device)[:, None]
            return y, key_mask
        if y.shape[0] != 1 or y.shape[1] != sum(lens):
            raise ValueError("with skip_y_embedder, y must be packed [1, sum(lens), C] or padded [B, L, C]")
        longest = max(lens)
        parts = y[0].split(lens)
        y_pad = torch.stack([F.pad(p, (0, 0, 0, longest - p.shape[0])) for p in parts])
        key_mask = torch.arange(longest, device=y.device)[None] < torch.tensor(lens, device=y.device)[:, None]
        return y_pad, key_mask

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        """``[B, T'H'W', pt*ph*pw*C_out] -> [B, C_out, T, H, W]`` (patch axes outer, channels inner), cropped."""
        b = x.shape[0]
        nt, nh, nw = grid
        pt, ph, pw = self.patch_size
        x = x.view(b, nt, nh, nw, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, nt * pt, nh * ph, nw * pw)
        t, h, w = size
        return x[:, :, :t, :h, :w]

    def _run_block(self, block: STDiT3Block, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _torch_checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: torch.Tensor | float | None = None,
        width: torch.Tensor | float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict ``[B, out_channels, T, H, W]`` (float32) for the noisy latent ``x [B, C, T, H, W]``.

        ``timestep [B]`` (0..1000; a scalar is broadcast), ``y [B, 1, L, caption_channels]``,
        ``mask [B, L]`` T5 attention mask (None: all tokens), ``x_mask [B, T]`` bool (False = conditioning
        frame, modulated with t = 0), ``fps [B]`` (a scalar or one value is repeated; None means
        :data:`DEFAULT_FPS`), ``height``/``width`` the pixel size (only element 0 is used; None means
        ``8 *`` the latent size). Other keyword arguments are ignored, as in the original.
        """
        dtype = self.dtype
        b = x.shape[0]
        x = x.to(dtype)
        timestep = torch.as_tensor(timestep, device=x.device).to(dtype)
        if timestep.dim() == 0 or timestep.numel() == 1 and b != 1:
            timestep = timestep.reshape(1).expand(b)
        y = y.to(dtype)
        if fps is None:
            fps = DEFAULT_FPS
        fps = torch.as_tensor(fps, device=x.device)

        size = tuple(x.shape[-3:])
        grid = self.get_dynamic_size(x)
        nt, nh, nw = grid
        s = nh * nw
        base_size = round(s**0.5)
        h_px = _first_value(height) if height is not None else float(VAE_SPATIAL_FACTOR * size[1])
        w_px = _first_value(width) if width is not None else float(VAE_SPATIAL_FACTOR * size[2])
        scale = (h_px * w_px) ** 0.5 / self.config.input_sq_size
        pos_emb = self.pos_embed(nh, nw, scale=scale, base_size=base_size, dtype=dtype)

        # timestep (+ fps) conditioning
        fps_emb = self.fps_embedder(fps, b)
        t = self.t_embedder(timestep, dtype) + fps_emb
        t_mod = self.t_block(t)
        t0 = t0_mod = None
        if x_mask is not None:
            x_mask = torch.as_tensor(x_mask, device=x.device).to(torch.bool)
            if tuple(x_mask.shape) != (b, nt):
                raise ValueError(f"x_mask must be [B, T'] = {(b, nt)}, got {tuple(x_mask.shape)}")
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype) + fps_emb
            t0_mod = self.t_block(t0)

        y, y_mask = self.encode_text(y, mask, batch_size=b)

        x = self.x_embedder(x)  # [B, T'S, C]
        x = (x.view(b, nt, s, -1) + pos_emb[:, None]).view(b, nt * s, -1)

        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = self._run_block(spatial, x, y, t_mod, y_mask, x_mask, t0_mod, nt, s)
            x = self._run_block(temporal, x, y, t_mod, y_mask, x_mask, t0_mod, nt, s)

        x = self.final_layer(x, t, x_mask, t0, nt)
        return self.unpatchify(x, grid, size).to(torch.float32)
