"""Identity metrics: does the generated video still show the person of the clean photo?

Default backend (offline, shipped with ``dlib-bin`` + ``face-recognition-models``):
dlib's HOG frontal face detector, its 5-point landmark model and its 128-d ResNet
face descriptor (the model behind the ``face_recognition`` package, 99.38% on LFW).

* `ISM` (identity score matching) is the mean, over the frames of a generated
  video, of the cosine similarity between the frame's face descriptor and the
  descriptor of the face in the **clean** photo. As in Anti-DreamBooth, a frame in
  which no face is detected contributes 0, so a protection that destroys the face
  lowers ISM instead of being ignored. Range ``[-1, 1]``; lower = better protection.
* `FDFR` (face detection failure rate) is the share of frames with no detected
  face. Range ``[0, 1]``; higher = better protection.

Reading dlib ISM values: dlib descriptors all lie in a narrow cone, so the cosine
similarity of two *different* people is typically 0.75-0.9, not around 0; the same
photo re-encoded or slightly shifted scores above 0.99. dlib's own same-person rule
(Euclidean distance < 0.6 between raw descriptors, whose norm is about 1.3-1.5)
corresponds to a cosine of about 0.9. Compare ISM values between clean and protected
runs, not against 0. ArcFace-based ISM values (the paper's) are not comparable.

Small frames: the HOG detector finds faces of about 80x80 px and larger. Frames whose
short side is below 160 px (e.g. the 64x96 frames of the tiny model) are first
upsampled (bicubic) by the smallest integer factor that brings the short side to at
least 160 px; the detector's own pyramid upsampling (``upsample``) comes on top.

ArcFace (insightface) is used only when the ``insightface`` package *and* a model
pack under ``~/.insightface/models`` are present (`arcface_available`); nothing is
downloaded. Pass an `ArcFaceIdentity` as ``faces=`` to use it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anti_i2v.errors import InputError, ModelError
from anti_i2v.evaluation.metrics.base import MetricSpec, Skipped, check_image, check_video, to_uint8

logger = logging.getLogger(__name__)

#: frames with a shorter side are upsampled by an integer factor before detection
MIN_DETECTION_SIDE = 160

ISM = MetricSpec(
    name="ism",
    description=(
        "identity score matching: mean cosine similarity between each generated frame's face "
        "descriptor (dlib 128-d) and the clean photo's; frames without a face count as 0"
    ),
    range=(-1.0, 1.0),
    higher_means="the generated person looks more like the person in the clean photo",
    protection_direction="lower",
)

FDFR = MetricSpec(
    name="fdfr",
    description="face detection failure rate: share of generated frames in which dlib finds no face",
    range=(0.0, 1.0),
    higher_means="more frames without a detectable face",
    protection_direction="higher",
)


def dlib_model_dir() -> Path:
    """The folder holding the dlib model files of the ``face-recognition-models`` package.

    Raises `Skipped` when the package is not installed.
    """
    # `import face_recognition_models` needs pkg_resources; locate the data files instead
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise Skipped("identity metrics need dlib's face models: pip install dlib-bin face-recognition-models")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def detection_scale(height: int, width: int) -> int:
    """Integer factor that brings the short side of an ``height x width`` frame to >= 160 px (1 if it already is)."""
    short = min(height, width)
    return max(1, math.ceil(MIN_DETECTION_SIDE / max(short, 1)))


class FaceIdentity:
    """dlib HOG face detector + 5-point landmarks + 128-d ResNet face descriptor.

    Args:
        upsample: how many times dlib's detector upsamples the (already >= 160 px)
            image in its pyramid; 1 finds faces down to about 40x40 px.

    Raises `Skipped` when dlib or the model files are missing.
    """

    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError as err:
            raise Skipped("identity metrics need dlib: pip install dlib-bin face-recognition-models") from err
        folder = dlib_model_dir()
        landmarks = folder / "shape_predictor_5_face_landmarks.dat"
        descriptor = folder / "dlib_face_recognition_resnet_model_v1.dat"
        for path in (landmarks, descriptor):
            if not path.is_file():
                raise Skipped(f"dlib model file {path.name} is missing: pip install --force-reinstall face-recognition-models")
        try:
            self._detector = dlib.get_frontal_face_detector()
            self._landmarks = dlib.shape_predictor(str(landmarks))
            self._descriptor = dlib.face_recognition_model_v1(str(descriptor))
        except RuntimeError as err:
            raise ModelError(f"dlib could not load its face models ({err}); reinstall face-recognition-models") from err
        self._dlib = dlib
        self.upsample = int(upsample)
        self._lock = threading.Lock()  # dlib models are not documented as thread-safe
        logger.debug("loaded dlib face models from %s", folder)

    def _largest_face(self, image: torch.Tensor) -> tuple[np.ndarray, Any]:
        """Upsampled uint8 RGB array and the 5-point landmarks of its largest face (None if none)."""
        image = check_image(image)
        rgb = to_uint8(image)
        scale = detection_scale(*rgb.shape[:2])
        if scale > 1:
            import cv2

            rgb = cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
        with self._lock:
            boxes = self._detector(rgb, self.upsample)
            if len(boxes) == 0:
                return rgb, None
            box = max(boxes, key=lambda b: b.area())
            return rgb, self._landmarks(rgb, box)

    def embed(self, image: torch.Tensor) -> np.ndarray | None:
        """Descriptor of the largest face in ``image`` ``(3, H, W)`` in ``[0, 1]``.

        Returns a unit-normalised float64 vector of shape ``(128,)``, or None when no
        face is detected.
        """
        rgb, shape = self._largest_face(image)
        if shape is None:
            return None
        with self._lock:
            vector = np.asarray(self._descriptor.compute_face_descriptor(rgb, shape), dtype=np.float64)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def embed_video(self, video: torch.Tensor) -> list[np.ndarray | None]:
        """`embed` of every frame of ``video`` ``(F, 3, H, W)`` in ``[0, 1]``: F entries, None where no face."""
        video = check_video(video)
        return [self.embed(frame) for frame in video]

    def face_chip(self, image: torch.Tensor, size: int = 112, padding: float = 0.25) -> np.ndarray | None:
        """The largest face of ``image`` ``(3, H, W)`` in ``[0, 1]``, aligned on its 5 landmarks.

        Returns a ``uint8`` RGB array ``(size, size, 3)`` (dlib ``get_face_chip``), or None
        when no face is detected.
        """
        rgb, shape = self._largest_face(image)
        if shape is None:
            return None
        with self._lock:
            return np.asarray(self._dlib.get_face_chip(rgb, shape, size=size, padding=padding))


class ArcFaceIdentity:
    """ArcFace embeddings from a local insightface model pack (same interface as `FaceIdentity`).

    Only usable when `arcface_available` is True; otherwise the constructor raises
    `Skipped`. Nothing is downloaded.

    Args:
        pack: model pack folder name under ``~/.insightface/models`` (e.g. ``buffalo_l``).
    """

    def __init__(self, pack: str = "buffalo_l") -> None:
        if not arcface_available(pack):
            raise Skipped(
                f"ArcFace needs the insightface package and the '{pack}' model pack in ~/.insightface/models; "
                "use the default dlib identity metrics otherwise"
            )
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(name=pack, providers=["CPUExecutionProvider"])
        self._app.prepare(ctx_id=-1, det_size=(640, 640))

    def embed(self, image: torch.Tensor) -> np.ndarray | None:
        """Unit-normalised ArcFace embedding ``(512,)`` of the largest face of ``image`` ``(3, H, W)`` in ``[0, 1]``, or None."""
        rgb = to_uint8(check_image(image))
        scale = detection_scale(*rgb.shape[:2])
        if scale > 1:
            import cv2

            rgb = cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
        found = self._app.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface expects BGR
        if not found:
            return None
        face = max(found, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
        return np.asarray(face.normed_embedding, dtype=np.float64)

    def embed_video(self, video: torch.Tensor) -> list[np.ndarray | None]:
        """`embed` of every frame of ``video`` ``(F, 3, H, W)`` in ``[0, 1]``."""
        return [self.embed(frame) for frame in check_video(video)]


def arcface_available(pack: str = "buffalo_l") -> bool:
    """True only if ``import insightface`` works and ``~/.insightface/models/<pack>`` holds ONNX files."""
    folder = Path.home() / ".insightface" / "models" / pack
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        return False
    try:
        import insightface  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


_shared: FaceIdentity | None = None
_shared_lock = threading.Lock()


def shared_faces() -> FaceIdentity:
    """The module's `FaceIdentity`, created on first use so the dlib models load once."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = FaceIdentity()
        return _shared


def ism(video: torch.Tensor, reference: torch.Tensor, faces: FaceIdentity | ArcFaceIdentity | None = None) -> float:
    """Identity score matching of ``video`` ``(F, 3, H, W)`` against the clean photo ``reference`` ``(3, H', W')``.

    Both in ``[0, 1]``. Mean over frames of the cosine similarity of face embeddings;
    frames without a face count as 0. Returns a value in ``[-1, 1]``; lower = better
    protection. Raises `InputError` when the clean photo has no detectable face.
    """
    faces = faces if faces is not None else shared_faces()
    video = check_video(video)
    clean = faces.embed(check_image(reference, "clean photo"))
    if clean is None:
        raise InputError("no face found in the clean photo; identity metrics need a face")
    scores = [0.0 if e is None else float(np.dot(e, clean)) for e in faces.embed_video(video)]
    logger.debug("ism per frame: %s", ["%.3f" % s for s in scores])
    return float(np.mean(scores))


def fdfr(video: torch.Tensor, faces: FaceIdentity | ArcFaceIdentity | None = None) -> float:
    """Face detection failure rate of ``video`` ``(F, 3, H, W)`` in ``[0, 1]``: share of frames without a face, in ``[0, 1]``; higher = better protection."""
    faces = faces if faces is not None else shared_faces()
    embeddings = faces.embed_video(check_video(video))
    return sum(e is None for e in embeddings) / len(embeddings)


def identity_scores(
    video: torch.Tensor,
    reference: torch.Tensor | np.ndarray,
    faces: FaceIdentity | ArcFaceIdentity | None = None,
) -> dict[str, float]:
    """`ism` and `fdfr` of ``video`` ``(F, 3, H, W)`` against ``reference`` in one pass.

    ``reference`` is the clean photo ``(3, H', W')`` in ``[0, 1]``, or its face
    embedding already computed with the same ``faces`` (saves a detection on a large
    photo per video). Returns ``{"ism": [-1, 1], "fdfr": [0, 1]}``; raises `InputError`
    when the clean photo has no face.
    """
    faces = faces if faces is not None else shared_faces()
    video = check_video(video)
    if isinstance(reference, np.ndarray):
        clean = reference
    else:
        clean = faces.embed(check_image(reference, "clean photo"))
    if clean is None:
        raise InputError("no face found in the clean photo; identity metrics need a face")
    embeddings = faces.embed_video(video)
    scores = [0.0 if e is None else float(np.dot(e, clean)) for e in embeddings]
    return {"ism": float(np.mean(scores)), "fdfr": sum(e is None for e in embeddings) / len(embeddings)}
