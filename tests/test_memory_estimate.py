"""The meta-device working-memory estimate (`benchmarks/memory_estimate.py`) counts what a GPU holds."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from memory_estimate import LiveTensorBytes, fused_attention, host_saved_tensors  # noqa: E402

MIB = 2**20


def _chain(depth: int = 4, width: int = 256) -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(*[nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                               for _ in range(depth)])


def _peak(run) -> int:
    x = torch.empty(1024, 256, device="meta", requires_grad=True)
    with LiveTensorBytes() as counted:
        y = run(x * 1)
        torch.autograd.grad(y.square().mean(), x)
    return counted.peak


def test_the_peak_counts_saved_activations_and_checkpointing_lowers_it():
    chain = _chain()
    plain = _peak(chain)
    per_block = _peak(lambda h: [h := checkpoint(block, h, use_reentrant=False) for block in chain][-1])
    # each block saves its input (1 MiB), the first linear's output and the GELU's (4 MiB each) in fp32;
    # the weights (8 MiB) existed before counting and are not counted, or the upper bound would not hold
    saved = 4 * (1 + 4 + 4) * MIB
    assert saved <= plain < saved + 8 * MIB
    assert per_block < plain / 2


def test_views_and_in_place_results_are_not_new_memory():
    with LiveTensorBytes() as counted:
        a = torch.empty(256, 1024, device="meta")
        a.t().add_(1)
        a.view(-1).mul_(2)
        a.t().reshape(-1)  # not contiguous: reshaping copies
    assert counted.peak == 2 * 256 * 1024 * 4


def test_fused_attention_keeps_the_output_and_not_the_attention_matrix():
    q = torch.empty(1, 4, 4096, 64, device="meta", requires_grad=True)

    def attention_peak() -> tuple[int, torch.Size, torch.Size]:
        with LiveTensorBytes() as counted:
            out = torch.nn.functional.scaled_dot_product_attention(q * 1, q * 1, q * 1)
            (grad,) = torch.autograd.grad(out.sum(), q)
        return counted.peak, out.shape, grad.shape

    math_peak, math_shape, _ = attention_peak()
    with fused_attention():
        fused_peak, fused_shape, grad_shape = attention_peak()
    assert fused_shape == math_shape and grad_shape == q.shape
    matrix = 4 * 4096 * 4096 * 4  # one fp32 attention matrix
    assert math_peak > matrix > 8 * fused_peak
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_fused_attention_takes_masks():
    q = torch.empty(2, 4, 128, 32, device="meta", requires_grad=True)
    mask = torch.ones(2, 1, 128, 128, dtype=torch.bool, device="meta")
    with fused_attention():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        (grad,) = torch.autograd.grad(out.sum(), q)
    assert out.shape == q.shape == grad.shape


def test_saved_tensors_kept_in_host_memory_are_not_counted():
    chain = _chain(depth=6)
    on_device = _peak(chain)
    with host_saved_tensors([chain]):
        on_host = _peak(chain)
    assert on_host < on_device / 2
