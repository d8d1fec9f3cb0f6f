"""Metrics: identity (dlib), DINO (tiny random model), temporal, fidelity, skipped quality models.

All offline and CPU-only; the dlib face models come with face-recognition-models.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anti_i2v.errors import ConfigError, InputError, ModelError
from anti_i2v.evaluation import metrics as M
from anti_i2v.evaluation.metrics.identity import detection_scale

torch.set_num_threads(1)

pytest.importorskip("dlib")
pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """skimage's astronaut photo (a real face), (3, 512, 512) in [0, 1]."""
    return torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def astronaut_video(astronaut) -> torch.Tensor:
    """4 frames of the astronaut at 256 px, shifted 2 px per frame, with light noise."""
    small = F.interpolate(astronaut[None], size=(256, 256), mode="bilinear", antialias=True)[0]
    g = torch.Generator().manual_seed(0)
    frames = [torch.roll(small, 2 * i, dims=2) + 0.02 * torch.randn(small.shape, generator=g) for i in range(4)]
    return torch.stack(frames).clamp(0, 1)


@pytest.fixture(scope="module")
def other_face_video() -> torch.Tensor:
    """4 frames of a different real person: LFW face #83 of skimage's lfw_subset.

    lfw_subset faces are 25x25 grey crops; upsampled to 100 px (the metric then
    upsamples x2 for detection) dlib detects them. Face #83 is another person than the
    astronaut by dlib's own rule (raw descriptor distance 1.0 > dlib's 0.6 threshold).
    """
    face = torch.from_numpy(skdata.lfw_subset()[83]).float()[None].repeat(3, 1, 1)
    face = F.interpolate(face[None], size=(100, 100), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return torch.stack([torch.roll(face, i, dims=2) for i in range(4)])


@pytest.fixture(scope="module")
def faces() -> M.FaceIdentity:
    return M.shared_faces()


# --------------------------------------------------------------------- identity

def test_embed_is_unit_128d(faces, astronaut):
    e = faces.embed(astronaut)
    assert e is not None and e.shape == (128,)
    assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-6)
    assert M.shared_faces() is faces  # loaded once


def test_ism_same_face_is_high(faces, astronaut, astronaut_video):
    scores = M.identity_scores(astronaut_video, astronaut, faces)
    assert scores["ism"] > 0.9
    assert scores["ism"] == pytest.approx(M.ism(astronaut_video, astronaut), abs=1e-9)
    assert scores["fdfr"] == 0.0 == M.fdfr(astronaut_video)


def test_ism_other_face_is_low(faces, astronaut, astronaut_video, other_face_video):
    assert M.fdfr(other_face_video, faces) == 0.0  # the other face is detected, so ISM compares faces
    same = M.ism(astronaut_video, astronaut, faces)
    other = M.ism(other_face_video, astronaut, faces)
    # dlib descriptors sit in a narrow cone: different people score ~0.75-0.9, not ~0
    assert other < 0.85
    assert same - other > 0.15


def test_frames_without_face_count_zero(faces, astronaut, astronaut_video):
    mixed = torch.cat([astronaut_video[:2], torch.zeros(2, 3, 256, 256)])
    assert M.fdfr(mixed, faces) == 0.5
    full = M.ism(astronaut_video[:2], astronaut, faces)
    assert M.ism(mixed, astronaut, faces) == pytest.approx(full / 2, abs=1e-9)


def test_fdfr_of_blank_and_noise_is_one(faces):
    g = torch.Generator().manual_seed(1)
    assert M.fdfr(torch.rand(3, 3, 64, 96, generator=g), faces) == 1.0
    assert M.fdfr(torch.zeros(2, 3, 64, 96), faces) == 1.0
    assert M.fdfr(torch.ones(2, 3, 64, 96), faces) == 1.0


def test_clean_photo_without_face_is_an_input_error(faces, astronaut_video):
    with pytest.raises(InputError, match="no face found in the clean photo"):
        M.ism(astronaut_video, torch.full((3, 128, 128), 0.5), faces)


def test_small_frames_are_upsampled_for_detection():
    assert detection_scale(64, 96) == 3  # short side 64 -> 192 >= 160
    assert detection_scale(100, 100) == 2
    assert detection_scale(160, 900) == 1


def test_bad_shapes_are_input_errors(faces, astronaut):
    with pytest.raises(InputError):
        M.fdfr(astronaut, faces)  # an image, not a video
    with pytest.raises(InputError):
        M.ism(astronaut[None], (astronaut * 255).to(torch.uint8), faces)


def test_arcface_not_offered_without_insightface(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert M.arcface_available() is False
    with pytest.raises(M.Skipped, match="insightface"):
        M.ArcFaceIdentity()


# --------------------------------------------------------------------- temporal

@pytest.fixture(scope="module")
def small_astronaut(astronaut) -> torch.Tensor:
    return F.interpolate(astronaut[None], size=(128, 128), mode="bilinear", antialias=True)[0]


def test_static_video_is_frozen(small_astronaut):
    static = small_astronaut[None].repeat(5, 1, 1, 1)
    assert M.is_frozen(static)
    assert M.warp_error(static) < 1e-3
    assert M.motion_magnitude(static) < 1e-4


def test_moving_square_is_not_frozen():
    video = torch.zeros(6, 3, 64, 96)
    for t in range(6):
        video[t, :, 20:40, 10 + 2 * t:30 + 2 * t] = 1.0  # a white square moving 2 px per frame
    assert not M.is_frozen(video)
    assert M.motion_magnitude(video) > 0.002
    assert M.warp_error(video) < 0.01  # the flow explains the motion


def test_noise_has_larger_warp_error_than_smooth_motion(small_astronaut):
    rolled = torch.stack([torch.roll(small_astronaut, 2 * t, dims=2) for t in range(6)])
    noise = torch.rand(6, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    smooth, incoherent = M.warp_error(rolled), M.warp_error(noise)
    assert not M.is_frozen(rolled) and M.motion_magnitude(rolled) > 0
    assert smooth < 0.01
    assert incoherent > 0.2 and incoherent > 20 * smooth


def test_temporal_needs_two_frames(small_astronaut):
    with pytest.raises(InputError, match="at least 2 frames"):
        M.warp_error(small_astronaut[None])


# --------------------------------------------------------------------- fidelity

def test_fidelity_of_identical_images(small_astronaut):
    scores = M.fidelity(small_astronaut, small_astronaut)
    assert set(scores) == {"linf", "linf_255", "psnr", "ssim", "ciede2000", "flip"}
    assert scores["flip"] == 0.0
    assert scores["linf"] == 0.0 and scores["linf_255"] == 0.0
    assert scores["psnr"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert scores["ciede2000"] == pytest.approx(0.0, abs=1e-9)


def test_fidelity_of_8_over_255_perturbation(small_astronaut):
    x = 0.1 + 0.8 * small_astronaut  # keep away from 0 and 1 so that no change is clipped
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    scores = M.fidelity(x, x + sign * 8 / 255)
    assert scores["linf_255"] == pytest.approx(8.0, abs=1e-3)
    assert scores["linf"] == pytest.approx(8 / 255, abs=1e-6)
    assert scores["psnr"] == pytest.approx(20 * math.log10(255 / 8), abs=0.05)  # 30.07 dB
    assert 0.0 < scores["ssim"] < 1.0
    assert scores["ciede2000"] > 0.5
    assert 0.0 < scores["flip"] < 1.0


def test_flip_is_zero_for_identical_images_and_grows_with_visibility(small_astronaut):
    x = 0.1 + 0.8 * small_astronaut
    assert M.flip_difference(x, x.clone()) == 0.0
    generator = torch.Generator().manual_seed(5)
    faint = x + (torch.rand(x.shape, generator=generator) * 2 - 1) / 255  # +-1/255 noise: invisible
    strong = x + (torch.rand(x.shape, generator=generator) * 2 - 1) * 16 / 255
    inverted = 1 - x  # a negative of the photo: as visible as a change gets
    scores = [M.flip_difference(x, y) for y in (faint, strong, inverted)]
    assert 0.0 < scores[0] < 0.02
    assert scores[0] < scores[1] < scores[2] < 1.0
    # symmetric enough to be a distance, and computed on the images as given (no resize)
    assert M.flip_difference(strong, x) == pytest.approx(scores[1], rel=0.2)
    assert M.FLIP.protection_direction == "lower" and M.FLIP.range == (0.0, 1.0)


def test_flip_refuses_bad_input(small_astronaut):
    with pytest.raises(InputError, match="one size"):
        M.flip_difference(small_astronaut, small_astronaut[:, :64])
    with pytest.raises(InputError):
        M.flip_difference(small_astronaut[None], small_astronaut[None])
    with pytest.raises(ConfigError):
        M.flip_difference(small_astronaut, small_astronaut, pixels_per_degree=0)


def test_fidelity_size_mismatch(small_astronaut):
    with pytest.raises(InputError, match="same resolution"):
        M.fidelity(small_astronaut, small_astronaut[:, :64])


# --------------------------------------------------------------------- DINO

@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, image_size=32, patch_size=8))
    folder = tmp_path_factory.mktemp("dino")
    model.save_pretrained(folder)
    return folder


def test_dino_same_video_is_one_and_noise_lower(tiny_dino_dir, small_astronaut):
    assert M.dino_available(str(tiny_dino_dir))
    dino = M.DinoSimilarity.from_pretrained(str(tiny_dino_dir), image_size=32)
    video = torch.stack([torch.roll(small_astronaut, 4 * t, dims=2) for t in range(3)])
    assert dino.features(video).shape == (3, 32)
    assert dino(video, video) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert dino(video, noise) < 0.99
    # photo reference: every frame against the photo; the unshifted frame matches it exactly
    assert dino(video[:1], small_astronaut) == pytest.approx(1.0, abs=1e-5)
    assert dino(video, small_astronaut) < dino(video[:1], small_astronaut)
    with pytest.raises(InputError, match="same number of frames"):
        dino(video, video[:2])


def test_dino_missing_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert not M.dino_available(str(tmp_path / "nothing"))
    assert not M.dino_available("facebook/dinov2-base")
    with pytest.raises(ModelError, match="DINO weights"):
        M.DinoSimilarity.from_pretrained(str(tmp_path / "nothing"))


# --------------------------------------------------------------------- quality

def test_qalign_skipped_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert not M.qalign_available()
    with pytest.raises(M.Skipped, match="q-future/one-align") as err:
        M.QAlign.from_pretrained()
    assert "\n" not in str(err.value)


def test_qalign_maps_scores_to_unit_range():
    class FakeOneAlign(torch.nn.Module):
        def score(self, images, task_="quality", input_="image"):
            assert task_ == "quality"
            if input_ == "video":
                assert len(images) == 1 and len(images[0]) <= 8
                return torch.tensor([5.0])
            return torch.full((len(images),), 3.0)

    frame, video = M.QAlign(FakeOneAlign())(torch.rand(10, 3, 16, 16))
    assert frame == pytest.approx(0.5) and video == pytest.approx(1.0)


def test_face_quality_skipped_without_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTI_I2V_FACE_QUALITY_MODEL", str(tmp_path / "cr_fiqa.pt"))
    assert not M.face_quality_available()
    with pytest.raises(M.Skipped, match="CR-FIQA") as err:
        M.FaceQuality.from_file()
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in torch 2.13
def test_face_quality_with_local_torchscript(tmp_path, monkeypatch, faces, astronaut_video):
    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean(dim=(1, 2, 3)), torch.full((x.shape[0], 1), 0.8)

    path = tmp_path / "fq.pt"
    torch.jit.script(Constant()).save(str(path))
    monkeypatch.setenv("ANTI_I2V_FACE_QUALITY_MODEL", str(path))
    assert M.face_quality_available()
    quality = M.FaceQuality.from_file()
    assert quality(astronaut_video) == pytest.approx(0.8, abs=1e-6)
    half = torch.cat([astronaut_video[:2], torch.zeros(2, 3, 256, 256)])
    assert quality(half) == pytest.approx(0.4, abs=1e-6)  # frames without a face count as 0


# --------------------------------------------------------------------- specs

def test_every_metric_spec_has_range_and_direction():
    expected = {"ism", "fdfr", "dino", "qalign_frame", "qalign_video", "face_quality", "warp_error",
                "motion", "frozen", "linf", "linf_255", "psnr", "ssim", "ciede2000", "flip"}
    assert set(M.ALL_METRICS) == expected
    for name, spec in M.ALL_METRICS.items():
        assert spec.name == name
        low, high = spec.range
        assert low < high
        assert spec.protection_direction in ("lower", "higher", "none")
        assert spec.description and spec.higher_means
    informational = {n for n, s in M.ALL_METRICS.items() if s.protection_direction == "none"}
    assert informational == {"motion", "frozen"}
    assert M.ISM.protection_direction == "lower" and M.ISM.range == (-1.0, 1.0)
    assert M.FDFR.protection_direction == "higher" and M.WARP_ERROR.protection_direction == "higher"
