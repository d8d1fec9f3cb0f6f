"""Loading the released Open-Sora 1.2 weights: ``hpcai-tech/OpenSora-STDiT-v3`` and ``OpenSora-VAE-v1.2``.

Both hub repos use the transformers ``save_pretrained`` layout (the original release): a
``config.json`` plus one ``model.safetensors`` whose keys are the original module names, which the
port's modules share. A source is a local folder holding those two files, a ``model.safetensors`` file
(its folder must hold ``config.json``, or pass ``config=``), or a hub id fetched with
``huggingface_hub.snapshot_download(repo, allow_patterns=[config.json, model.safetensors],
local_files_only=offline)``; ``offline`` defaults to ``HF_HUB_OFFLINE``.

**Strict keys.** Before any tensor is read, the file's key names and shapes (from the safetensors
header) are compared with the model's ``state_dict()``: a missing key, an unexpected key or a shape
mismatch raises :class:`~anti_i2v.errors.ModelError` with a one-line message saying what to check.
Keys on the ignore lists are accepted in a file and skipped:

* STDiT3 (:data:`STDIT3_IGNORED_KEYS`): ``pos_embed.inv_freq``, a non-persistent buffer the port
  recomputes (the official file does not contain it; an unofficial re-save might). ``rope.freqs`` and
  ``y_embedder.y_embedding`` are **not** ignored: they are in the official file and loaded.
* VAE (:data:`VAE_IGNORED_KEYS`): nothing.

**Low memory.** The model is built with its parameters on the ``meta`` device (buffers stay real, so
non-persistent ones such as ``pos_embed.inv_freq`` keep their computed values), the file is read
tensor by tensor and cast to ``dtype`` on the way, and the tensors are *assigned*
(``load_state_dict(strict=True, assign=True)``), so the full-size STDiT3 never exists twice in memory.
If a constructor cannot run that way, the model is built normally on the CPU and the tensors are
copied in instead.

The STDiT3 and VAE classes are imported lazily, so this module imports without them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anti_i2v.errors import ModelError
from anti_i2v.models.opensora.configs import STDIT3_HUB_ID, VAE_HUB_ID, vae_kwargs_from_config

logger = logging.getLogger(__name__)

__all__ = [
    "STDIT3_IGNORED_KEYS",
    "VAE_IGNORED_KEYS",
    "build_stdit3",
    "build_vae",
    "check_state_keys",
    "load_state_into",
    "load_stdit3",
    "load_vae",
    "resolve_model_dir",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: Keys accepted in an STDiT3 file but not loaded (see the module docstring).
STDIT3_IGNORED_KEYS: frozenset[str] = frozenset({"pos_embed.inv_freq"})
#: Keys accepted in a VAE file but not loaded.
VAE_IGNORED_KEYS: frozenset[str] = frozenset()

_VAE_MODEL_TYPES = ("VideoAutoencoderPipeline", "OpenSoraVAE_V1_2")
_STDIT3_MODULE = "anti_i2v.models.opensora.stdit3"
_VAE_MODULE = "anti_i2v.models.opensora.vae"


# ---------------------------------------------------------------------------------------------------
# locating files
# ---------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(
        (".safetensors", ".json", ".bin", ".pt", ".ckpt")
    )


def resolve_model_dir(
    path_or_hub_id: str | os.PathLike[str],
    *,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """``(folder, weights file)`` of a local folder, a ``model.safetensors`` file or a hub id.

    Hub ids are fetched (``config.json`` and ``model.safetensors`` only) with ``snapshot_download``;
    ``offline`` (default ``HF_HUB_OFFLINE``) restricts that to the local cache and fails fast.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.is_file():
        return p.parent, p
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if not weights.is_file():
            raise ModelError(f"{p} holds no {WEIGHTS_NAME}; pass a folder with config.json and {WEIGHTS_NAME}")
        return p, weights
    text = str(path_or_hub_id)
    if not _looks_like_hub_id(text):
        raise ModelError(f"{text} does not exist; pass a local folder, a {WEIGHTS_NAME} file or a hub id like {STDIT3_HUB_ID}")
    offline = _hub_offline() if offline is None else offline
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                text,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                local_files_only=offline,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        )
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one actionable message
        if offline:
            raise ModelError(
                f"{text} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"run `hf download {text}` once online, or pass a local folder with config.json and {WEIGHTS_NAME}"
            ) from None
        raise ModelError(
            f"cannot download {text} ({type(err).__name__}); check the network and the repo id, "
            f"or pass a local folder with config.json and {WEIGHTS_NAME}"
        ) from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{text} has no {WEIGHTS_NAME} in the cache ({folder}); download it again or pass a local folder")
    return folder, weights


def _read_config(folder: Path, config: Mapping[str, Any] | None) -> dict[str, Any]:
    if config is not None:
        return dict(config)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{folder} holds no {CONFIG_NAME}; add it or pass config= explicitly")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} ({type(err).__name__}); download it again") from None


# ---------------------------------------------------------------------------------------------------
# key checks and loading
# ---------------------------------------------------------------------------------------------------


def _file_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot read {weights} as safetensors ({type(err).__name__}); the file may be truncated, download it again") from None


def _examples(keys: list[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_keys(
    model: nn.Module,
    file_shapes: Mapping[str, tuple[int, ...]],
    *,
    ignore: frozenset[str] | set[str] = frozenset(),
    source: str = "checkpoint",
    what: str = "model",
) -> None:
    """Raise :class:`ModelError` unless ``file_shapes`` has exactly the model's keys and shapes (minus ``ignore``)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(s) for k, s in file_shapes.items() if k not in ignore}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        raise ModelError(
            f"{source} lacks {len(missing)} {what} tensor(s) ({_examples(missing)}); "
            f"pass the matching {what} checkpoint, or a config.json that matches its size"
        )
    if unexpected:
        raise ModelError(
            f"{source} has {len(unexpected)} tensor(s) the {what} does not have ({_examples(unexpected)}); "
            f"pass the matching {what} checkpoint, or a config.json that matches its size"
        )
    wrong = [k for k in expected if expected[k] != given[k]]
    if wrong:
        k = sorted(wrong)[0]
        raise ModelError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape, e.g. {k} is {list(given[k])} but the {what} "
            f"expects {list(expected[k])}; the config.json does not match the weights"
        )


def _read_tensors(
    weights: Path, keys: list[str], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for k in keys:
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[k] = t
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot read {weights} ({type(err).__name__}); the file may be truncated, download it again") from None
    return out


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def load_state_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    ignore: frozenset[str] | set[str] = frozenset(),
    source: str = "state dict",
    what: str = "model",
) -> nn.Module:
    """Strictly load ``state`` (official key names) into ``model``; ``ignore`` keys are skipped.

    Meta parameters are replaced by the given tensors (``assign=True``); otherwise values are copied.
    """
    state = {k: v for k, v in state.items() if k not in ignore}
    check_state_keys(model, {k: tuple(v.shape) for k, v in state.items()}, source=source, what=what)
    assign = _has_meta(model)
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load {source} into the {what} ({first[:200]})") from None
    if _has_meta(model):
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        raise ModelError(f"{source} left {len(left)} {what} tensor(s) unset ({_examples(left)}); pass a complete checkpoint")
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device (buffers are left alone)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kept = module._parameters[name]
            assert kept is not None
            module._parameters[name] = nn.Parameter(kept.to("meta"), requires_grad=kept.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            raise ModelError(f"the {what} port ({module}) is not available in this installation; update anti-i2v") from None
        raise


def _build(factory: Any, low_memory: bool) -> nn.Module:
    if low_memory:
        try:
            with _parameters_on_meta():
                return factory()
        except (NotImplementedError, RuntimeError) as err:
            logger.debug("meta construction failed (%s); building on the CPU", err)
    return factory()


# ---------------------------------------------------------------------------------------------------
# STDiT3
# ---------------------------------------------------------------------------------------------------


def build_stdit3(config: Mapping[str, Any] | Any, *, low_memory: bool = False) -> nn.Module:
    """An ``STDiT3`` from a config dict (original field names, e.g. ``OpenSoraConfig.stdit3``) or ``STDiT3Config``.

    Random weights on the CPU; ``low_memory=True`` leaves the parameters on the meta device (for loading).
    """
    mod = _import(_STDIT3_MODULE, "STDiT3")
    if isinstance(config, Mapping) and (config.get("model_type") in _VAE_MODEL_TYPES or "spatial_config" in config):
        raise ModelError(f"this is an Open-Sora VAE config, not STDiT3's; pass the folder of {STDIT3_HUB_ID} or a matching one")
    try:
        cfg = mod.STDiT3Config.from_dict(dict(config)) if isinstance(config, Mapping) else config
    except (TypeError, ValueError) as err:
        raise ModelError(f"invalid STDiT3 config ({err}); pass the config.json of {STDIT3_HUB_ID} or a matching one") from None
    return _build(lambda: mod.STDiT3(cfg), low_memory)


def load_stdit3(
    path_or_hub_id: str | os.PathLike[str] = STDIT3_HUB_ID,
    *,
    config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    low_memory: bool = True,
) -> nn.Module:
    """Load STDiT3 (``hpcai-tech/OpenSora-STDiT-v3`` by default) strictly, in ``eval()`` mode.

    ``dtype`` (default: the file's, float32 for the release) casts floating tensors while reading;
    non-persistent buffers follow it like ``model.to(dtype)`` in the original inference.
    """
    folder, weights = resolve_model_dir(path_or_hub_id, offline=offline, cache_dir=cache_dir)
    cfg = _read_config(folder, config)
    model = build_stdit3(cfg, low_memory=low_memory)
    _load_file_into(model, weights, STDIT3_IGNORED_KEYS, "STDiT3", dtype)
    return _finish(model, device, dtype)


# ---------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------


def build_vae(config: Mapping[str, Any], *, low_memory: bool = False) -> nn.Module:
    """A ``VideoAutoencoderPipeline`` from ``OpenSoraConfig.vae`` or a VAE ``config.json`` (random weights)."""
    mod = _import(_VAE_MODULE, "Open-Sora VAE")
    kind = config.get("model_type")
    if kind not in (None, *_VAE_MODEL_TYPES):
        raise ModelError(f"not an Open-Sora VAE config (model_type {kind!r}); pass the folder of {VAE_HUB_ID} or a matching one")
    kwargs = vae_kwargs_from_config(dict(config))
    spatial, temporal = kwargs.pop("spatial_config"), kwargs.pop("temporal_config")
    try:
        return _build(lambda: mod.VideoAutoencoderPipeline(spatial, temporal, **kwargs), low_memory)
    except (TypeError, ValueError) as err:
        raise ModelError(f"invalid Open-Sora VAE config ({err}); pass the config.json of {VAE_HUB_ID} or a matching one") from None


def load_vae(
    path_or_hub_id: str | os.PathLike[str] = VAE_HUB_ID,
    *,
    config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    low_memory: bool = True,
) -> nn.Module:
    """Load the Open-Sora 1.2 video VAE (``hpcai-tech/OpenSora-VAE-v1.2`` by default) strictly, ``eval()``.

    The official ``config.json`` only names the parts (``vae_2d``: the SDXL-VAE architecture, whose
    config the original fetched from PixArt's repo; ``vae_temporal``: ``VAE_Temporal_SD``); their sizes
    come from :func:`~anti_i2v.models.opensora.configs.vae_kwargs_from_config`, so nothing else is
    downloaded.
    """
    folder, weights = resolve_model_dir(path_or_hub_id, offline=offline, cache_dir=cache_dir)
    cfg = _read_config(folder, config)
    model = build_vae(cfg, low_memory=low_memory)
    _load_file_into(model, weights, VAE_IGNORED_KEYS, "Open-Sora VAE", dtype)
    return _finish(model, device, dtype)


# ---------------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------------


def _load_file_into(model: nn.Module, weights: Path, ignore: frozenset[str], what: str, dtype: torch.dtype | None) -> None:
    shapes = _file_shapes(weights)
    check_state_keys(model, shapes, ignore=ignore, source=str(weights), what=what)
    state = _read_tensors(weights, [k for k in shapes if k not in ignore], dtype)
    load_state_into(model, state, source=str(weights), what=what)


def _finish(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device)
    return model.eval()


def save_pretrained(model: nn.Module, folder: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the hub layout) so the load functions read it back.

    ``config`` is the STDiT3 config dict (original field names) or the VAE kwargs
    (``spatial_config``/``temporal_config``/...); ``model_type`` is added when absent. Returns the folder.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(config)
    if "model_type" not in meta:
        meta["model_type"] = "VideoAutoencoderPipeline" if "spatial_config" in meta else "STDiT3"
    try:
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=list))
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    except OSError as err:
        raise ModelError(f"cannot write {out} ({err.strerror or err}); choose a writable folder") from None
    return out
