"""Working memory of a run, estimated on the meta device: the bytes of tensors alive at once.

Weights are built before counting and are not counted; every tensor an operation creates
while counting is, from its creation until its last reference goes (autograd's saved
tensors included), so the peak is what an allocator would have to hold, without its
fragmentation. Two things make the meta device behave like a GPU here:

- `fused_attention`: PyTorch's attention on the meta device is the math path, which
  materialises the attention matrix; a GPU runs a fused kernel that keeps only the output
  and its log-sum-exp. Inside the context the fused kernels' own meta functions run.
- `host_saved_tensors`: what a memory mode saves in CPU memory (`torch.autograd.graph.save_on_cpu`)
  is packed into its shape alone while counting, and an empty tensor of that shape comes
  back for the backward pass.

Checked against the one full-size GPU measurement (CogVideoX-5B, the paper's objective,
`bench_protect_h200.json`): 10.9 GiB estimated against 11.1 GiB measured with gradient
checkpointing, 58.6 against 58.8 without.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operations create while active: ``live`` now, ``peak`` so far.

    A storage an operation returns is counted once, at its creation; outputs that share an
    input's storage (views, in-place results) are not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()

        def release(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self._tracked.pop(key, None)
            self.live -= size

        self._tracked[key] = weakref.ref(storage, release)
        self.live += size
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in inputs and id(storage) not in self._tracked:
                    self._count(storage)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """`scaled_dot_product_attention` through the fused kernels' meta functions (flash without a
    mask, memory-efficient with one), which save what the GPU kernels save."""
    if enable_gqa:
        raise NotImplementedError("grouped-query attention is not estimated")
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route `torch.nn.functional.scaled_dot_product_attention` through the fused kernels while active."""
    functional = torch.nn.functional
    before = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = before


def _host_saved_tensors() -> contextlib.AbstractContextManager:
    """Saved-tensor hooks that keep only the shape of what a memory mode moves to CPU memory."""

    def pack(tensor: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
        return tensor.shape, tensor.dtype

    def unpack(packed: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
        shape, dtype = packed
        return torch.empty(shape, dtype=dtype, device="meta")

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@contextlib.contextmanager
def host_saved_tensors(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While active, what autograd saves inside ``modules``' calls is counted as held in CPU memory."""
    from anti_i2v.call_context import CallContext

    hooks = CallContext(_host_saved_tensors).install(modules)
    try:
        yield
    finally:
        hooks.remove()
