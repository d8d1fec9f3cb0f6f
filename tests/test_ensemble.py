"""One perturbation against several models at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from feature_shift import deep_feature_shift

import anti_i2v
from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.models.cogvideox import CogVideoXI2V
from anti_i2v.models.dynamicrafter.adapter import DynamiCrafterI2V
from anti_i2v.objectives import AntiI2VObjective, draw_step
from anti_i2v.objectives.perceptual import ClipEmbeddingSimilarity

PROMPT = "a person talking to the camera"
METHOD = "anti-i2v-paper"  # the deep-feature shift measured below is what the paper's terms move


@pytest.fixture(scope="module")
def models():
    return CogVideoXI2V.tiny(seed=0), DynamiCrafterI2V.tiny(seed=0)


def _shift_on(model, photo: torch.Tensor, protected: torch.Tensor) -> float:
    """How far the protected photo moves this model's deep features (as its pipeline prepares it)."""
    objective = AntiI2VObjective(model, ProtectConfig(prompt=PROMPT))
    clean = model.prepare_image(photo)
    objective.prepare(model, clean)
    g = torch.Generator().manual_seed(5)
    draws = [draw_step(g, objective.latent_shape(), (0, 999)) for _ in range(3)]
    return deep_feature_shift(model, objective, clean, model.prepare_image(protected), draws)


def _as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_an_ensemble_protects_against_both_models_better_than_one(models, portrait):
    photo = torch.nn.functional.interpolate(portrait, size=(96, 96), mode="area")[0]
    cog, dyn = models
    one = _as_tensor(anti_i2v.protect(photo, cog, steps=20, prompt=PROMPT, method=METHOD).image)
    both = _as_tensor(anti_i2v.protect(photo, [cog, dyn], steps=20, prompt=PROMPT, method=METHOD).image)
    single = _shift_on(cog, photo, one) + _shift_on(dyn, photo, one)
    ensemble = _shift_on(cog, photo, both) + _shift_on(dyn, photo, both)
    assert ensemble > single, (ensemble, single)
    assert _shift_on(dyn, photo, both) > _shift_on(dyn, photo, one)


def test_ensemble_sidecar_lists_every_model_and_parts(tmp_path, models, portrait):
    photo = torch.nn.functional.interpolate(portrait, size=(64, 64), mode="area")[0]
    result = anti_i2v.protect(photo, list(models), out=tmp_path, steps=2, prompt=PROMPT)
    record = json.loads(result.sidecar.read_text())
    assert [m["name"] for m in record["model"]] == ["tiny-cogvideox", "tiny-dynamicrafter"]
    assert result.model == "tiny-cogvideox+tiny-dynamicrafter"
    assert any(k.startswith("tiny-dynamicrafter.") for k in result.history[0]) and result.budget.within_budget


def test_model_weights_steer_the_ensemble(models, portrait):
    photo = torch.nn.functional.interpolate(portrait, size=(64, 64), mode="area")[0]
    cog, dyn = models
    heavy_dyn = _as_tensor(anti_i2v.protect(photo, [cog, dyn], steps=15, prompt=PROMPT, method=METHOD, model_weights=(0.01, 1)).image)
    heavy_cog = _as_tensor(anti_i2v.protect(photo, [cog, dyn], steps=15, prompt=PROMPT, method=METHOD, model_weights=(1, 0.01)).image)
    assert _shift_on(dyn, photo, heavy_dyn) > _shift_on(dyn, photo, heavy_cog)
    assert _shift_on(cog, photo, heavy_cog) > _shift_on(cog, photo, heavy_dyn)
    with pytest.raises(ConfigError, match="one weight per model"):
        anti_i2v.protect(photo, [cog, dyn], steps=1, prompt=PROMPT, model_weights=(1, 1, 1))
    with pytest.raises(ConfigError, match="not all 0"):
        anti_i2v.protect(photo, [cog, dyn], steps=1, prompt=PROMPT, model_weights=(0, 0))


def test_each_model_of_an_ensemble_compares_with_its_own_clean_clip_embedding(models, portrait, tiny_clip,
                                                                              monkeypatch):
    """The auxiliary CLIP model is loaded once, but each member's CLIP term compares with the clean
    photo as its own model prepares it (the two tiny models see it at different sizes)."""
    photo = torch.nn.functional.interpolate(portrait, size=(64, 64), mode="area")[0]
    prepared: dict[int, torch.Size] = {}
    compared: list[tuple[torch.Size, torch.Size]] = []
    prepare, call = ClipEmbeddingSimilarity.prepare, ClipEmbeddingSimilarity.__call__

    def recording_prepare(self, x):
        prepared[id(self)] = x.shape[-2:]
        prepare(self, x)

    def recording_call(self, x_adv):
        compared.append((prepared[id(self)], x_adv.shape[-2:]))
        return call(self, x_adv)

    monkeypatch.setattr(ClipEmbeddingSimilarity, "prepare", recording_prepare)
    monkeypatch.setattr(ClipEmbeddingSimilarity, "__call__", recording_call)
    anti_i2v.protect(photo, list(models), steps=1, prompt=PROMPT, method=METHOD, weight_aux=1.0, aux_model=tiny_clip)
    assert len({size for size, _ in compared}) == 2  # one comparison per member, at its own size
    assert all(reference == seen for reference, seen in compared), compared
