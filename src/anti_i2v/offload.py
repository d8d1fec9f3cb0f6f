"""Several models, one accelerator: keep each model's weights there while they fit, park the rest on the CPU.

An ensemble (``protect --model cogvideox,svd,wan-i2v``) runs its members one after
another at every step. When their weights fit on the accelerator together, they all
stay there. When they do not, a member's weights are moved onto the accelerator for
its turn, and the least recently used others are parked on the CPU until there is
room for its weights plus the working memory its last turn needed (the first turn
of each model runs it alone, which is how that working memory is measured).

Only weights move: what an adapter or objective caches (prompt embeddings, clean
features, reference latents) stays on the compute device; it is small next to them.
The engine and objectives see none of this; the ensemble objective calls `turn`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from anti_i2v.models.base import VideoModel

logger = logging.getLogger(__name__)

PARK_DEVICE = torch.device("cpu")


def module_bytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(model: VideoModel) -> int:
    """Bytes of the model's weights (parameters and buffers, each counted once)."""
    return module_bytes(model.weight_modules())


def weights_device(model: VideoModel) -> torch.device | None:
    """Where the model's weights are now (the first weight found), None if it has none."""
    for module in model.weight_modules():
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


def move_tensors_except(modules: Sequence[nn.Module], skip: set[int], device: torch.device) -> None:
    """Move the tensors of ``modules`` to ``device``, except those of modules whose id is in ``skip``."""
    for module in modules:
        for owner in module.modules():
            if id(owner) in skip:
                continue
            for kind in ("_parameters", "_buffers"):
                store = getattr(owner, kind)
                for name, tensor in store.items():
                    if tensor is not None and tensor.device != device:
                        moved = tensor.detach().to(device)
                        store[name] = nn.Parameter(moved, requires_grad=False) if kind == "_parameters" else moved


def _cpu_kept_text_encoders(model: VideoModel) -> list[nn.Module]:
    return model.text_encoders() if model.text_on_cpu else []


def move_weights(model: VideoModel, device: torch.device) -> None:
    """Move every weight of ``model`` to ``device`` (its dtype is kept), but those of a text encoder
    that the memory mode keeps on the CPU, wherever it sits in the model."""
    kept = _cpu_kept_text_encoders(model)
    move_tensors_except(model.weight_modules(), {id(m) for encoder in kept for m in encoder.modules()}, device)


def moved_weight_bytes(model: VideoModel) -> int:
    """Bytes `move_weights` brings onto a device: every weight but a CPU-kept text encoder's."""
    return weight_bytes(model) - module_bytes(_cpu_kept_text_encoders(model))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)  # "cuda" is "cuda:0" here


def uses_accelerator(model: VideoModel) -> bool:
    """Whether the model computes on an accelerator (anything but the CPU)."""
    return model.device.type != "cpu"


def accelerator_free_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: what torch may still reserve (free on the device, within
    any per-process cap) plus what it holds unused."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    cap = int(torch.cuda.get_per_process_memory_fraction(device) * total) - reserved
    return max(0, min(free, cap)) + reserved - torch.cuda.memory_allocated(device)


def park_for_next_load(model: VideoModel) -> None:
    """Park a just-loaded ensemble member on the CPU so that the next one loads into free memory."""
    if uses_accelerator(model):
        move_weights(model, PARK_DEVICE)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


class Residency:
    """Which ensemble members have their weights on the accelerator, and who moves next.

    Args:
        models: the ensemble's models (each computing on its own ``model.device``).
        free_bytes: memory available on a device now (default: CUDA's figure).
        move: moves a model's weights to a device (default: `move_weights`).

    The default figures make it a no-op for models that compute on the CPU.
    """

    def __init__(
        self,
        models: Sequence[VideoModel],
        free_bytes: Callable[[torch.device], int] = accelerator_free_bytes,
        move: Callable[[VideoModel, torch.device], None] = move_weights,
    ) -> None:
        self.models = list(models)
        self._free = free_bytes
        self._move = move
        self._weights = {id(m): moved_weight_bytes(m) for m in self.models}
        # peak extra memory of each model's last turn, per frame layout: a run on a share of the
        # frames says nothing of the memory a run on every frame takes
        self._working: dict[tuple[int, str], int] = {}
        self._recent: list[VideoModel] = []  # resident models, least recently used first
        for model in self.models:
            where = weights_device(model)
            if uses_accelerator(model) and where is not None and where.type != PARK_DEVICE.type:
                self._recent.append(model)
        self.moves = 0  # weight transfers so far (reported in logs and read by tests)

    def is_resident(self, model: VideoModel) -> bool:
        """Whether ``model``'s weights are on its compute device (always, for CPU models)."""
        return not uses_accelerator(model) or any(m is model for m in self._recent)

    def activate(self, model: VideoModel) -> None:
        """Bring ``model``'s weights onto its device, parking least recently used others as needed."""
        if not uses_accelerator(model):
            return
        resident = any(m is model for m in self._recent)
        working = self._working.get(_work_key(model))
        need = (0 if resident else self._weights[id(model)]) + (working or 0)
        others = [m for m in self._recent if m is not model and _same_device(m.device, model.device)]
        # an unmeasured model runs alone, so that its working memory can be measured
        while others and (working is None or self._free(model.device) < need):
            victim = others.pop(0)
            self._move(victim, PARK_DEVICE)
            self._recent.remove(victim)
            self.moves += 1
            logger.info("parked %s on the CPU to make room for %s", victim.name, model.name)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        if not resident:
            self._move(model, model.device)
            self.moves += 1
        else:
            self._recent.remove(model)
        self._recent.append(model)

    @contextlib.contextmanager
    def turn(self, model: VideoModel) -> Iterator[None]:
        """Make ``model`` resident for one forward and backward pass, and measure its working memory."""
        self.activate(model)
        cuda = model.device.type == "cuda"
        if cuda:
            _fold_peak(model.device)
            torch.cuda.reset_peak_memory_stats(model.device)
            base = torch.cuda.memory_allocated(model.device)
        yield
        self._working[_work_key(model)] = (
            torch.cuda.max_memory_allocated(model.device) - base if cuda else 0
        )


def _work_key(model: VideoModel) -> tuple:
    """What a model's working memory depends on besides its weights: its frames and its input size."""
    return id(model), model.frame_layout(), tuple(model.resolution)


# torch's peak counter is reset at every turn to measure that member alone; the
# high-water mark of the earlier turns is kept here for `peak_memory_allocated`
_EARLIER_PEAKS: dict[int, int] = {}


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _fold_peak(device: torch.device) -> None:
    index = _cuda_index(device)
    _EARLIER_PEAKS[index] = max(_EARLIER_PEAKS.get(index, 0), torch.cuda.max_memory_allocated(device))


def peak_memory_allocated(device: torch.device | str = "cuda") -> int:
    """``torch.cuda.max_memory_allocated``, counting the turns an ensemble reset it for."""
    device = torch.device(device)
    return max(_EARLIER_PEAKS.get(_cuda_index(device), 0), torch.cuda.max_memory_allocated(device))


def reset_peak_memory(device: torch.device | str = "cuda") -> None:
    """Reset `peak_memory_allocated` (and torch's own counter)."""
    device = torch.device(device)
    _EARLIER_PEAKS.pop(_cuda_index(device), None)
    torch.cuda.reset_peak_memory_stats(device)

