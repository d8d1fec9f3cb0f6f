"""DynamiCrafter through the VideoModel seam, on tiny-dynamicrafter: everything that runs
on CogVideoX (protect, every baseline, verify) runs on it, with no model-specific code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import anti_i2v
from anti_i2v.evaluation.generate import GenerationSettings
from anti_i2v.evaluation.scoring import VideoScorer
from anti_i2v.evaluation.verify import verify
from anti_i2v.models.dynamicrafter.adapter import DynamiCrafterI2V
from anti_i2v.models.registry import load_model
from anti_i2v.photo import resize_for_model, resize_short_side_and_crop, resize_to_fill

PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def model():
    m = DynamiCrafterI2V.tiny(seed=0)
    m.condition(PROMPT)
    return m


@pytest.fixture(scope="module")
def x(portrait, model):
    return resize_for_model(portrait[0], *model.resolution)


def _draw(model, x, seed=0, t=600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([t])


def test_blocks_are_numbered_in_forward_order(model):
    layers = model.layers()
    n_in, n_out = len(model.unet.input_blocks), len(model.unet.output_blocks)
    assert len(layers.denoiser) == n_in + 1 + n_out
    assert model.module(f"denoiser.{n_in}") is model.unet.middle_block
    assert model.module(layers.denoiser[-1]) is model.unet.output_blocks[-1]


def test_both_image_paths_are_differentiable(model, x):
    latents, noise, t = _draw(model, x)
    pixels = x.clone().requires_grad_(True)
    encoded = model.encode_image(pixels, ["vae.mid_block"], torch.Generator().manual_seed(0))
    assert encoded.latents.shape == latents.shape and encoded.context is not None
    assert torch.equal(encoded.latents[:, :, 0], encoded.latents[:, :, -1])  # the image latent on every frame
    image_tokens = torch.autograd.grad(encoded.context.sum(), pixels, retain_graph=True)[0]
    vae_path = torch.autograd.grad(encoded.latents.sum(), pixels)[0]
    assert image_tokens.abs().sum() > 0 and vae_path.abs().sum() > 0


def test_early_exit_matches_the_full_forward_and_loss_is_the_v_mse(model, x):
    latents, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(1))
    full = model.denoise(encoded, latents, t, noise, ["denoiser.2", "denoiser.5"], with_loss=True, with_eps=True)
    early = model.denoise(encoded, latents, t, noise, ["denoiser.2"])
    torch.testing.assert_close(early.features["denoiser.2"], full.features["denoiser.2"])
    s = model.schedule
    x0 = latents * s.scale_arr[600]  # dynamic rescale of the 512-style schedule
    a = s.alphas_cumprod[600]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v_pred = (full.eps - (1 - a).sqrt() * noisy) / a.sqrt()
    v_target = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(torch.nn.functional.mse_loss(v_pred, v_target), full.loss, rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_photo_and_sampling_gives_the_frames(model, x):
    latents, noise, t = _draw(model, x)
    pixels = x.clone().requires_grad_(True)
    loss = model.training_loss(pixels, latents, t, noise)
    (grad,) = torch.autograd.grad(loss, pixels)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9
    video = model.generate(x, PROMPT, steps=2, seed=0)
    assert video.shape == (model.num_frames, 3, *model.resolution)
    torch.testing.assert_close(video, model.generate(x, PROMPT, steps=2, seed=0))


def test_verify_runs_on_it(tmp_path, portrait, model):
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((64, 64)).save(tmp_path / "face.png")
    protected = anti_i2v.protect(tmp_path / "face.png", model, out=tmp_path, steps=2, prompt=PROMPT).path
    report = verify(tmp_path / "face.png", protected, model, tmp_path / "report",
                    GenerationSettings(prompt=PROMPT, steps=2), purifiers=["jpeg75"],
                    scorer=VideoScorer(dino=None, qalign=None))
    assert set(report["runs"]) == {"original", "protected", "random noise (same budget)", "protected+jpeg75"}
    assert (tmp_path / "report" / "contact_sheet.png").is_file()


def test_the_attackers_preprocessing_crops_the_centre():
    image = torch.zeros(1, 3, 100, 300)
    image[..., 100:200] = 1  # a white band in the middle third
    out = resize_to_fill(image, 64, 64)
    assert out.shape == (1, 3, 64, 64) and out.mean() > 0.95


def test_registry_builds_the_tiny_model_and_names_the_released_ones():
    assert load_model("tiny-dynamicrafter", device="cpu").name == "tiny-dynamicrafter"
    from anti_i2v.models.registry import MODELS

    assert MODELS["dynamicrafter-512"].hub_id == "Doubiiu/DynamiCrafter_512"
    assert MODELS["dynamicrafter-512"].weights_file == "model.ckpt"


def test_protection_is_optimised_through_the_models_own_crop(tmp_path, portrait, model, monkeypatch):
    seen = []
    original = DynamiCrafterI2V.prepare_image
    monkeypatch.setattr(DynamiCrafterI2V, "prepare_image", lambda self, rgb: seen.append(rgb.shape) or original(self, rgb))
    wide = portrait[0][:, 128:384, :]  # a 256x512 photo, wider than the model's square input
    result = anti_i2v.protect(wide, model, steps=2, prompt=PROMPT)
    assert result.budget.within_budget
    assert seen and all(shape[-2:] == (256, 512) for shape in seen)  # every view starts from the full photo


def test_preparation_scales_the_short_side_and_pads_narrow_photos():
    portrait_photo = torch.ones(3, 150, 100)  # taller than wide
    out = resize_short_side_and_crop(portrait_photo, 32, 64)  # a wide model input, as DynamiCrafter 512
    # short side 100 -> 32: the photo becomes 48x32, cropped to 32 rows, padded to 64 columns
    assert out.shape == (1, 3, 32, 64)
    assert out[..., :, 16:48].min() > 0.999 and out[..., :, :16].max() == 0 and out[..., :, 48:].max() == 0


def test_generation_conditions_like_the_released_inference(model, x):
    calls = []
    unet_forward = model.unet.forward

    def recording(inp, t, context=None, fs=None, **kw):
        calls.append((inp[:, 4:].clone(), context.shape, fs.clone()))
        return unet_forward(inp, t, context=context, fs=fs, **kw)

    model.unet.forward = recording
    try:
        model.generate(x, PROMPT, steps=2, seed=0)
    finally:
        model.unet.forward = unet_forward
    assert len(calls) == 4  # cond and uncond at each of the 2 steps
    tokens = model.config.image_tokens_per_frame * model.num_frames
    assert all(c[1][1] == 77 + tokens for c in calls)
    assert all(int(c[2][0]) == model.config.default_fs for c in calls)
    assert all(torch.equal(c[0], calls[0][0]) for c in calls)  # one c_concat shared by cond and uncond


def test_eps_and_interpolation_variants_follow_their_conditioning(x):
    from anti_i2v.models.dynamicrafter.configs import get_config
    from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel

    config = get_config("tiny").with_overrides(parameterization="eps", interp=True, use_dynamic_rescale=False,
                                               rescale_betas_zero_snr=False, timestep_spacing="uniform")
    torch.manual_seed(0)
    m = DynamiCrafterI2V(DynamiCrafterModel(config))
    m.condition(PROMPT)
    encoded = m.encode_image(x, (), torch.Generator().manual_seed(0))
    norms = encoded.latents.flatten(3).norm(dim=-1)[0, 0]
    assert norms[0] > 0 and norms[-1] > 0 and norms[1:-1].abs().max() == 0  # first and last frame only
    latents, noise, t = _draw(m, x)
    result = m.denoise(encoded, latents, t, noise, with_loss=True, with_eps=True)
    torch.testing.assert_close(result.loss, torch.nn.functional.mse_loss(result.eps, noise))
    assert m.generate(x, PROMPT, steps=3, seed=0).shape[0] == m.num_frames  # 3 steps: not a divisor of 1000
