"""The Wan 2.1 I2V adapter through the VideoModel seam, on the tiny variant."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.errors import ModelError
from anti_i2v.models.wan import WanI2V, tiny_pipeline
from anti_i2v.photo import resize_for_model

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = WanI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return resize_for_model(portrait[0], *model.resolution)


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_layers_resolution_and_frames(model):
    assert model.name == "tiny-wan-i2v"
    assert model.resolution == (64, 64) and model.num_frames == 9
    layers = model.layers()
    assert layers.denoiser == [f"denoiser.{i}" for i in range(4)]
    assert layers.vae_encoder[0] == "vae.down_blocks.0" and layers.vae_encoder[-1] == "vae.mid_block"
    assert model.module("denoiser.2") is model.transformer.blocks[2]
    with pytest.raises(ModelError, match="unknown layer"):
        model.module("denoiser.9")


def test_encode_gives_the_pipelines_condition_and_clip_tokens(model, x):
    encoded = model.encode_image(x, ["vae.down_blocks.0", "vae.mid_block"])
    assert encoded.latents.shape == (1, 20, 3, 8, 8)  # 4 mask + 16 latent channels, 3 latent frames
    mask = encoded.latents[:, :4]
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    assert encoded.context.shape == (1, 1025, 4)
    torch.testing.assert_close(encoded.context, model.image_embedding(x))
    assert encoded.features["vae.mid_block"].shape[2] == 1  # the photo's own chunk
    assert model.image_latent(encoded).shape == (1, 16, 8, 8)
    assert model.still_video(model.image_latent(encoded)).shape == (1, 16, 3, 8, 8)
    assert model.encode_video(model.repeat_frames(x)).shape == (1, 16, 3, 8, 8)
    # the differentiable path equals the pipeline's own (no-grad) conditioning
    with torch.no_grad():
        _, cond = model.pipe.prepare_latents(x * 2 - 1, 1, 16, 64, 64, 9, dtype=torch.float32)
    torch.testing.assert_close(encoded.latents, cond)


def test_gradients_reach_the_photo_through_both_paths(model, x):
    video, noise, t = _draw(model, x)
    x = x.clone().requires_grad_(True)
    encoded = model.encode_image(x, ["vae.mid_block"])
    result = model.denoise(encoded, video, t, noise, ["denoiser.2"], with_loss=True)
    loss = result.loss + result.features["denoiser.2"].pow(2).mean() + encoded.features["vae.mid_block"].mean()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.99
    (clip_grad,) = torch.autograd.grad(model.image_embedding(x).pow(2).mean(), x)
    assert clip_grad.abs().sum() > 0


def test_loss_is_the_flow_matching_velocity_mse_and_depends_on_the_image(model, x):
    video, noise, t = _draw(model, x, t=700)
    encoded = model.encode_image(x)
    result = model.denoise(encoded, video, t, noise, with_loss=True, with_eps=True)
    assert torch.isfinite(result.loss)
    s = 700 / 1000
    sigma = model.shift * s / (1 + (model.shift - 1) * s)
    noisy = (1 - sigma) * video + sigma * noise
    pred = model.transformer(
        hidden_states=torch.cat([noisy, encoded.latents], 1), timestep=torch.tensor([sigma * 1000]),
        encoder_hidden_states=model._prompt_embeds, encoder_hidden_states_image=encoded.context, return_dict=False,
    )[0]
    torch.testing.assert_close(result.loss, torch.nn.functional.mse_loss(pred, noise - video), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.eps, noisy + (1 - sigma) * pred, rtol=1e-4, atol=1e-5)
    other = model.denoise(model.encode_image(1 - x), video, t, noise, with_loss=True).loss
    assert abs(float(other) - float(result.loss)) > 1e-6


def test_loading_a_local_folder_and_missing_weights(tmp_path, x):
    tiny_pipeline(seed=5).save_pretrained(tmp_path / "weights")
    loaded = WanI2V.from_pretrained(tmp_path / "weights", device="cpu", dtype=torch.float32,
                                    resolution=(64, 64), num_frames=9, max_sequence_length=16)
    built = WanI2V.tiny(seed=5)
    for m in (loaded, built):
        m.condition(PROMPT)
    video, noise, t = _draw(built, x)
    out = [m.denoise(m.encode_image(x), video, t, noise, ["denoiser.1"]).features["denoiser.1"] for m in (loaded, built)]
    torch.testing.assert_close(out[0], out[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no Wan-I2V weights"):
        WanI2V.from_pretrained(tmp_path / "empty", device="cpu")
    with pytest.raises(ModelError, match="no Wan-I2V weights"):
        WanI2V.from_pretrained(device="cpu")  # hub id, offline, not cached
