"""Speed levers that leave the numbers as they are: a compiled denoiser and a chosen attention kernel.

Both are properties of a loaded model (the engine and the objectives see none of them):

- `compile_denoiser` compiles each denoiser block's ``forward`` with `torch.compile`
  ("regional" compilation: identical blocks share one compiled graph, so compiling a
  transformer costs one block's time, not the model's). A U-Net's blocks differ in shape,
  so there each block shape gets a graph of its own. Hooks stay outside the compiled code,
  so feature taps, early exits and the block streaming of the ``sequential`` memory mode
  work as before. The first steps pay the compilation.
- `use_attention_kernel` runs the model's denoiser blocks and VAE-encoder layers under
  `torch.nn.attention.sdpa_kernel` with one backend ("flash", "efficient", "cudnn" or
  "math"); "auto" leaves the choice to PyTorch, which takes the fastest kernel the inputs
  allow.

`tests/test_acceleration.py` checks each against the plain path on a tiny model (same loss
and gradient within tolerance); `docs/results/speed.md` has what each buys.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from anti_i2v.call_context import CallContext
from anti_i2v.errors import ConfigError
from anti_i2v.memory import denoiser_blocks, layer_modules
from anti_i2v.models.base import VideoModel

logger = logging.getLogger(__name__)

# kernel names -> `torch.nn.attention.SDPBackend` members
_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
ATTENTION_KERNELS = ("auto", *_BACKENDS)


# Compiled graphs one block may need: with and without gradients, each for the frame counts of a run
# (a share of the frames, then every frame) and for an input that does or does not carry a gradient.
GRAPHS_PER_BLOCK = 8


def compile_denoiser(model: VideoModel, backend: str = "inductor", mode: str | None = None) -> VideoModel:
    """Compile the ``forward`` of each of ``model``'s denoiser blocks (see the module docstring).

    Graphs are static (one per input shape): shape-generic graphs would save compilations on a
    U-Net, but inductor failed to build some of DynamiCrafter's. The blocks of one class share
    one cache of compiled graphs, which is enlarged to hold every block's: at torch's default
    of 8, DynamiCrafter's blocks past the eighth shape silently ran uncompiled.
    """
    blocks = denoiser_blocks(model)
    _make_room_for_graphs(blocks)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, mode=mode, dynamic=False)
    model.compiled = True
    logger.info("%s: %d denoiser blocks compiled (%s)", model.name, len(blocks), backend)
    return model


def _make_room_for_graphs(blocks: list[torch.nn.Module]) -> None:
    """Raise torch's limits on compiled graphs per function (never lower them) to what the
    blocks sharing one ``forward`` may need."""
    needed = GRAPHS_PER_BLOCK * max(Counter(type(block).forward for block in blocks).values(), default=1)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)


def check_attention_kernel(name: str) -> str:
    """``name`` if it names an attention kernel, else a ConfigError listing them."""
    if name not in ATTENTION_KERNELS:
        raise ConfigError(f"unknown attention kernel '{name}'; choose from {', '.join(ATTENTION_KERNELS)}")
    return name


def use_attention_kernel(model: VideoModel, name: str) -> VideoModel:
    """Make ``model``'s attention use the kernel ``name`` ("auto": PyTorch's choice, nothing hooked).

    A kernel that cannot serve the model's inputs (flash attention in fp32, say) fails at the
    first step with PyTorch's reason.
    """
    check_attention_kernel(name)
    model.attention_kernel = name
    if name == "auto":
        return model
    # the backward pass reuses the kernel its forward chose, so hooking the calls is enough
    backend = getattr(torch.nn.attention.SDPBackend, _BACKENDS[name])
    kernel = CallContext(lambda: torch.nn.attention.sdpa_kernel(backend))
    model.attention_hooks = kernel.install(layer_modules(model, "denoiser") + layer_modules(model, "vae_encoder"))
    return model
