"""DynamiCrafter's image-token projector (``image_proj_model``): a Perceiver-style Resampler.

The Resampler turns the CLIP ViT tokens of the conditioning image (``[B, 257, embedding_dim]``: the
class token plus the 16x16 patch tokens, taken before ``ln_post``) into
``num_queries * video_length`` context tokens of width ``output_dim``. Frame ``f`` of the video owns
tokens ``[num_queries * f, num_queries * (f + 1))``; the UNet splits them per frame when the context
length is ``77 + num_queries * T``.

Computation (written from the description in the original release and the fixture notes):

* ``x = proj_in(tokens)``; ``latents`` is a learned ``[1, num_queries * video_length, dim]`` array
  repeated over the batch.
* ``depth`` times: ``latents = attn(x, latents) + latents`` then ``latents = ff(latents) + latents``.
* ``out = norm_out(proj_out(latents))``.

The attention block (``layers.N.0``) normalises the image tokens with ``norm1`` and the latents with
``norm2``. Queries come from the normalised latents only; keys and values from the concatenation
``[norm1(x), norm2(latents)]`` along the token axis. The original scales q and k each by
``dim_head ** -0.25`` before their product and takes the softmax in float32, which is the ordinary
``softmax(q k^T / sqrt(dim_head))`` computed here with :func:`torch.nn.functional.scaled_dot_product_attention`.
``to_q``, ``to_kv`` and ``to_out`` have no bias. The feed-forward block (``layers.N.1``) is
``Sequential(LayerNorm, Linear(no bias), GELU (exact erf), Linear(no bias))`` with hidden width
``dim * ff_mult``. All LayerNorms use eps 1e-5.

State-dict keys equal those of the original module, so the official checkpoint's
``image_proj_model.*`` entries load with ``strict=True`` after stripping that prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward", "PerceiverAttention", "Resampler"]


class PerceiverAttention(nn.Module):
    """Cross-attention from the latent queries to ``[image tokens; latents]``.

    Keys: ``norm1``, ``norm2`` (LayerNorm over ``dim``), ``to_q`` (``dim -> heads*dim_head``),
    ``to_kv`` (``dim -> 2*heads*dim_head``, keys first then values), ``to_out``
    (``heads*dim_head -> dim``); no biases in the linear layers.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Attend from ``latents`` [B, Nq, dim] to ``[x; latents]`` ([B, Nx, dim] and [B, Nq, dim]).

        Returns the attention output [B, Nq, dim] (without the residual).
        """
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16):
            # The original takes the softmax in float32; do the whole product there for half inputs.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Sequential):
    """``LayerNorm -> Linear(dim, dim*mult, no bias) -> GELU(erf) -> Linear(dim*mult, dim, no bias)``.

    Indices 0, 1 and 3 carry the weights (``layers.N.1.{0,1,3}``), as in the original.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        inner_dim = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim, bias=False),
            nn.GELU(),
            nn.Linear(inner_dim, dim, bias=False),
        )


class Resampler(nn.Module):
    """Perceiver Resampler that maps CLIP image tokens to per-frame UNet context tokens.

    The parameter names are the original's (``configs/inference_*.yaml``,
    ``image_proj_stage_config.params``). The released checkpoints use ``dim=1024, depth=4,
    dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=1024, ff_mult=4,
    video_length=16`` (48.8 M parameters).

    Args:
        dim: internal width of the latent queries.
        depth: number of (attention, feed-forward) blocks.
        dim_head: width of one attention head.
        heads: number of attention heads.
        num_queries: query tokens per frame.
        embedding_dim: width of the input image tokens.
        output_dim: width of the output tokens (the UNet's ``context_dim``).
        ff_mult: hidden-width multiplier of the feed-forward blocks.
        video_length: number of frames; the module has ``num_queries * video_length`` queries.
            ``None`` means a single set of ``num_queries`` queries.
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 8,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        embedding_dim: int = 768,
        output_dim: int = 1024,
        ff_mult: int = 4,
        video_length: int | None = None,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.video_length = video_length
        total_queries = num_queries * video_length if video_length is not None else num_queries
        self.latents = nn.Parameter(torch.randn(1, total_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim=dim, mult=ff_mult)]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project image tokens ``x`` [B, N, embedding_dim] to [B, num_queries*video_length, output_dim]."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
