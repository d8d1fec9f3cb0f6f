"""Model names -> adapters: hub ids, local folders and the tiny variants.

A name either builds a tiny variant in code (seeded random weights, offline) or
loads released weights from its hub id, or from ``path`` when given (a local folder
in the diffusers layout).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.models.base import VideoModel

logger = logging.getLogger(__name__)


DEMONSTRATION_NOTE = "random weights: it demonstrates the pipeline and protects against nothing"


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry."""

    name: str
    hub_id: str | None  # None for tiny variants built in code
    description: str
    build: Callable[..., VideoModel]
    weights_file: str = "model_index.json"  # the file whose presence means "weights are here"

    @property
    def is_tiny(self) -> bool:
        return self.hub_id is None


def _cogvideox(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.cogvideox import CogVideoXI2V

    return CogVideoXI2V.from_pretrained(
        source, device=device, dtype=dtype, gradient_checkpointing=device.type == "cuda"
    )


def _tiny_cogvideox(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.cogvideox import CogVideoXI2V

    # fixed weights: the tiny model is one model, whatever seed the protection uses
    return CogVideoXI2V.tiny(seed=0, device=device, dtype=dtype)


def _dynamicrafter(variant: str) -> Callable[..., VideoModel]:
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.dynamicrafter.adapter import DynamiCrafterI2V

        return DynamiCrafterI2V.from_pretrained(
            source, variant, device=device, dtype=dtype, gradient_checkpointing=device.type == "cuda"
        )

    return build


def _tiny_dynamicrafter(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.dynamicrafter.adapter import DynamiCrafterI2V

    return DynamiCrafterI2V.tiny(seed=0, device=device, dtype=dtype)


def _opensora(resolution: str) -> Callable[..., VideoModel]:
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.opensora.adapter import OpenSoraI2V

        return OpenSoraI2V.from_pretrained(
            source, device=device, dtype=dtype, resolution=resolution, gradient_checkpointing=device.type == "cuda"
        )

    return build


def _tiny_opensora(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.opensora.adapter import OpenSoraI2V

    return OpenSoraI2V.tiny(seed=0, device=device, dtype=dtype)


def _svd(default: str) -> Callable[..., VideoModel]:
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.svd import StableVideoDiffusionI2V

        return StableVideoDiffusionI2V.from_pretrained(
            source or default, device=device, dtype=dtype, gradient_checkpointing=device.type == "cuda"
        )

    return build


def _tiny_svd(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.svd import StableVideoDiffusionI2V

    return StableVideoDiffusionI2V.tiny(seed=0, device=device, dtype=dtype)


def _hunyuan(resolution: tuple[int, int] = (720, 1280)) -> Callable[..., VideoModel]:
    """The released HunyuanVideo-I2V at ``resolution`` (720p by default), whose area sets its size buckets."""
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.hunyuan import HunyuanVideoI2V

        return HunyuanVideoI2V.from_pretrained(source, device=device, dtype=dtype, resolution=resolution)

    return build


def _tiny_hunyuan(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.hunyuan import HunyuanVideoI2V

    return HunyuanVideoI2V.tiny(seed=0, device=device, dtype=dtype)


def _ltx(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.ltx import LTXVideoI2V

    return LTXVideoI2V.from_pretrained(source, device=device, dtype=dtype)


def _tiny_ltx(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
    from anti_i2v.models.ltx import LTXVideoI2V

    return LTXVideoI2V.tiny(seed=0, device=device, dtype=dtype)


def _wan(release: tuple[int, int] = (480, 832)) -> Callable[..., VideoModel]:
    """A released Wan I2V whose photos are sized within the area of ``release`` (Wan 2.1 and 2.2 A14B;
    TI2V-5B weights keep their own 704x1280), whatever the weights' folder is called."""
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.wan import WanI2V

        return WanI2V.from_pretrained(source, device=device, dtype=dtype, release=release,
                                      gradient_checkpointing=device.type == "cuda")

    return build


def _tiny_wan(variant: str) -> Callable[..., VideoModel]:
    def build(source: str | None, device: torch.device, dtype: torch.dtype) -> VideoModel:
        from anti_i2v.models.wan import WanI2V

        return WanI2V.tiny(seed=0, device=device, dtype=dtype, variant=variant)

    return build


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "cogvideox",
            "THUDM/CogVideoX-5b-I2V",
            "CogVideoX-5B image-to-video, 480x720, 49 frames (the paper's main backbone)",
            _cogvideox,
        ),
        ModelSpec(
            "tiny-cogvideox",
            None,
            "CogVideoX-I2V layout with random weights, 64x96, 9 frames: demonstrates the pipeline, protects against nothing",
            _tiny_cogvideox,
        ),
        ModelSpec("dynamicrafter-512", "Doubiiu/DynamiCrafter_512",
                  "DynamiCrafter 512, 320x512, 16 frames (the paper's U-Net backbone)", _dynamicrafter("512"),
                  "model.ckpt"),
        ModelSpec("dynamicrafter-1024", "Doubiiu/DynamiCrafter_1024", "DynamiCrafter 1024, 576x1024, 16 frames",
                  _dynamicrafter("1024"), "model.ckpt"),
        ModelSpec("dynamicrafter-256", "Doubiiu/DynamiCrafter", "DynamiCrafter 256, 256x256, 16 frames (eps)",
                  _dynamicrafter("256"), "model.ckpt"),
        ModelSpec("dynamicrafter-512-interp", "Doubiiu/DynamiCrafter_512_Interp",
                  "DynamiCrafter 512 frame interpolation / looping, 320x512, 16 frames", _dynamicrafter("512_interp"),
                  "model.ckpt"),
        ModelSpec("opensora", "hpcai-tech/OpenSora-STDiT-v3",
                  "Open-Sora 1.2 (STDiT3-XL/2 + OpenSora-VAE-v1.2 + T5-XXL), 240x426, 51 frames (the paper's DiT "
                  "backbone); --model-path is the STDiT3 folder", _opensora("240p"), "model.safetensors"),
        *(
            ModelSpec(f"opensora-{res}", "hpcai-tech/OpenSora-STDiT-v3",
                      f"Open-Sora 1.2 at {res} (9:16), 51 frames", _opensora(res), "model.safetensors")
            for res in ("360p", "480p", "720p")
        ),
        ModelSpec("tiny-opensora", None,
                  "Open-Sora 1.2 architecture with random weights, 64x64, 17 frames: demonstrates the pipeline, "
                  "protects against nothing", _tiny_opensora),
        ModelSpec("svd", "stabilityai/stable-video-diffusion-img2vid",
                  "Stable Video Diffusion (U-Net), 576x1024, 14 frames", _svd("stabilityai/stable-video-diffusion-img2vid")),
        ModelSpec("svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt",
                  "Stable Video Diffusion XT, 576x1024, 25 frames", _svd("stabilityai/stable-video-diffusion-img2vid-xt")),
        ModelSpec("tiny-svd", None,
                  "Stable Video Diffusion architecture with random weights, 64x64, 8 frames: protects against nothing",
                  _tiny_svd),
        ModelSpec("wan-i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                  "Wan 2.1 image-to-video 14B, each photo at its aspect ratio within 480x832 pixels, 81 frames "
                  "(wan-i2v-720p for the 720P weights)", _wan()),
        ModelSpec("wan-i2v-720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
                  "Wan 2.1 image-to-video 14B 720P, each photo at its aspect ratio within 720x1280 pixels, 81 frames",
                  _wan((720, 1280))),
        ModelSpec("tiny-wan-i2v", None,
                  "Wan 2.1 I2V architecture with random weights, 64x64, 9 frames: protects against nothing",
                  _tiny_wan("2.1")),
        ModelSpec("wan2.2-i2v", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                  "Wan 2.2 image-to-video A14B (two 14B experts split at a timestep), each photo at its aspect ratio "
                  "within 480x832 pixels, 81 frames",
                  _wan()),
        ModelSpec("wan2.2-i2v-720p", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                  "Wan 2.2 image-to-video A14B at 720P, each photo at its aspect ratio within 720x1280 pixels, "
                  "81 frames", _wan((720, 1280))),
        ModelSpec("tiny-wan2.2-i2v", None,
                  "Wan 2.2 I2V-A14B architecture (two experts) with random weights, 64x64, 9 frames: protects "
                  "against nothing", _tiny_wan("2.2-a14b")),
        ModelSpec("wan2.2-ti2v", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                  "Wan 2.2 TI2V-5B (first-frame conditioning, 48-channel VAE), each photo cropped to its aspect ratio "
                  "within 704x1280 pixels, 121 frames",
                  _wan()),
        ModelSpec("tiny-wan2.2-ti2v", None,
                  "Wan 2.2 TI2V-5B architecture with random weights, 64x64, 9 frames: protects against nothing",
                  _tiny_wan("2.2-ti2v")),
        ModelSpec("ltx-i2v", "Lightricks/LTX-Video", "LTX-Video image-to-video (DiT), 512x704, 161 frames", _ltx),
        ModelSpec("tiny-ltx-i2v", None,
                  "LTX-Video architecture with random weights, 64x64, 9 frames: protects against nothing", _tiny_ltx),
        ModelSpec("hunyuan-i2v", "hunyuanvideo-community/HunyuanVideo-I2V",
                  "HunyuanVideo-I2V (MM-DiT), each photo cropped to its 720p size bucket, 129 frames", _hunyuan()),
        *(
            ModelSpec(f"hunyuan-i2v-{res}", "hunyuanvideo-community/HunyuanVideo-I2V",
                      f"HunyuanVideo-I2V, each photo cropped to its {res} size bucket, 129 frames", _hunyuan(size))
            for res, size in (("540p", (544, 960)), ("360p", (368, 640)))
        ),
        ModelSpec("tiny-hunyuan-i2v", None,
                  "HunyuanVideo-I2V architecture with random weights, 64x64, 9 frames: protects against nothing",
                  _tiny_hunyuan),
        ModelSpec("tiny-dynamicrafter", None,
                  "DynamiCrafter architecture with random weights, 32x32, 4 frames: demonstrates the pipeline, "
                  "protects against nothing", _tiny_dynamicrafter),
    )
}


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` -> dtype; None picks bf16 on GPU and fp32 on CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ConfigError(f"unknown dtype '{name}'; choose bf16, fp16 or fp32")
    return table[name]


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` or a ModelError listing the known names."""
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}'; `anti-i2v models` lists them: {', '.join(MODELS)}")
    return MODELS[name]


def available_locally(source: str | Path, index_file: str) -> bool:
    """Whether ``source`` (a file, a folder, or a hub id in the local cache) holds ``index_file``."""
    if Path(source).is_file():
        return True
    if Path(source).is_dir():
        return (Path(source) / index_file).is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(str(source), index_file), str)
    except ValueError:  # not a valid repo id
        return False


def weights_present(spec: ModelSpec, path: str | Path | None = None) -> bool:
    """Whether weights for ``spec`` can be loaded without a download."""
    if spec.is_tiny:
        return True
    return available_locally(path if path is not None else spec.hub_id, spec.weights_file)


def model_identity(name: str, path: str | Path | None = None) -> tuple[str, str]:
    """The name and weights that `load_model` (``name``, ``path``) gives its model, without loading it:
    what a sidecar records of the model a photo was protected against."""
    spec = get_spec(name)
    if spec.is_tiny:
        if path is not None:
            raise ConfigError(f"'{name}' is built in code and takes no --model-path")
        return spec.name, "built in code"
    return spec.name, str(path) if path is not None else spec.hub_id


def load_model(
    name: str,
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    memory: str = "full",
    compile: bool = False,
    attention: str = "auto",
) -> VideoModel:
    """Build the adapter for ``name``: tiny in code, or released weights (hub id or ``path``), set up
    for the memory mode ``memory`` (`anti_i2v.memory`: full, offload or sequential), with its denoiser
    blocks compiled when ``compile`` and the attention kernel ``attention`` (`anti_i2v.acceleration`), in
    ``dtype`` (default: bf16 on a GPU, fp32 on the CPU; fp32 for a tiny model unless asked)."""
    from anti_i2v.acceleration import check_attention_kernel, compile_denoiser, use_attention_kernel
    from anti_i2v.memory import apply_memory_mode, check_memory_mode, deferred_placement

    check_memory_mode(memory)
    check_attention_kernel(attention)
    spec = get_spec(name)
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError as err:
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    # a tiny model keeps fp32 unless asked: it checks the pipeline, whose numbers bf16 would only blur
    torch_dtype = torch.float32 if spec.is_tiny and dtype is None else parse_dtype(dtype, device)
    identity = model_identity(name, path)
    if path is not None and not Path(path).exists():
        raise ModelError(f"--model-path '{path}' does not exist; point it at the downloaded weights")
    source = None if spec.is_tiny else identity[1]
    logger.info("loading %s from %s on %s (%s, memory mode %s)", name, identity[1], device, torch_dtype, memory)
    # streamed blocks never reach the accelerator all at once, not even while loading
    with deferred_placement() if memory == "sequential" else contextlib.nullcontext():
        model = spec.build(source, device, torch_dtype)
    model.name, model.source = identity  # what a sidecar records
    apply_memory_mode(model, memory)
    use_attention_kernel(model, attention)
    return compile_denoiser(model) if compile else model
