"""The Wan 2.1 I2V adapter through the VideoModel seam, on the tiny variant."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.errors import ModelError
from anti_i2v.models.wan import WanI2V, area_resolution, closest_aspect_resolution, tiny_pipeline
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


@pytest.mark.parametrize(
    ("photo", "area", "expected"),
    [
        ((1024, 768), 480 * 832, (720, 544)),  # a 3:4 portrait at 480P
        ((768, 1024), 480 * 832, (544, 720)),
        ((720, 1280), 480 * 832, (464, 832)),  # 16:9 rounds its short side down
        ((1000, 1000), 480 * 832, (624, 624)),
        ((1024, 768), 720 * 1280, (1104, 816)),  # the same portrait at 720P
    ],
)
def test_area_sizing_keeps_the_photos_aspect_ratio_as_the_reference_code_does(photo, area, expected):
    assert area_resolution(*photo, area, 16) == expected


@pytest.mark.parametrize(
    ("photo", "expected"),
    [((1024, 768), (1088, 800)), ((720, 1280), (704, 1248)), ((1000, 1000), (928, 960))],
)
def test_ti2v_sizing_keeps_the_rounding_nearest_the_photos_aspect_ratio(photo, expected):
    assert closest_aspect_resolution(*photo, 704 * 1280, 32) == expected


def test_each_photo_is_sized_within_the_configured_area_and_fixed_sizing_stretches(model):
    assert model.sizing == "area" and model.max_area == 64 * 64
    assert model.resolution_for(96, 72) == (64, 48) and model.resolution_for(72, 96) == (48, 64)
    with model.sized_for(96, 72) as size:
        assert size == model.resolution == (64, 48) and model.token_grid() == (4, 3)
        with model.sized_for(72, 96) as inner:  # nested: the outer photo decides
            assert inner == (64, 48) and model.resolution == (64, 48)
    assert model.resolution == (64, 64)
    fixed = WanI2V(model.pipe, resolution=(64, 64), num_frames=9, max_sequence_length=16, sizing="fixed")
    assert fixed.resolution_for(96, 72) == (64, 64)
    assert model.size_summary() == "9 frames, each photo at its aspect ratio within 64x64 pixels"
    assert fixed.size_summary() == "64x64x9"
    with pytest.raises(ModelError, match="unknown sizing"):
        WanI2V(model.pipe, resolution=(64, 64), sizing="crop")
    with pytest.raises(ModelError, match="multiples of 16"):
        model.set_resolution((60, 64))


def test_a_portrait_is_protected_and_generated_at_its_own_aspect_ratio(model, portrait, tmp_path):
    import json

    import anti_i2v
    from anti_i2v.evaluation.generate import GenerationSettings, video_key
    from PIL import Image

    photo = resize_for_model(portrait[0], 96, 72)[0]  # 3:4 portrait
    photo = (photo * 255).round() / 255
    Image.fromarray((photo.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "portrait.png")
    seen = []
    encode = model.encode_image

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        return encode(x, *args, **kwargs)

    model.encode_image = spy
    try:
        result = anti_i2v.protect(tmp_path / "portrait.png", model, out=tmp_path / "out", steps=2, prompt=PROMPT)
    finally:
        del model.encode_image
    assert seen and set(seen) == {(64, 48)}
    assert json.loads(result.sidecar.read_text())["model"]["resolution"] == [64, 48]
    assert result.budget.within_budget and model.resolution == (64, 64)
    video = model.generate(photo, PROMPT, steps=2)
    assert video.shape == (9, 3, 64, 48) and model.resolution == (64, 64)
    from anti_i2v.evaluation.scoring import VideoScorer
    from anti_i2v.evaluation.verify import verify

    report = verify(tmp_path / "portrait.png", result.path, model, tmp_path / "report",
                    GenerationSettings(prompt=PROMPT, steps=2), purifiers=[], scorer=VideoScorer(dino=None, qalign=None))
    assert report["resolution"] == [64, 48] and "at 64x48." in (tmp_path / "report" / "report.md").read_text()
    settings = GenerationSettings(prompt=PROMPT, steps=2)
    fixed = WanI2V(model.pipe, resolution=(64, 64), num_frames=9, max_sequence_length=16, sizing="fixed")
    assert video_key(model, photo, settings) != video_key(fixed, photo, settings)  # other sizes, other videos


def test_each_name_sizes_photos_within_its_own_release_whatever_the_folder_is_called(tmp_path):
    from anti_i2v.models.registry import load_model

    folder = tmp_path / "Wan2.1-I2V-14B-720P-Diffusers"  # a 720P name on any weights
    tiny_pipeline(seed=5).save_pretrained(folder)
    for name, area in (("wan-i2v", 480 * 832), ("wan2.2-i2v", 480 * 832), ("wan-i2v-720p", 720 * 1280),
                       ("wan2.2-i2v-720p", 720 * 1280)):
        model = load_model(name, folder, device="cpu")
        assert (model.name, model.max_area) == (name, area)
    assert model.resolution_for(1024, 768) == (1104, 816)
    # in Python, a hub id or folder that names 720P still picks that release
    assert WanI2V.from_pretrained(folder, device="cpu", dtype=torch.float32).max_area == 720 * 1280
