"""Atomic file writes: a crash leaves either the old file or the new one, never half."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temp file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented, standard JSON (no NaN/Infinity) atomically."""
    text = json.dumps(record, indent=2, default=str, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))
