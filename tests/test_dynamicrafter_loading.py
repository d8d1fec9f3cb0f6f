"""DynamiCrafter conditioning encoders, VAE, configs and official-checkpoint loading (CPU, offline).

* Key/shape parity with the official checkpoints: the port, built full size on the meta device, maps
  back onto every key of ``keys/dynamicrafter_{256,512,1024}.tsv`` (shape included) except the
  documented ignore list, and a strict load of a meta tensor dict made from the tsv succeeds.
* Parameter counts of the original release 2.1.
* Numerics on tiny models: official-named random weights give the same outputs through the key maps as
  independent references (diffusers' own LDM-VAE converter; OpenCLIP-style text/image towers written
  here with ``F.multi_head_attention_forward``, the kernel of ``nn.MultiheadAttention`` that OpenCLIP
  uses), the penultimate-layer semantics, the kornia-style pre-processing, and a full round trip.
* Checkpoint files: Lightning / DeepSpeed / safetensors layouts, the 256 rename, safe unpickling.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anti_i2v.errors import ConfigError, ModelError
from anti_i2v.models.dynamicrafter import checkpoint as ckpt_mod
from anti_i2v.models.dynamicrafter.checkpoint import (
    convert_to_safetensors,
    load_checkpoint,
    normalize_official_keys,
)
from anti_i2v.models.dynamicrafter.configs import VARIANTS, get_config, normalize_variant
from anti_i2v.models.dynamicrafter.encoders import (
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    image_ignored_keys,
    text_ignored_keys,
    tiny_clip_tokenizer,
    tokenize,
)
from anti_i2v.models.dynamicrafter.vae import (
    build_vae,
    diffusers_to_ldm_vae_key,
    ldm_to_diffusers_vae_key,
    vae_key_rules,
)

FULL_VARIANTS = ("256", "512", "1024")
# the original release, measured on the original modules (checkpoint tensors, ignored ones included)
PORTS_COUNTS_M = {"first_stage_model": 83.65, "cond_stage_model": 354.0, "embedder": 683.8, "image_proj_model": 48.8}
UNET_PARAMS = 1_438_854_980
TINY = get_config("tiny")


def _tsv_path(variant: str) -> Path:
    name = f"dynamicrafter_{variant}.tsv"
    candidates = [Path(__file__).parent / "fixtures" / "ports" / "keys" / name]
    env = os.environ.get("ANTI_I2V_PORT_FIXTURES")
    if env:
        candidates.append(Path(env) / "keys" / name)
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ports" / "keys" / name)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        pytest.skip(f"{name} not available")
    return found


def _official_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in _tsv_path(variant).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(d) for d in shape.strip("()[] ").replace(" ", "").split(",") if d)
    return out


def _needs_full_model() -> None:
    pytest.importorskip("anti_i2v.models.dynamicrafter.unet")
    pytest.importorskip("anti_i2v.models.dynamicrafter.resampler")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and persistent buffer redrawn, so zero-initialised layers are live."""
    state = module.state_dict()
    fresh = _random_like({k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}, seed)
    with torch.no_grad():
        for k, v in fresh.items():
            state[k].copy_(v)


def _random_like(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        fan_in = max(1, math.prod(s[1:])) if len(s) > 1 else 1
        scale = min(0.2, max(0.02, fan_in**-0.5)) if len(s) > 1 else 0.05
        t = torch.randn(s, generator=g) * scale
        if len(s) == 1 and any(n in k for n in ("norm", "ln_", "layer_norm")) and k.endswith("weight"):
            t = t + 1.0
        out[k] = t
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = (a.double() - b.double()).abs().max().item()
    scale = max(b.double().abs().max().item(), 1e-12)
    assert err <= tol * scale, f"max|diff| {err:.3g} > {tol:g} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------


def test_released_configs_follow_the_official_yamls_and_scripts():
    c256, c512, c1024, ci = (get_config(v) for v in ("256", "512", "1024", "512_interp"))
    assert (c256.hub_repo, c512.hub_repo, c1024.hub_repo, ci.hub_repo) == (
        "Doubiiu/DynamiCrafter",
        "Doubiiu/DynamiCrafter_512",
        "Doubiiu/DynamiCrafter_1024",
        "Doubiiu/DynamiCrafter_512_Interp",
    )
    assert {c.filename for c in (c256, c512, c1024, ci)} == {"model.ckpt"}
    assert (c256.resolution, c512.resolution, c1024.resolution) == ((256, 256), (320, 512), (576, 1024))
    assert (c512.latent_size, c1024.latent_size, c256.latent_size) == ((40, 64), (72, 128), (32, 32))
    assert (c256.default_fs, c512.default_fs, c1024.default_fs, ci.default_fs) == (3, 24, 10, 5)
    assert (c256.unet["default_fs"], c512.unet["default_fs"], c1024.unet["default_fs"], ci.unet["default_fs"]) == (3, 24, 10, 24)
    assert c256.parameterization == "eps" and not c256.rescale_betas_zero_snr and not c256.use_dynamic_rescale
    assert c256.timestep_spacing == "uniform" and c256.guidance_rescale == 0.0 and c256.fs_type == "frame_stride"
    assert c256.unet["image_cross_attention_scale_learnable"] is True
    for c in (c512, c1024, ci):
        assert c.parameterization == "v" and c.rescale_betas_zero_snr and c.use_dynamic_rescale
        assert c.timestep_spacing == "uniform_trailing" and c.guidance_rescale == 0.7
        assert "image_cross_attention_scale_learnable" not in c.unet
    assert (c512.base_scale, c1024.base_scale, ci.base_scale) == (0.7, 0.3, 0.7)
    assert ci.interp and not c512.interp
    for c in (c256, c512, c1024, ci):
        assert c.frames == 16 and c.scale_factor == 0.18215 and c.guidance_scale == 7.5 and c.ddim_steps == 50
        assert c.unet["temporal_length"] == 16 and c.resampler["video_length"] == 16
    # sub-dicts are not shared between calls
    get_config("512").unet["model_channels"] = 1
    assert get_config("512").unet["model_channels"] == 320


def test_variant_names_and_tiny_config():
    assert set(VARIANTS) == {"256", "512", "1024", "512_interp", "tiny"}
    assert normalize_variant(512) == "512" and normalize_variant("DynamiCrafter-512-Interp") == "512_interp"
    with pytest.raises(ConfigError, match="unknown DynamiCrafter variant"):
        get_config("768")
    assert TINY.is_tiny and TINY.hub_repo is None
    assert TINY.unet["context_dim"] == TINY.text["width"] == TINY.resampler["output_dim"]
    assert TINY.resampler["embedding_dim"] == TINY.vision["width"]
    assert TINY.unet["temporal_length"] == TINY.resampler["video_length"] == TINY.frames
    assert len(tiny_clip_tokenizer()) <= TINY.text["vocab_size"]


# ---------------------------------------------------------------------------------------------------
# key/shape parity, full size on the meta device
# ---------------------------------------------------------------------------------------------------


def _component_official(prefix, module, rules):
    sd = module.state_dict()
    return {prefix + r.official: tuple(r.to_official([sd[k] for k in r.ours]).shape) for r in rules}


@pytest.mark.parametrize("variant", FULL_VARIANTS)
def test_encoders_and_vae_map_onto_the_official_keys(variant):
    """Runs without the UNet: VAE, text and image towers against their tsv slices."""
    cfg, official = get_config(variant), _official_shapes(variant)
    with torch.device("meta"):
        vae = build_vae(**cfg.vae)
        text = OpenCLIPTextEncoder(**cfg.text)
        image = OpenCLIPImageEncoder(**cfg.vision)
    parts = [
        ("first_stage_model.", vae, vae_key_rules(vae), {}),
        ("cond_stage_model.", text, text.key_rules(), text.ignored_keys()),
        ("embedder.", image, image.key_rules(), image.ignored_keys()),
    ]
    for prefix, module, rules, ignored in parts:
        got = _component_official(prefix, module, rules)
        sliced = {k: s for k, s in official.items() if k.startswith(prefix)}
        assert all(prefix + k in sliced for k in ignored), f"{prefix}: ignore list names keys the checkpoint lacks"
        expected = {k: s for k, s in sliced.items() if k[len(prefix) :] not in ignored}
        assert got == expected, f"{prefix}: {sorted(set(got) ^ set(expected))[:5]}"
        covered = [k for r in rules for k in r.ours]
        assert sorted(covered) == sorted(module.state_dict()), f"{prefix}: rules do not cover the module exactly"
        # parameter counts: ours + ignored = the checkpoint's = the original release
        name = prefix[:-1]
        ckpt_count = sum(math.prod(s) for s in sliced.values())
        ignored_count = sum(math.prod(sliced[prefix + k]) for k in ignored)
        assert sum(p.numel() for p in module.parameters()) + ignored_count == ckpt_count
        digits = 2 if name == "first_stage_model" else 1
        assert round(ckpt_count / 1e6, digits) == PORTS_COUNTS_M[name]


@pytest.mark.parametrize("variant", (*FULL_VARIANTS, "512_interp"))
def test_full_model_state_dict_is_the_official_one_minus_the_ignore_list(variant):
    _needs_full_model()
    from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel

    official = _official_shapes("512" if variant == "512_interp" else variant)  # same network as 512
    with torch.device("meta"):
        model = DynamiCrafterModel(variant)
    ignored = model.ignored_official_keys()
    assert set(ignored) <= set(official)
    assert all(reason for reason in ignored.values())
    ours_as_official = {k: tuple(v.shape) for k, v in model.official_state_dict().items()}
    expected = {k: s for k, s in official.items() if k not in ignored}
    assert ours_as_official == expected, sorted(set(ours_as_official) ^ set(expected))[:8]

    # strict load of the whole tsv as meta tensors (nothing allocated), ignored keys included
    state = {k: torch.empty(s, device="meta") for k, s in official.items()}
    report = model.load_official_state_dict(state, assign=True)
    assert sorted(report.ignored) == sorted(ignored)
    assert report.loaded == len(model.state_dict())
    assert not report.missing and not report.unexpected

    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    extra_alpha = 16 if variant == "256" else 0  # one learnable image-attention scale per spatial transformer
    assert counts["model"] == UNET_PARAMS + extra_alpha
    assert round(counts["image_proj_model"] / 1e6, 1) == PORTS_COUNTS_M["image_proj_model"]
    for name in ("first_stage_model", "cond_stage_model", "embedder"):
        ignored_count = sum(math.prod(official[k]) for k in ignored if k.startswith(name + "."))
        digits = 2 if name == "first_stage_model" else 1
        assert round((counts[name] + ignored_count) / 1e6, digits) == PORTS_COUNTS_M[name]
    buffers = {n for n, _ in model.named_buffers(recurse=False)}
    assert ("scale_arr" in buffers) == (variant != "256")


def test_ignore_list_is_exactly_the_documented_one():
    text = text_ignored_keys(24)
    assert set(text) == {"model.text_projection", "model.logit_scale"} | {
        k for k in text if k.startswith("model.transformer.resblocks.23.")
    }
    assert len(text) == 2 + 12
    assert set(image_ignored_keys()) == {
        "model.visual.proj",
        "model.token_embedding.weight",
        "model.positional_embedding",
        "model.ln_final.weight",
        "model.ln_final.bias",
        "model.text_projection",
        "model.logit_scale",
    }


def test_vae_key_map_reverses_the_decoder_levels_and_reshapes_attention():
    assert ldm_to_diffusers_vae_key("decoder.up.0.block.2.conv1.weight", 4) == ("decoder.up_blocks.3.resnets.2.conv1.weight", "copy")
    assert ldm_to_diffusers_vae_key("decoder.up.3.upsample.conv.bias", 4) == ("decoder.up_blocks.0.upsamplers.0.conv.bias", "copy")
    assert ldm_to_diffusers_vae_key("encoder.down.1.block.0.nin_shortcut.weight", 4)[0] == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert ldm_to_diffusers_vae_key("encoder.mid.attn_1.proj_out.weight", 4) == ("encoder.mid_block.attentions.0.to_out.0.weight", "conv1x1")
    assert diffusers_to_ldm_vae_key("decoder.mid_block.resnets.1.norm2.bias", 4) == "decoder.mid.block_2.norm2.bias"
    with pytest.raises(KeyError):
        ldm_to_diffusers_vae_key("encoder.down.0.attn.0.q.weight", 4)


# ---------------------------------------------------------------------------------------------------
# numerics on tiny towers, against independent references fed the official-named weights
# ---------------------------------------------------------------------------------------------------


def _official_named(module, rules, seed):
    sd = module.state_dict()
    shapes = {r.official: tuple(r.to_official([sd[k] for k in r.ours]).shape) for r in rules}
    return _random_like(shapes, seed)


def _load_rules(module, rules, official):
    ours = {}
    for r in rules:
        ours.update(zip(r.ours, r.to_ours(official[r.official])))
    module.load_state_dict(ours, strict=True)


def _ref_resblock(x, sd, p, heads, eps, mask=None):
    """OpenCLIP ResidualAttentionBlock (batch-first here; OpenCLIP 2.22 runs LND, same math)."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps).transpose(0, 1)
    a, _ = F.multi_head_attention_forward(
        h, h, h, d, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
    )
    x = x + a.transpose(0, 1)
    h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def test_text_encoder_matches_an_openclip_style_reference_and_is_the_penultimate_layer():
    cfg = TINY.text
    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(**cfg).eval()
    rules = enc.key_rules()
    official = _official_named(enc, rules, seed=1)
    # the checkpoint also holds the last resblock and the projection: give them values too
    for k in text_ignored_keys(cfg["layers"]):
        like = official[k.replace(f"resblocks.{cfg['layers'] - 1}.", "resblocks.0.")] if "resblocks" in k else None
        official[k] = torch.randn_like(like) if like is not None else torch.randn(cfg["projection_dim"], cfg["width"])
    _load_rules(enc, rules, official)

    ids = tokenize(tiny_clip_tokenizer(), ["a person talking to the camera", ""], cfg["context_length"])
    with torch.no_grad():
        ours = enc(ids)
        # reference: token + positional embedding, all resblocks but the last (causal mask), ln_final
        L = ids.shape[1]
        x = official["model.token_embedding.weight"][ids] + official["model.positional_embedding"][:L]
        mask = torch.full((L, L), float("-inf")).triu(1)
        for i in range(cfg["layers"] - 1):
            x = _ref_resblock(x, official, f"model.transformer.resblocks.{i}.", cfg["heads"], cfg["layer_norm_eps"], mask)
        ref = F.layer_norm(x, (cfg["width"],), official["model.ln_final.weight"], official["model.ln_final.bias"], cfg["layer_norm_eps"])
    assert ours.shape == (2, cfg["context_length"], cfg["width"])
    _close(ours, ref)

    # penultimate semantics: == hidden_states[-2] of the full-depth transformers model, then final_layer_norm
    full = OpenCLIPTextEncoder(**{**cfg, "layer": "last"}).eval()
    _load_rules(full, full.key_rules(), official)
    with torch.no_grad():
        out = full.transformer(input_ids=ids, output_hidden_states=True)
        penultimate = full.transformer.final_layer_norm(out.hidden_states[-2])
    assert len(out.hidden_states) == cfg["layers"] + 1
    _close(ours, penultimate)
    assert (ours - out.last_hidden_state).abs().max() > 1e-3  # the last layer really is skipped


def test_hub_tokenizer_offline_gives_an_actionable_error(tmp_path, monkeypatch):
    from anti_i2v.models.dynamicrafter.encoders import load_clip_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="CLIP tokenizer"):
        load_clip_tokenizer(str(tmp_path / "no-such-tokenizer"))


def test_tokenizer_pads_with_zero_like_open_clip():
    tok = tiny_clip_tokenizer()
    sot, eot = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    ids = tokenize(tok, ["a person", "", "word " * 200], 77)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[1, :2].tolist() == [sot, eot] and ids[1, 2:].eq(0).all()
    n = int((ids[0] != 0).sum())
    assert ids[0, 0] == sot and ids[0, n - 1] == eot and ids[0, n:].eq(0).all()
    assert ids[2, 0] == sot and ids[2, -1] == eot and ids[2].ne(0).all()  # truncated, eot kept last
    assert tok.convert_ids_to_tokens(0) == "!"  # 0 is a real token, as in the CLIP vocabulary


def _ref_gaussian_blur(x, sigmas):
    """Separable Gaussian blur with reflect padding (kornia's ``gaussian_blur2d`` convention)."""
    out = x
    for dim, s in ((2, sigmas[0]), (3, sigmas[1])):
        ks = int(max(4.0 * s, 3))
        ks = ks if ks % 2 else ks + 1
        r = torch.arange(ks, dtype=x.dtype) - ks // 2
        k = torch.exp(-(r**2) / (2 * s * s))
        k = k / k.sum()
        c = out.shape[1]
        if dim == 2:
            out = F.conv2d(F.pad(out, (0, 0, ks // 2, ks // 2), mode="reflect"), k.view(1, 1, ks, 1).repeat(c, 1, 1, 1), groups=c)
        else:
            out = F.conv2d(F.pad(out, (ks // 2, ks // 2, 0, 0), mode="reflect"), k.view(1, 1, 1, ks).repeat(c, 1, 1, 1), groups=c)
    return out


def _ref_preprocess(x, size, mean, std):
    h, w = x.shape[-2:]
    factors = (h / size, w / size)
    if max(factors) > 1:
        x = _ref_gaussian_blur(x, [max((f - 1) / 2, 0.001) for f in factors])
    x = F.interpolate(x, (size, size), mode="bicubic", align_corners=True)
    x = (x + 1) / 2
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_image_encoder_matches_an_openclip_style_reference_and_keeps_all_tokens():
    cfg = TINY.vision
    enc = OpenCLIPImageEncoder(**cfg).eval()
    rules = enc.key_rules()
    official = _official_named(enc, rules, seed=2)
    _load_rules(enc, rules, official)

    g = torch.Generator().manual_seed(3)
    for hw in ((320, 512), (576, 1024), (100, 150)):
        images = torch.rand(2, 3, *hw, generator=g) * 2 - 1
        _close(enc.preprocess(images), _ref_preprocess(images, cfg["image_size"], enc.mean, enc.std), 1e-5)

    images = torch.rand(2, 3, 320, 512, generator=g) * 2 - 1
    with torch.no_grad():
        ours = enc(images)
        px = _ref_preprocess(images, cfg["image_size"], enc.mean, enc.std)
        v = "model.visual."
        x = F.conv2d(px, official[f"{v}conv1.weight"], stride=cfg["patch_size"]).flatten(2).transpose(1, 2)
        cls = official[f"{v}class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + official[f"{v}positional_embedding"]
        x = F.layer_norm(x, (cfg["width"],), official[f"{v}ln_pre.weight"], official[f"{v}ln_pre.bias"], cfg["layer_norm_eps"])
        for i in range(cfg["layers"]):
            x = _ref_resblock(x, official, f"{v}transformer.resblocks.{i}.", cfg["heads"], cfg["layer_norm_eps"])
    n_tokens = 1 + (cfg["image_size"] // cfg["patch_size"]) ** 2
    assert ours.shape == (2, n_tokens, cfg["width"]) == x.shape
    _close(ours, x)  # before ln_post and proj

    # differentiable down to the pixels
    images.requires_grad_(True)
    enc(images).square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_vae_key_map_agrees_with_diffusers_ldm_converter():
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    vae = build_vae(**TINY.vae).eval()
    rules = vae_key_rules(vae)
    official = {f"first_stage_model.{k}": v for k, v in _official_named(vae, rules, seed=4).items()}
    by_diffusers = convert_ldm_vae_checkpoint(official, dict(vae.config))
    ours = {}
    for r in rules:
        ours.update(zip(r.ours, r.to_ours(official["first_stage_model." + r.official])))
    assert set(ours) == set(by_diffusers)
    for k in ours:
        assert torch.equal(ours[k].reshape(by_diffusers[k].shape), by_diffusers[k]) and ours[k].shape == by_diffusers[k].shape, k
    vae.load_state_dict(ours, strict=True)
    video = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mean
        assert z.shape == (1, 4, 8, 8) and vae.decode(z).sample.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# the assembled tiny model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair():
    _needs_full_model()
    from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel

    torch.manual_seed(0)
    a = DynamiCrafterModel("tiny").eval()
    _randomize(a, seed=5)
    torch.manual_seed(1)
    b = DynamiCrafterModel("tiny").eval()
    return a, b


def _tiny_outputs(model):
    g = torch.Generator().manual_seed(7)
    frames = TINY.frames
    h, w = TINY.resolution
    image = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    video = image.unsqueeze(2).repeat(1, 1, frames, 1, 1)
    with torch.no_grad():
        text = model.encode_text(["a person talking", ""])
        img_ctx = model.encode_image_tokens(image)
        z = model.encode_first_stage(video)
        rec = model.decode_first_stage(z)
        noise = torch.randn(z.shape, generator=g)
        out = model.model(torch.cat([noise, z], 1), torch.tensor([10, 700]), context=torch.cat([text, img_ctx], 1), fs=torch.tensor([24, 5]))
    return {"text": text, "image_context": img_ctx, "latents": z, "reconstruction": rec, "unet": out}


def test_tiny_round_trip_through_official_names_gives_identical_outputs(tiny_pair):
    a, b = tiny_pair
    official = a.official_state_dict()
    assert not any(k in official for k in a.ignored_official_keys())
    b.load_official_state_dict(official)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    out_a, out_b = _tiny_outputs(a), _tiny_outputs(b)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    assert out_a["text"].shape == (2, 77, TINY.text["width"])
    assert out_a["image_context"].shape == (2, 16 * TINY.frames, TINY.unet["context_dim"])
    assert out_a["unet"].shape == out_a["latents"].shape == (2, 4, TINY.frames, 8, 8)


def test_from_official_builds_on_meta_and_matches(tiny_pair):
    from anti_i2v.models.dynamicrafter.model import DynamiCrafterModel

    a, _ = tiny_pair
    official = a.official_state_dict()
    # extra official keys on the ignore list are accepted and skipped
    official["embedder.model.logit_scale"] = torch.tensor(4.6)
    official["cond_stage_model.model.text_projection"] = torch.zeros(TINY.text["width"], TINY.text["projection_dim"])
    c = DynamiCrafterModel.from_official(official, "tiny")
    assert not any(t.is_meta for t in list(c.parameters()) + list(c.buffers()))
    pos = c.cond_stage_model.transformer.embeddings.position_ids
    assert torch.equal(pos, torch.arange(77).unsqueeze(0))
    out_a, out_c = _tiny_outputs(a), _tiny_outputs(c)
    for k in out_a:
        assert torch.equal(out_a[k], out_c[k]), k


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tiny_pair):
    a, b = tiny_pair
    official = a.official_state_dict()
    broken = dict(official)
    del broken["embedder.model.visual.ln_pre.weight"]
    broken["model.diffusion_model.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(ModelError) as info:
        b.load_official_state_dict(broken)
    msg = str(info.value)
    assert "\n" not in msg and "1 missing keys" in msg and "1 unexpected keys" in msg
    assert "embedder.model.visual.ln_pre.weight" in msg and "not_a_layer" in msg
    assert info.value.missing == ["embedder.model.visual.ln_pre.weight"]

    shaped = dict(official)
    shaped["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ModelError, match="shapes do not match.*quant_conv"):
        b.load_official_state_dict(shaped)

    report = b.load_official_state_dict(broken, strict=False)
    assert report.missing == ["embedder.model.visual.ln_pre.weight"]
    assert report.unexpected == ["model.diffusion_model.not_a_layer.weight"]


def test_schedule_buffers_follow_the_ddpm_formulas():
    from anti_i2v.models.dynamicrafter.model import schedule_buffers

    b512, b256 = schedule_buffers(get_config("512")), schedule_buffers(get_config("256"))
    assert b512["alphas_cumprod"][-1] == 0 and b512["betas"][-1] == 1
    assert b512["sqrt_recip_alphas_cumprod"].eq(0).all() and b512["sqrt_recipm1_alphas_cumprod"].eq(0).all()
    assert b512["scale_arr"].shape == (1400,) and b512["scale_arr"][0] == 1 and torch.allclose(b512["scale_arr"][400:], torch.tensor(0.7))
    assert "scale_arr" not in b256 and abs(b256["betas"][0].item() - 0.00085) < 1e-9
    assert torch.allclose(b256["sqrt_recip_alphas_cumprod"] ** 2 * b256["alphas_cumprod"], torch.ones(1000), atol=1e-5)
    assert b512["posterior_variance"][0] == 0
    try:
        from anti_i2v.models.dynamicrafter.schedule import DynamiCrafterSchedule
    except ImportError:
        return
    for variant, buffers in (("512", b512), ("256", b256)):
        ref = DynamiCrafterSchedule.for_variant(variant)
        for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            assert torch.equal(buffers[name], getattr(ref, name)), (variant, name)


def test_tiny_parts_run_fast(tiny_pair):
    a, _ = tiny_pair
    _tiny_outputs(a)  # warm-up
    start = time.perf_counter()
    _tiny_outputs(a)
    assert time.perf_counter() - start < 2.0  # text + image + VAE enc/dec (4 frames x 2) + UNet


# ---------------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------------


def _small_state():
    return {
        "model.diffusion_model.fps_embedding.0.weight": torch.randn(4, 3),
        "first_stage_model.quant_conv.bias": torch.randn(8),
        "betas": torch.rand(10),
    }


def test_load_checkpoint_reads_lightning_deepspeed_and_safetensors(tmp_path):
    state = _small_state()
    lightning = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.9.3"}, lightning)
    got = load_checkpoint(lightning)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)

    deepspeed = tmp_path / "ds.ckpt"
    torch.save({"module": {"_forward_module." + k: v for k, v in state.items()}}, deepspeed)
    assert set(load_checkpoint(deepspeed)) == set(state)

    out = convert_to_safetensors(lightning, tmp_path / "conv" / "model.safetensors", variant="512")
    again = load_checkpoint(out)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    assert load_checkpoint(tmp_path / "conv").keys() == again.keys()  # a folder holding model.safetensors


def test_framestride_embed_of_the_256_checkpoint_is_renamed(tmp_path):
    state = {
        "model.diffusion_model.framestride_embed.0.weight": torch.zeros(2, 2),
        "model.diffusion_model.framestride_embed.2.bias": torch.zeros(2),
        "betas": torch.zeros(3),
    }
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    got = load_checkpoint(tmp_path / "model.ckpt", "256")
    assert set(got) == {"model.diffusion_model.fps_embedding.0.weight", "model.diffusion_model.fps_embedding.2.bias", "betas"}
    assert normalize_official_keys({"model.diffusion_model.fps_embedding.0.weight": 1}) == {"model.diffusion_model.fps_embedding.0.weight": 1}


def _fake_class(monkeypatch, module: str, name: str, base: type = object) -> type:
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module, "__qualname__": name})
    setattr(sys.modules[module], name, cls)
    return cls


def test_lightning_objects_next_to_the_weights_load_inertly(tmp_path, monkeypatch):
    attr_dict = _fake_class(monkeypatch, "pytorch_lightning.utilities.parsing", "AttributeDict", dict)
    config = _fake_class(monkeypatch, "omegaconf.dictconfig", "DictConfig")
    cfg = config()
    cfg.content = {"lr": 1e-5}
    hp = attr_dict(base_learning_rate=1e-5, nested=cfg)
    path = tmp_path / "model.ckpt"
    state = _small_state()
    np = pytest.importorskip("numpy")
    torch.save({"state_dict": state, "hyper_parameters": hp, "loops": {"best": np.float64(0.5)}}, path)
    with pytest.raises(Exception):  # plain weights_only refuses it
        torch.load(path, weights_only=True)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert "pytorch_lightning.utilities.parsing.AttributeDict" in unsafe and "omegaconf.dictconfig.DictConfig" in unsafe
    assert any(g.startswith("numpy") for g in unsafe)
    got = load_checkpoint(path)
    assert set(got) == set(state)


def test_unknown_pickled_globals_are_refused(tmp_path, monkeypatch):
    payload = _fake_class(monkeypatch, "some_package.tricks", "Payload")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _small_state(), "extra": payload()}, path)
    with pytest.raises(ModelError, match="some_package.tricks.Payload.*allow_unsafe_pickle"):
        load_checkpoint(path)
    assert set(load_checkpoint(path, allow_unsafe_pickle=True)) == set(_small_state())


def test_checkpoint_errors_are_one_line_and_actionable(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither model.safetensors nor model.ckpt"):
        load_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError) as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value)
    torch.save({"state_dict": {"a": 1}}, tmp_path / "nt.ckpt")
    with pytest.raises(ModelError, match="non-tensor"):
        load_checkpoint(tmp_path / "nt.ckpt")
    with pytest.raises(ModelError, match="no released checkpoint"):
        load_checkpoint(None, "tiny")


def test_hub_ids_go_through_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    local = tmp_path / "model.ckpt"
    torch.save({"state_dict": _small_state()}, local)
    calls = []

    def fake_download(repo, filename, local_files_only=False, **kwargs):
        calls.append((repo, filename, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(ckpt_mod, "_hub_offline", lambda: False)
    assert set(load_checkpoint(None, "512")) == set(_small_state())
    assert set(load_checkpoint("Doubiiu/DynamiCrafter_1024")) == set(_small_state())
    assert calls == [("Doubiiu/DynamiCrafter_512", "model.ckpt", False), ("Doubiiu/DynamiCrafter_1024", "model.ckpt", False)]

    monkeypatch.setattr(ckpt_mod, "_hub_offline", lambda: True)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_checkpoint(None, "256")
    assert calls[-1] == ("Doubiiu/DynamiCrafter", "model.ckpt", True)


def test_convert_checkpoint_command_writes_safetensors_that_load_back(tmp_path):
    import torch
    from typer.testing import CliRunner

    from anti_i2v.cli import app
    from anti_i2v.models.dynamicrafter.checkpoint import load_checkpoint

    state = {"model.diffusion_model.out.2.bias": torch.arange(4.0), "scale_arr": torch.ones(3)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.ckpt")
    result = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "model.ckpt"), str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(tmp_path / "m.safetensors", "512")
    assert set(loaded) == set(state) and torch.equal(loaded["scale_arr"], state["scale_arr"])
    missing = CliRunner().invoke(app, ["convert-checkpoint", str(tmp_path / "none.ckpt"), str(tmp_path / "x.safetensors")])
    assert missing.exit_code != 0 and "Traceback" not in missing.output
