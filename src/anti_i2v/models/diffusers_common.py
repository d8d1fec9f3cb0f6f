"""What the diffusers-backed adapters share: loading, placing modules, 8-bit input images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from anti_i2v.errors import ModelError


def load_diffusers_pipeline(pipeline_cls: type, source: str, dtype: torch.dtype, family: str, hub_id: str, tiny: str):
    """``pipeline_cls.from_pretrained(source)``, or one line saying where to get the weights."""
    try:
        return pipeline_cls.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"no {family} weights found at '{source}' ({reason}); download them with "
            f"`hf download {hub_id} --local-dir DIR` on a machine with internet and pass "
            f"--model-path DIR, or use --model {tiny} to try the pipeline"
        ) from err


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen module to ``device``, casting only when its dtype differs."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def to_pil_8bit(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] as the 8-bit picture an attacker's pipeline reads."""
    array = (image[0] if image.dim() == 4 else image).permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray(np.round(array.clip(0, 1) * 255).astype(np.uint8))
