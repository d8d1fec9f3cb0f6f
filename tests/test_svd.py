"""Stable Video Diffusion through the VideoModel seam, on tiny-svd (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from anti_i2v.errors import ModelError
from anti_i2v.models.svd import SCHEDULER, StableVideoDiffusionI2V, tiny_pipeline
from anti_i2v.photo import resize_for_model

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = StableVideoDiffusionI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return resize_for_model(portrait[0], *model.resolution)


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_resolution_frames_and_blocks_in_forward_order(model):
    assert model.resolution == (64, 64) and model.num_frames == 8
    layers = model.layers()
    unet = model.unet
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    assert layers.denoiser == [f"denoiser.{i}" for i in range(n_down + 1 + n_up)] and len(layers.denoiser) == 5
    assert model.module("denoiser.0") is unet.down_blocks[0]
    assert model.module(f"denoiser.{n_down}") is unet.mid_block
    assert model.module(layers.denoiser[-1]) is unet.up_blocks[-1]
    assert layers.vae_encoder[-1] == "vae.mid_block"
    assert model.module("vae.mid_block") is model.vae.encoder.mid_block
    with pytest.raises(ModelError, match="unknown layer"):
        model.module("denoiser.9")


def test_encode_shapes_and_both_paths_are_differentiable(model, x):
    latents = _draw(model, x)[0]
    pixels = x.clone().requires_grad_(True)
    encoded = model.encode_image(pixels, ["vae.down_blocks.0", "vae.mid_block"], torch.Generator().manual_seed(0))
    assert encoded.latents.shape == latents.shape == (1, 8, 4, 8, 8)
    assert torch.equal(encoded.latents[:, 0], encoded.latents[:, -1])  # the image latent on every frame
    assert encoded.context.shape == (1, 1, model.unet.config.cross_attention_dim)
    assert set(encoded.features) == {"vae.down_blocks.0", "vae.mid_block"}
    assert model.image_latent(encoded).shape == (1, 4, 8, 8)
    assert model.still_video(model.image_latent(encoded)).shape == latents.shape
    clip_path = torch.autograd.grad(encoded.context.sum(), pixels, retain_graph=True)[0]
    vae_path = torch.autograd.grad(encoded.latents.sum(), pixels)[0]
    assert clip_path.abs().sum() > 0 and vae_path.abs().sum() > 0
    torch.testing.assert_close(model.image_embedding(x), encoded.context.detach())


def test_gradients_of_features_and_loss_reach_the_photo(model, x):
    latents, noise, t = _draw(model, x)
    pixels = x.clone().requires_grad_(True)
    feats = model.features(pixels, t, noise, ["vae.mid_block", "denoiser.3"], latents, torch.Generator().manual_seed(0))
    loss = model.training_loss(pixels, latents, t, noise, torch.Generator().manual_seed(0))
    loss = loss + sum(f.pow(2).mean() for f in feats.values())
    (grad,) = torch.autograd.grad(loss, pixels)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.99


def test_gradient_checkpointing_recomputes_the_transformers_too_and_changes_nothing(model, x):
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    checkpointed = StableVideoDiffusionI2V.tiny(seed=0, gradient_checkpointing=True)
    latents, noise, t = _draw(model, x)

    def loss_and_gradient(m):
        calls = []
        for block in m.unet.modules():
            if isinstance(block, TransformerSpatioTemporalModel):
                block.proj_in.register_forward_hook(lambda *_: calls.append(1))
        pixels = x.clone().requires_grad_(True)
        loss = m.training_loss(pixels, latents, t, noise, torch.Generator().manual_seed(0))
        forward_calls = len(calls)
        return loss, torch.autograd.grad(loss, pixels)[0], forward_calls, len(calls)

    plain_loss, plain_grad, plain_calls, plain_after = loss_and_gradient(StableVideoDiffusionI2V.tiny(seed=0))
    loss, grad, calls, after = loss_and_gradient(checkpointed)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-7)
    assert plain_calls == plain_after == calls > 0 and after == 2 * calls  # each transformer ran again backwards


def test_loss_is_the_edm_weighted_v_prediction_loss(model, x):
    latents, noise, t = _draw(model, x, t=700)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(2))
    result = model.denoise(encoded, latents, t, noise, with_loss=True, with_eps=True)
    assert torch.isfinite(result.loss)
    sched = model.scheduler
    abar = sched.alphas_cumprod[700]
    sigma = ((1 - abar) / abar).sqrt()
    fresh = EulerDiscreteScheduler(**SCHEDULER)  # before set_timesteps: one sigma per training step, t descending
    torch.testing.assert_close(sigma, fresh.sigmas[999 - 700])
    noisy = latents + sigma * noise
    pred = model.unet(
        torch.cat([noisy / (sigma**2 + 1).sqrt(), encoded.latents], dim=2),  # scale_model_input
        0.25 * sigma.log().reshape(1),
        encoder_hidden_states=encoded.context,
        added_time_ids=model.pipe._get_add_time_ids(6, 127, 0.02, torch.float32, 1, 1, False),
        return_dict=False,
    )[0]
    denoised = pred * (-sigma / (sigma**2 + 1).sqrt()) + noisy / (sigma**2 + 1)
    expected = ((sigma**2 + 1) / sigma**2 * (denoised - latents) ** 2).mean()
    torch.testing.assert_close(result.loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.eps, (noisy - denoised) / sigma, rtol=1e-4, atol=1e-5)


def test_the_loss_depends_on_the_image(model, x):
    latents, noise, t = _draw(model, x)
    losses = [
        model.training_loss(img, latents, t, noise, torch.Generator().manual_seed(0))
        for img in (x, torch.flip(x, dims=[-1]))
    ]
    assert all(torch.isfinite(v) for v in losses) and abs(losses[0] - losses[1]) > 1e-6


def test_a_local_folder_loads_and_missing_weights_fail_clearly(tmp_path, x):
    tiny_pipeline(seed=5).save_pretrained(tmp_path / "weights")
    loaded = StableVideoDiffusionI2V.from_pretrained(str(tmp_path / "weights"), device="cpu", dtype=torch.float32)
    built = StableVideoDiffusionI2V.tiny(seed=5)
    assert (loaded.resolution, loaded.num_frames) == (built.resolution, built.num_frames)
    latents, noise, t = _draw(built, x)
    out = [m.denoise(m.encode_image(x, (), torch.Generator().manual_seed(0)), latents, t, noise,
                     ["denoiser.2"]).features["denoiser.2"] for m in (loaded, built)]
    torch.testing.assert_close(out[0], out[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no Stable Video Diffusion weights"):
        StableVideoDiffusionI2V.from_pretrained(str(tmp_path / "empty"), device="cpu", dtype=torch.float32)


def test_a_video_encodes_a_few_frames_at_a_time_to_the_same_latents(model, x, monkeypatch):
    import anti_i2v.models.svd as svd

    frames = torch.stack([x[0] * (1 - k / 10) for k in range(model.num_frames)])
    whole = model.encode_video(frames)
    monkeypatch.setattr(svd, "ENCODE_FRAMES", 3)
    calls = []
    handle = model.vae.encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    try:
        chunked = model.encode_video(frames)
    finally:
        handle.remove()
    assert calls == [3, 3, 2]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_the_compiled_u_net_with_its_transformers_checkpointed_gives_the_plain_loss_and_gradient(model, x):
    from anti_i2v.acceleration import compile_denoiser

    latents, noise, t = _draw(model, x)

    def loss_and_gradient(m):
        pixels = x.clone().requires_grad_(True)
        loss = m.training_loss(pixels, latents, t, noise, torch.Generator().manual_seed(0))
        return loss, torch.autograd.grad(loss, pixels)[0]

    plain_loss, plain_grad = loss_and_gradient(StableVideoDiffusionI2V.tiny(seed=0))
    compiled = compile_denoiser(StableVideoDiffusionI2V.tiny(seed=0, gradient_checkpointing=True), backend="aot_eager")
    for _ in range(2):  # the first call compiles, the second runs the compiled code
        loss, grad = loss_and_gradient(compiled)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-3, atol=1e-6)
