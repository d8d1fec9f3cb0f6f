"""The optional extras (`pip install 'anti-i2v[NAME]'`): the modules each brings, and one check for them."""

from __future__ import annotations

import importlib.util

from anti_i2v.errors import ConfigError

# the modules each extra of pyproject.toml installs beyond the base install
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "eval": ("cv2", "dlib", "face_recognition_models", "skimage", "flip_evaluator", "imageio", "imageio_ffmpeg"),
    "ray": ("ray",),
    "web": ("gradio",),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed (empty when what needs it can run)."""
    return [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise one `ConfigError` line naming the missing modules and the install command, when
    ``what`` (e.g. "--ray", "checking") cannot run without ``extra``."""
    missing = missing_modules(extra)
    if missing:
        raise ConfigError(f"{what} needs the {extra} extra (missing {', '.join(missing)}): "
                          f"pip install 'anti-i2v[{extra}]'")
