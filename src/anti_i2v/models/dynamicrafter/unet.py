"""DynamiCrafter's denoiser: the LVDM 3-D UNet (``model.diffusion_model`` in the official checkpoints).

Written from the architecture description in the original release and the notes of the
``dynamicrafter_unet`` golden fixture. Parameter names, the constructor's keyword names (those of the
official YAML ``unet_config.params``) and the ``state_dict()`` layout equal the original's, so the
official ``model.diffusion_model.*`` tensors load with ``strict=True`` once that prefix is stripped
(the 256 checkpoint's ``framestride_embed.*`` is accepted as ``fps_embedding.*``).

Data flow of :meth:`UNetModel.forward` for a video batch ``x`` of shape ``[B, C, T, H, W]``:

* Frames are folded into the batch, ``[(B T), C, H, W]`` (frame index inner), for every 2-D layer.
  Layers that mix frames (the temporal conv inside each ResBlock, the temporal transformers)
  unfold to ``[B, C, T, H, W]`` internally.
* ``emb = time_embed(sin(t)) + fps_embedding(sin(fs))`` (sinusoids of width ``model_channels``,
  ``[cos, sin]`` order, max period 1e4), repeated per frame.
* Context ``[B, L, context_dim]``: the first 77 tokens are text and the rest image tokens. If
  ``L == 77 + 16 * T`` (both numbers hard-coded, as in the original) frame ``f`` gets the text plus
  image tokens ``[16 f, 16 f + 16)``; otherwise every frame gets the whole context.
* ``input_blocks[0]`` (conv) -> ``init_attn`` (a temporal transformer with 8 heads and Conv1d
  projections) -> ``input_blocks[1:]`` -> ``middle_block`` -> ``output_blocks`` (each concatenates
  the matching input-block output on channels first) -> ``out`` (GroupNorm, SiLU, conv).

Spatial transformer blocks: self-attention, then cross-attention
``Attn(q, to_k(text), to_v(text)) + s * Attn(q, to_k_ip(img), to_v_ip(img))`` with ``s = 1`` or,
for the 256 model, ``s = tanh(alpha) + 1``, then a GEGLU feed-forward; LayerNorms before each and
residuals after each. Temporal transformer blocks have the same layout, but both attentions are
self-attention over the ``T`` frames of each pixel. All attention uses
:func:`torch.nn.functional.scaled_dot_product_attention`. GroupNorm eps is 1e-6 inside the
transformers and 1e-5 elsewhere; the ResBlock and output GroupNorms compute in float32.

Feature taps: ``input_blocks``, ``middle_block`` and ``output_blocks`` hold
:class:`TimestepEmbedSequential` blocks in forward order, so a forward hook on
``input_blocks[i]`` / ``middle_block`` / ``output_blocks[i]`` receives that block's output
``[(B T), C, h, w]``. Note that the skip connection of ``input_blocks[0]`` (and the input of
``input_blocks[1]``) is the output of ``init_attn``, not of ``input_blocks[0]`` itself.

Gradient checkpointing (``use_checkpoint=True`` or :meth:`UNetModel.set_gradient_checkpointing`)
wraps every ResBlock and transformer block in non-reentrant :func:`torch.utils.checkpoint.checkpoint`,
as the original does; it is only applied while autograd is recording. Nothing in the module is
decorated with ``no_grad`` or detaches, so gradients flow from the output to ``x`` and ``context``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from anti_i2v.models.dynamicrafter.attention import multi_head_attention

__all__ = [
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "GroupNorm32",
    "ResBlock",
    "SpatialTransformer",
    "TemporalConvBlock",
    "TemporalTransformer",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "timestep_embedding",
]

#: Number of text tokens at the start of the context (hard-coded in the original).
TEXT_CONTEXT_LEN = 77
#: Image tokens per frame that trigger the per-frame context split (hard-coded in the original).
IMAGE_TOKENS_PER_FRAME = 16


# --------------------------------------------------------------------------------------------------
# small building blocks
# --------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` of a 1-D tensor of (possibly integer) steps.

    ``f_i = exp(-ln(max_period) * i / (dim // 2))``; an odd ``dim`` gets one zero column at the end.
    Returns float32 ``[N, dim]``.
    """
    half = dim // 2
    idx = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * idx / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back to the input dtype (ResBlocks and ``out``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _run(module: nn.Module, fn, *args):
    """Call ``fn(*args)``, through non-reentrant activation checkpointing if the module asks for it."""
    if getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return _torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers called with what each needs.

    ResBlocks get ``(x, emb, batch_size)``, spatial transformers ``(x, context)``, temporal
    transformers the unfolded video ``[B, C, T, H, W]`` (and the context); other layers just ``x``.
    ``x`` is ``[(B T), C, H, W]`` in and out.
    """

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch_size=batch_size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                if batch_size is None:
                    raise ValueError("a temporal transformer needs batch_size (the number of videos)")
                n, c, h, w = x.shape
                t = n // batch_size
                x = x.reshape(batch_size, t, c, h, w).transpose(1, 2)
                x = layer(x, context)
                x = x.transpose(1, 2).reshape(n, c, h, w)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (key ``op``) or, without ``use_conv``, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        if dims != 2:
            raise NotImplementedError("only dims=2 is supported")
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W (nearest), then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        if dims != 2:
            raise NotImplementedError("only dims=2 is supported")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class TemporalConvBlock(nn.Module):
    """Four residual-free temporal convolutions on ``[B, C, T, H, W]`` with one outer residual.

    ``conv1 = [GroupNorm, SiLU, Conv3d]`` and ``conv2..4 = [GroupNorm, SiLU, Dropout, Conv3d]``; the
    kernels are (3, 1, 1) with padding (1, 0, 0), or, with ``spatial_aware``, (3, 3, 1) for conv1/3
    and (3, 1, 3) for conv2/4. The GroupNorms (32 groups, eps 1e-5) run in the input dtype.
    """

    def __init__(
        self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, spatial_aware: bool = False
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        k_h, p_h = ((3, 3, 1), (1, 1, 0)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        k_w, p_w = ((3, 1, 3), (1, 0, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        self.conv1 = nn.Sequential(
            nn.GroupNorm(32, in_channels), nn.SiLU(), nn.Conv3d(in_channels, out_channels, k_h, padding=p_h)
        )
        self.conv2 = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, k_w, padding=p_w),
        )
        self.conv3 = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, k_h, padding=p_h),
        )
        self.conv4 = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, k_w, padding=p_w),
        )
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """Time-conditioned residual block on ``[(B T), C, H, W]``, plus an optional temporal conv block.

    ``h = in_layers(x)``; ``h = h + emb_layers(emb)`` (or, with ``use_scale_shift_norm``,
    ``norm(h) * (1 + scale) + shift``); ``h = out_layers(h)``; ``h = skip_connection(x) + h``;
    then, if ``use_temporal_conv`` and a ``batch_size`` is given, ``temopral_conv`` (sic, the
    checkpoint's spelling) on the unfolded video.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_conv: bool = False,
        up: bool = False,
        down: bool = False,
        use_temporal_conv: bool = False,
        tempspatial_aware: bool = False,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise NotImplementedError("only dims=2 is supported")
        if up or down:
            raise NotImplementedError("ResBlock up/down-sampling (resblock_updown) is not supported")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_temporal_conv = use_temporal_conv
        self.gradient_checkpointing = use_checkpoint
        self.in_layers = nn.Sequential(
            _normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        out_conv = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(
            _normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout), out_conv
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)
        if use_temporal_conv:
            self.temopral_conv = TemporalConvBlock(
                self.out_channels, self.out_channels, dropout=0.1, spatial_aware=tempspatial_aware
            )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return _run(self, lambda x_, e_: self._forward(x_, e_, batch_size), x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        h = self.skip_connection(x) + h
        if self.use_temporal_conv and batch_size:
            n, c, hh, ww = h.shape
            t = n // batch_size
            v = h.reshape(batch_size, t, c, hh, ww).transpose(1, 2)
            v = self.temopral_conv(v)
            h = v.transpose(1, 2).reshape(n, c, hh, ww)
        return h


# --------------------------------------------------------------------------------------------------
# attention and transformers
# --------------------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` split in halves (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU(dim -> mult*dim) | Linear+GELU, Dropout, Linear(mult*dim -> dim_out)]``."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention with the original's context conventions.

    * ``context is None``: self-attention on ``x``.
    * With ``image_cross_attention``: ``context[:, :text_context_len]`` goes through ``to_k``/``to_v``
      and the rest through ``to_k_ip``/``to_v_ip``; the two attention results (same queries) are
      summed, the image one weighted by ``image_cross_attention_scale`` (times ``tanh(alpha) + 1``
      when ``image_cross_attention_scale_learnable``).
    * Otherwise a given context is cut to its first ``text_context_len`` tokens.

    ``mask`` (optional, broadcastable to ``[B, Lq, Lk]``) marks with values > 0.5 the keys that may
    be attended.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        image_cross_attention: bool = False,
        image_cross_attention_scale: float = 1.0,
        image_cross_attention_scale_learnable: bool = False,
        text_context_len: int = TEXT_CONTEXT_LEN,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale = image_cross_attention_scale
        self.image_cross_attention_scale_learnable = image_cross_attention_scale_learnable
        self.text_context_len = text_context_len
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
            if image_cross_attention_scale_learnable:
                self.alpha = nn.Parameter(torch.tensor(0.0))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn_mask = None
        if mask is not None:
            attn_mask = (mask > 0.5).unsqueeze(-3)  # [.., 1 (heads), Lq, Lk]
        return multi_head_attention(q, k, v, self.heads, attn_mask, scale=self.scale)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.to_q(x)
        out_ip = None
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
        elif self.image_cross_attention:
            text, image = context[:, : self.text_context_len], context[:, self.text_context_len :]
            k, v = self.to_k(text), self.to_v(text)
            out_ip = self._attend(q, self.to_k_ip(image), self.to_v_ip(image), None)
        else:
            text = context[:, : self.text_context_len]
            k, v = self.to_k(text), self.to_v(text)
        out = self._attend(q, k, v, mask)
        if out_ip is not None:
            if self.image_cross_attention_scale_learnable:
                out = out + self.image_cross_attention_scale * out_ip * (torch.tanh(self.alpha) + 1)
            else:
                out = out + self.image_cross_attention_scale * out_ip
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))`` (LayerNorm eps 1e-5).

    ``attn1`` is self-attention (or cross-attention to the context with ``disable_self_attn``);
    ``attn2`` is cross-attention to the context, or self-attention when the context is ``None``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
        image_cross_attention: bool = False,
        image_cross_attention_scale: float = 1.0,
        image_cross_attention_scale_learnable: bool = False,
        text_context_len: int = TEXT_CONTEXT_LEN,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.gradient_checkpointing = checkpoint
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim,
            context_dim=context_dim,
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
            image_cross_attention=image_cross_attention,
            image_cross_attention_scale=image_cross_attention_scale,
            image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
            text_context_len=text_context_len,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _run(self, self._forward, x, context, mask)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None, mask=mask) + x
        x = self.attn2(self.norm2(x), context=context, mask=mask) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the ``H*W`` tokens of ``[N, C, H, W]``, with a residual.

    ``norm`` (GroupNorm 32, eps 1e-6) -> ``proj_in`` (Linear, or 1x1 Conv2d without ``use_linear``)
    -> ``transformer_blocks`` -> ``proj_out`` -> ``+ x``.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        video_length: int | None = None,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.video_length = video_length
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                checkpoint=use_checkpoint,
                disable_self_attn=disable_self_attn,
                image_cross_attention=image_cross_attention,
                image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(n, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TemporalTransformer(nn.Module):
    """Transformer over the ``T`` frames at each pixel of ``[B, C, T, H, W]``, with a residual.

    ``norm`` is a GroupNorm (32, eps 1e-6) over the whole video (statistics over C/32, T, H, W).
    ``proj_in``/``proj_out`` are Linear with ``use_linear`` and kernel-1 Conv1d otherwise. With
    ``only_self_att`` (all released models) both attentions are self-attention over frames, with an
    optional causal mask. Otherwise ``attn2`` attends to the text part of the per-frame context, and
    token ``p`` of the ``H*W`` sequences of a video uses the context of frame ``p // (H*W/T)``, the
    original's layout (no causal mask in that case).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        use_linear: bool = False,
        only_self_att: bool = True,
        causal_attention: bool = False,
        causal_block_size: int = 1,
        relative_position: bool = False,
        temporal_length: int | None = None,
    ) -> None:
        super().__init__()
        if relative_position:
            raise NotImplementedError("relative position in temporal attention is not supported")
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.only_self_att = only_self_att
        self.causal_attention = causal_attention
        self.causal_block_size = causal_block_size
        self.temporal_length = temporal_length
        if causal_attention and temporal_length is None:
            raise ValueError("causal temporal attention needs temporal_length")
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = (
            nn.Linear(in_channels, inner) if use_linear else nn.Conv1d(in_channels, inner, kernel_size=1)
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=None if only_self_att else context_dim,
                checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        self.proj_out = (
            nn.Linear(inner, in_channels) if use_linear else nn.Conv1d(inner, in_channels, kernel_size=1)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)  # [(B H W), C, T]
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.transpose(1, 2)  # [(B H W), T, C']
        if self.use_linear:
            x = self.proj_in(x)

        if self.only_self_att:
            mask = None
            if self.causal_attention:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None]
            for block in self.transformer_blocks:
                x = block(x, mask=mask)
        else:
            if context is None:
                raise ValueError("temporal cross-attention needs a context")
            hw = h * w
            if hw % t:
                raise ValueError("temporal cross-attention needs H*W divisible by T")
            ctx = context.reshape(b, t, *context.shape[1:]).repeat_interleave(hw // t, dim=1)
            ctx = ctx.reshape(b * hw, *context.shape[1:])
            for block in self.transformer_blocks:
                x = block(x, context=ctx)

        if self.use_linear:
            x = self.proj_out(x)
            x = x.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        else:
            x = self.proj_out(x.transpose(1, 2))  # [(B H W), C, T]
            x = x.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        return x + x_in


# --------------------------------------------------------------------------------------------------
# the UNet
# --------------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """The LVDM 3-D UNet of DynamiCrafter, with the original's constructor keywords and state keys.

    Official configuration (``configs/inference_{256,512,1024}_v1.0.yaml``): in_channels 8,
    out_channels 4, model_channels 320, attention_resolutions [4, 2, 1], num_res_blocks 2,
    channel_mult [1, 2, 4, 4], num_head_channels 64, transformer_depth 1, context_dim 1024,
    use_linear, temporal_conv, temporal_attention, temporal_selfatt_only, addition_attention,
    image_cross_attention, fs_condition all true, temporal_length 16, default_fs 24 (512),
    10 (1024) or 3 (256, which also sets image_cross_attention_scale_learnable).

    Not supported (no released model uses them): ``use_relative_position``, ``resblock_updown`` and
    ``dims`` other than 2 raise :class:`NotImplementedError`. ``use_fp16`` is accepted and ignored:
    the module computes in the dtype of its parameters (cast it with ``.to(dtype)``), and returns the
    dtype of ``x``.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        context_dim: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        temporal_conv: bool = False,
        tempspatial_aware: bool = False,
        temporal_attention: bool = True,
        use_relative_position: bool = True,
        use_causal_attention: bool = False,
        temporal_length: int | None = None,
        use_fp16: bool = False,
        addition_attention: bool = False,
        temporal_selfatt_only: bool = True,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
        default_fs: int = 4,
        fs_condition: bool = False,
    ) -> None:
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if dims != 2:
            raise NotImplementedError("only dims=2 is supported")
        if resblock_updown:
            raise NotImplementedError("resblock_updown is not supported")
        if use_relative_position and temporal_attention:
            raise NotImplementedError("use_relative_position is not supported")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.context_dim = context_dim
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.temporal_attention = temporal_attention
        self.temporal_length = temporal_length
        self.use_fp16 = use_fp16
        self.addition_attention = addition_attention
        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale_learnable = image_cross_attention_scale_learnable
        self.default_fs = default_fs
        self.fs_condition = fs_condition

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if fs_condition:
            self.fps_embedding = nn.Sequential(
                nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )
            nn.init.zeros_(self.fps_embedding[2].weight)
            nn.init.zeros_(self.fps_embedding[2].bias)

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_temporal_conv=temporal_conv,
                tempspatial_aware=tempspatial_aware,
            )

        def attention_layers(ch: int) -> list[nn.Module]:
            n_heads, d_head = heads_for(ch)
            layers: list[nn.Module] = [
                SpatialTransformer(
                    ch,
                    n_heads,
                    d_head,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    use_checkpoint=use_checkpoint,
                    use_linear=use_linear,
                    video_length=temporal_length,
                    image_cross_attention=image_cross_attention,
                    image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                )
            ]
            if temporal_attention:
                layers.append(
                    TemporalTransformer(
                        ch,
                        n_heads,
                        d_head,
                        depth=transformer_depth,
                        context_dim=context_dim,
                        use_checkpoint=use_checkpoint,
                        use_linear=use_linear,
                        only_self_att=temporal_selfatt_only,
                        causal_attention=use_causal_attention,
                        relative_position=use_relative_position,
                        temporal_length=temporal_length,
                    )
                )
            return layers

        # encoder
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        if addition_attention:
            self.init_attn = TimestepEmbedSequential(
                TemporalTransformer(
                    model_channels,
                    n_heads=8,
                    d_head=num_head_channels,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    use_checkpoint=use_checkpoint,
                    only_self_att=temporal_selfatt_only,
                    causal_attention=False,
                    relative_position=use_relative_position,
                    temporal_length=temporal_length,
                )
            )
        skip_channels = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.extend(attention_layers(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims, ch)))
                skip_channels.append(ch)
                ds *= 2

        # bottleneck
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), *attention_layers(ch), res_block(ch, ch))

        # decoder
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [res_block(ch + skip, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.extend(attention_layers(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_conv = nn.Conv2d(model_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(_normalization(ch), nn.SiLU(), out_conv)

        if use_checkpoint:
            self.set_gradient_checkpointing(True)

    # ---------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (that of its weights)."""
        return self.time_embed[0].weight.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether ResBlocks and transformer blocks are activation-checkpointed."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self._checkpointable())

    def _checkpointable(self):
        return (m for m in self.modules() if isinstance(m, (ResBlock, BasicTransformerBlock)))

    def set_gradient_checkpointing(self, enabled: bool = True) -> UNetModel:
        """Turn non-reentrant activation checkpointing of every ResBlock and transformer block on/off."""
        for m in self._checkpointable():
            m.gradient_checkpointing = bool(enabled)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # The 256 checkpoint names the fs MLP ``framestride_embed``; accept it as ``fps_embedding``.
        old = prefix + "framestride_embed."
        for key in [k for k in state_dict if k.startswith(old)]:
            new = prefix + "fps_embedding." + key[len(old) :]
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------

    def _frame_context(self, context: torch.Tensor | None, t: int) -> torch.Tensor | None:
        """Per-frame context ``[(B T), L', D]`` from the video context ``[B, L, D]``."""
        if context is None:
            return None
        b, length, dim = context.shape
        if length == TEXT_CONTEXT_LEN + IMAGE_TOKENS_PER_FRAME * t:
            text = context[:, :TEXT_CONTEXT_LEN].repeat_interleave(t, dim=0)
            image = context[:, TEXT_CONTEXT_LEN:].reshape(b * t, IMAGE_TOKENS_PER_FRAME, dim)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(t, dim=0)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        features_adapter: Sequence[torch.Tensor] | None = None,
        fs: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Denoiser output ``[B, out_channels, T, H, W]`` for ``x`` ``[B, in_channels, T, H, W]``.

        ``timesteps`` and ``fs`` are ``[B]`` (integer or float); ``fs`` defaults to ``default_fs``.
        ``context`` is ``[B, 77 + n_img, context_dim]`` (text tokens, then image tokens).
        ``features_adapter``, if given, holds one tensor per group of three input blocks, added to
        the output of ``input_blocks[3k + 2]`` (the original's T2I-adapter hook). Extra keyword
        arguments are ignored, as in the original.
        """
        b, _, t, h, w = x.shape
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.default_fs, dtype=torch.long, device=x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, self.model_channels).to(dtype))
        emb = emb.repeat_interleave(t, dim=0)
        context = self._frame_context(context, t)
        if context is not None:
            context = context.to(dtype)

        hidden = x.transpose(1, 2).reshape(b * t, x.shape[1], h, w).to(dtype)
        skips = []
        adapter_idx = 0
        for idx, block in enumerate(self.input_blocks):
            hidden = block(hidden, emb, context, b)
            if idx == 0 and self.addition_attention:
                hidden = self.init_attn(hidden, emb, context, b)
            if features_adapter is not None and (idx + 1) % 3 == 0:
                hidden = hidden + features_adapter[adapter_idx]
                adapter_idx += 1
            skips.append(hidden)
        if features_adapter is not None and adapter_idx != len(features_adapter):
            raise ValueError(f"features_adapter has {len(features_adapter)} entries, {adapter_idx} were used")

        hidden = self.middle_block(hidden, emb, context, b)
        for block in self.output_blocks:
            hidden = block(torch.cat([hidden, skips.pop()], dim=1), emb, context, b)
        out = self.out(hidden)
        out = out.reshape(b, t, *out.shape[1:]).transpose(1, 2)
        return out.to(x.dtype)
