"""The CogVideoX-I2V adapter through the VideoModel seam, on the tiny variant."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.models.base import FeatureTaps
from anti_i2v.models.cogvideox import CogVideoXI2V, tiny_pipeline
from anti_i2v.models.registry import load_model


def _draw(model, seed=0, t=500):
    latents = model.encode_video(model.repeat_frames(torch.full((1, 3, *model.resolution), 0.5)))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return latents, noise, torch.tensor([t])


def test_resolution_and_frames_come_from_the_model_config(tiny_model):
    assert tiny_model.resolution == (64, 96)
    assert tiny_model.num_frames == 9
    layers = tiny_model.layers()
    assert layers.denoiser == [f"denoiser.{i}" for i in range(8)]
    assert layers.vae_encoder[-1] == "vae.mid_block"


def test_block_indices_resolve_from_the_end(tiny_model):
    assert tiny_model.layers().resolve_denoiser([3, -1]) == ["denoiser.3", "denoiser.7"]
    with pytest.raises(ConfigError, match="out of range"):
        tiny_model.layers().resolve_denoiser([8])


def test_image_latent_is_frame_zero_and_the_rest_is_zero_padding(tiny_model, portrait_small):
    encoded = tiny_model.encode_image(portrait_small, ["vae.down_blocks.0"], torch.Generator().manual_seed(0))
    assert encoded.latents.shape == (1, 3, 4, 8, 12)
    assert encoded.latents[:, 0].abs().sum() > 0
    assert encoded.latents[:, 1:].abs().sum() == 0
    assert encoded.features["vae.down_blocks.0"].shape[1] == 8


def test_early_exit_returns_the_same_features_as_a_full_forward(tiny_model, portrait_small):
    video, noise, t = _draw(tiny_model)
    encoded = tiny_model.encode_image(portrait_small, (), torch.Generator().manual_seed(1))
    taps = ["denoiser.3", "denoiser.5"]
    early = tiny_model.denoise(encoded, video, t, noise, taps, with_loss=False)
    full = tiny_model.denoise(encoded, video, t, noise, taps, with_loss=True)
    assert early.loss is None and full.loss is not None
    for name in taps:
        torch.testing.assert_close(early.features[name], full.features[name])


def test_early_exit_skips_the_blocks_after_the_deepest_tap(tiny_model, portrait_small):
    video, noise, t = _draw(tiny_model)
    encoded = tiny_model.encode_image(portrait_small)
    calls = []
    handle = tiny_model.transformer.transformer_blocks[6].register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_model.denoise(encoded, video, t, noise, ["denoiser.4"])
        assert calls == []
        tiny_model.denoise(encoded, video, t, noise, ["denoiser.4"], with_loss=True)
        assert calls == [1]
    finally:
        handle.remove()


def test_training_loss_is_the_v_prediction_mse(tiny_model, portrait_small):
    video, noise, t = _draw(tiny_model, t=700)
    encoded = tiny_model.encode_image(portrait_small, (), torch.Generator().manual_seed(2))
    loss = tiny_model.denoise(encoded, video, t, noise, with_loss=True).loss
    sched = tiny_model.scheduler
    a = sched.alphas_cumprod[700]
    noisy = a.sqrt() * video + (1 - a).sqrt() * noise
    pred = tiny_model.transformer(
        hidden_states=torch.cat([noisy, encoded.latents], dim=2),
        encoder_hidden_states=tiny_model._prompt_embeds,
        timestep=t,
        image_rotary_emb=tiny_model._rope,
        return_dict=False,
    )[0]
    v_target = a.sqrt() * noise - (1 - a).sqrt() * video
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, v_target), rtol=1e-4, atol=1e-6)


def test_gradients_of_features_and_loss_reach_the_photo(tiny_model, portrait_small):
    video, noise, t = _draw(tiny_model)
    x = portrait_small.clone().requires_grad_(True)
    feats = tiny_model.features(x, t, noise, ["vae.mid_block", "denoiser.6"], video)
    loss = tiny_model.training_loss(x, video, t, noise) + sum(f.pow(2).mean() for f in feats.values())
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.99


def test_feature_taps_stop_the_forward_and_leave_no_hooks_behind():
    layer = torch.nn.Linear(2, 2)
    taps = FeatureTaps({"l": layer})
    with taps.capture(stop_after="l") as feats:
        assert taps.run(lambda: layer(torch.ones(1, 2))) is None
    assert feats["l"].shape == (1, 2)
    assert not layer._forward_hooks
    assert layer(torch.ones(1, 2)).shape == (1, 2)


def test_gradient_checkpointing_gives_the_same_loss_and_photo_gradient(portrait_small):
    grads, losses = [], []
    for checkpointing in (False, True):
        model = CogVideoXI2V.tiny(seed=0, gradient_checkpointing=checkpointing)
        model.condition("a person")
        video, noise, t = _draw(model)
        x = portrait_small.clone().requires_grad_(True)
        encoded = model.encode_image(x, ["vae.mid_block"], torch.Generator().manual_seed(0))
        result = model.denoise(encoded, video, t, noise, ["denoiser.3", "denoiser.6"], with_loss=True)
        early = model.denoise(encoded, video, t, noise, ["denoiser.4"])
        loss = result.loss + result.features["denoiser.6"].pow(2).mean() + early.features["denoiser.4"].mean()
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, x)[0])
    assert model.transformer.gradient_checkpointing
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_generate_returns_the_models_frame_count(tiny_model, portrait_small):
    video = tiny_model.generate(portrait_small, "a person talking to the camera", steps=2, seed=0)
    assert video.shape == (9, 3, 64, 96)
    assert 0 <= video.min() and video.max() <= 1
    again = tiny_model.generate(portrait_small, "a person talking to the camera", steps=2, seed=0)
    torch.testing.assert_close(video, again)


def test_real_loading_path_reads_a_local_folder(tmp_path, portrait_small):
    tiny_pipeline(seed=5).save_pretrained(tmp_path / "weights")
    loaded = load_model("cogvideox", path=tmp_path / "weights", device="cpu", dtype="fp32")
    built = CogVideoXI2V.tiny(seed=5)
    assert loaded.resolution == built.resolution and loaded.num_frames == built.num_frames
    for m in (loaded, built):
        m.condition("a person")
    video, noise, t = _draw(built)
    out = [m.denoise(m.encode_image(portrait_small, (), torch.Generator().manual_seed(0)), video, t, noise,
                     ["denoiser.2"]).features["denoiser.2"] for m in (loaded, built)]
    torch.testing.assert_close(out[0], out[1])


def test_a_text_to_video_checkpoint_is_refused(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    pipe = tiny_pipeline(seed=0)
    config = dict(pipe.transformer.config)
    config["in_channels"] = 4  # a text-to-video transformer takes only the noisy latents
    pipe.transformer = CogVideoXTransformer3DModel.from_config(config)
    with pytest.raises(ModelError, match="not an image-to-video"):
        CogVideoXI2V(pipe)


def test_missing_weights_and_unknown_models_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no CogVideoX-I2V weights"):
        load_model("cogvideox", path=tmp_path / "empty", device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model("cogvideox", path=tmp_path / "nope", device="cpu")
    with pytest.raises(ModelError, match="unknown model"):
        load_model("sora-9000", device="cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        load_model("tiny-cogvideox", device="tpu9")
    with pytest.raises(ModelError, match="no CogVideoX-I2V weights"):
        load_model("cogvideox", device="cpu")  # hub id, offline, not cached


def test_noise_prediction_is_the_v_prediction_in_noise_space(tiny_model, portrait_small):
    video, noise, t = _draw(tiny_model, t=300)
    encoded = tiny_model.encode_image(portrait_small, (), torch.Generator().manual_seed(0))
    result = tiny_model.denoise(encoded, video, t, noise, with_loss=True, with_eps=True)
    a = tiny_model.scheduler.alphas_cumprod[300]
    noisy = a.sqrt() * video + (1 - a).sqrt() * noise
    v_pred = (result.eps - (1 - a).sqrt() * noisy) / a.sqrt()
    v_target = a.sqrt() * noise - (1 - a).sqrt() * video
    torch.testing.assert_close(torch.nn.functional.mse_loss(v_pred, v_target), result.loss, rtol=1e-4, atol=1e-6)
    assert tiny_model.image_embedding(portrait_small) is None
