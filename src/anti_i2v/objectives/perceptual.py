"""The auxiliary term: CLIP image-embedding similarity to the clean photo.

The paper adds CLIP-feature and LPIPS distances, with an ambiguous role. Here the
term is the cosine similarity between the CLIP image embeddings of the protected
and the clean photo, minimised (pushed apart). LPIPS needs a pretrained network that
is not bundled, so it is not offered. The term needs a CLIP vision model from a hub
id or a local folder (``aux_model``); by default it is on when those weights are
present locally and off otherwise (see `resolve_aux_weight`), since none ship with
anti-i2v.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection

from anti_i2v.config import ProtectConfig

from anti_i2v.errors import ModelError
from anti_i2v.models.registry import available_locally

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable CLIP preprocessing: resize to ``size`` square and normalise."""
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipEmbeddingSimilarity:
    """Cosine similarity of CLIP image embeddings to a clean reference, in [-1, 1]."""

    def __init__(self, encoder: CLIPVisionModelWithProjection) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.size = encoder.config.image_size
        self.reference: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, source: str, device: torch.device, dtype: torch.dtype) -> ClipEmbeddingSimilarity:
        """Load a CLIP vision model (e.g. ``openai/clip-vit-large-patch14``) or fail clearly."""
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ModelError(
                f"the auxiliary term needs CLIP weights, none found at '{source}'; pass a local "
                "folder with --aux-model DIR or set its weight to 0"
            ) from err
        return cls(encoder.to(device))

    def with_own_reference(self) -> ClipEmbeddingSimilarity:
        """A similarity on this one's loaded encoder with a clean reference of its own: each
        objective prepares the photo as its own model sees it, the encoder is loaded once."""
        return type(self)(self.encoder)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings of ``x`` (B, 3, H, W) in [0, 1]."""
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(pixel_values=clip_pixels(x.to(dtype), self.size)).image_embeds.float()

    def prepare(self, x: torch.Tensor) -> None:
        """Cache the clean photo's embedding."""
        with torch.no_grad():
            self.reference = self.embed(x)

    def __call__(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity to the clean embedding (minimise to push apart)."""
        assert self.reference is not None, "call prepare() first"
        return F.cosine_similarity(self.embed(x_adv), self.reference, dim=-1).mean()


def resolve_aux_weight(config: ProtectConfig) -> ProtectConfig:
    """Turn ``weight_aux=None`` into 1 when the CLIP weights are local, else 0 (logged)."""
    if config.weight_aux is not None:
        return config
    if available_locally(config.aux_model, "config.json"):
        return dataclasses.replace(config, weight_aux=1.0)
    logger.info(
        "auxiliary CLIP term off: no local weights for '%s' (pass --aux-model DIR to enable it)", config.aux_model
    )
    return dataclasses.replace(config, weight_aux=0.0)
