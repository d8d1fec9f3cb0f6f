"""Where the Open-Sora golden port fixtures are, and how the tests read them.

Every value that describes a fixture (case names, step counts, tiny-configuration sizes, shapes,
tolerances) is read from its ``<name>.json`` or from the keys of its ``<name>.safetensors``, so any
fixture of the same format (other seeds, other tiny configurations, other case names) can be tested.

``ANTI_I2V_PORT_FIXTURES``: a folder holding such fixtures instead of ``tests/fixtures/ports``. The
key lists of the official checkpoints (``keys/``) describe the released models and are always read
from ``tests/fixtures/ports/keys``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

PORTS = Path(__file__).parent / "fixtures" / "ports"
FIXTURES = Path(os.environ.get("ANTI_I2V_PORT_FIXTURES") or PORTS)
KEYS = PORTS / "keys"


@lru_cache(maxsize=None)
def spec(name: str) -> dict:
    """The fixture's json."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


@lru_cache(maxsize=None)
def tensors(name: str) -> dict[str, torch.Tensor]:
    """All tensors of the fixture (shared: clone before changing one)."""
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def state(name: str) -> dict[str, torch.Tensor]:
    """The ``state.*`` tensors without the prefix, as float32."""
    return {k[len("state.") :]: v.float() for k, v in tensors(name).items() if k.startswith("state.")}


def cases(name: str, where: Callable[[str, dict], bool] | None = None) -> list[str]:
    """The case names of the json in file order, optionally those where ``where(case, case_spec)`` holds."""
    return [c for c, s in spec(name)["cases"].items() if where is None or where(c, s)]
