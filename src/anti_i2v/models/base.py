"""The seam between attacks and backbones: the `VideoModel` interface and `FeatureTaps`.

The engine and the objectives only ever see a `VideoModel`. Each backbone is one
adapter that implements it (see `cogvideox.py`); nothing outside the adapter knows
how a backbone conditions on the image or what it was trained to predict.

Layer names are plain strings: denoiser blocks are ``"denoiser.<i>"`` in forward
order and VAE-encoder blocks ``"vae.<name>"``; `VideoModel.layers()` lists them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DENOISER_PREFIX = "denoiser."
VAE_PREFIX = "vae."


class _StopForward(Exception):
    """Raised from a hook to abandon a forward pass once the deepest tap has fired."""


@dataclass
class ModelLayers:
    """Ordered layer names a model exposes for feature taps."""

    denoiser: list[str]
    vae_encoder: list[str]

    def resolve_denoiser(self, indices: Sequence[int]) -> list[str]:
        """Map block indices (negative counts from the end) to denoiser layer names."""
        n = len(self.denoiser)
        names = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                from anti_i2v.errors import ConfigError

                raise ConfigError(
                    f"block index {i} is out of range: this model has {n} denoiser blocks "
                    f"(0..{n - 1}); pick indices in that range"
                )
            names.append(self.denoiser[j])
        return names


@dataclass
class DenoiserResult:
    """What one denoiser pass returns: tapped features, and what else was asked for.

    ``loss`` is the model's own training loss; ``eps`` the prediction converted to
    noise space (whatever the model predicts), for score-based attacks such as SDS;
    ``x0`` the same prediction as clean video latents, where the adapter provides it.
    Noising ``x0`` with ``eps`` at a timestep (as `VideoModel.denoise` noises its
    reference) is one deterministic (DDIM-like) sampler step to that timestep.
    """

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    eps: torch.Tensor | None = None
    x0: torch.Tensor | None = None


@dataclass
class EncodedImage:
    """The condition image as the denoiser sees it, plus tapped VAE-encoder features.

    ``latents`` is the VAE path (concatenated or injected latents); ``context`` the
    image-embedding path (e.g. CLIP tokens through a resampler), None for models
    that see the image through the VAE only.
    """

    latents: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    context: torch.Tensor | None = None


class FeatureTaps:
    """Forward hooks that record chosen modules' outputs and can stop the forward early.

    ``stop_after`` names the module after which the forward pass is abandoned (the
    deepest tapped block when the prediction is not needed). Hooks exist only inside
    `capture`, so gradient-checkpoint recomputation in the backward pass (which runs
    after it) neither records nor stops anything.

    Example:
        >>> taps = FeatureTaps({"denoiser.3": model.blocks[3]})
        >>> with taps.capture(stop_after="denoiser.3") as feats:
        ...     taps.run(lambda: model(x))
        >>> feats["denoiser.3"].shape
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._first_only = False
        self._stop_after: str | None = None
        self._store: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if self._first_only and name in self._store:
                return  # a module called in chunks (a video VAE): keep the first, the photo's
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            self._store[name] = tensor
            if name == self._stop_after:
                raise _StopForward

        return hook

    @contextlib.contextmanager
    def capture(
        self, stop_after: str | None = None, first_only: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Hook the modules for one forward pass; yields the dict that fills with features.

        ``first_only`` keeps each module's first output when it runs several times.
        """
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        self._store = {}
        self._stop_after = stop_after
        self._first_only = first_only
        try:
            yield self._store
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def run(forward) -> object | None:
        """Call ``forward()``; returns its output, or None when a tap stopped it early."""
        try:
            return forward()
        except _StopForward:
            return None


class VideoModel(ABC):
    """One image-to-video backbone, as the attack sees it.

    Images at this boundary are float tensors (B, 3, H, W) in [0, 1] at
    `resolution`; each adapter converts to its own range.
    """

    name: str
    family: str = ""  # the architecture family, the same for its tiny and released variants ("": none known)
    source: str = "built in code"  # hub id or folder the weights came from
    resolution: tuple[int, int]
    num_frames: int
    num_train_timesteps: int = 1000

    _device: torch.device  # set by each adapter
    _dtype: torch.dtype
    memory_mode: str = "full"  # set by `anti_i2v.memory.apply_memory_mode`
    text_on_cpu: bool = False  # run the text encoder on the CPU (memory modes other than full)
    # whether gradient checkpointing recomputes whole denoiser blocks (the streaming of
    # `--memory sequential` needs it: a block's weights are present only during its own call)
    checkpoints_whole_blocks: bool = True
    crops_photo: bool = False  # whether `prepare_image` crops (then the perturbation needs through_resize)
    # the step (pixels) of the input sizes an adapter that sizes each photo runs at; None: one size only
    size_multiple: int | None = None
    _sizing_photo: bool = False  # inside `sized_for`
    compiled: bool = False  # set by `anti_i2v.acceleration`
    attention_kernel: str = "auto"

    def text_device(self) -> torch.device:
        """Where the text encoder runs: the accelerator in memory mode ``full``, else the CPU."""
        return self._device if self._device.type == "cuda" and not self.text_on_cpu else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Device the denoiser runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the denoiser."""
        return self._dtype

    @abstractmethod
    def layers(self) -> ModelLayers:
        """Ordered names of the denoiser blocks and of the VAE-encoder blocks."""

    @abstractmethod
    def module(self, name: str) -> nn.Module:
        """The module behind a layer name of `layers` (for hooks)."""

    def tapped_forward(self, forward: Callable[[], Any], taps: Sequence[str], need_output: bool) -> tuple[Any, dict]:
        """Run the denoiser call ``forward`` with ``taps`` hooked.

        Unless ``need_output``, the pass stops after the deepest tapped block (the
        output is then None). Returns the output and the tapped features.
        """
        order = {n: i for i, n in enumerate(self.layers().denoiser)}
        deepest = max(taps, key=order.__getitem__) if taps else None
        tapper = FeatureTaps({n: self.module(n) for n in taps})
        with tapper.capture(stop_after=None if need_output else deepest) as feats:
            output = tapper.run(forward)
        return output, dict(feats)

    @abstractmethod
    def condition(self, prompt: str) -> None:
        """Compute and cache the text conditioning used by later passes."""

    @abstractmethod
    def encode_image(
        self,
        x: torch.Tensor,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> EncodedImage:
        """Differentiable VAE encoding of the condition image ``x`` in [0, 1]."""

    @abstractmethod
    def image_latent(self, encoded: EncodedImage) -> torch.Tensor:
        """The condition image's own VAE latent (B, C, h, w), taken from ``encoded``."""

    @abstractmethod
    def still_video(self, latent: torch.Tensor) -> torch.Tensor:
        """Video latents of a still video made of one image latent (B, C, h, w), in the
        layout `denoise` expects (an approximation for temporally compressing VAEs)."""

    @abstractmethod
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """VAE latents of a reference video ``frames`` (F, 3, H, W) in [0, 1] (no grad)."""

    @abstractmethod
    def denoise(
        self,
        image: EncodedImage,
        video_latents: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        taps: Sequence[str] = (),
        with_loss: bool = False,
        with_eps: bool = False,
    ) -> DenoiserResult:
        """One denoiser pass on the noised reference video conditioned on ``image``.

        Returns the tapped block outputs; unless the loss or the noise prediction
        (``with_loss``, ``with_eps``) is asked for, the pass stops after the deepest tap.
        """

    @abstractmethod
    def generate(
        self,
        image: torch.Tensor,
        prompt: str,
        steps: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample a video with the real pipeline; returns frames (F, 3, H, W) in [0, 1].

        ``guidance_scale`` None uses the model's released default.
        """

    @property
    def identity(self) -> str:
        """Name, weights and precision: what makes two models give the same results."""
        return f"{self.name}|{self.source}|{self.dtype}"

    # Convenience wrappers over the two primitives above.

    def features(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        taps: Sequence[str],
        video_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tapped features (denoiser and VAE encoder) for condition image ``x``.

        Without ``video_latents`` the clean image repeated over all frames is the
        noised video, as in the default reference of the diffusion loss.
        """
        vae_taps = [n for n in taps if n.startswith(VAE_PREFIX)]
        den_taps = [n for n in taps if n.startswith(DENOISER_PREFIX)]
        encoded = self.encode_image(x, vae_taps, generator)
        if video_latents is None:
            video_latents = self.encode_video(self.repeat_frames(x.detach()))
        out = dict(encoded.features)
        if den_taps:
            out.update(self.denoise(encoded, video_latents, t, noise, den_taps).features)
        return out

    def training_loss(
        self,
        x: torch.Tensor,
        video_latents: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The model's own diffusion training loss with ``x`` as the condition image."""
        encoded = self.encode_image(x, (), generator)
        loss = self.denoise(encoded, video_latents, t, noise, (), with_loss=True).loss
        assert loss is not None
        return loss

    def prepare_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """A photo (3, H, W) or (B, 3, H, W) in [0, 1] as this model's pipeline prepares it:
        (B, 3, h, w) at `resolution`, differentiable. By default stretched, as the diffusers
        image-to-video pipelines do; adapters whose pipeline crops override this."""
        from anti_i2v.photo import resize_for_model

        return resize_for_model(rgb, *self.resolution)

    def resolution_for(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) this model's pipeline runs a photo of ``height x width`` at, as its
        users size it. By default the configured `resolution` for every photo; adapters whose
        reference pipeline sizes each photo (e.g. by aspect ratio within a pixel area) override it
        and set `size_multiple`."""
        return tuple(self.resolution)

    def size_summary(self) -> str:
        """The input size and frames as a one-line summary says them (``480x720x49``)."""
        return f"{self.resolution[0]}x{self.resolution[1]}x{self.num_frames}"

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Run at ``resolution`` (height, width) from now on: positive multiples of `size_multiple`
        where the adapter has one (what it sizes photos within stays what it was built with);
        fixed-size models refuse any other size."""
        from anti_i2v.errors import ModelError

        height, width = (int(v) for v in resolution)
        step = self.size_multiple
        if step is None:
            if (height, width) != tuple(self.resolution):
                raise NotImplementedError(f"{type(self).__name__} runs at one resolution")
            return
        if height < step or width < step or height % step or width % step:
            raise ModelError(f"'{self.name}' runs at multiples of {step} pixels, not {height}x{width}")
        self.resolution = (height, width)

    @contextlib.contextmanager
    def sized_for(self, height: int, width: int) -> Iterator[tuple[int, int]]:
        """Run at the resolution chosen for a photo of ``height x width`` inside the block (yields
        it), then at the one before. Inside another `sized_for` block the outer one's holds: an
        image prepared for the outer photo runs as it was prepared (call it with no other image)."""
        before = tuple(self.resolution)
        if self._sizing_photo:  # nested (e.g. a reference video generated while
            yield before  # protecting, from the already prepared image): the outer photo decides
            return
        size = tuple(self.resolution_for(height, width))
        self._sizing_photo = True
        try:
            if size != before:
                self.set_resolution(size)
            yield size
        finally:
            self._sizing_photo = False
            if size != before:
                self.set_resolution(before)

    def frame_count_for(self, share: float) -> int:
        """The frame count nearest ``share`` of `num_frames` that the model can run (adapters
        that can change their frame count override it; by default only the full count)."""
        if share != 1.0:
            from anti_i2v.errors import ConfigError

            raise ConfigError(f"'{self.name}' cannot change its frame count; use frame_share=1")
        return self.num_frames

    def spread_frames_kept(self, share: float) -> int:
        """How many of the denoiser's frames (latent frames where the VAE compresses time) a run on
        ``share`` of them spread over the video keeps; 0 where frames cannot be spread (the default)."""
        return 0

    def frame_layout(self) -> str:
        """Which frames the model now runs with, as `set_num_frames` left them: part of the key of
        what is cached from its output (a generated reference video). By default their count."""
        return str(self.num_frames)

    def set_num_frames(self, num_frames: int, spread: bool | None = False) -> None:
        """Run with ``num_frames`` frames from now on (one `frame_count_for` gave): the first ones,
        or with ``spread`` ones spaced over the whole video where the adapter can keep their
        positions (None: spread if it can, else the first ones)."""
        if num_frames != self.num_frames:
            raise NotImplementedError(f"{type(self).__name__} has a fixed frame count")

    @contextlib.contextmanager
    def fewer_frames(self, share: float, spread: bool | None = False) -> Iterator[int]:
        """Run with about ``share`` of the frames inside the block (yields the count), then the full count."""
        full = self.num_frames
        count = self.frame_count_for(share)
        if count == full:
            yield full
            return
        self.set_num_frames(count, spread)
        try:
            yield count
        finally:
            self.set_num_frames(full)

    def repeat_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The image (1, 3, H, W) repeated as a still video (F, 3, H, W)."""
        return x[0].unsqueeze(0).expand(self.num_frames, -1, -1, -1).contiguous()

    def release_text_encoder(self) -> None:
        """Free the text encoder once the conditioning is cached (no-op by default)."""

    def weight_modules(self) -> list[nn.Module]:
        """The modules holding this model's weights, which an ensemble may park on the CPU.

        By default: every `nn.Module` attribute of the adapter, and the modules of its
        diffusers pipeline (``self.pipe``), text encoder included while it is kept.
        """
        found: dict[int, nn.Module] = {}
        candidates = list(vars(self).values())
        pipe = getattr(self, "pipe", None)
        if pipe is not None and hasattr(pipe, "components"):
            candidates += list(pipe.components.values())
        for value in candidates:
            if isinstance(value, nn.Module):
                found.setdefault(id(value), value)
        return list(found.values())

    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules among `weight_modules` (by default the diffusers pipeline's
        ``text_encoder*`` components), which memory modes keep on the CPU."""
        pipe = getattr(self, "pipe", None)
        components = getattr(pipe, "components", {}) if pipe is not None else {}
        return [m for k, m in components.items() if k.startswith("text_encoder") and isinstance(m, nn.Module)]

    def token_grid(self) -> tuple[int, int] | None:
        """(h, w) of one frame's tokens in transformer block outputs (frames outermost), when
        the adapter knows it; None lets tools infer it from the resolution."""
        return None

    def sampling_guidance(self) -> torch.Tensor | None:
        """The classifier-free guidance `generate` samples with by default, as a scalar tensor or one
        broadcastable over the video latents (e.g. per frame); None when the adapter has no
        unconditional branch (`denoise_unconditional`)."""
        return None

    def denoise_unconditional(
        self, image: EncodedImage, video_latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> DenoiserResult:
        """The unconditional branch of classifier-free guidance, as the pipeline runs it (e.g. the empty
        prompt), with ``eps`` and ``x0``; only where `sampling_guidance` is not None."""
        from anti_i2v.errors import ModelError

        raise ModelError(f"'{self.name}' has no unconditional branch for guidance")

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's own image-encoder embedding of ``x`` (e.g. CLIP), differentiable;
        None for models that condition on the image through the VAE only."""
        return None
