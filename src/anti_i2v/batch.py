"""Protect many photos: expand folders, skip finished ones, keep going past bad ones."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anti_i2v.api import ProtectResult, protect, sidecar_path
from anti_i2v.engine import StepReport
from anti_i2v.errors import AntiI2VError, InputError, OutputError
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


def is_done(source: Path, out_dir: Path, fmt: str) -> Path | None:
    """The finished output for ``source`` (image and sidecar both present), if any."""
    output = output_path_for(source, out_dir, fmt)
    return output if output.is_file() and sidecar_path(output).is_file() else None


def protect_batch(
    inputs: Iterable[str | Path],
    model: VideoModel,
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

    A photo whose output and sidecar already exist is skipped (unless ``overwrite``),
    so a rerun resumes an interrupted batch; a bad photo is reported and the batch
    goes on.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    sources = expand_inputs(inputs)
    items: list[BatchItem] = []
    for index, source in enumerate(sources):
        if on_start is not None:
            on_start(index, len(sources), source)
        done = None if overwrite else is_done(source, out_dir, fmt)
        if done is not None:
            item = BatchItem(source, "skipped", output=done)
        else:
            try:
                if not source.exists():
                    raise InputError(f"'{source}' does not exist; check the path")
                result = protect(source, model, out=out_dir, fmt=fmt, callback=callback, overwrite=True, **options)
                item = BatchItem(source, "done", output=result.path, result=result)
            except (InputError, OutputError) as err:
                item = BatchItem(source, "failed", error=str(err))
            except AntiI2VError:
                raise  # model or configuration errors concern every photo: stop the batch
        items.append(item)
        if on_done is not None:
            on_done(item)
    return items
