"""Backbones behind the `VideoModel` seam, and the registry of model names."""

from anti_i2v.models.base import VideoModel
from anti_i2v.models.registry import MODELS, load_model

__all__ = ["MODELS", "VideoModel", "load_model"]
