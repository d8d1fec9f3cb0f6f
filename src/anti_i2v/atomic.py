"""Atomic file writes: a crash leaves either the old file or the new one, never half."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temp file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temp name per process, so that concurrent writers of one path never share a temp file;
    # keep the suffix: some writers pick formats by it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_safe(value: Any) -> Any:
    """``value`` with every inf/nan float replaced by None, so that it is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented, standard JSON (inf/nan become null) atomically."""
    text = json.dumps(json_safe(record), indent=2, default=str, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))
