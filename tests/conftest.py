"""Shared test set-up: offline, one thread, small models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny CogVideoX-I2V adapter (random weights, CPU), conditioned on a prompt."""
    from anti_i2v.models.cogvideox import CogVideoXI2V

    model = CogVideoXI2V.tiny(seed=0)
    model.condition("a person talking to the camera")
    return model


@pytest.fixture(scope="session")
def portrait() -> torch.Tensor:
    """A real portrait (skimage astronaut) as (1, 3, 512, 512) in [0, 1]."""
    from skimage import data

    return torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.fixture(scope="session")
def portrait_small(portrait, tiny_model) -> torch.Tensor:
    """The portrait at the tiny model's resolution."""
    from anti_i2v.photo import resize_for_model

    return resize_for_model(portrait[0], *tiny_model.resolution)


@pytest.fixture
def tiny_clip(tmp_path) -> str:
    """A folder holding a tiny CLIP vision model with seeded random weights, for the auxiliary term."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, intermediate_size=37, patch_size=8)
    path = tmp_path / "clip"
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    return str(path)
