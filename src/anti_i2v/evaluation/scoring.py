"""Score generated videos against the clean photo and the clean generation.

`VideoScorer` loads each metric's model once, skips (with one line saying why) the
metrics whose weights are not present, and returns plain dicts. `verdict` turns a
row of scores into a short judgement, with thresholds stated in `VERDICT_RULES`.

Where no face metric applies (no face in the clean video, or no face model) and DINO
is not available, the verdict is relative to the model itself: the video generated
from the photo plus uniform random noise of the same L-inf budget (same seed, prompt
and sampler) is the reference. Such noise is what "a perturbation of this size" does
to the model by chance; a protection must move the generated video clearly further
from the clean video than that. `noise_verdict` states the thresholds.
"""

from __future__ import annotations

import logging
import math

import torch

from anti_i2v.errors import InputError, ModelError
from anti_i2v.evaluation.metrics import ALL_METRICS
from anti_i2v.evaluation.metrics.base import MetricSpec, Skipped
from anti_i2v.evaluation.metrics.dino import DEFAULT_DINO, DinoSimilarity, dino_available
from anti_i2v.evaluation.metrics.identity import ArcFaceIdentity, arcface_available, identity_scores, shared_faces
from anti_i2v.evaluation.metrics.quality import DEFAULT_QALIGN, FaceQuality, QAlign
from anti_i2v.evaluation.metrics.temporal import is_frozen, motion_magnitude, warp_error

logger = logging.getLogger(__name__)

# How far ISM must fall below the clean video's to call the identity lost, per identity model:
# dlib puts the same person at ~0.95-0.99 and other people at ~0.75-0.9; ArcFace at ~0.6-0.8 and < 0.3.
ISM_DROP = {"dlib": 0.1, "arcface": 0.25}
DINO_DROP = 0.15
PSNR_CAP = 100.0  # dB reported for identical videos, so that every value stays finite
# How far (dB) the video's PSNR to the clean video must fall below the same-budget noise video's.
# 6 dB: its RMS distance to the clean video is at least twice the noise video's. 3 dB: twice the
# squared error. On tiny-cogvideox, eight noise seeds of one budget spread over up to 6 dB (std 0.4-2.3
# dB), so 3-6 dB can still be luck of the draw ("weak") and only 6 dB or more is called "protected".
NOISE_PROTECTED_DB = 6.0
NOISE_WEAK_DB = 3.0
VERDICT_RULES = (
    f"protected: the video lost the identity (ISM at least {ISM_DROP['dlib']} below the clean video's with dlib, "
    f"{ISM_DROP['arcface']} with ArcFace, or no face in half "
    f"the frames) or, when the clean video shows no face, its DINO similarity fell at least {DINO_DROP} below "
    "the clean video's; "
    "when neither identity nor DINO applies, the reference is the video generated from the clean photo plus "
    "uniform random noise of the same L-inf budget (same seed, prompt and sampler): protected when the video's "
    f"PSNR to the clean video is at least {NOISE_PROTECTED_DB:g} dB below the noise video's (at least twice its "
    f"RMS distance to the clean video), weak when {NOISE_WEAK_DB:g} to {NOISE_PROTECTED_DB:g} dB below (more than "
    "noise, but within what another noise draw can do), not protected otherwise; "
    "frozen: the video hardly moves (counted apart, never as a success); "
    "not protected: none of these; unknown: no identity, DINO or noise-referenced score could be computed"
)


PSNR_TO_CLEAN = MetricSpec(
    name="psnr_to_clean_video",
    description="PSNR in dB between this generated video and the one generated from the clean photo",
    range=(0.0, PSNR_CAP),
    higher_means="the video is closer to the clean generation (100 = identical)",
    protection_direction="lower",
)
SCORED_METRICS: dict[str, MetricSpec] = {**ALL_METRICS, PSNR_TO_CLEAN.name: PSNR_TO_CLEAN}


def video_psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB, data range 1) between two videos of the same shape, capped at `PSNR_CAP` (identical)."""
    mse = float((video.float() - reference.float()).pow(2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1 / mse))


class VideoScorer:
    """All available metrics of a generated video, relative to the clean photo and video.

    Args:
        dino: hub id or folder of a DINO(v2) model, or None to skip DINO.
        qalign: hub id or folder of Q-Align, or None to skip it.
        face_quality: path of a face-quality TorchScript model, or None for the default place.
        device: where the feature models run.
    """

    def __init__(
        self,
        dino: str | None = DEFAULT_DINO,
        qalign: str | None = DEFAULT_QALIGN,
        face_quality: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        # what this scorer cannot measure on any photo (a setting of the run); `skipped` starts from
        # it for each photo and adds what that photo cannot give (no face in it, say)
        self.unavailable: dict[str, str] = {}
        self.dino = None
        if dino is not None and dino_available(dino):
            self.dino = DinoSimilarity.from_pretrained(dino, device=device)
        else:
            self.unavailable["dino"] = f"no local weights for '{dino}' (download them or pass --dino-model DIR)"
        self.qalign = self._optional("qalign", lambda: QAlign.from_pretrained(qalign, device=device), qalign)
        self.face_quality = self._optional("face_quality", lambda: FaceQuality.from_file(face_quality, device=device), True)
        # ArcFace (the paper's identity model) when it is installed with its weights, else dlib
        self.faces = ArcFaceIdentity() if arcface_available() else shared_faces()
        self.identity_model = "arcface" if isinstance(self.faces, ArcFaceIdentity) else "dlib"
        self.skipped: dict[str, str] = dict(self.unavailable)
        self.clean_photo: torch.Tensor | None = None
        self.clean_video: torch.Tensor | None = None

    def _optional(self, name: str, load, wanted) -> object | None:
        if not wanted:
            self.unavailable[name] = "turned off"
            return None
        try:
            return load()
        except (Skipped, ModelError) as reason:
            self.unavailable[name] = str(reason)
            return None

    def prepare(self, clean_photo: torch.Tensor, clean_video: torch.Tensor) -> None:
        """Set the clean photo (3, H, W) and the clean generation (F, 3, h, w) to compare with."""
        self.clean_photo = clean_photo
        self.clean_video = clean_video
        self.clean_face = self.faces.embed(clean_photo)
        self.skipped = dict(self.unavailable)  # what the previous photo could not give does not carry over
        if self.clean_face is None:
            self.skipped["ism"] = self.skipped["fdfr"] = "no face found in the clean photo"

    def score(self, video: torch.Tensor) -> dict[str, float]:
        """Every available metric of ``video`` (F, 3, h, w) in [0, 1]."""
        assert self.clean_photo is not None and self.clean_video is not None, "call prepare() first"
        scores: dict[str, float] = {}
        if "ism" not in self.skipped:
            try:
                scores.update(identity_scores(video, self.clean_face, self.faces))
            except InputError as err:
                self.skipped["ism"] = self.skipped["fdfr"] = str(err)
        if self.dino is not None:
            scores["dino"] = self.dino(video, self.clean_photo)
        if self.qalign is not None:
            scores["qalign_frame"], scores["qalign_video"] = self.qalign(video)
        if self.face_quality is not None:
            try:
                scores["face_quality"] = self.face_quality(video)
            except (ModelError, InputError) as err:
                self.skipped["face_quality"] = str(err)
        scores["warp_error"] = warp_error(video)
        scores["motion"] = motion_magnitude(video)
        scores["frozen"] = float(is_frozen(video))
        if video.shape == self.clean_video.shape:
            scores["psnr_to_clean_video"] = video_psnr(video, self.clean_video)
        return scores


def identity_applies(clean: dict[str, float]) -> bool:
    """Whether the face rule can judge videos of this photo: ISM was measured and the clean video shows the face."""
    return "ism" in clean and clean.get("fdfr", 1.0) < 1.0


def needs_noise_reference(clean: dict[str, float]) -> bool:
    """Whether `verdict` falls back to the same-budget noise video for this clean video's scores
    (neither the face rule nor DINO applies)."""
    return not identity_applies(clean) and "dino" not in clean


def noise_verdict(scores: dict[str, float], noise: dict[str, float]) -> str:
    """"protected", "weak", "not protected" or "unknown": the video's PSNR to the clean video against
    the same-budget noise video's.

    ``margin = noise["psnr_to_clean_video"] - scores["psnr_to_clean_video"]`` (dB):
    protected when ``margin >= NOISE_PROTECTED_DB`` (6 dB, at least twice the noise
    video's RMS distance to the clean video), weak when ``margin >= NOISE_WEAK_DB``
    (3 dB), else not protected. Unknown when either PSNR is missing (a video of
    another shape than the clean one).
    """
    if "psnr_to_clean_video" not in scores or "psnr_to_clean_video" not in noise:
        return "unknown"
    margin = noise["psnr_to_clean_video"] - scores["psnr_to_clean_video"]
    if margin >= NOISE_PROTECTED_DB:
        return "protected"
    return "weak" if margin >= NOISE_WEAK_DB else "not protected"


def verdict(
    scores: dict[str, float],
    clean: dict[str, float],
    identity_model: str = "dlib",
    noise: dict[str, float] | None = None,
) -> str:
    """"protected", "weak", "frozen", "not protected" or "unknown" by `VERDICT_RULES`.

    ``scores`` are a video's, ``clean`` the clean video's; ``noise`` (optional) are
    the scores of the video generated from the clean photo plus uniform noise of the
    same L-inf budget, the reference when neither identity nor DINO applies.
    """
    if scores.get("frozen") and not clean.get("frozen"):
        return "frozen"
    if "ism" in scores and identity_applies(clean):
        lost = scores["ism"] <= clean["ism"] - ISM_DROP[identity_model] or scores.get("fdfr", 0) >= max(0.5, clean.get("fdfr", 0) + 0.25)
        return "protected" if lost else "not protected"
    if "dino" in scores and "dino" in clean:
        return "protected" if scores["dino"] <= clean["dino"] - DINO_DROP else "not protected"
    if noise is not None:
        return noise_verdict(scores, noise)
    return "unknown"
