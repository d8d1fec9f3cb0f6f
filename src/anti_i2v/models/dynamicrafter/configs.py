"""Configurations of the released DynamiCrafter checkpoints and of a tiny CPU test variant.

Values come from the official inference YAMLs (``configs/inference_{256,512,1024}_v1.0.yaml``) and run
scripts (``scripts/run.sh``, ``scripts/run_application.sh``) of the original release. Sub-module sizes
are plain dicts of constructor keyword arguments:

* ``unet``: the YAML's ``unet_config.params``, original names, passed as ``UNetModel(**unet)``;
* ``resampler``: ``image_proj_stage_config.params``, passed as ``Resampler(**resampler)``;
* ``vae``: ``first_stage_config.params.ddconfig`` (plus ``embed_dim``), passed to
  :func:`~anti_i2v.models.dynamicrafter.vae.build_vae`;
* ``text`` / ``vision``: the OpenCLIP ViT-H/14 tower sizes, passed to
  :class:`~anti_i2v.models.dynamicrafter.encoders.OpenCLIPTextEncoder` /
  :class:`~anti_i2v.models.dynamicrafter.encoders.OpenCLIPImageEncoder`.

Variants: ``"256"``, ``"512"``, ``"1024"``, ``"512_interp"`` and ``"tiny"`` (random weights, built in
code; small enough that a forward of every part runs on a CPU in well under a second, yet its UNet has
input, middle and output blocks with spatial and temporal transformers and per-frame image tokens).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from anti_i2v.errors import ConfigError

__all__ = ["VARIANTS", "DynamiCrafterConfig", "get_config", "normalize_variant"]

_CLIP_H_TEXT: dict[str, Any] = {
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "intermediate_size": 4096,
    "context_length": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "layer": "penultimate",
    "projection_dim": 1024,
}
_CLIP_H_VISION: dict[str, Any] = {
    "width": 1280,
    "layers": 32,
    "heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "antialias": True,
    "projection_dim": 1024,
}
_SD_VAE: dict[str, Any] = {
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 4,
    "embed_dim": 4,
    "in_channels": 3,
    "out_ch": 3,
    "double_z": True,
    "attn_resolutions": [],
    "dropout": 0.0,
    "resolution": 256,
}
_RESAMPLER: dict[str, Any] = {
    "dim": 1024,
    "depth": 4,
    "dim_head": 64,
    "heads": 12,
    "num_queries": 16,
    "embedding_dim": 1280,
    "output_dim": 1024,
    "ff_mult": 4,
    "video_length": 16,
}


def _unet(default_fs: int, *, learnable_alpha: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {
        "in_channels": 8,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "dropout": 0.1,
        "num_head_channels": 64,
        "transformer_depth": 1,
        "context_dim": 1024,
        "use_linear": True,
        "use_checkpoint": True,
        "temporal_conv": True,
        "temporal_attention": True,
        "temporal_selfatt_only": True,
        "use_relative_position": False,
        "use_causal_attention": False,
        "temporal_length": 16,
        "addition_attention": True,
        "image_cross_attention": True,
        "default_fs": default_fs,
        "fs_condition": True,
    }
    if learnable_alpha:
        params["image_cross_attention_scale_learnable"] = True
    return params


@dataclass(frozen=True)
class DynamiCrafterConfig:
    """Everything needed to build one DynamiCrafter variant and sample it as the official scripts do.

    ``resolution`` is ``(height, width)`` in pixels; latents are ``resolution / 8`` for the real VAE.
    ``default_fs`` is the ``fs`` value the run scripts pass to the UNet (a frame rate for 512/1024, a
    frame *stride* for 256: ``fs_type``). ``interp``: the 512 interpolation/looping model, whose
    ``c_concat`` holds the first and the last frame latents with zeros in between (the others repeat the
    first frame latent over all frames).
    """

    name: str
    hub_repo: str | None
    resolution: tuple[int, int]
    default_fs: int
    fs_type: str
    parameterization: str
    rescale_betas_zero_snr: bool
    timestep_spacing: str
    guidance_rescale: float
    use_dynamic_rescale: bool
    base_scale: float | None
    perframe_ae: bool
    unet: dict[str, Any]
    resampler: dict[str, Any]
    text: dict[str, Any] = field(default_factory=lambda: dict(_CLIP_H_TEXT))
    vision: dict[str, Any] = field(default_factory=lambda: dict(_CLIP_H_VISION))
    vae: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(_SD_VAE))
    filename: str = "model.ckpt"
    frames: int = 16
    interp: bool = False
    image_cross_attention_learnable_alpha: bool = False
    scale_factor: float = 0.18215
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    turning_step: int = 400
    guidance_scale: float = 7.5
    ddim_steps: int = 50
    ddim_eta: float = 1.0
    seed: int = 123
    text_context_length: int = 77
    image_tokens_per_frame: int = 16
    tokenizer: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae["ch_mult"]) - 1)

    @property
    def latent_size(self) -> tuple[int, int]:
        f = self.vae_downsample
        return self.resolution[0] // f, self.resolution[1] // f

    @property
    def latent_channels(self) -> int:
        return int(self.vae["z_channels"])

    @property
    def is_tiny(self) -> bool:
        return self.hub_repo is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **changes: Any) -> DynamiCrafterConfig:
        """A copy with top-level fields replaced (sub-dicts are copied, not shared)."""
        return replace(copy.deepcopy(self), **changes)


def _released() -> dict[str, DynamiCrafterConfig]:
    c512 = DynamiCrafterConfig(
        name="512",
        hub_repo="Doubiiu/DynamiCrafter_512",
        resolution=(320, 512),
        default_fs=24,
        fs_type="fps",
        parameterization="v",
        rescale_betas_zero_snr=True,
        timestep_spacing="uniform_trailing",
        guidance_rescale=0.7,
        use_dynamic_rescale=True,
        base_scale=0.7,
        perframe_ae=True,
        unet=_unet(24),
        resampler=dict(_RESAMPLER),
    )
    c1024 = replace(
        c512,
        name="1024",
        hub_repo="Doubiiu/DynamiCrafter_1024",
        resolution=(576, 1024),
        default_fs=10,
        base_scale=0.3,
        unet=_unet(10),
        resampler=dict(_RESAMPLER),
        text=dict(_CLIP_H_TEXT),
        vision=dict(_CLIP_H_VISION),
        vae=copy.deepcopy(_SD_VAE),
    )
    c256 = DynamiCrafterConfig(
        name="256",
        hub_repo="Doubiiu/DynamiCrafter",
        resolution=(256, 256),
        default_fs=3,
        fs_type="frame_stride",
        parameterization="eps",
        rescale_betas_zero_snr=False,
        timestep_spacing="uniform",
        guidance_rescale=0.0,
        use_dynamic_rescale=False,
        base_scale=None,
        perframe_ae=False,
        unet=_unet(3, learnable_alpha=True),
        resampler=dict(_RESAMPLER),
        image_cross_attention_learnable_alpha=True,
    )
    # same network and YAML as 512; run_application.sh samples it with fs 5 and seed 12306 (interp)
    c512i = replace(
        c512,
        name="512_interp",
        hub_repo="Doubiiu/DynamiCrafter_512_Interp",
        default_fs=5,
        interp=True,
        seed=12306,
        unet=_unet(24),
        resampler=dict(_RESAMPLER),
        text=dict(_CLIP_H_TEXT),
        vision=dict(_CLIP_H_VISION),
        vae=copy.deepcopy(_SD_VAE),
    )
    return {c.name: c for c in (c256, c512, c1024, c512i)}


def _tiny() -> DynamiCrafterConfig:
    frames = 4
    context_dim = 32
    unet = {
        "in_channels": 8,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2, 1],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "dropout": 0.0,
        "num_head_channels": 16,
        "transformer_depth": 1,
        "context_dim": context_dim,
        "use_linear": True,
        "use_checkpoint": False,
        "temporal_conv": True,
        "temporal_attention": True,
        "temporal_selfatt_only": True,
        "use_relative_position": False,
        "use_causal_attention": False,
        "temporal_length": frames,
        "addition_attention": True,
        "image_cross_attention": True,
        "default_fs": 24,
        "fs_condition": True,
    }
    vision = {
        "width": 40,
        "layers": 2,
        "heads": 4,
        "patch_size": 14,
        "image_size": 224,
        "intermediate_size": 80,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "antialias": True,
        "projection_dim": 24,
    }
    text = {
        "width": context_dim,
        "layers": 3,
        "heads": 4,
        "intermediate_size": 64,
        "context_length": 77,  # the UNet's per-frame token split assumes 77 text tokens
        "vocab_size": 1024,  # >= len(tiny_clip_tokenizer())
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "layer": "penultimate",
        "projection_dim": 24,
    }
    resampler = {
        "dim": 48,
        "depth": 2,
        "dim_head": 16,
        "heads": 3,
        "num_queries": 16,
        "embedding_dim": vision["width"],
        "output_dim": context_dim,
        "ff_mult": 4,
        "video_length": frames,
    }
    vae = {
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "z_channels": 4,
        "embed_dim": 4,
        "in_channels": 3,
        "out_ch": 3,
        "double_z": True,
        "attn_resolutions": [],
        "dropout": 0.0,
        "resolution": 32,
    }
    return DynamiCrafterConfig(
        name="tiny",
        hub_repo=None,
        filename="",
        resolution=(32, 32),
        frames=frames,
        default_fs=24,
        fs_type="fps",
        parameterization="v",
        rescale_betas_zero_snr=True,
        timestep_spacing="uniform_trailing",
        guidance_rescale=0.7,
        use_dynamic_rescale=True,
        base_scale=0.7,
        perframe_ae=True,
        unet=unet,
        resampler=resampler,
        text=text,
        vision=vision,
        vae=vae,
        ddim_steps=4,
        tokenizer=None,  # tiny_clip_tokenizer(), built in memory
    )


#: Names accepted by :func:`get_config`.
VARIANTS: tuple[str, ...] = ("256", "512", "1024", "512_interp", "tiny")

_ALIASES = {
    "dynamicrafter": "256",
    "dynamicrafter256": "256",
    "dynamicrafter512": "512",
    "dynamicrafter1024": "1024",
    "512interp": "512_interp",
    "interp": "512_interp",
    "dynamicrafter512interp": "512_interp",
    "tiny": "tiny",
}


def normalize_variant(variant: str | int) -> str:
    """``"512"``, ``512``, ``"dynamicrafter_512"``, ``"512-interp"`` ... -> a name in :data:`VARIANTS`."""
    key = str(variant).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key in {"256", "512", "1024"}:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ConfigError(f"unknown DynamiCrafter variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def get_config(variant: str | int | DynamiCrafterConfig) -> DynamiCrafterConfig:
    """A fresh (deep-copied) configuration of ``variant``; a config passed in is returned as is."""
    if isinstance(variant, DynamiCrafterConfig):
        return variant
    name = normalize_variant(variant)
    cfg = _tiny() if name == "tiny" else _released()[name]
    return copy.deepcopy(cfg)
