"""Evaluation of protected photos: purification counter-attacks and protection metrics."""

import importlib.util

# what `verify` and `evaluate` import beyond the base install (the `eval` extra)
EVAL_MODULES = ("cv2", "dlib", "face_recognition_models", "skimage", "flip_evaluator", "imageio", "imageio_ffmpeg")


def missing_eval_extras() -> list[str]:
    """The modules of the `eval` extra that are not installed (empty when verification can run)."""
    return [m for m in EVAL_MODULES if importlib.util.find_spec(m) is None]
