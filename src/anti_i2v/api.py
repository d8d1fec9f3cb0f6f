"""`protect()`: one photo in, a protected photo and its measured budget out."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anti_i2v import __version__
from anti_i2v.atomic import write_json_atomic
from anti_i2v.config import DEFAULT_MEMORY_MODE, DEFAULT_PRESET, ProtectConfig
from anti_i2v.engine import PGDResult, StepReport, View, checkpoint_step, fingerprint, run_pgd
from anti_i2v.eot import ExpectationOverTransforms, parse_eot
from anti_i2v.errors import ConfigError, InputError, OutOfMemory, OutputError
from anti_i2v.memory import out_of_memory_message
from anti_i2v.methods import get_method, unused_settings
from anti_i2v.models.base import VideoModel
from anti_i2v.models.registry import load_model
from anti_i2v.objectives.ensemble import EnsembleMember, EnsembleObjective
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity, resolve_aux_weight
from anti_i2v.offload import Residency, park_for_next_load
from anti_i2v.photo import (
    BudgetReport,
    Photo,
    carry_perturbation,
    limit_saved_psnr,
    load_photo,
    measure_budget,
    output_path_for,
    save_protected,
)
from anti_i2v.spaces import space_from_config

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = ".anti-i2v-checkpoints"


def sample_photo() -> Path:
    """Path of the bundled sample portrait (used by the Quickstart)."""
    return Path(str(resources.files("anti_i2v") / "assets" / "sample.jpg"))


@dataclass
class ProtectResult:
    """What `protect` returns: the protected photo and the figures measured on it."""

    image: Image.Image
    budget: BudgetReport
    path: Path | None
    sidecar: Path | None
    model: str
    config: ProtectConfig
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(output: Path) -> Path:
    """``<stem>_protected.json`` beside ``<stem>_protected.<ext>``."""
    return output.with_suffix(".json")


def read_record(sidecar: Path) -> dict[str, Any] | None:
    """A sidecar's record; None when there is none or it does not read as one."""
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_output_name(record: dict[str, Any]) -> str | None:
    """The file name of the output a sidecar record describes (None in a record without one)."""
    output = record.get("output")
    return Path(output).name if isinstance(output, str) and output else None


def record_conflict(out_path: Path) -> str | None:
    """Why ``out_path`` must not be written, even with overwrite: its sidecar name holds the record of
    another output that still exists (the same photo saved in another format), which would be lost.
    None when the name is free."""
    record = read_record(sidecar_path(out_path))
    name = recorded_output_name(record) if record is not None else None
    other = out_path.with_name(name) if name else None
    if other is None or not other.exists() or (out_path.exists() and other.samefile(out_path)):
        return None
    return (f"'{sidecar_path(out_path)}' is the record of '{other}', which saving '{out_path}' would replace; "
            "pick another --out (or move that photo and its record away)")


@functools.lru_cache(maxsize=1)
def _auxiliary_model(source: str, device: torch.device, dtype: torch.dtype) -> ClipEmbeddingSimilarity:
    """Load the auxiliary CLIP model once per batch, not once per photo (each objective takes
    `ClipEmbeddingSimilarity.with_own_reference`: ensemble members prepare different images)."""
    return ClipEmbeddingSimilarity.from_pretrained(source, device, dtype)


def _environment(model: VideoModel) -> dict[str, Any]:
    """What bit-identical results also depend on: versions, device and thread count."""
    return {
        "torch": torch.__version__,
        "device": str(model.device),
        "cuda": torch.version.cuda if model.device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as a sidecar records it (``bfloat16``, ``float32``...)."""
    return str(dtype).removeprefix("torch.")


def _model_record(model: VideoModel, photo_size: tuple[int, int]) -> dict[str, Any]:
    return {
        "name": model.name,
        "source": model.source,
        "resolution": list(model.resolution_for(*photo_size)),
        "frames": model.num_frames,
        "device": str(model.device),
        "dtype": dtype_name(model.dtype),
        "memory_mode": model.memory_mode,
        "compiled": model.compiled,
        "attention_kernel": model.attention_kernel,
    }


def _load_models(
    model: str | VideoModel | Sequence[str | VideoModel],
    model_path: str | Path | None,
    device: str | None,
    dtype: str | None,
    memory: str = DEFAULT_MEMORY_MODE,
    compile: bool = False,
    attention: str = "auto",
) -> list[VideoModel]:
    """One model, a comma-separated list of names, or a list of names/models -> loaded models."""
    if isinstance(model, VideoModel):
        return [model]
    items = [m.strip() for m in model.split(",") if m.strip()] if isinstance(model, str) else list(model)
    if model_path is not None and len(items) > 1:
        raise ConfigError("--model-path serves one model; load the others from the hub cache")
    if memory == "sequential" and len(items) > 1:
        raise ConfigError("--memory sequential serves one model; ensembles take turns on the GPU in full or offload")
    models = []
    for index, item in enumerate(items):
        if isinstance(item, VideoModel):
            models.append(item)
            continue
        models.append(load_model(item, model_path, device, dtype, memory, compile, attention))
        if index < len(items) - 1:
            park_for_next_load(models[-1])  # make room for the next; a Residency brings it back for its turn
    return models


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as saved:
        saved.load()
        return saved.copy()


def _budget_in_memory(photo: Photo, protected: torch.Tensor, eps: float, saved_eps: float
                      ) -> tuple[Image.Image, BudgetReport]:
    """Measure the budget ``eps`` as it would be on a saved PNG (quantised within ``saved_eps``, which is
    less for a photo read off its own values), without keeping the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_protected(photo, protected, Path(tmp) / "protected.png", saved_eps)
        return _read_image(path), measure_budget(photo, path, eps)


def random_protection(photo: Photo, config: ProtectConfig) -> torch.Tensor:
    """The photo plus uniform noise in [-eps, eps] at full resolution (gray stays gray)."""
    generator = torch.Generator().manual_seed(config.seed)
    channels = 1 if photo.is_gray else 3
    noise = (torch.rand((channels, *photo.size), generator=generator) * 2 - 1) * config.eps
    return (photo.rgb + noise.expand_as(photo.rgb)).clamp(0, 1)


def _t_range(model: VideoModel, config: ProtectConfig) -> tuple[int, int]:
    last = model.num_train_timesteps - 1
    return min(config.t_min, last), min(config.t_max, last)


def _within_reading_error(config: ProtectConfig, photo: Photo) -> ProtectConfig:
    """The settings to optimise with: the budget less what reading the photo may already have moved it
    (`Photo.reading_error`), so that the saved file stays within ``eps`` of the source's own values."""
    if not photo.reading_error:
        return config
    inner = config.eps - photo.reading_error
    if inner < 1 / 255 - 1e-9:  # a budget below one level could not change a saved photo
        raise InputError(f"this photo is 16-bit and read within {photo.reading_error * 255:.2f}/255 of its values, "
                         f"which eps {config.eps * 255:.2f}/255 leaves less than 1/255 of; use eps 2/255 or more")
    return replace(config, eps=inner)


def _optimise(
    models: Sequence[VideoModel],
    photo: Photo,
    config: ProtectConfig,
    callback: Callable[[StepReport], None] | None,
    checkpoint_path: Path | None,
    release_text_encoder: bool = True,
) -> tuple[torch.Tensor, PGDResult]:
    """Run the optimisation at the first model's input; returns the full-size protected RGB.

    Each model runs at the size its pipeline's users give a photo of this size
    (`VideoModel.sized_for`). With several models, one perturbation is optimised against
    the sum of their objectives, each model seeing the photo as its own pipeline prepares
    it; models that do not fit on the accelerator together take turns there (`Residency`).
    """
    with contextlib.ExitStack() as sizes:
        for model in models:
            sizes.enter_context(model.sized_for(*photo.size))
        return _optimise_sized(models, photo, config, callback, checkpoint_path, release_text_encoder)


def _optimise_sized(
    models: Sequence[VideoModel],
    photo: Photo,
    config: ProtectConfig,
    callback: Callable[[StepReport], None] | None,
    checkpoint_path: Path | None,
    release_text_encoder: bool,
) -> tuple[torch.Tensor, PGDResult]:
    space = space_from_config(config)  # fails fast on a bad space, before any model work
    method = get_method(config.method)
    base = models[0]
    x = base.prepare_image(photo.rgb).to(base.device)
    if method.build is None:
        return random_protection(photo, config), PGDResult(x_adv=x)
    target = None
    if config.target is not None:
        target = load_photo(config.target).rgb.unsqueeze(0)
    weights = config.model_weights or (1.0,) * len(models)
    if len(weights) != len(models):
        raise ConfigError(f"{len(weights)} model weights for {len(models)} models; give one weight per model")
    residency = Residency(models) if len(models) > 1 else None
    eot = ExpectationOverTransforms(parse_eot(config.eot))
    run_id = fingerprint(x, config, "+".join(m.identity for m in models))

    def build_members() -> list[EnsembleMember]:
        members = []
        for index, model in enumerate(models):
            if residency is not None:
                residency.activate(model)
            aux = (_auxiliary_model(config.aux_model, model.device, model.dtype).with_own_reference()
                   if config.weight_aux else None)
            objective = method.build(model, config, target, aux)
            objective.prepare(model, model.prepare_image(photo.rgb).to(model.device))
            if release_text_encoder and model.device.type == "cuda":
                model.release_text_encoder()  # the prompt stays cached for later runs of steps
            if not config.through_resize and model.crops_photo:
                logger.warning("%s crops the photo: without through_resize the perturbation is not aligned with it",
                               model.name)
            needs_view = index > 0 or (config.through_resize and photo.size != tuple(model.resolution))
            view = _photo_view(model, photo, x, config.eps, eot) if needs_view else _model_view(eot)
            members.append(
                EnsembleMember(model.name, objective, view, _t_range(model, config), weights[index], model)
            )
        return members

    done = checkpoint_step(checkpoint_path, run_id)
    result: PGDResult | None = None
    phases = config.frame_phases()
    for index, (share, steps) in enumerate(phases):
        if steps.stop <= done and index < len(phases) - 1:
            continue  # the checkpoint is past these steps: they need no objective
        with contextlib.ExitStack() as frames:
            for model in models:  # fewer frames while optimising (frame_share), every frame again after
                frames.enter_context(model.fewer_frames(share, config.frame_spread))
            members = build_members()
            single = len(members) == 1
            result = run_pgd(
                members[0].objective if single else EnsembleObjective(members, residency),
                space,
                x,
                config,
                t_range=members[0].t_range,
                run_id=run_id,
                keep_gray=photo.is_gray,
                view=members[0].view if single else None,
                callback=callback,
                checkpoint_path=checkpoint_path,
                steps=steps,
                carry=result,
            )
            del members  # this share's objectives (their noise pools) go before the next share's are prepared
    assert result is not None  # the last run of steps always runs
    protected = carry_perturbation(photo.rgb, x.float().cpu(), result.x_adv.float().cpu(), config.eps)
    return limit_saved_psnr(photo, protected, config.eps, config.min_psnr), result


def _photo_view(model: VideoModel, photo: Photo, x: torch.Tensor, eps: float, eot: ExpectationOverTransforms) -> View:
    """What ``model`` sees of the saved photo: the perturbation carried to full size, passed through
    a random transform of the upload channel (EOT, when asked for), then prepared as its pipeline does."""
    full = photo.rgb.to(model.device)

    def view(x_adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        carried = carry_perturbation(full, x.to(model.device), x_adv.to(model.device), eps)
        return model.prepare_image(eot(carried.unsqueeze(0), generator) if eot else carried)

    return view


def _model_view(eot: ExpectationOverTransforms) -> View:
    """The optimised image itself (already at the model's input), after an EOT draw when asked for."""
    return lambda x_adv, generator: eot(x_adv, generator) if eot else x_adv


def protect(
    image: str | Path | Image.Image | np.ndarray | torch.Tensor,
    model: str | VideoModel | Sequence[str | VideoModel] = "tiny-cogvideox",
    *,
    out: str | Path | None = None,
    model_path: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    memory: str = DEFAULT_MEMORY_MODE,
    compile: bool = False,
    attention: str = "auto",
    preset: str = DEFAULT_PRESET,
    fmt: str = "png",
    overwrite: bool = False,
    stem: str | None = None,
    callback: Callable[[StepReport], None] | None = None,
    release_text_encoder: bool = True,
    **config: Any,
) -> ProtectResult:
    """Protect one photo against an image-to-video model with Anti-I2V.

    Args:
        image: a path, PIL image, HxWx3 array or (3, H, W) tensor in [0, 1].
        model: a registry name (see `anti-i2v models`), a loaded `VideoModel`, or several
            (``"cogvideox,dynamicrafter-512"`` or a list): one perturbation is then optimised
            against the sum of their objectives.
        out: output folder; the photo is saved there as ``<stem>_protected.<fmt>``
            with a JSON sidecar. None keeps everything in memory.
        model_path: local folder of released weights (instead of the hub id).
        device, dtype: where and in which precision the model runs (defaults: the
            GPU in bf16 when present, else the CPU in fp32).
        memory: memory mode of models loaded by name: "max" (80 GB cards, a fifth less work per
            step), "full" (default), "offload" (24 GB cards) or "sequential" (12 GB cards,
            slower); see `anti_i2v.memory`.
        compile, attention: for models loaded by name, compile the denoiser's blocks and choose
            the attention kernel ("auto", "flash", "efficient", "cudnn" or "math"); see
            `anti_i2v.acceleration`.
        preset: "fast", "balanced" or "strong" (eps and steps, and on long videos the frames optimised on:
            `config.LONG_VIDEO_PRESETS`; overridable).
        fmt: "png" (default, lossless) or "jpg"/"webp" (lossy; weakens protection).
        overwrite: replace an existing output file.
        stem: output name stem (default: the photo's file stem).
        release_text_encoder: on a GPU, free the text encoder after encoding the prompt
            (saves memory; later prompts then need a new model). Keep it when the same
            model must encode other prompts, as `evaluate` does.
        callback: called after each optimisation step with a `StepReport`.
        **config: any `ProtectConfig` field, e.g. ``eps=8/255, steps=100, seed=1``, or
            ``method="advdm"`` for a baseline or ablation (see `anti_i2v.methods`).

    Returns:
        `ProtectResult` with the protected image and the budget measured on the saved
        (or, without ``out``, the quantised) pixels: L-inf in [0, 1] units, PSNR, SSIM.

    Example:
        >>> result = protect("me.jpg", model="tiny-cogvideox", out="protected", steps=20)
        >>> result.budget.linf <= 8 / 255
        True
    """
    began = time.perf_counter()
    asked = ProtectConfig.from_preset(preset, **config)  # a bad setting fails before any model loads
    fmt = fmt.lower().lstrip(".")
    photo = load_photo(image)
    _within_reading_error(asked, photo)  # and a budget this photo leaves nothing of
    out_path = checkpoint_path = None
    if out is not None:  # an output that may not be written fails before any model loads
        out_path = output_path_for(photo.path, Path(out), fmt, stem)
        if out_path.exists() and not overwrite:
            raise OutputError(f"'{out_path}' already exists; delete it or pass overwrite=True (--overwrite)")
        if conflict := record_conflict(out_path):
            raise OutputError(conflict)
    models = _load_models(model, model_path, device, dtype, memory, compile, attention)
    cfg = resolve_aux_weight(ProtectConfig.for_models(preset, models, **config))
    if unused := unused_settings(cfg, config):
        logger.warning("%s does not read %s with its terms as set: %s change nothing (--method anti-i2v-paper "
                       "reads them all)", cfg.method, ", ".join(unused), "they" if len(unused) > 1 else "it")
    name = "+".join(m.name for m in models)
    inner = _within_reading_error(cfg, photo)
    if out_path is not None and cfg.checkpoint_every:
        checkpoint_path = out_path.parent / CHECKPOINT_DIR / f"{out_path.stem}.pt"
    try:
        protected, result = _optimise(models, photo, inner, callback, checkpoint_path, release_text_encoder)
    except torch.OutOfMemoryError:
        protected = None  # raised below, once the traceback no longer holds the step's tensors
    if protected is None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(out_of_memory_message(models, models[0].memory_mode))

    if out_path is None:
        image_out, budget = _budget_in_memory(photo, protected, cfg.eps, inner.eps)
        return ProtectResult(image_out, budget, None, None, name, cfg, time.perf_counter() - began, result.history)

    save_protected(photo, protected, out_path, inner.eps, overwrite=overwrite)
    budget = measure_budget(photo, out_path, cfg.eps)
    seconds = time.perf_counter() - began
    record = {
        "anti_i2v_version": __version__,
        "input": str(photo.path) if photo.path else None,
        "input_sha256": file_sha256(photo.path),
        "input_format": photo.source_format,
        "input_size": list(photo.size),
        "output": str(out_path),
        "output_sha256": file_sha256(out_path),
        "model": (_model_record(models[0], photo.size) if len(models) == 1
                  else [_model_record(m, photo.size) for m in models]),
        "method": cfg.method,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "budget": budget.to_dict(),
        "loss_first": result.history[0] if result.history else None,
        "loss_last": result.history[-1] if result.history else None,
        "resumed_from_step": result.resumed_from,
        "steps_done": result.steps_done,
        "stopped_early": result.stopped_early,
        "environment": _environment(models[0]),
        "seconds": round(seconds, 3),
    }
    sidecar = sidecar_path(out_path)
    try:
        write_json_atomic(sidecar, record)
    except OSError as err:  # e.g. the disk filled up after the photo: a photo without its record is not kept
        out_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{sidecar}' ({err.strerror or err}); the protected photo was not kept, "
                          "free some space or pick another --out") from err
    if checkpoint_path is not None and checkpoint_path.exists():
        checkpoint_path.unlink()
    return ProtectResult(_read_image(out_path), budget, out_path, sidecar, name, cfg, seconds, result.history)
