"""Released Open-Sora 1.2 settings and a tiny CPU test variant.

Values come from the original release (``configs/opensora-v1-2/inference/sample.py``
of the original, tag v1.2.0). Sub-module sizes are plain dicts:

* ``stdit3``: the ``STDiT3Config`` fields under their original names (the HF ``config.json`` of
  ``hpcai-tech/OpenSora-STDiT-v3``), passed to ``STDiT3Config.from_dict``. ``enable_flash_attn`` and
  ``enable_layernorm_kernel`` are ``True`` in the released file and ignored by the port.
* ``vae``: constructor keyword arguments of ``VideoAutoencoderPipeline`` (``spatial_config`` = diffusers
  ``AutoencoderKL`` kwargs, ``temporal_config`` = ``VAETemporal`` kwargs, ``micro_batch_size``,
  ``micro_frame_size``, ``scale``, ``shift``). :func:`vae_kwargs_from_config` also maps the official
  ``config.json`` (``vae_2d`` / ``vae_temporal`` with ``type`` names) onto them.
* ``text``: the T5 encoder (hub id, ``model_max_length``, feature width).

**Sizes.** Open-Sora names aspect ratios *height:width*: its default ``"9:16"`` is a landscape frame,
240p 9:16 = 240 x 426 pixels (height x width). :data:`RESOLUTIONS` holds the 9:16 sizes that the original release
lists; Open-Sora's other bucket sizes are not reproduced here (pass ``(height, width)`` directly).
Lengths: ``"2s"`` = 51 frames, ``"4s"`` = 102, ``"8s"`` = 204, ``"16s"`` = 408, ``"image"`` = 1 (the
model then gets fps 120). The VAE turns every chunk of up to 17 frames into ``ceil(n / 4)`` latent
frames (51 -> 15) and divides H and W by 8.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.models.opensora.vae import full_size_vae_config, tiny_vae_config

__all__ = [
    "LENGTHS",
    "RESOLUTIONS",
    "STDIT3_HUB_ID",
    "T5_HUB_ID",
    "VAE_HUB_ID",
    "VARIANTS",
    "OpenSoraConfig",
    "get_config",
    "get_image_size",
    "get_num_frames",
    "latent_frames",
    "vae_kwargs_from_config",
]

STDIT3_HUB_ID = "hpcai-tech/OpenSora-STDiT-v3"
VAE_HUB_ID = "hpcai-tech/OpenSora-VAE-v1.2"
T5_HUB_ID = "DeepFloyd/t5-v1_1-xxl"

#: ``{resolution: {aspect ratio (height:width): (height, width)}}`` in pixels (the original release).
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "240p": {"9:16": (240, 426)},
    "360p": {"9:16": (360, 640)},
    "480p": {"9:16": (480, 854)},
    "720p": {"9:16": (720, 1280)},
}

#: Named lengths of the released inference, in frames.
LENGTHS: dict[str, int] = {"image": 1, "2s": 51, "4s": 102, "8s": 204, "16s": 408}

# STDiT3-XL/2, the fields of hpcai-tech/OpenSora-STDiT-v3/config.json (the original release)
_STDIT3_XL2: dict[str, Any] = {
    "model_type": "STDiT3",
    "input_sq_size": 512,
    "in_channels": 4,
    "patch_size": [1, 2, 2],
    "hidden_size": 1152,
    "depth": 28,
    "num_heads": 16,
    "mlp_ratio": 4.0,
    "pred_sigma": True,
    "caption_channels": 4096,
    "model_max_length": 300,
    "qk_norm": True,
    "enable_flash_attn": True,  # ignored by the port
    "enable_layernorm_kernel": True,  # ignored by the port
}

# OpenSora-VAE-v1.2: the SDXL-VAE spatial part, VAE_Temporal_SD, and the released shift/scale
_VAE_V1_2: dict[str, Any] = {
    **full_size_vae_config(),
    "scale": list(full_size_vae_config()["scale"]),  # lists, as a config.json holds them
    "shift": list(full_size_vae_config()["shift"]),
}

_T5_XXL: dict[str, Any] = {"hub_id": T5_HUB_ID, "model_max_length": 300, "d_model": 4096}


@dataclass(frozen=True)
class OpenSoraConfig:
    """Everything needed to build Open-Sora 1.2 and sample it as the released inference does.

    ``stdit3_hub_id``/``vae_hub_id`` are ``None`` for the tiny variant (random weights built in code).
    ``resolution``/``aspect_ratio``/``length`` are the defaults of ``sample.py`` (240p, 9:16, 51 frames);
    ``image_size`` and ``num_frames`` resolve them. ``dtype`` is the released inference dtype (the T5
    encoder always runs in float32).
    """

    name: str
    stdit3_hub_id: str | None
    vae_hub_id: str | None
    stdit3: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    resolution: str = "240p"
    aspect_ratio: str = "9:16"
    length: str = "2s"
    fps: int = 24
    frame_interval: int = 1
    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    aes: float | None = 6.5
    flow: float | None = None
    seed: int = 42
    align: int = 5
    condition_frame_length: int = 5
    micro_frame_size: int = 17
    dtype: str = "bf16"
    sizes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: copy.deepcopy(RESOLUTIONS))
    lengths: dict[str, int] = field(default_factory=lambda: dict(LENGTHS))

    @property
    def is_tiny(self) -> bool:
        return self.stdit3_hub_id is None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of the default resolution and aspect ratio."""
        return get_image_size(self.resolution, self.aspect_ratio, sizes=self.sizes)

    @property
    def num_frames(self) -> int:
        return get_num_frames(self.length, lengths=self.lengths)

    @property
    def text_hub_id(self) -> str | None:
        return self.text.get("hub_id")

    @property
    def model_max_length(self) -> int:
        return int(self.text["model_max_length"])

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae["spatial_config"]["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.stdit3.get("in_channels", 4))

    def latent_size(self, num_frames: int | None = None, image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """``(T_lat, H/8, W/8)`` of a video (default: this config's length and size)."""
        n = self.num_frames if num_frames is None else int(num_frames)
        h, w = self.image_size if image_size is None else image_size
        f = self.vae_downsample
        return latent_frames(n, self.micro_frame_size), h // f, w // f

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **changes: Any) -> OpenSoraConfig:
        """A copy with top-level fields replaced (sub-dicts are copied, not shared)."""
        return replace(copy.deepcopy(self), **changes)


def latent_frames(num_frames: int, micro_frame_size: int = 17) -> int:
    """Latent frames of ``num_frames`` pixel frames: ``ceil(n / 4)`` per chunk of ``micro_frame_size``."""
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    full, rest = divmod(int(num_frames), micro_frame_size)
    return full * math.ceil(micro_frame_size / 4) + math.ceil(rest / 4)


def get_image_size(
    resolution: str | tuple[int, int],
    aspect_ratio: str = "9:16",
    *,
    sizes: dict[str, dict[str, tuple[int, int]]] | None = None,
) -> tuple[int, int]:
    """``(height, width)`` in pixels of ``resolution`` (``"240p"``...) at ``aspect_ratio`` (height:width).

    A ``(height, width)`` pair is returned as is.
    """
    if isinstance(resolution, (tuple, list)):
        h, w = resolution
        return int(h), int(w)
    table = RESOLUTIONS if sizes is None else sizes
    key = str(resolution).strip().lower()
    if key not in table:
        raise ConfigError(f"unknown resolution {resolution!r}; choose one of {', '.join(table)} or pass (height, width)")
    ratios = table[key]
    if aspect_ratio not in ratios:
        raise ConfigError(
            f"aspect ratio {aspect_ratio!r} is not tabulated for {key} (have {', '.join(ratios)}); pass (height, width)"
        )
    return ratios[aspect_ratio]


def get_num_frames(length: str | int, *, lengths: dict[str, int] | None = None) -> int:
    """Frames of a named length (``"2s"`` -> 51, ``"image"`` -> 1) or an integer as is."""
    if isinstance(length, int):
        if length < 1:
            raise ConfigError(f"num_frames must be >= 1, got {length}")
        return length
    table = LENGTHS if lengths is None else lengths
    key = str(length).strip().lower()
    if key.isdigit():
        return get_num_frames(int(key))
    if key not in table:
        raise ConfigError(f"unknown length {length!r}; choose one of {', '.join(table)} or a frame count")
    return table[key]


def vae_kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """``VideoAutoencoderPipeline`` kwargs from a VAE ``config.json``.

    Accepts this package's layout (``spatial_config``/``temporal_config``, as :class:`OpenSoraConfig`
    stores it) and the official one, where ``vae_2d`` (``type: VideoAutoencoderKL``, weights of the SDXL
    VAE architecture, with ``micro_batch_size``) and ``vae_temporal`` (``type: VAE_Temporal_SD``) name
    the parts instead of sizing them. ``scale``/``shift`` are read when present (the checkpoint's
    buffers overwrite them anyway).
    """
    if "spatial_config" in config and "temporal_config" in config:
        out = {k: copy.deepcopy(config[k]) for k in ("spatial_config", "temporal_config")}
        for k in ("micro_batch_size", "micro_frame_size", "scale", "shift"):
            if k in config:
                out[k] = copy.deepcopy(config[k])
        return out
    vae_2d = config.get("vae_2d") or {}
    vae_t = config.get("vae_temporal") or {}
    kind_2d = vae_2d.get("type", "VideoAutoencoderKL")
    kind_t = vae_t.get("type", "VAE_Temporal_SD")
    if kind_2d != "VideoAutoencoderKL" or kind_t != "VAE_Temporal_SD":
        raise ModelError(
            f"unsupported Open-Sora VAE config (vae_2d {kind_2d!r}, vae_temporal {kind_t!r}); "
            "use hpcai-tech/OpenSora-VAE-v1.2 or a config.json with spatial_config/temporal_config"
        )
    out = copy.deepcopy(_VAE_V1_2)
    if vae_2d.get("micro_batch_size") is not None:
        out["micro_batch_size"] = int(vae_2d["micro_batch_size"])
    if config.get("micro_frame_size") is not None:
        out["micro_frame_size"] = int(config["micro_frame_size"])
    for k in ("scale", "shift"):
        v = config.get(k)
        if isinstance(v, (list, tuple)) and len(v) == 4:
            out[k] = [float(x) for x in v]
    return out


def _released() -> OpenSoraConfig:
    return OpenSoraConfig(
        name="opensora-v1.2",
        stdit3_hub_id=STDIT3_HUB_ID,
        vae_hub_id=VAE_HUB_ID,
        stdit3=copy.deepcopy(_STDIT3_XL2),
        vae=copy.deepcopy(_VAE_V1_2),
        text=dict(_T5_XXL),
    )


#: Tiny variant: the released structure shrunk (2 spatial + 2 temporal blocks, 64 wide, a 4-level
#: spatial VAE 8-16 wide, a 2-layer 32-wide T5 with a 20-token window); one forward of each part takes
#: milliseconds on a CPU.
TINY_TEXT_LENGTH = 20
TINY_CAPTION_CHANNELS = 32


def _tiny() -> OpenSoraConfig:
    stdit3 = {
        "model_type": "STDiT3",
        "input_sq_size": 512,
        "in_channels": 4,
        "patch_size": [1, 2, 2],
        "hidden_size": 64,
        "depth": 6,  # enough blocks for the default IRC layers (block 3 and the last three)
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "pred_sigma": True,
        "caption_channels": TINY_CAPTION_CHANNELS,
        "model_max_length": TINY_TEXT_LENGTH,
        "qk_norm": True,
        "enable_flash_attn": False,
        "enable_layernorm_kernel": False,
    }
    vae = tiny_vae_config()
    return OpenSoraConfig(
        name="tiny",
        stdit3_hub_id=None,
        vae_hub_id=None,
        stdit3=stdit3,
        vae=vae,
        text={"hub_id": None, "model_max_length": TINY_TEXT_LENGTH, "d_model": TINY_CAPTION_CHANNELS},
        resolution="tiny",
        aspect_ratio="1:1",
        length="tiny",
        num_sampling_steps=4,
        dtype="fp32",
        sizes={"tiny": {"1:1": (64, 64)}},
        lengths={"tiny": 17, "image": 1},
    )


#: Names accepted by :func:`get_config`.
VARIANTS: tuple[str, ...] = ("opensora-v1.2", "tiny")

_ALIASES = {"opensora": "opensora-v1.2", "opensora12": "opensora-v1.2", "opensorav12": "opensora-v1.2", "v12": "opensora-v1.2"}


def get_config(variant: str | OpenSoraConfig = "opensora-v1.2") -> OpenSoraConfig:
    """A fresh configuration of ``variant`` (``"opensora-v1.2"`` or ``"tiny"``); a config is returned as is."""
    if isinstance(variant, OpenSoraConfig):
        return variant
    key = str(variant).strip().lower().replace("-", "").replace("_", "").replace(".", "").replace(" ", "")
    if key == "tiny":
        return _tiny()
    if key in _ALIASES or key == "opensorav12":
        return _released()
    raise ConfigError(f"unknown Open-Sora variant {variant!r}; choose one of {', '.join(VARIANTS)}")
