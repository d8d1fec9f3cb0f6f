"""The LTX-Video I2V adapter through the VideoModel seam, on the tiny variant."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.errors import ModelError
from anti_i2v.models.ltx import LTXVideoI2V, tiny_pipeline
from anti_i2v.photo import resize_for_model

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = LTXVideoI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return resize_for_model(portrait[0], *model.resolution)


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_layers_resolution_and_frames(model):
    assert model.name == "tiny-ltx-i2v"
    assert model.resolution == (64, 64) and model.num_frames == 9
    layers = model.layers()
    assert layers.denoiser == [f"denoiser.{i}" for i in range(4)]
    assert layers.vae_encoder[0] == "vae.down_blocks.0" and layers.vae_encoder[-1] == "vae.mid_block"
    assert model.module("denoiser.2") is model.transformer.transformer_blocks[2]
    assert model.image_embedding(torch.zeros(1, 3, 64, 64)) is None
    with pytest.raises(ModelError, match="unknown layer"):
        model.module("denoiser.9")


def test_encode_places_the_photo_latent_in_frame_zero_as_the_pipeline_does(model, x):
    encoded = model.encode_image(x, ["vae.down_blocks.0", "vae.mid_block"], torch.Generator().manual_seed(4))
    assert encoded.latents.shape == (1, 8, 3, 16, 16) and encoded.context is None
    assert encoded.latents[:, :, 1:].eq(0).all()
    assert "vae.mid_block" in encoded.features
    assert model.image_latent(encoded).shape == (1, 8, 16, 16)
    assert model.still_video(model.image_latent(encoded)).shape == (1, 8, 3, 16, 16)
    assert model.encode_video(model.repeat_frames(x)).shape == (1, 8, 3, 16, 16)
    # frame 0 equals the pipeline's own (no-grad) prepare_latents with the same generator
    with torch.no_grad():
        packed, cmask = model.pipe.prepare_latents(x * 2 - 1, 1, 8, 64, 64, 9, dtype=torch.float32,
                                                   generator=torch.Generator().manual_seed(4))
    assert packed.shape == (1, 768, 8) and cmask.shape == (1, 768)
    pipe_frame0 = model._unpack(packed)[:, :, 0]
    torch.testing.assert_close(model.image_latent(encoded), pipe_frame0)
    # without a generator the posterior mode is used (deterministic)
    torch.testing.assert_close(model.encode_image(x).latents, model.encode_image(x).latents)


def test_loss_is_the_flow_matching_velocity_mse_on_the_noised_frames(model, x):
    video, noise, t = _draw(model, x, t=700)
    encoded = model.encode_image(x)
    result = model.denoise(encoded, video, t, noise, with_loss=True, with_eps=True)
    assert torch.isfinite(result.loss)
    sigma = float(model.sigmas(torch.tensor([700])))
    noisy = (1 - sigma) * video + sigma * noise
    noisy[:, :, 0] = encoded.latents[:, :, 0]
    tokens = model.pipe._pack_latents(noisy)
    cmask = torch.zeros(1, 768)
    cmask[:, :256] = 1  # frame 0 tokens come first
    pred = model.transformer(
        hidden_states=tokens, encoder_hidden_states=model._prompt_embeds, timestep=sigma * 1000 * (1 - cmask),
        encoder_attention_mask=model._prompt_mask, num_frames=3, height=16, width=16,
        rope_interpolation_scale=(4 / 25, 4, 4), return_dict=False,
    )[0]
    pred = model._unpack(pred)
    target = noise - video
    torch.testing.assert_close(result.loss, torch.nn.functional.mse_loss(pred[:, :, 1:], target[:, :, 1:]),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.eps[:, :, 1:], (noisy + (1 - sigma) * pred)[:, :, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.eps[:, :, 0], noise[:, :, 0])
    other = model.denoise(model.encode_image(1 - x), video, t, noise, with_loss=True).loss
    assert abs(float(other) - float(result.loss)) > 1e-6


def test_loading_a_local_folder_and_missing_weights(tmp_path, x):
    tiny_pipeline(seed=5).save_pretrained(tmp_path / "weights")
    loaded = LTXVideoI2V.from_pretrained(tmp_path / "weights", device="cpu", dtype=torch.float32,
                                         resolution=(64, 64), num_frames=9, max_sequence_length=16)
    built = LTXVideoI2V.tiny(seed=5)
    for m in (loaded, built):
        m.condition(PROMPT)
    video, noise, t = _draw(built, x)
    out = [m.denoise(m.encode_image(x), video, t, noise, ["denoiser.1"]).features["denoiser.1"] for m in (loaded, built)]
    torch.testing.assert_close(out[0], out[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no LTX-Video weights"):
        LTXVideoI2V.from_pretrained(tmp_path / "empty", device="cpu")
    with pytest.raises(ModelError, match="no LTX-Video weights"):
        LTXVideoI2V.from_pretrained(device="cpu")  # hub id, offline, not cached


def test_released_defaults():
    from anti_i2v.models import ltx

    assert ltx.RELEASED_RESOLUTION == (512, 704) and ltx.RELEASED_FRAMES == 161
