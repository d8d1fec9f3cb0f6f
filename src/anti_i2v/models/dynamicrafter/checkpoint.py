"""Reading the official DynamiCrafter ``model.ckpt`` files, and the key-rule type used to rename them.

The released checkpoints (the original release) are PyTorch Lightning ``.ckpt`` pickles whose
``["state_dict"]`` holds every tensor of the original ``LatentVisualDiffusion`` under its original
names (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``embedder.*``,
``image_proj_model.*`` and the schedule buffers). :func:`load_checkpoint` returns that flat
``{official name: tensor}`` dict; :meth:`DynamiCrafterModel.load_official_state_dict
<anti_i2v.models.dynamicrafter.model.DynamiCrafterModel.load_official_state_dict>` renames it onto the
port's modules.

Loading is safe by default:

* ``torch.load(..., map_location="cpu", weights_only=True, mmap=True)`` first (``mmap`` keeps a 10 GB
  file out of RAM until tensors are used; it is skipped for legacy non-zip pickles).
* If that fails because the pickle names classes outside torch's allow-list (Lightning writes
  ``hyper_parameters``/``callbacks`` entries that may hold ``AttributeDict`` or OmegaConf objects),
  the unsafe globals are listed *statically* with ``torch.serialization.get_unsafe_globals_in_checkpoint``.
  When every one of them lies in :data:`INERT_PICKLE_PREFIXES` (Lightning, OmegaConf, numpy scalars,
  ``typing``/``collections`` helpers), they are mapped, through ``torch.serialization.safe_globals``,
  onto inert stand-ins (:class:`_InertObject`, which stores constructor arguments and state and runs no
  code, or :class:`_InertMapping`, a plain ``OrderedDict`` for ``dict`` subclasses such as Lightning's
  ``AttributeDict``). Those objects only sit next to ``state_dict``; they are discarded.
* Any other global makes :func:`load_checkpoint` raise :class:`~anti_i2v.errors.ModelError` naming it.
  ``weights_only=False`` is used only when the caller passes ``allow_unsafe_pickle=True`` explicitly
  (after reviewing the file), never as a silent fallback. :func:`convert_to_safetensors` then writes a
  pickle-free copy that needs none of this.

Checkpoint shapes handled: a Lightning dict with ``"state_dict"``; a DeepSpeed dict with ``"module"``
whose keys carry the 16-character ``_forward_module.`` prefix (stripped, as the original loader does);
or an already flat ``{name: tensor}`` dict (e.g. a ``.safetensors`` file). The 256 checkpoint names the
frame-stride embedding ``framestride_embed``; it is renamed to ``fps_embedding`` (the port's name, and the
name the original module tree uses) whenever the ``fps_embedding`` keys are absent.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from anti_i2v.errors import ModelError

__all__ = [
    "INERT_PICKLE_PREFIXES",
    "KeyRule",
    "convert_to_safetensors",
    "extract_state_dict",
    "load_checkpoint",
    "normalize_official_keys",
    "resolve_checkpoint_file",
]

DEEPSPEED_PREFIX = "_forward_module."  # 16 characters

# ---------------------------------------------------------------------------------------------------
# key rules
# ---------------------------------------------------------------------------------------------------

Transform = Literal["copy", "split0", "conv1x1"]


@dataclass(frozen=True)
class KeyRule:
    """How one official tensor maps onto one or more tensors of the port.

    ``transform``:

    * ``"copy"``: one-to-one, same shape.
    * ``"split0"``: the official tensor is the concatenation along dim 0 of ``ours`` in order
      (OpenCLIP's fused ``in_proj_weight``/``in_proj_bias`` -> transformers' ``q_proj``/``k_proj``/``v_proj``).
    * ``"conv1x1"``: an official ``[O, I, 1, 1]`` 1x1 convolution kernel is our ``[O, I]`` linear weight
      (the LDM VAE's mid-block attention ``q``/``k``/``v``/``proj_out``).

    Both directions work on meta tensors, so full-size mappings can be checked without allocating weights.
    """

    official: str
    ours: tuple[str, ...]
    transform: Transform = "copy"

    def with_prefix(self, official_prefix: str, our_prefix: str) -> KeyRule:
        return KeyRule(official_prefix + self.official, tuple(our_prefix + k for k in self.ours), self.transform)

    def to_ours(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.transform == "copy":
            return [tensor]
        if self.transform == "split0":
            n = len(self.ours)
            if tensor.shape[0] % n:
                raise ValueError(f"{self.official}: dim 0 of {tuple(tensor.shape)} is not divisible by {n}")
            return list(torch.chunk(tensor, n, dim=0))
        if self.transform == "conv1x1":
            if tensor.dim() == 4:
                if tuple(tensor.shape[2:]) != (1, 1):
                    raise ValueError(f"{self.official}: expected a 1x1 kernel, got {tuple(tensor.shape)}")
                return [tensor.reshape(tensor.shape[0], tensor.shape[1])]
            return [tensor]  # the bias of a 1x1 conv is already the linear bias
        raise ValueError(f"unknown transform {self.transform!r}")

    def to_official(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.transform == "copy":
            return tensors[0]
        if self.transform == "split0":
            return torch.cat(list(tensors), dim=0)
        if self.transform == "conv1x1":
            (t,) = tensors
            return t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t
        raise ValueError(f"unknown transform {self.transform!r}")


def identity_rules(keys: Iterable[str]) -> list[KeyRule]:
    """One ``copy`` rule per key (modules that already use the original names)."""
    return [KeyRule(k, (k,)) for k in keys]


# ---------------------------------------------------------------------------------------------------
# official key clean-up
# ---------------------------------------------------------------------------------------------------


def normalize_official_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Strip a DeepSpeed ``_forward_module.`` prefix and rename the 256 model's ``framestride_embed``.

    Returns a new dict (tensors are not copied).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith(DEEPSPEED_PREFIX):
            key = key[len(DEEPSPEED_PREFIX) :]
        out[key] = value
    if not any(".fps_embedding." in k for k in out) and any(".framestride_embed." in k for k in out):
        out = {k.replace(".framestride_embed.", ".fps_embedding."): v for k, v in out.items()}
    return out


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a loaded checkpoint object (see the module docstring)."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source} holds a {type(obj).__name__}, not a state dict; pass an official DynamiCrafter model.ckpt")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
    elif "module" in obj and isinstance(obj["module"], Mapping):
        state = obj["module"]  # DeepSpeed
    else:
        state = obj
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        what = f"non-tensor entries such as {bad[0]!r}" if bad else "no tensors"
        raise ModelError(f"{source} has {what} where a state dict was expected; pass an official DynamiCrafter model.ckpt")
    return normalize_official_keys(state)


# ---------------------------------------------------------------------------------------------------
# safe unpickling
# ---------------------------------------------------------------------------------------------------

#: Globals that may appear *next to* ``state_dict`` in a Lightning checkpoint and are replaced by
#: inert stand-ins (no code of theirs runs). Matched as prefixes of ``module.qualname``.
INERT_PICKLE_PREFIXES: tuple[str, ...] = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "typing.",
    "collections.defaultdict",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.",
    "argparse.Namespace",
)


class _InertObject:
    """Stand-in for an allow-listed non-tensor object: keeps its arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _InertObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pickled_args = args

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


class _InertMapping:
    """Stand-in for an allow-listed ``dict`` subclass (Lightning's ``AttributeDict``, ``defaultdict``).

    Constructing it yields a plain ``OrderedDict``, the one mapping type whose items and attribute state
    torch's restricted unpickler may fill in.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict[Any, Any]:  # type: ignore[misc]
        return OrderedDict()


def _stand_in(name: str) -> type:
    return _InertMapping if name.endswith("AttributeDict") or name == "collections.defaultdict" else _InertObject


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": weights_only}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True
    return torch.load(path, **kwargs)


def _load_pickle_checkpoint(path: Path, *, allow_unsafe_pickle: bool) -> Any:
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as first_error:
        if allow_unsafe_pickle:
            return _torch_load(path, weights_only=False)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - a legacy pickle cannot be scanned
            unsafe = []
        if not unsafe:
            raise ModelError(
                f"cannot read {path} with torch.load(weights_only=True) ({str(first_error).splitlines()[0]}); "
                "check the file, or pass allow_unsafe_pickle=True if you trust it"
            ) from None
        blocked = [g for g in unsafe if not g.startswith(INERT_PICKLE_PREFIXES)]
        if blocked:
            raise ModelError(
                f"{path} pickles non-allow-listed objects ({', '.join(sorted(blocked)[:5])}); "
                "pass allow_unsafe_pickle=True only if you trust the file, then save a .safetensors copy"
            ) from None
        stubs = [(_stand_in(name), name) for name in unsafe]
        with torch.serialization.safe_globals(stubs):
            try:
                return _torch_load(path, weights_only=True)
            except pickle.UnpicklingError as err:
                raise ModelError(
                    f"cannot read {path} even with inert stand-ins for {', '.join(unsafe[:5])} "
                    f"({str(err).splitlines()[0]}); pass allow_unsafe_pickle=True only if you trust the file"
                ) from None


# ---------------------------------------------------------------------------------------------------
# locating and loading
# ---------------------------------------------------------------------------------------------------

_CHECKPOINT_NAMES = ("model.safetensors", "model.ckpt")


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def resolve_checkpoint_file(path_or_hub_id: str | os.PathLike[str] | None, variant: str | None = None) -> Path:
    """A local checkpoint path: a file, a folder holding ``model.safetensors``/``model.ckpt``, or a hub id.

    ``None`` means the official hub repo of ``variant``. Hub files are fetched with
    ``huggingface_hub.hf_hub_download(repo, "model.ckpt")``; with ``HF_HUB_OFFLINE`` set only the local
    cache is consulted.
    """
    if path_or_hub_id is None:
        if variant is None:
            raise ModelError("no checkpoint given; pass a path to model.ckpt or a DynamiCrafter variant name")
        from anti_i2v.models.dynamicrafter.configs import get_config

        cfg = get_config(variant)
        if cfg.hub_repo is None:
            raise ModelError(f"variant {cfg.name!r} has no released checkpoint; it is built with random weights")
        repo, filename = cfg.hub_repo, cfg.filename
    else:
        p = Path(path_or_hub_id).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for name in _CHECKPOINT_NAMES:
                if (p / name).is_file():
                    return p / name
            raise ModelError(f"{p} holds neither model.safetensors nor model.ckpt; pass the checkpoint file itself")
        text = str(path_or_hub_id)
        if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".ckpt", ".safetensors", ".pt")):
            raise ModelError(f"checkpoint {text} does not exist; pass an existing file or a hub id like Doubiiu/DynamiCrafter_512")
        repo, filename = text, "model.ckpt"
        if variant is not None:
            from anti_i2v.models.dynamicrafter.configs import get_config

            filename = get_config(variant).filename
    from huggingface_hub import hf_hub_download

    offline = _hub_offline()
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one actionable message
        if offline:
            raise ModelError(
                f"{repo}/{filename} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it once online or pass a local path to model.ckpt"
            ) from None
        raise ModelError(
            f"cannot download {repo}/{filename} ({type(err).__name__}); check the network and the repo id, "
            "or pass a local path to model.ckpt"
        ) from None


def load_checkpoint(
    path_or_hub_id: str | os.PathLike[str] | None,
    variant: str | None = None,
    *,
    allow_unsafe_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The official state dict of a DynamiCrafter checkpoint, ``{official name: tensor}`` on the CPU.

    ``path_or_hub_id``: a ``.ckpt``/``.pt`` pickle, a ``.safetensors`` file, a folder holding one, a hub
    repo id, or ``None`` for the official repo of ``variant`` (``"256"``, ``"512"``, ``"1024"``,
    ``"512_interp"``). The result has the DeepSpeed prefix stripped and ``framestride_embed`` renamed to
    ``fps_embedding``; it is *not* yet renamed to the port's module names (see
    :meth:`DynamiCrafterModel.load_official_state_dict`).
    """
    path = resolve_checkpoint_file(path_or_hub_id, variant)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"cannot read {path} as safetensors ({type(err).__name__}); re-create it with convert_to_safetensors") from None
    else:
        try:
            obj = _load_pickle_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
        except ModelError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise ModelError(
                f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "the file may be truncated, download it again"
            ) from None
    return extract_state_dict(obj, source=str(path))


def convert_to_safetensors(
    ckpt: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    variant: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> Path:
    """Write the official state dict of ``ckpt`` (a path/hub id, or an already loaded dict) as safetensors.

    Keys keep their official names (after the DeepSpeed/``framestride_embed`` clean-up), so the file can
    be passed to :func:`load_checkpoint` like the original. Returns the output path.
    """
    from safetensors.torch import save_file

    if isinstance(ckpt, Mapping):
        state = extract_state_dict(ckpt, source="state dict")
    else:
        state = load_checkpoint(ckpt, variant, allow_unsafe_pickle=allow_unsafe_pickle)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        ident = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        if ident in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(ident)
        tensors[k] = v
    metadata = {"format": "pt", "source": "DynamiCrafter official checkpoint (anti_i2v convert_to_safetensors)"}
    if variant is not None:
        metadata["variant"] = str(variant)
    try:
        save_file(tensors, str(out_path), metadata=metadata)
    except OSError as err:
        raise ModelError(f"cannot write {out_path} ({err.strerror or err}); choose a writable folder") from None
    return out_path
