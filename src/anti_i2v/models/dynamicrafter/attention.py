"""Generic attention helpers built on :func:`torch.nn.functional.scaled_dot_product_attention`.

Nothing here is specific to one module: the UNet's spatial/temporal transformers use
:func:`multi_head_attention`, and any other part of the port may use the plain
:func:`scaled_dot_product_attention` wrapper.

Two practical points are handled here so that callers need not care:

* In some torch releases CUDA's fused SDPA kernels put the batch dimension on a launch-grid axis
  limited to 65 535 blocks (pytorch/pytorch#146704, #142228; torch 2.11 on an H200 was seen to
  handle a batch of 70 000). DynamiCrafter's temporal attention runs one tiny sequence (the 16
  frames) per latent pixel, so its batch is ``B * H * W`` (9 216 per video at 1024x576) and can
  pass that limit for a few videos. The wrapper splits the batch into chunks below the limit on
  CUDA; the result is identical.
* Half-precision inputs can optionally be attended in float32 (``upcast=True``), which matches
  originals that take the softmax in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MAX_CUDA_SDPA_BATCH", "multi_head_attention", "scaled_dot_product_attention"]

#: Largest leading (batch) size given to one CUDA SDPA call (the grid-dimension limit is 65 535).
MAX_CUDA_SDPA_BATCH = 32768


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over ``[..., L, E]`` tensors, via torch SDPA.

    Same arguments and semantics as :func:`torch.nn.functional.scaled_dot_product_attention`
    (``scale`` defaults to ``E ** -0.5``; a boolean ``attn_mask`` marks the positions that take
    part). Extras: ``upcast=True`` computes in float32 for float16/bfloat16 inputs and returns the
    input dtype; on CUDA a leading batch dimension larger than :data:`MAX_CUDA_SDPA_BATCH` is
    processed in chunks. Fully differentiable.
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()

    def _call(q_, k_, v_, m_):
        return F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=m_, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )

    n = q.shape[0] if q.dim() >= 3 else 1
    if q.is_cuda and q.dim() >= 3 and n > MAX_CUDA_SDPA_BATCH:
        outs = []
        for start in range(0, n, MAX_CUDA_SDPA_BATCH):
            sl = slice(start, start + MAX_CUDA_SDPA_BATCH)
            m = attn_mask
            if m is not None and m.dim() == q.dim() and m.shape[0] == n:
                m = m[sl]
            outs.append(_call(q[sl], k[sl], v[sl], m))
        out = torch.cat(outs, dim=0)
    else:
        out = _call(q, k, v, attn_mask)
    return out.to(dtype)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Multi-head attention on token-major tensors.

    ``q`` is ``[B, Lq, heads * d]``, ``k`` ``[B, Lk, heads * d]`` and ``v`` ``[B, Lk, heads * dv]``;
    channel ``h * d + i`` belongs to head ``h`` (the usual ``(h d)`` layout). ``attn_mask``, if given,
    broadcasts to ``[B, heads, Lq, Lk]`` (e.g. ``[Lq, Lk]``). Returns ``[B, Lq, heads * dv]``.
    """
    b, lq, _ = q.shape
    lk = k.shape[1]
    q = q.reshape(b, lq, heads, -1).transpose(1, 2)
    k = k.reshape(b, lk, heads, -1).transpose(1, 2)
    v = v.reshape(b, lk, heads, -1).transpose(1, 2)
    out = scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, upcast=upcast)
    return out.transpose(1, 2).reshape(b, lq, -1)
