"""Every backbone at its released size, with random weights, for speed and memory measurements.

Random weights have the real speed and memory, and nothing is downloaded. Each builder
takes gradient checkpointing and a device: ``cuda`` to measure, or ``meta`` to build
without memory (parameter counts, construction checks). Each conditions its model on
random prompt embeddings of the released shape, standing in for the text encoder, which
the tool frees before optimising.

    python benchmarks/full_size.py                     # parameter counts, as JSON (meta device)
    python benchmarks/full_size.py --meta-step svd-xt  # one full-size step on the meta device
    python benchmarks/full_size.py --memory-plan cogvideox  # weights on the GPU per memory mode
    python benchmarks/full_size.py --flops cogvideox  # TFLOPs per optimisation step, per objective and frames
    python benchmarks/full_size.py --peak-memory cogvideox  # estimated peak GPU memory per memory mode
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anti_i2v.config import DEFAULT_PROMPT, ProtectConfig  # noqa: E402
from anti_i2v.errors import ConfigError  # noqa: E402
from anti_i2v.methods import get_method  # noqa: E402
from anti_i2v.models.base import VideoModel  # noqa: E402
from anti_i2v.objectives import AntiI2VObjective, draw_step  # noqa: E402
from anti_i2v.offload import module_bytes, weight_bytes  # noqa: E402

BF16 = torch.bfloat16
PAPER_MODELS = ("cogvideox", "dynamicrafter-512", "opensora")

# Released configurations that differ from the diffusers defaults (the model repos' config.json).
_CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
_SVD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=4, sample_size=768)
_WAN21_I2V_14B = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)  # else the 14B defaults
_WAN22_A14B = dict(in_channels=36)  # two experts of the 14B layout, no image cross-attention
_WAN22_TI2V_5B = dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48)
_WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                  patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
_HUNYUAN_I2V = dict(in_channels=33, image_condition_type="latent_concat", guidance_embeds=False)


def _build_device(device: str) -> str:
    """Where a builder creates the weights: the CPU while placement is deferred (`--memory sequential`
    builds a model too large for the GPU there, and the memory mode places it), else ``device``."""
    from anti_i2v.models import diffusers_common

    return "cpu" if diffusers_common.DEFER_PLACEMENT and device != "meta" else device


def cogvideox(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """CogVideoX-5B-I2V: 480x720, 49 frames."""
    from anti_i2v.models.cogvideox import FULL_TRANSFORMER, FULL_VAE, CogVideoXI2V, random_pipeline

    with torch.device(_build_device(device)):
        pipe = random_pipeline(FULL_TRANSFORMER, FULL_VAE)
    model = CogVideoXI2V(pipe, name="cogvideox-5b-random", device=device, dtype=BF16,
                         gradient_checkpointing=gradient_checkpointing)
    embeds = torch.randn(1, FULL_TRANSFORMER["max_text_seq_length"], FULL_TRANSFORMER["text_embed_dim"])
    model.use_prompt_embeds(embeds, label=DEFAULT_PROMPT)
    return model


def dynamicrafter_512(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """DynamiCrafter 512: 320x512, 16 frames."""
    from anti_i2v.models.dynamicrafter.adapter import DynamiCrafterI2V
    from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel

    with torch.device(_build_device(device)):
        net = DynamiCrafterModel("512")
    model = DynamiCrafterI2V(net, name="dynamicrafter-512-random", device=device, dtype=BF16,
                             gradient_checkpointing=gradient_checkpointing)
    model.use_prompt_embeds(torch.randn(1, 77, net.config.unet["context_dim"]), label=DEFAULT_PROMPT)
    return model


def opensora(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """Open-Sora 1.2 (STDiT3-XL/2 + its VAE): 240x426, 51 frames."""
    from anti_i2v.models.opensora.adapter import OpenSoraI2V
    from anti_i2v.models.opensora.checkpoint import build_stdit3, build_vae
    from anti_i2v.models.opensora.configs import get_config

    config = get_config("opensora-v1.2")
    with torch.device(_build_device(device)):
        stdit3, vae = build_stdit3(config.stdit3), build_vae(config.vae)
    model = OpenSoraI2V(stdit3, vae, None, config, name="opensora-random", device=device, dtype=BF16,
                        gradient_checkpointing=gradient_checkpointing)
    length = config.model_max_length
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, :20] = 1  # a 20-token prompt
    model.use_prompt_embeds(torch.randn(1, 1, length, config.stdit3["caption_channels"]), mask, label=DEFAULT_PROMPT)
    return model


def svd_xt(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """Stable Video Diffusion XT: 576x1024, 25 frames (the released U-Net config: the defaults, sample size 96)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from anti_i2v.models.svd import SCHEDULER, StableVideoDiffusionI2V

    with torch.device(_build_device(device)):  # schedulers stay outside: they compute on the CPU
        vae = AutoencoderKLTemporalDecoder(**_SVD_VAE)
        unet = UNetSpatioTemporalConditionModel(sample_size=96, num_frames=25)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_CLIP_VIT_H))
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    return StableVideoDiffusionI2V(pipe, name="svd-xt-random", device=device, dtype=BF16,
                                   gradient_checkpointing=gradient_checkpointing)


def _wan(name: str, device: str, gradient_checkpointing: bool, transformer: dict, vae: dict, two_experts: bool,
         expand_timesteps: bool, clip: bool, **kwargs) -> VideoModel:
    """A Wan image-to-video model of the given layout, random weights, no text encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from anti_i2v.models.wan import RELEASED_BOUNDARY_22_A14B, RELEASED_MAX_SEQUENCE_LENGTH, WanI2V

    with torch.device(_build_device(device)):
        experts = [WanTransformer3DModel(**transformer) for _ in range(2 if two_experts else 1)] + [None]
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**_CLIP_VIT_H)) if clip else None
        autoencoder = AutoencoderKLWan(**vae)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        image_processor=None, image_encoder=image_encoder, transformer=experts[0], transformer_2=experts[1],
        boundary_ratio=RELEASED_BOUNDARY_22_A14B if two_experts else None, expand_timesteps=expand_timesteps,
    )
    model = WanI2V(pipe, name=name, device=device, dtype=BF16, gradient_checkpointing=gradient_checkpointing, **kwargs)
    model.use_prompt_embeds(torch.randn(1, RELEASED_MAX_SEQUENCE_LENGTH, 4096), label=DEFAULT_PROMPT)
    return model


def wan21_i2v(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """Wan 2.1 I2V 14B (480P): 480x832, 81 frames, CLIP ViT-H image tokens."""
    return _wan("wan-i2v-random", device, gradient_checkpointing, _WAN21_I2V_14B, {}, two_experts=False,
                expand_timesteps=False, clip=True)


def wan22_i2v(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """Wan 2.2 I2V-A14B: two 14B experts, 480x832, 81 frames."""
    return _wan("wan2.2-i2v-random", device, gradient_checkpointing, _WAN22_A14B, {}, two_experts=True,
                expand_timesteps=False, clip=False)


def wan22_ti2v(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """Wan 2.2 TI2V-5B: 704x1280, 121 frames, 48-channel VAE."""
    from anti_i2v.models.wan import RELEASED_TI2V, RELEASED_TI2V_FRAMES

    return _wan("wan2.2-ti2v-random", device, gradient_checkpointing, _WAN22_TI2V_5B, _WAN22_VAE, two_experts=False,
                expand_timesteps=True, clip=False, resolution=RELEASED_TI2V, num_frames=RELEASED_TI2V_FRAMES)


def ltx_i2v(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """LTX-Video 2B (the diffusers defaults are the release's): 512x704, 161 frames."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline
    from diffusers import LTXVideoTransformer3DModel

    from anti_i2v.models.ltx import RELEASED_MAX_SEQUENCE_LENGTH, LTXVideoI2V

    with torch.device(_build_device(device)):
        vae, transformer = AutoencoderKLLTXVideo(), LTXVideoTransformer3DModel()
    pipe = LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   tokenizer=None, transformer=transformer)
    model = LTXVideoI2V(pipe, name="ltx-i2v-random", device=device, dtype=BF16,
                        gradient_checkpointing=gradient_checkpointing)
    model.use_prompt_embeds(torch.randn(1, RELEASED_MAX_SEQUENCE_LENGTH, 4096), label=DEFAULT_PROMPT)
    return model


def hunyuan_i2v(gradient_checkpointing: bool, device: str = "cuda") -> VideoModel:
    """HunyuanVideo-I2V 13B (latent concat): 720x1280, 129 frames."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    from anti_i2v.models.hunyuan import RELEASED_MAX_SEQUENCE_LENGTH, HunyuanVideoI2V

    with torch.device(_build_device(device)):
        transformer, vae = HunyuanVideoTransformer3DModel(**_HUNYUAN_I2V), AutoencoderKLHunyuanVideo()
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        image_processor=None,
    )
    model = HunyuanVideoI2V(pipe, name="hunyuan-i2v-random", device=device, dtype=BF16,
                            gradient_checkpointing=gradient_checkpointing)
    model.use_prompt_embeds(torch.randn(1, RELEASED_MAX_SEQUENCE_LENGTH, 4096), torch.randn(1, 768),
                            label=DEFAULT_PROMPT)
    return model


FULL_SIZE: dict[str, Callable[..., VideoModel]] = {
    "cogvideox": cogvideox,
    "dynamicrafter-512": dynamicrafter_512,
    "opensora": opensora,
    "svd-xt": svd_xt,
    "wan-i2v": wan21_i2v,
    "wan2.2-i2v": wan22_i2v,
    "wan2.2-ti2v": wan22_ti2v,
    "ltx-i2v": ltx_i2v,
    "hunyuan-i2v": hunyuan_i2v,
}


def parameter_counts() -> dict[str, dict]:
    """Build every configuration on the meta device: its shape, weight size and parameters per module."""
    counts = {}
    for name, build in FULL_SIZE.items():
        model = build(True, device="meta")
        modules = model.weight_modules()
        counts[name] = {
            "resolution": list(model.resolution),
            "frames": model.num_frames,
            "denoiser_blocks": len(model.layers().denoiser),
            "weights_gib_bf16": round(weight_bytes(model) / 2**30, 2),
            "billion_parameters": [
                [type(m).__name__, round(sum(p.numel() for p in m.parameters()) / 1e9, 3)] for m in modules
            ],
        }
    return counts


def meta_step(name: str) -> dict:
    """One forward and backward pass of the Anti-I2V terms on the meta device, at full size.

    Checks every shape of the adapter's path (conditioning, token layout, taps, loss,
    gradient to the photo) at the released size, in seconds and without memory. Both
    ends of the timestep range are run, so that a two-expert model runs each expert.
    """
    model = FULL_SIZE[name](True, device="meta")
    x = torch.rand(1, 3, *model.resolution).to("meta")
    objective = AntiI2VObjective(model, ProtectConfig())
    objective.prepare(model, x)
    record = {"latents": list(objective.latent_shape())}
    for t in (100, 950):
        draw = draw_step(torch.Generator().manual_seed(0), objective.latent_shape(), (t, t))
        image = x.clone().requires_grad_(True)
        encoded = model.encode_image(image, objective.vae_layers)
        result = model.denoise(encoded, objective.video_latents, draw.t, draw.noise, objective.denoiser_taps(),
                               with_loss=True)
        features = [*result.features.values(), *encoded.features.values()]
        loss = result.loss + sum(f.float().pow(2).mean() for f in features)
        (grad,) = torch.autograd.grad(loss, image)
        record[f"t{t}"] = {"features": {k: list(v.shape) for k, v in result.features.items()},
                           "gradient": list(grad.shape)}
    # the default's objective as the tool runs it (the family's settings; one guided sampler step and one
    # pooled noise, which take the shapes of every step without the cost)
    config = ProtectConfig.from_preset(families=[model.family], sampler_steps=1, sampler_noise_pool=1)
    default = get_method(config.method).build(model, config, None, None)
    default.prepare(model, x)
    image = x.clone().requires_grad_(True)
    output = default(image, draw_step(torch.Generator().manual_seed(0), default.latent_shape(), (500, 500)))
    record["default"] = {"terms": sorted(output.parts), "gradient": list(torch.autograd.grad(output.loss, image)[0].shape)}
    return record


def _t5_xxl(device: str) -> torch.nn.Module:
    """The T5-XXL v1.1 encoder CogVideoX conditions on (4.8 B parameters), random weights, bf16."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device(_build_device(device)):
        return T5EncoderModel(config).to(BF16)


def memory_plan(name: str) -> dict:
    """Weights on the accelerator at the worst moment of each memory mode (`anti_i2v.memory`), on the
    meta device; CogVideoX gets its T5-XXL text encoder (the others here are built without theirs).
    Working memory (activations, gradients) is measured on a GPU (`bench_photo.py`)."""
    from anti_i2v.config import MEMORY_MODES
    from anti_i2v.memory import resident_weight_bytes

    model = FULL_SIZE[name](True, device="meta")
    if name == "cogvideox":
        model.pipe.text_encoder = _t5_xxl("meta")
    gib = 1024**3
    return {mode: round(resident_weight_bytes(model, mode) / gib, 2) for mode in MEMORY_MODES}


def peak_memory(name: str, spec: str = "anti-i2v", shares: tuple[float, ...] = (1.0,)) -> list[dict]:
    """Estimated peak accelerator memory of a protection in each memory mode, in GiB, on a share of
    the frames: the weights the mode keeps on the accelerator (`memory_plan`) plus the working
    memory of the method's preparation and of one optimisation step, counted on the meta device
    as a GPU runs them (checkpointed denoiser blocks, and sampler passes but in ``max``; fused
    attention; `memory_estimate`). ``sequential`` keeps what autograd saves in the VAE encoder
    in CPU memory. A step's peak is every step's: nothing carries over from one to the next."""
    from anti_i2v.config import MEMORY_MODES
    from anti_i2v.memory import layer_modules, resident_weight_bytes
    from memory_estimate import LiveTensorBytes, fused_attention, host_saved_tensors
    from strength import parse_method

    model = FULL_SIZE[name](True, device="meta")
    if name == "cogvideox":
        model.pipe.text_encoder = _t5_xxl("meta")
    x = torch.rand(1, 3, *model.resolution).to("meta")
    method, overrides = parse_method(spec)
    config = ProtectConfig.from_preset(families=[model.family], method=method, **{**overrides, "reference": "repeat"})
    gib = 1024**3
    text_bytes = module_bytes(model.text_encoders())

    def working(mode: str) -> tuple[int, int]:
        objective = get_method(method).build(model, config, None, None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_attention())
            stack.callback(setattr, model, "memory_mode", model.memory_mode)
            model.memory_mode = mode  # read by the sampler (`max` keeps its passes' activations)
            if mode == "sequential":
                stack.enter_context(host_saved_tensors(layer_modules(model, "vae_encoder")))
            with LiveTensorBytes() as counted:
                objective.prepare(model, x)
                prepared = counted.peak
                draw = draw_step(torch.Generator().manual_seed(0), objective.latent_shape(), (500, 500))
                counted.reset_peak()
                image = x.clone().requires_grad_(True)
                torch.autograd.grad(objective(image, draw).loss, image)
                return prepared, counted.peak

    rows = []
    for share in shares:
        with model.fewer_frames(share) as frames:
            row: dict = {"frames": frames, "frame_share": share, "method": spec}
            for mode in MEMORY_MODES:
                if mode == "sequential" and not model.checkpoints_whole_blocks:
                    continue
                prepared, step = working(mode)
                weights = resident_weight_bytes(model, mode)
                # once the prompt is encoded the text encoder is freed (max, full) or was never on the accelerator
                after_prompt = weights - (text_bytes if mode in ("max", "full") else 0)
                row[mode] = {"weights_gib": round(weights / gib, 2),
                             "prepare_working_gib": round(prepared / gib, 2),
                             "step_working_gib": round(step / gib, 2),
                             "peak_gib": round(max(weights, after_prompt + max(prepared, step)) / gib, 2)}
            rows.append(row)
    return rows


# the objectives counted per step: AdvDM's, the default's, and with every sampler step guided (the
# former default) with its clean runs pooled, with fresh noise every step (a clean run per step), and
# with two sampler steps (pooled)
FLOP_SPECS = ("advdm", "anti-i2v", "anti-i2v:sampler_guided_steps=0;sampler_noise_pool=4",
              "anti-i2v:sampler_guided_steps=0;sampler_noise_pool=0",
              "anti-i2v:sampler_steps=2;sampler_guided_steps=0;sampler_noise_pool=4")


def step_flops(name: str, shares: tuple[float, ...] = (1.0, 0.5, 0.25), specs: tuple[str, ...] = FLOP_SPECS
               ) -> list[dict]:
    """TFLOPs of one optimisation step at full size, counted on the meta device, for each method
    spec (``name:key=value;...``, the model family's own settings applied) on a share of the frames:
    the objective's own forward pass and its gradient to the photo. What ``prepare`` computes once
    (the pooled clean runs) is not counted, nor gradient checkpointing's recomputation (on a GPU
    one more forward pass of what is differentiated, two for the sampler's passes but in
    ``--memory max``): the model is built without checkpointing and its sampler passes kept."""
    from torch.utils.flop_counter import FlopCounterMode

    from strength import parse_method

    model = FULL_SIZE[name](False, device="meta")
    model.memory_mode = "max"  # the sampler's passes are not checkpointed (recomputed) either
    x = torch.rand(1, 3, *model.resolution).to("meta")

    def tflops(spec: str) -> float:
        method, overrides = parse_method(spec)
        # a generated reference video (AdvDM's) is made once, and the meta device cannot sample it
        config = ProtectConfig.from_preset(families=[model.family], method=method, **{**overrides, "reference": "repeat"})
        # a step costs the same whatever the pool's size: one pooled noise is enough to count it
        config = dataclasses.replace(config, sampler_noise_pool=min(config.sampler_noise_pool, 1))
        objective = get_method(method).build(model, config, None, None)
        objective.prepare(model, x)
        draw = draw_step(torch.Generator().manual_seed(0), objective.latent_shape(), (500, 500))
        image = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(objective(image, draw).loss, image)
        return round(counter.get_total_flops() / 1e12, 1)

    rows = []
    for share in shares:
        try:
            model.frame_count_for(share)
        except ConfigError:  # an adapter with a fixed frame count
            continue
        with model.fewer_frames(share) as frames:
            rows.append({"frames": frames, "frame_share": share, **{spec: tflops(spec) for spec in specs}})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-step", default=None, help="models to run one full-size step on the meta device")
    parser.add_argument("--memory-plan", default=None,
                        help="models whose weights on the accelerator per memory mode to print, in GiB")
    parser.add_argument("--flops", default=None, help="models whose TFLOPs per optimisation step to count")
    parser.add_argument("--peak-memory", default=None, help="models whose peak accelerator memory per mode to estimate")
    parser.add_argument("--method", default="anti-i2v", help="the method whose peak memory to estimate (a spec)")
    parser.add_argument("--frame-shares", default="1", help="shares of the frames to estimate the peak memory at")
    args = parser.parse_args()
    if args.peak_memory:
        shares = tuple(float(s) for s in args.frame_shares.split(","))
        print(json.dumps({name: peak_memory(name, args.method, shares) for name in args.peak_memory.split(",")},
                         indent=2))
    if args.flops:
        print(json.dumps({name: step_flops(name) for name in args.flops.split(",")}, indent=2))
    if args.memory_plan:
        print(json.dumps({name: memory_plan(name) for name in args.memory_plan.split(",")}, indent=2))
    if args.meta_step:
        print(json.dumps({name: meta_step(name) for name in args.meta_step.split(",")}, indent=2))
    if not (args.memory_plan or args.meta_step or args.flops or args.peak_memory):
        print(json.dumps(parameter_counts(), indent=2))
    sys.exit(0)
