"""The HunyuanVideo-I2V adapter through the VideoModel seam, on the tiny variant."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.errors import ModelError
from anti_i2v.models.hunyuan import HunyuanVideoI2V, nearest_bucket
from anti_i2v.photo import resize_for_model, resize_short_side_and_crop

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = HunyuanVideoI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return resize_for_model(portrait[0], *model.resolution)


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_layers_resolution_and_frames(model):
    assert model.name == "tiny-hunyuan-i2v"
    assert model.resolution == (64, 64) and model.num_frames == 9
    layers = model.layers()
    assert layers.denoiser == [f"denoiser.{i}" for i in range(4)]
    assert layers.vae_encoder[0] == "vae.down_blocks.0" and layers.vae_encoder[-1] == "vae.mid_block"
    assert model.module("denoiser.0") is model.transformer.transformer_blocks[0]
    assert model.module("denoiser.1") is model.transformer.transformer_blocks[1]
    assert model.module("denoiser.2") is model.transformer.single_transformer_blocks[0]
    assert model.module("denoiser.3") is model.transformer.single_transformer_blocks[1]
    with pytest.raises(ModelError, match="unknown layer"):
        model.module("denoiser.4")
    assert model.image_embedding(torch.rand(1, 3, 64, 64)) is None


def test_encode_gives_the_pipelines_condition(model, x):
    encoded = model.encode_image(x, ["vae.down_blocks.0", "vae.mid_block"])
    assert encoded.latents.shape == (1, 5, 3, 8, 8)  # 4 image-latent channels + 1 mask, 3 latent frames
    mask = encoded.latents[:, 4:]
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    assert encoded.latents[:, :4, 1:].eq(0).all() and encoded.context is None
    assert encoded.features["vae.mid_block"].shape[2] == 1
    assert model.image_latent(encoded).shape == (1, 4, 8, 8)
    assert model.still_video(model.image_latent(encoded)).shape == (1, 4, 3, 8, 8)
    assert model.encode_video(model.repeat_frames(x)).shape == (1, 4, 3, 8, 8)
    # equals the pipeline's own (in-place zeroed) conditioning
    with torch.no_grad():
        _, image_latents = model.pipe.prepare_latents(x * 2 - 1, 1, 4, 64, 64, 9, torch.float32)
        image_latents[:, :, 1:] = 0
    torch.testing.assert_close(encoded.latents[:, :4], image_latents)


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
        encoder_hidden_states=model._prompt_embeds, encoder_attention_mask=model._attention_mask,
        pooled_projections=model._pooled_embeds, return_dict=False,
    )[0]
    torch.testing.assert_close(result.loss, torch.nn.functional.mse_loss(pred, noise - video), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.eps, noisy + (1 - sigma) * pred, rtol=1e-4, atol=1e-5)
    other = model.denoise(model.encode_image(1 - x), video, t, noise, with_loss=True).loss
    assert abs(float(other) - float(result.loss)) > 1e-6


def test_text_conditioning_is_seeded_and_prompt_dependent(model):
    assert model._prompt_embeds.shape == (1, 16, 16) and model._pooled_embeds.shape == (1, 8)
    other = HunyuanVideoI2V.tiny(seed=0)
    other.condition(PROMPT)
    torch.testing.assert_close(other._prompt_embeds, model._prompt_embeds)
    other.condition("a woman dancing")
    assert not torch.equal(other._pooled_embeds, model._pooled_embeds)
    other.release_text_encoder()
    with pytest.raises(ModelError, match="released"):
        other.condition("a man")
    other.use_prompt_embeds(model._prompt_embeds, model._pooled_embeds, model._attention_mask)
    torch.testing.assert_close(other._pooled_embeds, model._pooled_embeds)


def test_generate_drops_the_frames_of_latent_frame_zero(model, x):
    video = model.generate(x, PROMPT, steps=2, seed=0)
    assert video.shape == (5, 3, 64, 64)  # the pipeline drops the 4 frames of latent frame 0


def test_missing_weights_is_one_line_model_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", "hunyuanvideo-community/HunyuanVideo-I2V"):
        with pytest.raises(ModelError, match="no HunyuanVideo-I2V weights") as info:
            HunyuanVideoI2V.from_pretrained(source, device="cpu")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("photo", "base", "expected"),
    [
        ((1024, 768), 960, (1088, 832)),  # a 3:4 portrait at 720p
        ((768, 1024), 960, (832, 1088)),
        ((720, 1280), 960, (704, 1248)),
        ((1000, 1000), 960, (960, 960)),
        ((1350, 1080), 960, (1056, 864)),  # 4:5: the nearest bucket the photo covers, not the nearest
        ((1000, 2000), 960, (672, 1312)),  # exactly 1:2 landscape: a bucket strictly less wide
        ((1080, 1920), 720, (544, 928)),  # 540p
    ],
)
def test_each_photo_runs_at_the_bucket_nearest_its_aspect_ratio_as_the_reference_code_runs_it(photo, base, expected):
    assert nearest_bucket(*photo, base) == expected
    with_pad = resize_short_side_and_crop(torch.ones(1, 3, *photo), *expected)
    assert with_pad.min() > 0.99  # the photo covers its bucket: no black bars

def test_bucket_sizing_crops_the_photo_to_its_bucket_and_fixed_sizing_stretches(model, portrait):
    wide = HunyuanVideoI2V(model.pipe, resolution=(64, 128), num_frames=9, max_sequence_length=16,
                           text_path=model.text_path)
    assert wide.bucket_base == 96 and wide.crops_photo
    photo = resize_for_model(portrait[0], 128, 96)[0]  # 3:4 portrait
    assert wide.resolution_for(128, 96) == (96, 96)  # of the buckets it covers, the square is nearest
    with wide.sized_for(128, 96):
        torch.testing.assert_close(wide.prepare_image(photo), resize_short_side_and_crop(photo, 96, 96))
    assert wide.resolution == (64, 128)
    assert wide.generate(photo, PROMPT, steps=2).shape == (5, 3, 96, 96)  # 9 frames less the 4 of latent frame 0
    fixed = HunyuanVideoI2V(model.pipe, resolution=(64, 128), num_frames=9, max_sequence_length=16,
                            text_path=model.text_path, sizing="fixed")
    assert not fixed.crops_photo and fixed.resolution_for(128, 96) == (64, 128)
    assert fixed.prepare_image(photo).shape == (1, 3, 64, 128)
    with pytest.raises(ModelError, match="unknown sizing"):
        HunyuanVideoI2V(model.pipe, resolution=(64, 128), text_path=model.text_path, sizing="area")


@pytest.mark.parametrize(("name", "base"), [("hunyuan-i2v", 960), ("hunyuan-i2v-540p", 720), ("hunyuan-i2v-360p", 480)])
def test_each_released_resolution_name_sets_its_bucket_base(name, base, model, monkeypatch):
    from anti_i2v.models.registry import MODELS

    def built_from_tiny(source, device="cpu", dtype=torch.float32, **kwargs):
        return HunyuanVideoI2V(model.pipe, text_path=model.text_path, **kwargs)

    monkeypatch.setattr(HunyuanVideoI2V, "from_pretrained", built_from_tiny)
    assert MODELS[name].build("weights", torch.device("cpu"), torch.float32).bucket_base == base
