"""Every method runs on every tiny backbone, with no model-specific code outside the adapters."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import anti_i2v
from anti_i2v.errors import ConfigError
from anti_i2v.methods import METHODS
from anti_i2v.models.registry import MODELS, load_model

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
        assert np.abs(saved - original).max() <= 4, (name, method)


@pytest.mark.parametrize("name", TINY)
def test_weight_modules_hold_every_tapped_layer(name):
    """An ensemble parks a model by moving `weight_modules()`: they must hold every layer it runs."""
    model = load_model(name, device="cpu")
    held = {id(p) for module in model.weight_modules() for p in module.parameters()}
    layers = model.layers()
    for layer in layers.denoiser + layers.vae_encoder:
        assert all(id(p) in held for p in model.module(layer).parameters()), (name, layer)
