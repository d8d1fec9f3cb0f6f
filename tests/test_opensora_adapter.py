"""Open-Sora 1.2 through the VideoModel seam, on tiny-opensora: protect, every baseline
and verify run on it with no model-specific code outside the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import anti_i2v
from anti_i2v.evaluation.generate import GenerationSettings
from anti_i2v.evaluation.scoring import VideoScorer
from anti_i2v.evaluation.verify import verify
from anti_i2v.models.opensora.adapter import OpenSoraI2V
from anti_i2v.models.opensora.sampler import rf_training_target

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = OpenSoraI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return model.prepare_image(portrait[0])


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_blocks_are_the_spatial_temporal_pairs(model):
    layers = model.layers()
    assert len(layers.denoiser) == len(model.stdit3.temporal_blocks) == len(model.stdit3.spatial_blocks)
    assert model.module("denoiser.2") is model.stdit3.temporal_blocks[2]


def test_condition_frame_is_clean_and_out_of_the_loss(model, x):
    latents, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(0))
    assert encoded.latents.shape[2] == 1
    full = model.denoise(encoded, latents, t, noise, ["denoiser.1"], with_loss=True, with_eps=True)
    early = model.denoise(encoded, latents, t, noise, ["denoiser.1"])
    torch.testing.assert_close(early.features["denoiser.1"], full.features["denoiser.1"])
    # recompute the loss by hand: frames 1.. only, velocity target x0 - noise
    s = 0.6
    x0 = torch.cat([encoded.latents, latents[:, :, 1:]], dim=2)
    noisy = (1 - s) * x0 + s * noise
    velocity = (noisy - full.eps) / (1 - s)
    target = rf_training_target(x0, noise)
    by_hand = (velocity - target)[:, :, 1:].pow(2).mean()
    torch.testing.assert_close(full.loss, by_hand, rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_photo_and_sampling_gives_the_frames(model, x):
    latents, noise, t = _draw(model, x)
    pixels = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.training_loss(pixels, latents, t, noise), pixels)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9
    video = model.generate(x, PROMPT, steps=2, seed=0)
    assert video.shape == (model.num_frames, 3, *model.resolution)
    torch.testing.assert_close(video, model.generate(x, PROMPT, steps=2, seed=0))


def test_verify_runs_on_it_and_the_registry_builds_it(tmp_path, portrait, model):
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((64, 64)).save(tmp_path / "face.png")
    protected = anti_i2v.protect(tmp_path / "face.png", model, out=tmp_path, steps=2, prompt=PROMPT).path
    report = verify(tmp_path / "face.png", protected, model, tmp_path / "report",
                    GenerationSettings(prompt=PROMPT, steps=2), purifiers=["jpeg75"],
                    scorer=VideoScorer(dino=None, qalign=None))
    assert set(report["runs"]) == {"original", "protected", "random noise (same budget)", "protected+jpeg75"}
    from anti_i2v.models.registry import MODELS, load_model

    assert load_model("tiny-opensora", device="cpu").name == "tiny-opensora"
    assert MODELS["opensora"].hub_id == "hpcai-tech/OpenSora-STDiT-v3"


def test_noise_prediction_leaves_the_clean_condition_frame_out(model, x):
    latents, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(0))
    eps = model.denoise(encoded, latents, t, noise, with_eps=True).eps
    torch.testing.assert_close(eps[:, :, 0], noise[:, :, 0])  # zero residual where nothing was noised
    assert not torch.allclose(eps[:, :, 1:], noise[:, :, 1:])
