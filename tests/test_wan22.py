"""Wan 2.2 through the Wan adapter: the two-expert I2V-A14B and the first-frame TI2V-5B, on tiny variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anti_i2v.models.wan import RELEASED_TI2V, RELEASED_TI2V_FRAMES, WanI2V, tiny_pipeline
from anti_i2v.photo import resize_for_model

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def a14b():
    m = WanI2V.tiny(seed=0, variant="2.2-a14b")
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def ti2v():
    m = WanI2V.tiny(seed=0, variant="2.2-ti2v")
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait):
    return resize_for_model(portrait[0], 64, 64)


def _draw(model, x, seed=0):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))


def _timestep_fed(model, t: int) -> float:
    return float(model.sigmas(torch.tensor([t]))[0]) * model.num_train_timesteps


def test_a14b_has_two_experts_and_no_clip_path(a14b, x):
    assert a14b.name == "tiny-wan2.2-i2v" and len(a14b.experts) == 2
    assert a14b.boundary_timestep == pytest.approx(900.0)
    encoded = a14b.encode_image(x)
    assert encoded.latents.shape == (1, 20, 3, 8, 8) and encoded.context is None
    assert a14b.image_embedding(x) is None
    assert a14b.released_guidance == 3.5


@pytest.mark.parametrize("t", [200, 950])
def test_a14b_each_timestep_goes_to_its_expert(a14b, x, t):
    video, noise = _draw(a14b, x)
    fed = _timestep_fed(a14b, t)
    expert = a14b.transformer if fed >= 900 else a14b.transformer_2
    other = a14b.transformer_2 if expert is a14b.transformer else a14b.transformer
    seen = []
    handles = [e.blocks[1].register_forward_hook(lambda m, i, o, e=e: seen.append(e)) for e in (expert, other)]
    try:
        encoded = a14b.encode_image(x)
        result = a14b.denoise(encoded, video, torch.tensor([t]), noise, ["denoiser.1"], with_loss=True)
    finally:
        for h in handles:
            h.remove()
    assert seen == [expert]
    assert a14b.module("denoiser.1") is expert.blocks[1]  # layer names follow the expert at work
    sigma = fed / 1000
    noisy = (1 - sigma) * video + sigma * noise
    pred = expert(hidden_states=torch.cat([noisy, encoded.latents], 1), timestep=torch.tensor([fed]),
                  encoder_hidden_states=a14b._prompt_embeds, return_dict=False)[0]
    torch.testing.assert_close(result.loss, F.mse_loss(pred, noise - video), rtol=1e-4, atol=1e-6)


def test_ti2v_writes_the_photo_into_frame_zero(ti2v, x):
    assert ti2v.name == "tiny-wan2.2-ti2v" and ti2v.expand_timesteps and ti2v.image_embedding(x) is None
    encoded = ti2v.encode_image(x, ["vae.down_blocks.0", "vae.mid_block"])
    assert encoded.latents.shape == (1, 48, 1, 4, 4) and encoded.context is None
    assert set(encoded.features) == {"vae.down_blocks.0", "vae.mid_block"}
    with torch.no_grad():
        _, cond, mask = ti2v.pipe.prepare_latents(x * 2 - 1, 1, 48, 64, 64, 9, dtype=torch.float32)
    torch.testing.assert_close(encoded.latents, cond)
    assert mask[:, :, 0].eq(0).all() and mask[:, :, 1:].eq(1).all()
    assert ti2v.image_latent(encoded).shape == (1, 48, 4, 4)
    assert ti2v.still_video(ti2v.image_latent(encoded)).shape == (1, 48, 3, 4, 4)


def test_ti2v_loss_is_the_pipelines_forward_on_the_generated_frames(ti2v, x):
    video, noise = _draw(ti2v, x)
    encoded = ti2v.encode_image(x)
    t = torch.tensor([700])
    result = ti2v.denoise(encoded, video, t, noise, with_loss=True, with_eps=True)
    fed = _timestep_fed(ti2v, 700)
    sigma = fed / 1000
    noisy = (1 - sigma) * video + sigma * noise
    model_input = torch.cat([encoded.latents, noisy[:, :, 1:]], dim=2)
    tokens_per_frame = (4 // 2) * (4 // 2)
    timestep = torch.tensor([[0.0] * tokens_per_frame + [fed] * 2 * tokens_per_frame])
    pred = ti2v.transformer(hidden_states=model_input, timestep=timestep,
                            encoder_hidden_states=ti2v._prompt_embeds, return_dict=False)[0]
    target = noise - video
    torch.testing.assert_close(result.loss, F.mse_loss(pred[:, :, 1:], target[:, :, 1:]), rtol=1e-4, atol=1e-6)
    # frame 0 is given, so its noise changes nothing
    other_noise = noise.clone()
    other_noise[:, :, 0] = torch.randn_like(other_noise[:, :, 0])
    again = ti2v.denoise(encoded, video, t, other_noise, with_loss=True).loss
    torch.testing.assert_close(again, result.loss)


def test_a_saved_ti2v_folder_loads_with_its_release_defaults(tmp_path):
    tiny_pipeline(seed=2, variant="2.2-ti2v").save_pretrained(tmp_path / "weights")
    loaded = WanI2V.from_pretrained(tmp_path / "weights", device="cpu", dtype=torch.float32, name="wan2.2-ti2v")
    assert loaded.expand_timesteps and loaded.transformer_2 is None
    assert loaded.resolution == RELEASED_TI2V and loaded.num_frames == RELEASED_TI2V_FRAMES
    tiny_pipeline(seed=2, variant="2.2-a14b").save_pretrained(tmp_path / "a14b")
    two = WanI2V.from_pretrained(tmp_path / "a14b", device="cpu", dtype=torch.float32, resolution=(64, 64),
                                 num_frames=9, max_sequence_length=16)
    assert two.transformer_2 is not None and two.boundary_timestep == pytest.approx(900.0)
    assert {id(e) for e in two.experts} <= {id(m) for m in two.weight_modules()}


def test_a_ti2v_folder_saved_as_the_text_to_video_pipeline_loads(tmp_path):
    """TI2V-5B serves both tasks; a folder whose model_index names `WanPipeline` still loads for I2V."""
    from diffusers import WanPipeline

    p = tiny_pipeline(seed=1, variant="2.2-ti2v")
    WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                transformer=p.transformer, expand_timesteps=True).save_pretrained(tmp_path / "t2v")
    loaded = WanI2V.from_pretrained(tmp_path / "t2v", device="cpu", dtype=torch.float32, resolution=(64, 64),
                                    num_frames=9, max_sequence_length=16)
    assert loaded.expand_timesteps and loaded.image_embedding(torch.rand(1, 3, 64, 64)) is None


def test_ti2v_covers_its_reference_size_and_crops_the_centre(ti2v, portrait):
    from anti_i2v.photo import resize_to_fill

    model = WanI2V(ti2v.pipe, resolution=(64, 128), num_frames=9, max_sequence_length=16)
    photo = resize_for_model(portrait[0], 128, 96)[0]  # 3:4 portrait
    assert model.crops_photo and model.resolution_for(128, 96) == (96, 64)
    with model.sized_for(128, 96):
        prepared = model.prepare_image(photo)
    assert prepared.shape == (1, 3, 96, 64)
    torch.testing.assert_close(prepared, resize_to_fill(photo, 96, 64))
    assert model.generate(photo, PROMPT, steps=2).shape == (9, 3, 96, 64)
    fixed = WanI2V(ti2v.pipe, resolution=(64, 128), num_frames=9, max_sequence_length=16, sizing="fixed")
    assert not fixed.crops_photo and fixed.prepare_image(photo).shape == (1, 3, 64, 128)
    # stretched to the very size the crop has: another video, another cache key
    from anti_i2v.evaluation.generate import GenerationSettings, video_key

    same_size = WanI2V(ti2v.pipe, resolution=(96, 64), num_frames=9, max_sequence_length=16, sizing="fixed")
    settings = GenerationSettings(prompt=PROMPT, steps=2)
    assert same_size.resolution_for(128, 96) == (96, 64)
    assert video_key(model, photo, settings) != video_key(same_size, photo, settings)
    assert "cropped to its aspect ratio within 64x128 pixels" in model.size_summary()
