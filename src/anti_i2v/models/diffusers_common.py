"""What the diffusers-backed adapters share: loading, placing modules, layer names, text conditioning,
8-bit input images."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint

from anti_i2v.errors import ModelError
from anti_i2v.models.base import DENOISER_PREFIX, VAE_PREFIX, ModelLayers, VideoModel


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


# Set by `anti_i2v.memory.deferred_placement`: build on the CPU, the memory mode places the weights.
DEFER_PLACEMENT = False


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen module to ``device`` (unless placement is deferred), casting only when its dtype differs."""
    if not DEFER_PLACEMENT:
        module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def to_pil_8bit(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] as the 8-bit picture an attacker's pipeline reads."""
    array = (image[0] if image.dim() == 4 else image).permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray(np.round(array.clip(0, 1) * 255).astype(np.uint8))


def pipeline_image(model: VideoModel, image: torch.Tensor) -> Image.Image:
    """The 8-bit picture ``model``'s pipeline is given for ``image``: cropped first, as its reference code
    crops the 8-bit photo, where the model crops (`VideoModel.crops_photo`); else whole, for the
    pipeline to resize to the model's current `resolution`."""
    if model.crops_photo:
        image = model.prepare_image((image.float().clamp(0, 1) * 255).round() / 255)
    return to_pil_8bit(image)


def standard_layers(n_blocks: int, vae_encoder: torch.nn.Module) -> ModelLayers:
    """``denoiser.0..n_blocks-1`` and the VAE encoder's ``down_blocks.<i>`` then ``mid_block``."""
    return ModelLayers(
        denoiser=[f"{DENOISER_PREFIX}{i}" for i in range(n_blocks)],
        vae_encoder=[f"{VAE_PREFIX}down_blocks.{i}" for i in range(len(vae_encoder.down_blocks))]
        + [f"{VAE_PREFIX}mid_block"],
    )


def drop_text_encoders(pipe, device: torch.device, *names: str) -> None:
    """Free the pipeline's text encoder(s) ``names`` once the prompt is cached."""
    if any(getattr(pipe, n) is not None for n in names):
        for n in names:
            setattr(pipe, n, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class CachedPromptEmbeds:
    """Text conditioning held as one (prompt, negative) pair of embeddings without a mask,
    as CogVideoX and Wan use it; `condition` fills it from the text encoder."""

    _device: torch.device
    _dtype: torch.dtype
    _prompt: str | None = None
    _prompt_embeds: torch.Tensor | None = None
    _negative_embeds: torch.Tensor | None = None

    def use_prompt_embeds(self, embeds: torch.Tensor, negative: torch.Tensor | None = None, label: str = "") -> None:
        """Condition on precomputed text-encoder embeddings (1, L, D) instead of a prompt string
        (the negative defaults to zeros)."""
        self._prompt = label
        self._prompt_embeds = embeds.to(self._device, self._dtype)
        self._negative_embeds = (negative if negative is not None else torch.zeros_like(embeds)).to(
            self._device, self._dtype
        )

    def denoise_unconditional(self, image, video_latents, t, noise):
        """The guidance branch the pipeline runs: the negative (empty) prompt, the same image condition."""
        positive = self._require_condition()
        self._prompt_embeds = self._negative_embeds
        try:
            return self.denoise(image, video_latents, t, noise, with_eps=True)
        finally:
            self._prompt_embeds = positive

    def _require_condition(self) -> torch.Tensor:
        if self._prompt_embeds is None:
            raise ModelError("call condition(prompt) before running the denoiser")
        return self._prompt_embeds


def checkpoint_calls(modules: Iterable[torch.nn.Module]) -> None:
    """Recompute each of ``modules``' calls in the backward pass (gradient checkpointing), for the
    parts of a denoiser that its own gradient checkpointing leaves out.

    The instance's ``forward`` is wrapped, so hooks on the module itself run once per call, as
    before, and its weights and state-dict keys are untouched.
    """
    for module in modules:
        forward = module.forward

        def checkpointed(*args, forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        module.forward = checkpointed
