"""Quality metrics that need large or unpublished weights (never downloaded here).

* `QALIGN_FRAME` / `QALIGN_VIDEO`: Q-Align / OneAlign (``q-future/one-align``, an
  mPLUG-Owl2 LMM, about 16 GB) rates quality on 1..5; the score is mapped to
  ``[0, 1]`` as ``(s - 1) / 4``. The frame score is the mean image-quality score of
  the frames, the video score the model's video-quality score of (a subsample of)
  the frames. Lower = better protection. The model loads with
  ``AutoModelForCausalLM(trust_remote_code=True)`` and is used through its
  ``score(images, task_="quality", input_="image" | "video")`` method as on its model
  card; its remote code was written for transformers 4.36, so a load failure under
  newer transformers is reported as a `ModelError`.
* `FACE_QUALITY`: face image quality of the generated frames in ``[0, 1]``; lower =
  better protection. CR-FIQA (the paper's choice) is not published as a transformers
  model, so it is taken from a local TorchScript file, see `FaceQuality`.

Without the weights every entry point raises `Skipped` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from anti_i2v.errors import InputError, ModelError
from anti_i2v.evaluation.metrics.base import MetricSpec, Skipped, check_video, to_uint8

if TYPE_CHECKING:
    from anti_i2v.evaluation.metrics.identity import FaceIdentity

logger = logging.getLogger(__name__)

DEFAULT_QALIGN = "q-future/one-align"
#: environment variable naming the TorchScript face-quality model
FACE_QUALITY_ENV = "ANTI_I2V_FACE_QUALITY_MODEL"
#: where the face-quality model is looked for when neither a path nor the variable is given
DEFAULT_FACE_QUALITY_FILE = Path.home() / ".cache" / "anti_i2v" / "face_quality.pt"

QALIGN_FRAME = MetricSpec(
    name="qalign_frame",
    description="Q-Align (one-align) image quality, mean over generated frames, score 1..5 mapped to [0, 1]",
    range=(0.0, 1.0),
    higher_means="better-looking frames",
    protection_direction="lower",
)

QALIGN_VIDEO = MetricSpec(
    name="qalign_video",
    description="Q-Align (one-align) video quality of the generated video, score 1..5 mapped to [0, 1]",
    range=(0.0, 1.0),
    higher_means="a better-looking video",
    protection_direction="lower",
)

FACE_QUALITY = MetricSpec(
    name="face_quality",
    description=(
        "face image quality (local CR-FIQA-style TorchScript model) of the largest face per generated "
        "frame, mean over frames; frames without a face count as 0"
    ),
    range=(0.0, 1.0),
    higher_means="sharper, more recognisable faces",
    protection_direction="lower",
)


def _cached(source: str | Path, filename: str) -> bool:
    if Path(source).is_dir():
        return (Path(source) / filename).is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(str(source), filename), str)
    except ValueError:  # not a valid repo id
        return False


def qalign_available(source: str = DEFAULT_QALIGN) -> bool:
    """Whether Q-Align weights are present locally: a folder with ``config.json`` or the hub id in the HF cache."""
    return _cached(source, "config.json")


class QAlign:
    """Q-Align / OneAlign quality scorer of generated videos.

    Args:
        model: the loaded one-align model (must have ``score``).
        max_video_frames: frames (evenly spaced) passed to the video-quality prompt.
    """

    def __init__(self, model: torch.nn.Module, max_video_frames: int = 8) -> None:
        if not hasattr(model, "score"):
            raise ModelError("the Q-Align model has no score() method; load q-future/one-align with trust_remote_code")
        self.model = model.eval()
        self.max_video_frames = int(max_video_frames)

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_QALIGN, device: str | torch.device = "cpu") -> QAlign:
        """Load one-align from the local HF cache or a folder; `Skipped` if absent, `ModelError` if it fails to load."""
        if not qalign_available(source):
            raise Skipped(
                f"Q-Align needs the {DEFAULT_QALIGN} weights (about 16 GB) in the local Hugging Face cache "
                "or --qalign-model DIR"
            )
        from transformers import AutoModelForCausalLM

        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=True, attn_implementation="eager", dtype=dtype
            )
        except Exception as err:  # noqa: BLE001 - remote code can fail in many ways
            raise ModelError(
                f"Q-Align from '{source}' failed to load ({type(err).__name__}); its remote code targets "
                "transformers 4.36, run it in an environment with that version"
            ) from err
        logger.info("loaded Q-Align from %s on %s", source, device)
        return cls(model.to(device))

    @torch.inference_mode()
    def __call__(self, video: torch.Tensor) -> tuple[float, float]:
        """``(frame_score, video_score)`` of ``video`` ``(F, 3, H, W)`` in ``[0, 1]``, each in ``[0, 1]``; lower = better protection."""
        from PIL import Image

        frames = [Image.fromarray(to_uint8(frame)) for frame in check_video(video)]
        frame_scores = []
        for start in range(0, len(frames), 8):
            scores = self.model.score(frames[start:start + 8], task_="quality", input_="image")
            frame_scores.extend(float(s) for s in torch.as_tensor(scores).flatten())
        keep = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), self.max_video_frames)).round().astype(int))
        video_score = float(torch.as_tensor(
            self.model.score([[frames[i] for i in keep]], task_="quality", input_="video")
        ).flatten()[0])
        to_unit = lambda s: float(np.clip((s - 1.0) / 4.0, 0.0, 1.0))  # noqa: E731
        return to_unit(float(np.mean(frame_scores))), to_unit(video_score)


def face_quality_file(path: str | Path | None = None) -> Path:
    """Where the face-quality model is expected: ``path``, else ``$ANTI_I2V_FACE_QUALITY_MODEL``, else ``~/.cache/anti_i2v/face_quality.pt``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(FACE_QUALITY_ENV)
    return Path(env) if env else DEFAULT_FACE_QUALITY_FILE


def face_quality_available(path: str | Path | None = None) -> bool:
    """Whether the TorchScript face-quality model file (see `face_quality_file`) exists."""
    return face_quality_file(path).is_file()


class FaceQuality:
    """Face image quality from a local TorchScript model (e.g. CR-FIQA exported with ``torch.jit.trace``).

    Expected model contract:

    * input: ``(N, 3, 112, 112)`` float32 RGB face crops normalised to ``[-1, 1]``
      (``(x - 0.5) / 0.5``), aligned on dlib's 5 landmarks (``get_face_chip``,
      112 px, padding 0.25);
    * output: a tensor ``(N,)`` or ``(N, 1)``, or a tuple whose last element is that
      tensor (CR-FIQA returns ``(embedding, quality)``);
    * the raw score is mapped to ``[0, 1]`` by ``(s - low) / (high - low)`` with
      ``score_range=(low, high)`` and clamped; export a model that already outputs
      ``[0, 1]`` or pass the raw score range of your model.

    Args:
        module: the loaded TorchScript (or any torch) module.
        score_range: raw ``(low, high)`` of the model's score.
        faces: the dlib face detector/aligner (the shared one by default).
    """

    def __init__(
        self, module: torch.nn.Module, score_range: tuple[float, float] = (0.0, 1.0), faces: FaceIdentity | None = None
    ) -> None:
        from anti_i2v.evaluation.metrics.identity import shared_faces

        if not score_range[0] < score_range[1]:
            raise InputError("score_range must be (low, high) with low < high")
        self.module = module.eval() if hasattr(module, "eval") else module
        self.score_range = score_range
        self.faces = faces if faces is not None else shared_faces()

    @classmethod
    def from_file(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", score_range: tuple[float, float] = (0.0, 1.0)
    ) -> FaceQuality:
        """Load the model (``torch.jit.load``, or ``torch.export.load`` for ``.pt2``); `Skipped` if absent, `ModelError` if unreadable."""
        file = face_quality_file(path)
        if not file.is_file():
            raise Skipped(
                f"face quality needs a CR-FIQA TorchScript file at {file} (or set {FACE_QUALITY_ENV}); "
                "CR-FIQA is not on the Hugging Face hub"
            )
        try:
            if file.suffix == ".pt2":  # a torch.export archive
                module = torch.export.load(str(file)).module().to(device)
            else:
                with warnings.catch_warnings():  # TorchScript is deprecated in recent torch but still loads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    module = torch.jit.load(str(file), map_location=torch.device(device))
        except (RuntimeError, ValueError) as err:
            raise ModelError(f"'{file}' is not a loadable TorchScript (.pt) or torch.export (.pt2) file; re-export it") from err
        return cls(module, score_range=score_range)

    #: same as `from_file` (``path`` plays the role of the weights source), for symmetry with the other metrics
    from_pretrained = from_file

    @torch.inference_mode()
    def __call__(self, video: torch.Tensor) -> float:
        """Mean face quality of ``video`` ``(F, 3, H, W)`` in ``[0, 1]``; in ``[0, 1]``, frames without a face count as 0."""
        video = check_video(video)
        chips = [self.faces.face_chip(frame, size=112, padding=0.25) for frame in video]
        found = [c for c in chips if c is not None]
        if not found:
            return 0.0
        x = torch.from_numpy(np.stack(found)).permute(0, 3, 1, 2).float().div(255.0)
        param = next(iter(self.module.parameters()), None)
        x = ((x - 0.5) / 0.5).to(param.device if param is not None else "cpu")
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[-1]
        low, high = self.score_range
        scores = ((out.float().flatten().cpu() - low) / (high - low)).clamp(0, 1)
        if scores.numel() != len(found):
            raise ModelError("the face-quality model must return one score per face; check its output shape")
        return float(scores.sum()) / len(chips)
