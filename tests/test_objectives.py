"""IRC, IRA, the diffusion-loss reference video and the auxiliary CLIP term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import InputError, ModelError
from anti_i2v.objectives import AntiI2VObjective, draw_step
from anti_i2v.objectives.base import relative_sq_distance
from anti_i2v.objectives.diffusion import fit_frames, read_video_file, reference_latents
from anti_i2v.objectives.ira import default_target_image, ira_loss
from anti_i2v.objectives.irc import irc_loss
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity, resolve_aux_weight


def test_relative_distance_is_scale_free_and_zero_at_the_target():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert relative_sq_distance(b, b) == 0
    torch.testing.assert_close(relative_sq_distance(10 * a, 10 * b), relative_sq_distance(a, b))


def test_irc_pulls_deep_features_only():
    shallow = torch.randn(1, 6, 4)
    deep = (shallow + torch.randn(1, 6, 4)).requires_grad_(True)
    feats = {"s": shallow.clone().requires_grad_(True), "d": deep}
    loss = irc_loss(feats, "s", ["d"])
    loss.backward()
    assert loss > 0 and deep.grad.abs().sum() > 0 and feats["s"].grad is None
    assert irc_loss({"s": shallow, "d": shallow.clone()}, "s", ["d"]) == 0


def test_ira_is_zero_at_the_target_and_default_target_is_fixed():
    psi = default_target_image(64, 96)
    assert psi.shape == (1, 3, 64, 96) and 0 <= psi.min() and psi.max() <= 1 and psi.std() > 0.1
    torch.testing.assert_close(psi, default_target_image(64, 96))
    f = {"a": torch.randn(3, 3)}
    assert ira_loss(f, {"a": f["a"].clone()}, ["a"]) == 0
    assert ira_loss(f, {"a": torch.randn(3, 3)}, ["a"]) > 0


def test_draws_are_reproducible_from_the_seed():
    a = draw_step(torch.Generator().manual_seed(3), torch.Size([1, 2, 3]), (100, 200))
    b = draw_step(torch.Generator().manual_seed(3), torch.Size([1, 2, 3]), (100, 200))
    assert a.t == b.t and 100 <= a.t <= 200 and torch.equal(a.noise, b.noise)


def test_reference_video_from_files(tmp_path, tiny_model):
    frames = (np.random.default_rng(0).random((4, 20, 30, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "clip.gif", save_all=True, append_images=images[1:])
    for name in ("clip.npy", "clip.gif"):
        video = read_video_file(tmp_path / name)
        assert video.shape == (4, 3, 20, 30) and video.max() <= 1
    fitted = fit_frames(read_video_file(tmp_path / "clip.npy"), 9, (64, 96))
    assert fitted.shape == (9, 3, 64, 96)
    x = torch.rand(1, 3, 64, 96)
    latents = reference_latents(tiny_model, x, str(tmp_path / "clip.npy"), "p", 0)
    assert latents.shape == reference_latents(tiny_model, x, "repeat", "p", 0).shape
    with pytest.raises(InputError, match="does not exist"):
        read_video_file(tmp_path / "missing.gif")


def test_generated_reference_is_cached(tmp_path, monkeypatch, tiny_model, portrait_small):
    monkeypatch.setenv("ANTI_I2V_CACHE", str(tmp_path))
    calls = []
    original = tiny_model.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "generate", counting)
    first = reference_latents(tiny_model, portrait_small, "generate", "a person talking to the camera", 0, steps=2)
    second = reference_latents(tiny_model, portrait_small, "generate", "a person talking to the camera", 0, steps=2)
    assert len(calls) == 1
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, reference_latents(tiny_model, portrait_small, "repeat", "", 0))
    # a run on fewer frames generates its own, first or spread: the full video's is not theirs
    for spread in (True, False):
        with tiny_model.fewer_frames(0.5, spread=spread):
            fewer = reference_latents(tiny_model, portrait_small, "generate", "a person talking to the camera", 0, steps=2)
        assert fewer.shape[1] < first.shape[1]
    assert len(calls) == 3
    again = reference_latents(tiny_model, portrait_small, "generate", "a person talking to the camera", 0, steps=2)
    assert len(calls) == 3
    torch.testing.assert_close(again, first)


def test_aux_clip_term_loads_from_a_folder_and_pushes_apart(tmp_path, tiny_clip, portrait_small):
    aux = ClipEmbeddingSimilarity.from_pretrained(tiny_clip, torch.device("cpu"), torch.float32)
    aux.prepare(portrait_small)
    assert aux(portrait_small) == pytest.approx(1.0, abs=1e-5)
    x = portrait_small.clone().requires_grad_(True)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    sim = aux(noisy)
    sim.backward()
    assert sim < 1 and x.grad.abs().sum() > 0
    with pytest.raises(ModelError, match="CLIP weights"):
        ClipEmbeddingSimilarity.from_pretrained(str(tmp_path / "none"), torch.device("cpu"), torch.float32)


def test_anti_i2v_objective_reports_every_term(tiny_clip, tiny_model, portrait_small):
    config = ProtectConfig(weight_aux=1.0, aux_model=tiny_clip, prompt="a person talking to the camera")
    aux = ClipEmbeddingSimilarity.from_pretrained(config.aux_model, torch.device("cpu"), torch.float32)
    objective = AntiI2VObjective(tiny_model, config, aux=aux)
    objective.prepare(tiny_model, portrait_small)
    draw = draw_step(torch.Generator().manual_seed(0), objective.latent_shape(), (0, 999))
    out = objective(portrait_small.clone().requires_grad_(True), draw)
    assert set(out.parts) == {"irc", "ira", "dm", "aux", "total"}
    expected = out.parts["irc"] + out.parts["ira"] + out.parts["aux"] - out.parts["dm"]
    assert out.parts["total"] == pytest.approx(expected, rel=1e-5)
    assert objective.deep == ["denoiser.5", "denoiser.6", "denoiser.7"] and objective.shallow == "denoiser.3"


def test_aux_term_is_on_only_when_its_weights_are_local(tiny_clip):
    assert resolve_aux_weight(ProtectConfig(aux_model=tiny_clip)).weight_aux == 1.0
    assert resolve_aux_weight(ProtectConfig()).weight_aux == 0.0  # default CLIP is not bundled
    assert resolve_aux_weight(ProtectConfig(weight_aux=0.5)).weight_aux == 0.5


def test_configurations_that_cannot_optimise_are_refused(tiny_model):
    from anti_i2v.errors import ConfigError

    with pytest.raises(ConfigError, match="every loss weight is 0"):
        ProtectConfig(weight_irc=0, weight_ira=0, weight_dm=0, weight_aux=0)
    with pytest.raises(ConfigError, match="neither 'repeat'"):
        ProtectConfig(reference="somewhere/clip.mp4")
    with pytest.raises(ConfigError, match="other than that one"):
        AntiI2VObjective(tiny_model, ProtectConfig(irc_deep=(3,)))


def test_unet_features_of_different_scales_are_compared_on_a_common_grid():
    from anti_i2v.objectives.base import match_shapes

    deep, shallow = torch.randn(4, 320, 16, 16), torch.randn(4, 320, 8, 8)
    a, b = match_shapes(deep, shallow)
    assert a.shape == b.shape == (4, 320, 8, 8)
    a, b = match_shapes(torch.randn(4, 640, 8, 8), shallow)
    assert a.shape == b.shape == (4, 1, 8, 8)
    assert relative_sq_distance(shallow.repeat_interleave(2, -1).repeat_interleave(2, -2), shallow) < 1e-10
    with pytest.raises(ValueError, match="cannot compare"):
        match_shapes(torch.randn(2, 3), torch.randn(3, 2))
