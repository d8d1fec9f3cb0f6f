"""Protect many photos: expand folders, skip finished ones, keep going past bad ones."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anti_i2v.api import (
    ProtectResult, dtype_name, file_sha256, protect, read_record, record_conflict, recorded_output_name, sidecar_path,
)
from anti_i2v.config import DEFAULT_PRESET, LONG_VIDEO_PRESETS, ProtectConfig, is_long_video
from anti_i2v.engine import StepReport
from anti_i2v.errors import InputError, OutputError
from anti_i2v.methods import get_method
from anti_i2v.models.base import VideoModel
from anti_i2v.photo import output_path_for

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


@dataclass
class BatchItem:
    """Outcome for one input: "done", "skipped" (already protected) or "failed"."""

    source: Path
    status: str
    output: Path | None = None
    error: str | None = None
    result: ProtectResult | None = None


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found = [p for p in found if not p.stem.endswith("_protected")]
            if not found:
                logger.warning("folder '%s' holds no photos (%s)", path, ", ".join(sorted(IMAGE_SUFFIXES)))
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def check_output_dir(out_dir: Path) -> None:
    """Fail early, with one line, when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to output folder '{out_dir}' ({err.strerror}); pick another --out") from err
    if not os.access(out_dir, os.W_OK):
        raise OutputError(f"output folder '{out_dir}' is not writable; pick another --out")


def output_stems(sources: list[Path]) -> dict[Path, str]:
    """A distinct output stem per source: ``face.jpg`` and ``face.png`` must not share one.

    The first photo with a stem keeps it; later ones get the extension, then a
    counter, appended. Sources are in a stable order, so reruns pick the same names.
    """
    stems: dict[Path, str] = {}
    taken: set[str] = set()
    for source in sources:
        candidates = [source.stem, f"{source.stem}-{source.suffix.lstrip('.').lower()}"]
        candidates += [f"{candidates[1]}-{n}" for n in range(2, len(sources) + 2)]
        stem = next(c for c in candidates if c not in taken)
        taken.add(stem)
        stems[source] = stem
    return stems


# settings that do not change the protected photo, or that the run resolves from what this machine has
# (the auxiliary CLIP term is on where its weights are local): compared only when the options give them
NOT_COMPARED = ("checkpoint_every",)
RESOLVED_AT_RUN = ("weight_aux",)


def resume_settings(options: dict[str, Any], long_video: bool | None = False,
                    families: Sequence[str] | None = ()) -> dict[str, Any]:
    """Every setting a run with these `protect` options uses (its preset and method included), as its
    sidecar records it: a finished photo is skipped only when its record has them all.

    ``long_video``: whether the models take the presets' long-video route (`config.is_long_video`);
    ``families``: the models' families, whose own settings the method takes (`Method.overrides_for`).
    None where that is not known (before any model loads): the settings that the route or a family
    change are then left out unless the options give them, so a photo done either way counts as done.
    """
    fields = {f.name for f in dataclasses.fields(ProtectConfig)}
    settings = {k: v for k, v in options.items() if k in fields}
    preset = options.get("preset") or DEFAULT_PRESET
    config = ProtectConfig.from_preset(preset, families=families or (), long_video=bool(long_video), **settings)
    unknown = set(RESOLVED_AT_RUN)
    if long_video is None:
        unknown |= set(LONG_VIDEO_PRESETS.get(preset, {}))
    if families is None:
        unknown |= {key for overrides in get_method(config.method).family_overrides.values() for key in overrides}
    recorded = json.loads(json.dumps(config.to_dict()))  # as a sidecar reads back: tuples are lists
    return {key: recorded[key] for key in sorted(fields - set(NOT_COMPARED))
            if key not in unknown or settings.get(key) is not None}


def _record_of(output: Path) -> dict[str, Any] | None:
    """The sidecar record of ``output`` when both exist, the record reads and it is this output's
    (not the same photo's in another format); None otherwise."""
    record = read_record(sidecar_path(output)) if output.is_file() else None
    if record is None or recorded_output_name(record) not in (None, output.name):
        return None
    return record


def _made_from(source: Path, record: dict[str, Any]) -> bool:
    """Whether a sidecar ``record`` was made from this very ``source`` file (its bytes as they are now)."""
    return source.is_file() and record.get("input_sha256") == file_sha256(source)


ModelIdentity = tuple[str, str, "str | None"]  # name, weights, dtype (None: not known, not compared)


def model_identities(models: VideoModel | Sequence[VideoModel]) -> list[ModelIdentity]:
    """Name, weights and dtype of each model, as a sidecar records them: which models a photo was
    protected against, and in which precision (bf16 and fp32 optimise to different photos)."""
    return [(m.name, m.source, dtype_name(m.dtype)) for m in ([models] if isinstance(models, VideoModel) else models)]


SizesFor = Callable[[tuple[int, int]], list[tuple[int, int]]]  # a photo's (H, W) -> each model's input size


def model_sizes(models: Sequence[VideoModel]) -> SizesFor:
    """The size each model runs a photo of a given size at (`VideoModel.resolution_for`), as a sidecar
    records it: a model that sizes each photo anew optimises it at another size than before."""
    return lambda size: [tuple(m.resolution_for(*size)) for m in models]


def _model_entries(recorded: Any) -> list[dict[str, Any]]:
    """A sidecar's ``model`` entry as a list of one record per model (one model is recorded bare)."""
    return [r for r in (recorded if isinstance(recorded, list) else [recorded]) if isinstance(r, dict)]


def _same_sizes(record: dict[str, Any], sizes: SizesFor) -> bool:
    """Whether the models ran at the sizes ``sizes`` gives the recorded photo (records without sizes pass)."""
    recorded = [r.get("resolution") for r in _model_entries(record.get("model"))]
    if not record.get("input_size") or any(r is None for r in recorded):
        return True
    return [tuple(r) for r in recorded] == sizes(tuple(record["input_size"]))


def _same_models(recorded: Any, models: list[ModelIdentity]) -> bool:
    """Whether a sidecar's ``model`` entry names these models (and their dtypes, where known)."""
    entries = _model_entries(recorded)
    return len(entries) == len(models) and all(
        (r.get("name"), r.get("source")) == (name, source) and (dtype is None or r.get("dtype") == dtype)
        for r, (name, source, dtype) in zip(entries, models)
    )


def is_done(source: Path, output: Path, settings: dict[str, Any] | None = None,
            models: list[ModelIdentity] | None = None, sizes: SizesFor | None = None) -> bool:
    """Whether ``output`` and its sidecar exist, were made from this very ``source`` file and changed it
    (and, given the run's `resume_settings`, `model_identities` and `model_sizes`, with those settings
    against those models at those sizes)."""
    record = _record_of(output)
    if record is None or not _made_from(source, record):
        return False
    if models is not None and not _same_models(record.get("model"), models):
        return False
    if sizes is not None and not _same_sizes(record, sizes):
        return False
    if not (record.get("budget") or {}).get("linf"):
        return False  # not protected at all, as the default left Wan and HunyuanVideo photos before its random start
    made = record.get("config", {})
    return settings is None or all(made.get(key) == value for key, value in settings.items())


def foreign_output_error(source: Path, output: Path) -> str | None:
    """Why ``output`` must not be replaced unasked, when it exists and was not made from ``source``
    (a user's file, or another photo's output of the same name, or a record of another output that
    --overwrite would not replace either: `api.record_conflict`); None when it may be."""
    if conflict := record_conflict(output):
        return conflict
    if not output.exists():
        return None
    record = _record_of(output)
    if record is not None and (_made_from(source, record) or  # or from this photo before it was edited
                               (record.get("input") and Path(record["input"]).resolve() == source.resolve())):
        return None
    return f"'{output}' exists and was not made from '{source}'; pass --overwrite to replace it or pick another --out"


def settled_item(source: Path, output: Path, settings: dict[str, Any], models: list[ModelIdentity],
                 overwrite: bool = False, sizes: SizesFor | None = None) -> BatchItem | None:
    """What a batch does with a photo without protecting it: "skipped" when its output is done
    (`is_done`), "failed" when the file there must not be replaced (`foreign_output_error`); None to
    protect it (always with ``overwrite``)."""
    if overwrite:
        return None
    if is_done(source, output, settings, models, sizes):
        return BatchItem(source, "skipped", output=output)
    if foreign := foreign_output_error(source, output):
        return BatchItem(source, "failed", error=foreign)
    return None


@dataclass
class RunSummary:
    """What a batch run did: photos done, skipped (already protected) and failed, in ``seconds``."""

    done: int
    skipped: int
    failed: int
    seconds: float

    @classmethod
    def of(cls, items: Iterable[BatchItem], seconds: float) -> RunSummary:
        """Count the outcomes of a run."""
        statuses = [i.status for i in items]
        return cls(statuses.count("done"), statuses.count("skipped"), statuses.count("failed"), seconds)

    @property
    def photos_per_minute(self) -> float:
        """Photos protected per minute of the run."""
        return 60 * self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One line for the end of a run."""
        return (f"{self.done} protected, {self.skipped} skipped, {self.failed} failed; "
                f"{self.photos_per_minute:.1f} photos per minute")


def protect_photo(
    source: Path,
    model: VideoModel | list[VideoModel],
    out_dir: Path,
    fmt: str,
    stem: str,
    callback: Callable[[StepReport], None] | None = None,
    **options: Any,
) -> BatchItem:
    """Protect one photo of a batch into ``out_dir`` as ``<stem>_protected.<fmt>``.

    A missing or unusable photo, or an output that cannot be written, gives a "failed" item;
    model, configuration and memory errors are raised: they concern every photo of the batch.
    """
    try:
        if not source.exists():
            raise InputError(f"'{source}' does not exist; check the path")
        result = protect(source, model, out=out_dir, fmt=fmt, stem=stem, callback=callback, overwrite=True, **options)
    except (InputError, OutputError) as err:
        return BatchItem(source, "failed", error=str(err))
    return BatchItem(source, "done", output=result.path, result=result)


def protect_batch(
    inputs: Iterable[str | Path],
    model: VideoModel | list[VideoModel],
    out_dir: str | Path,
    *,
    fmt: str = "png",
    overwrite: bool = False,
    on_start: Callable[[int, int, Path], None] | None = None,
    on_done: Callable[[BatchItem], None] | None = None,
    callback: Callable[[StepReport], None] | None = None,
    **options: Any,
) -> list[BatchItem]:
    """Protect each photo in turn, saving each as soon as it is done.

    A photo whose output and sidecar already exist, made from the same input bytes against the
    same models at the same sizes with the same settings (`resume_settings`), is skipped (unless ``overwrite``), so a
    rerun resumes an interrupted batch, and a rerun with other settings protects again. An output
    of that name made from anything else (a user's file, another photo of the same name) fails
    the photo, unless ``overwrite``: it is not replaced unasked. A bad
    photo is reported and the batch goes on; running out of memory stops it with one line that
    names the memory mode that would fit (photos already saved stay).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    sources = expand_inputs(inputs)
    stems = output_stems(sources)
    models = model if isinstance(model, list) else [model]
    settings = resume_settings(options, is_long_video(models), [m.family for m in models])
    made_against = model_identities(models)
    items: list[BatchItem] = []
    for index, source in enumerate(sources):
        if on_start is not None:
            on_start(index, len(sources), source)
        output = output_path_for(source, out_dir, fmt, stems[source])
        item = settled_item(source, output, settings, made_against, overwrite, model_sizes(models))
        if item is None:
            item = protect_photo(source, model, out_dir, fmt, stems[source], callback=callback, **options)
        items.append(item)
        if on_done is not None:
            on_done(item)
    return items
