"""What every tiny backbone must do through the seam alone: every method within the budget, gradients
to the photo, early exit, a protection that beats random noise, seeded generation, text-encoder release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feature_shift import protection_vs_random_noise
from PIL import Image

import anti_i2v
from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.methods import METHODS
from anti_i2v.models.registry import MODELS, load_model, model_identity
from anti_i2v.objectives.anti_i2v import sampler_run
from anti_i2v.objectives.base import relative_sq_distance

TINY = sorted(name for name, spec in MODELS.items() if spec.is_tiny)
PROMPT = "a person talking to the camera"


@pytest.fixture(scope="module")
def photo(tmp_path_factory, portrait):
    path = tmp_path_factory.mktemp("all") / "face.png"
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((80, 72)).save(path)
    return path


@pytest.mark.parametrize("name", TINY)
def test_every_method_on_every_backbone(name, photo, tmp_path):
    model = load_model(name, device="cpu")
    original = np.asarray(Image.open(photo), dtype=np.int16)
    for method in METHODS:
        if method == "clip-embed" and model.image_embedding(anti_i2v.photo.load_photo(photo).rgb[None]) is None:
            with pytest.raises(ConfigError, match="no image encoder"):
                anti_i2v.protect(photo, model, method=method, steps=1, prompt=PROMPT)
            continue
        result = anti_i2v.protect(photo, model, out=tmp_path / method, method=method, steps=1, eps="4/255",
                                  prompt=PROMPT)
        saved = np.asarray(Image.open(result.path), dtype=np.int16)
        assert 0 < np.abs(saved - original).max() <= 4, (name, method)  # moved, within the budget


@pytest.mark.parametrize("name", TINY)
def test_a_model_is_named_as_its_identity_says_and_runs_in_the_dtype_asked(name):
    """What a sidecar records of a model is known before loading it (a Ray driver skips finished photos
    with it); a tiny model keeps fp32 unless another dtype is asked for, and then runs in it."""
    plain = load_model(name, device="cpu")
    assert (plain.name, plain.source) == model_identity(name) and plain.dtype == torch.float32
    with pytest.raises(ConfigError, match="takes no --model-path"):
        model_identity(name, "weights")
    half = load_model(name, device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16
    weights = [p for module in half.weight_modules() for p in module.parameters()]
    assert sum(p.dtype == torch.bfloat16 for p in weights) > 0.5 * len(weights), name  # some norms stay fp32


@pytest.mark.parametrize("name", TINY)
def test_weight_modules_hold_every_tapped_layer(name):
    """An ensemble parks a model by moving `weight_modules()`: they must hold every layer it runs."""
    model = load_model(name, device="cpu")
    held = {id(p) for module in model.weight_modules() for p in module.parameters()}
    layers = model.layers()
    for layer in layers.denoiser + layers.vae_encoder:
        assert all(id(p) in held for p in model.module(layer).parameters()), (name, layer)


@pytest.fixture(scope="module")
def tiny_models():
    """Each tiny backbone, conditioned on the prompt, built once for the tests below."""
    models = {}
    for name in TINY:
        models[name] = load_model(name, device="cpu")
        models[name].condition(PROMPT)
    return models


def _draw(model, x, t: int = 600):
    latents = model.encode_video(model.repeat_frames(x))
    return latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([t])


@pytest.mark.parametrize("name", TINY)
def test_gradients_of_features_and_loss_reach_the_photo(name, tiny_models, portrait):
    model = tiny_models[name]
    x = model.prepare_image(portrait[0]).detach().requires_grad_(True)
    video, noise, t = _draw(model, x.detach())
    layers = model.layers()
    encoded = model.encode_image(x, layers.vae_encoder[-1:], torch.Generator().manual_seed(0))
    result = model.denoise(encoded, video, t, noise, layers.denoiser[1:2], with_loss=True)
    loss = result.loss + sum(f.float().pow(2).mean() for f in [*result.features.values(), *encoded.features.values()])
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.99, name


@pytest.mark.parametrize("name", TINY)
def test_early_exit_equals_the_full_forward_and_skips_later_blocks(name, tiny_models, portrait):
    model = tiny_models[name]
    x = model.prepare_image(portrait[0])
    video, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(0))
    blocks = model.layers().denoiser
    taps = blocks[len(blocks) // 2 - 1 : len(blocks) // 2 + 1]  # mid-depth (Hunyuan: across dual and single stream)
    full = model.denoise(encoded, video, t, noise, taps, with_loss=True)
    calls = []
    handle = model.module(blocks[-1]).register_forward_hook(lambda *a: calls.append(1))
    try:
        early = model.denoise(encoded, video, t, noise, taps)
        assert early.loss is None and calls == [], name
        model.denoise(encoded, video, t, noise, taps, with_loss=True)
        assert calls, name  # the hook does fire on a full pass
    finally:
        handle.remove()
    for layer in taps:
        torch.testing.assert_close(early.features[layer], full.features[layer])


@pytest.mark.parametrize("name", TINY)
def test_clean_and_noise_predictions_renoise_to_the_same_input(name, tiny_models, portrait):
    """Noising the predicted x0 with the predicted noise at the same timestep gives back the pass's own
    input, so that (x0, eps) chained over timesteps is a deterministic sampler (the sampler term's)."""
    model = tiny_models[name]
    x = model.prepare_image(portrait[0])
    video, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(0))
    first = model.denoise(encoded, video, t, noise, with_eps=True)
    assert first.x0 is not None and first.x0.shape == first.eps.shape, name
    again = model.denoise(encoded, first.x0, t, first.eps, with_eps=True)
    torch.testing.assert_close(again.x0, first.x0, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(again.eps, first.eps, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_the_guidance_branch_differs_and_leaves_the_condition_as_it_was(name, tiny_models, portrait):
    """Where `generate` samples with classifier-free guidance, the adapter gives its unconditional branch."""
    model = tiny_models[name]
    guidance = model.sampling_guidance()
    if guidance is None:  # HunyuanVideo-I2V samples without CFG
        assert name == "tiny-hunyuan-i2v"
        return
    assert float(guidance.max()) > 1, name
    x = model.prepare_image(portrait[0])
    video, noise, t = _draw(model, x)
    encoded = model.encode_image(x, (), torch.Generator().manual_seed(0))
    conditional = model.denoise(encoded, video, t, noise, with_eps=True)
    free = model.denoise_unconditional(encoded, video, t, noise)
    assert free.x0.shape == conditional.x0.shape and not torch.allclose(free.eps, conditional.eps), name
    torch.testing.assert_close(model.denoise(encoded, video, t, noise, with_eps=True).eps, conditional.eps)


@pytest.mark.parametrize("name", TINY)
def test_protection_moves_deep_features_further_than_random_noise(name, tiny_models, portrait):
    model = tiny_models[name]
    attacked, random_noise = protection_vs_random_noise(model, model.prepare_image(portrait[0]), PROMPT)
    assert attacked >= 2 * random_noise, (name, attacked, random_noise)


@pytest.mark.parametrize("name", TINY)
def test_the_default_protection_moves_the_sampler_output_far_more_than_random_noise(name, tiny_models, portrait):
    """The default method's few steps change the model's own sampler run from the photo (the same noises and
    encoding draws for both) by far more than uniform noise of the same budget does. On models whose encoding
    draws no noise (Wan, HunyuanVideo) the objective is flat at the photo: without a random start there the
    protection never left it."""
    model = tiny_models[name]
    photo = torch.nn.functional.interpolate(portrait, size=(96, 96), mode="area")[0]
    result = anti_i2v.protect(photo, model, steps=3, prompt=PROMPT)
    config = result.config
    protected = anti_i2v.photo.load_photo(result.image).rgb
    noise = (torch.rand(photo.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * config.eps
    noisy = anti_i2v.photo.load_photo((photo + noise).clamp(0, 1)).rgb
    video, _, _ = _draw(model, model.prepare_image(photo))
    noises = torch.randn((2, *video.shape), generator=torch.Generator().manual_seed(5))

    def sampler_shift(image: torch.Tensor) -> float:
        shifts = []
        with torch.no_grad():
            for seed, start in enumerate(noises):
                runs = [sampler_run(model, model.encode_image(model.prepare_image(img), (),
                                                              torch.Generator().manual_seed(seed)),
                                    start, config.sampler_steps, 999, guided_steps=config.sampler_guided_steps)
                        for img in (image, photo)]
                shifts.append(float(relative_sq_distance(*runs)))
        return sum(shifts) / len(shifts)

    assert result.budget.linf == pytest.approx(config.eps, abs=0.5 / 255), name
    assert sampler_shift(protected) > 10 * sampler_shift(noisy), name


@pytest.mark.parametrize("name", TINY)
def test_generation_is_seeded(name, tiny_models, portrait):
    model = tiny_models[name]
    x = model.prepare_image(portrait[0])
    video = model.generate(x, PROMPT, steps=2, seed=0)
    assert video.shape[0] >= 1 and video.shape[1:] == (3, *model.resolution), name
    assert 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(video, model.generate(x, PROMPT, steps=2, seed=0))
    assert not torch.equal(video, model.generate(x, PROMPT, steps=2, seed=1))


@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny-svd"])  # SVD takes no text
def test_a_released_text_encoder_refuses_a_new_prompt(name):
    model = load_model(name, device="cpu")
    model.condition("a man")
    model.release_text_encoder()
    model.condition("a man")  # cached: fine
    with pytest.raises(ModelError, match="released"):
        model.condition("a woman")
