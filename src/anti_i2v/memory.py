"""Memory modes: how much of a model sits on the accelerator at once.

``max``
    As ``full``, and the differentiated denoiser passes of the default's sampler keep their
    activations until the backward pass instead of being recomputed in it: a step costs
    four forward passes' worth per pass instead of five, for the activations of every pass at
    once (about 22 GiB more on CogVideoX-5B by the meta-device estimate). For 80 GB cards.
``full``
    Every weight on the accelerator; the text encoder runs there once, then is freed. Each
    differentiated denoiser pass of the sampler is recomputed in the backward pass, so that
    one pass's activations are held at a time.
``offload``
    The text encoder runs on the CPU and never reaches the accelerator; the denoiser
    recomputes its blocks in the backward pass (gradient checkpointing); the VAE decodes
    generated videos in tiles. For 24 GB cards.
``sequential``
    As ``offload``, and the denoiser's blocks stay on the CPU: each block's weights are
    copied onto the accelerator for its call (forward, and again for the recomputation in
    the backward pass) and dropped after it; what autograd saves in the VAE encoder (which
    is not checkpointed) waits in CPU memory. For 12 GB cards; every step moves the
    denoiser's weights twice, so it is slower. The block inputs that gradient checkpointing
    keeps stay on the accelerator.

The mode is a property of a loaded model (`apply_memory_mode`); the engine and the
objectives see none of it. `resident_weight_bytes` says how many bytes of weights each mode
keeps on the accelerator, and `out_of_memory_message` turns an out-of-memory error into
one line that names the mode that would fit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from anti_i2v.call_context import CallContext
from anti_i2v.config import MEMORY_MODES
from anti_i2v.errors import ConfigError
from anti_i2v.models.base import VideoModel
from anti_i2v.offload import module_bytes, move_tensors_except

logger = logging.getLogger(__name__)

GIB = 1024**3


def check_memory_mode(mode: str) -> str:
    """``mode`` if it names a memory mode, else a ConfigError listing them."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"unknown memory mode '{mode}'; choose from {', '.join(MEMORY_MODES)}")
    return mode


def denoiser_blocks(model: VideoModel) -> list[nn.Module]:
    """The modules behind the model's denoiser block names, each once, in order."""
    return layer_modules(model, "denoiser")


def layer_modules(model: VideoModel, group: str) -> list[nn.Module]:
    """The modules behind the model's ``group`` layer names ("denoiser" or "vae_encoder"), each once,
    in order: the regions called as modules at every step, where per-call settings are hooked."""
    modules: dict[int, nn.Module] = {}
    for name in getattr(model.layers(), group):
        module = model.module(name)
        modules.setdefault(id(module), module)
    return list(modules.values())


def resident_weight_bytes(model: VideoModel, mode: str) -> int:
    """Bytes of weights the accelerator holds at the worst moment of a protection in ``mode``.

    ``full`` holds every weight while the prompt is encoded; ``offload`` every weight but the
    text encoder; ``sequential`` those minus the denoiser's blocks, plus the two largest
    blocks (one block's copy may still be referenced by the backward pass when the next
    one arrives). Working memory (activations, gradients) comes on top.
    """
    check_memory_mode(mode)
    everything = module_bytes(model.weight_modules())
    if mode in ("max", "full"):
        return everything
    text = module_bytes(model.text_encoders())
    if mode == "offload":
        return everything - text
    blocks = sorted((module_bytes([b]) for b in denoiser_blocks(model)), reverse=True)
    return everything - text - sum(blocks) + sum(blocks[:2])


@dataclass
class _Slot:
    owner: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    master: torch.Tensor  # the copy that stays on the CPU


@dataclass
class BlockStreamer:
    """Keeps blocks' weights on the CPU and gives each block a copy on ``device`` for each call.

    The copy replaces the block's tensors for the call and is dropped after it; what the
    backward pass still needs of it stays alive through autograd's references alone, so
    at most a block or two of weights sit on the device at once.
    """

    device: torch.device
    loads: int = 0  # block copies made so far (read by tests and logs)
    masters: list[torch.Tensor] = field(default_factory=list)  # what the blocks hold between calls
    _hooks: list[CallContext] = field(default_factory=list)

    def install(self, blocks: Sequence[nn.Module]) -> None:
        """Move ``blocks``' weights to the CPU (pinned when CUDA is present) and hook their calls."""
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        for block in blocks:
            slots = []
            for owner in block.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(owner, kind).items():
                        if tensor is None:
                            continue
                        master = tensor.detach().to("cpu")
                        master = master.pin_memory() if pin else master
                        slots.append(_Slot(owner, kind, name, master))
                        self.masters.append(master)
                        self._put(slots[-1], master)
            self._hooks.append(CallContext(lambda slots=slots: self._streamed(slots)).install([block]))

    @staticmethod
    def _put(slot: _Slot, tensor: torch.Tensor) -> None:
        if slot.kind == "_parameters":
            tensor = nn.Parameter(tensor, requires_grad=False)
        getattr(slot.owner, slot.kind)[slot.name] = tensor

    @contextlib.contextmanager
    def _streamed(self, slots: list[_Slot]) -> Iterator[None]:
        """The block holds a device copy of its weights for one call, its CPU masters again after."""
        for slot in slots:
            # copy=True: a fresh tensor per call, even where the device is the CPU itself
            self._put(slot, slot.master.to(self.device, non_blocking=True, copy=True))
        self.loads += 1
        try:
            yield
        finally:
            for slot in slots:
                self._put(slot, slot.master)

    def remove(self) -> None:
        """Unhook the blocks (their weights stay on the CPU)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def tile_decoding(vae: nn.Module) -> None:
    """Make a diffusers VAE decode in tiles (as `enable_tiling` does) while encoding stays whole, so
    that the protection's gradient is the one of the full mode; VAEs that cannot tile are left as
    they are."""
    if not hasattr(vae, "use_tiling") or getattr(vae, "_tiles_decoding", False):
        return
    decode = vae.decode

    def decode_in_tiles(*args, **kwargs):
        before, vae.use_tiling = vae.use_tiling, True
        try:
            return decode(*args, **kwargs)
        finally:
            vae.use_tiling = before

    vae.decode = decode_in_tiles
    vae._tiles_decoding = True


def apply_memory_mode(model: VideoModel, mode: str) -> VideoModel:
    """Set ``model`` up for ``mode`` (see the module docstring); returns it.

    ``full`` and ``max`` change no weight's place (``max`` is read by the sampler: its passes
    are not recomputed). On the CPU every mode computes the same numbers; ``sequential`` then
    still copies each block per call (which is how it is checked against ``full``).
    """
    check_memory_mode(mode)
    if mode == "sequential" and not model.checkpoints_whole_blocks:
        raise ConfigError(f"--memory sequential does not serve '{model.name}' (its denoiser recomputes parts of "
                          "blocks, which streaming whole blocks cannot follow); use --memory offload")
    model.memory_mode = mode
    if mode in ("max", "full"):
        return model
    model.text_on_cpu = True
    vae = getattr(model, "vae", None)
    if isinstance(vae, nn.Module):
        tile_decoding(vae)  # generating a video (verify, references) decodes every frame at once otherwise
    text = model.text_encoders()
    for encoder in text:
        encoder.to("cpu")
    if mode == "sequential":
        blocks = denoiser_blocks(model)
        streamer = BlockStreamer(model.device)
        streamer.install(blocks)
        model.block_streamer = streamer
        inside = {id(m) for b in blocks for m in b.modules()} | {id(m) for t in text for m in t.modules()}
        move_tensors_except(model.weight_modules(), inside, model.device)
        # what autograd saves in the VAE encoder (not checkpointed) waits in CPU memory until the backward pass
        pin = model.device.type == "cuda"
        offload = CallContext(lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))
        model.activation_offload = offload.install(layer_modules(model, "vae_encoder"))
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("%s: memory mode %s (%s)", model.name, mode, MEMORY_MODES[mode])
    return model


def lighter_mode(mode: str) -> str | None:
    """The next mode that keeps less on the accelerator, None after ``sequential``."""
    modes = list(MEMORY_MODES)  # ordered from the most to the least on the accelerator
    index = modes.index(check_memory_mode(mode)) + 1
    return modes[index] if index < len(modes) else None


def out_of_memory_message(models: Sequence[VideoModel], mode: str) -> str:
    """One line for an out-of-memory error in ``mode``: the device's size and the first lighter mode
    whose weights fit in it (when its size is known), with the weights it keeps on the accelerator."""
    device = models[0].device
    total = None
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
    size = f" ({total / GIB:.0f} GiB)" if total else ""
    names = ", ".join(m.name for m in models)
    head = f"out of memory on {device}{size} protecting against {names} in --memory {mode}"
    lighter = lighter_mode(mode)
    if lighter is None:
        return f"{head}; this is the lightest mode: use a GPU with more memory, or --device cpu"
    while lighter is not None:
        weights = sum(resident_weight_bytes(m, lighter) for m in models)
        if total is None or weights < total:
            return (f"{head}; try --memory {lighter} ({MEMORY_MODES[lighter]}; it keeps {weights / GIB:.1f} GiB "
                    "of weights on the GPU at once); nothing was written for this photo")
        lighter = lighter_mode(lighter)
    return f"{head}; no lighter mode's weights fit this GPU: use one with more memory, or --device cpu"


@contextlib.contextmanager
def deferred_placement() -> Iterator[None]:
    """While active, `place` casts modules but leaves them on the CPU, so that a model too large for
    the accelerator can be built and then set up by `apply_memory_mode` ('sequential')."""
    from anti_i2v.models import diffusers_common

    before = diffusers_common.DEFER_PLACEMENT
    diffusers_common.DEFER_PLACEMENT = True
    try:
        yield
    finally:
        diffusers_common.DEFER_PLACEMENT = before
