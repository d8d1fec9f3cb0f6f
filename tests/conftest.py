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
