"""DINO similarity: does the generated video still look like the clean one?

`DINO` is the mean cosine similarity of DINOv2 CLS features between the frames of
a generated video and a clean reference: either the clean photo (every frame is
compared with it) or the video generated from the clean photo (frame t with
frame t). Range ``[-1, 1]``; lower = better protection.

Preprocessing is done in torch (no image processor, which would need torchvision):
bicubic antialiased resize to ``image_size`` square, then ImageNet mean/std.
Weights (``facebook/dinov2-base`` by default, about 350 MB) are not shipped; see
`dino_available`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from anti_i2v.errors import ConfigError, InputError, ModelError
from anti_i2v.evaluation.metrics.base import MetricSpec, check_image, check_video

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINO = "facebook/dinov2-base"

DINO = MetricSpec(
    name="dino",
    description=(
        "mean cosine similarity of DINOv2 CLS features between generated frames and the clean "
        "reference (the clean photo, or the clean video frame by frame)"
    ),
    range=(-1.0, 1.0),
    higher_means="the generated frames look more like the clean reference",
    protection_direction="lower",
)


def dino_available(source: str = DEFAULT_DINO) -> bool:
    """Whether DINO weights can be loaded without a download.

    ``source`` is a local folder (must hold ``config.json``) or a hub id already in the
    local Hugging Face cache.
    """
    if Path(source).is_dir():
        return (Path(source) / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(str(source), "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


class DinoSimilarity:
    """Cosine similarity of DINO(v2) CLS features.

    Args:
        model: a transformers vision backbone whose output has ``pooler_output`` (the
            layer-normalised CLS token, as `transformers.Dinov2Model`) or
            ``last_hidden_state`` (token 0 is used).
        image_size: square side the frames are resized to (a multiple of the patch size;
            DINOv2 interpolates its position embeddings).
    """

    def __init__(self, model: transformers.PreTrainedModel, image_size: int = 224) -> None:
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        patch = getattr(model.config, "patch_size", None)
        if isinstance(patch, int) and self.image_size % patch:
            raise ConfigError(f"image_size {image_size} must be a multiple of the model's patch size {patch}")

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_DINO, device: str | torch.device = "cpu", image_size: int = 224
    ) -> DinoSimilarity:
        """Load a DINO backbone with `transformers.AutoModel` from a hub id or a local folder.

        Downloads only when ``source`` is a hub id that is not cached and the hub is online.

        Raises `ModelError` when the weights cannot be found or loaded.
        """
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ModelError(
                f"DINO weights '{source}' not found; download them (hf download {DEFAULT_DINO}) "
                "or pass a local folder"
            ) from err
        logger.info("loaded DINO model from %s on %s", source, device)
        return cls(model.to(device), image_size=image_size)

    @torch.inference_mode()
    def features(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """CLS features ``(N, D)`` (float32, CPU, not normalised) of ``images`` ``(N, 3, H, W)`` in ``[0, 1]``. No gradients."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise InputError("DINO features need images (N, 3, H, W) in [0, 1]")
        param = next(self.model.parameters())
        out = []
        for chunk in images.split(batch_size):
            x = chunk.to(param.device, torch.float32).clamp(0, 1)
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              antialias=True, align_corners=False)
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            output = self.model(pixel_values=((x - mean) / std).to(param.dtype))
            pooled = getattr(output, "pooler_output", None)
            cls = pooled if pooled is not None else output.last_hidden_state[:, 0]
            out.append(cls.float().cpu())
        return torch.cat(out)

    def __call__(self, video: torch.Tensor, reference: torch.Tensor) -> float:
        """DINO similarity of ``video`` ``(F, 3, H, W)`` to ``reference``, all in ``[0, 1]``.

        ``reference`` is the clean photo ``(3, H', W')`` (every frame is compared with it)
        or the clean video ``(F, 3, H', W')`` (frame t with frame t; same F). Returns a
        value in ``[-1, 1]``; lower = better protection.
        """
        video = check_video(video)
        if reference.ndim == 3:
            ref = check_image(reference, "clean reference")[None]
        else:
            ref = check_video(reference, "clean reference video")
            if ref.shape[0] != video.shape[0]:
                raise InputError(
                    f"the clean video has {ref.shape[0]} frames and the generated one {video.shape[0]}; "
                    "generate both with the same number of frames"
                )
        sims = F.cosine_similarity(self.features(video), self.features(ref), dim=-1)
        return float(sims.mean())
