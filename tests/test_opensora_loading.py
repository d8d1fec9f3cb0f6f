"""Open-Sora 1.2 configs, checkpoint loading (strict, offline-safe) and T5 text conditioning.

Tests that need the STDiT3 / VAE ports skip only while their module does not exist; once it exists,
import errors fail the test.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anti_i2v.errors import ModelError
from anti_i2v.models.opensora import checkpoint as ckpt
from anti_i2v.models.opensora.configs import (
    LENGTHS,
    RESOLUTIONS,
    STDIT3_HUB_ID,
    T5_HUB_ID,
    VAE_HUB_ID,
    get_config,
    get_image_size,
    get_num_frames,
    latent_frames,
    vae_kwargs_from_config,
)
from anti_i2v.models.opensora.sampler import RFlowSampler, apply_reference
from anti_i2v.models.opensora.text import T5TextEncoder, append_scores, clean_caption, text_preprocessing

KEYS = Path(__file__).parent / "fixtures" / "ports" / "keys"
STDIT3_MODULE = "anti_i2v.models.opensora.stdit3"
VAE_MODULE = "anti_i2v.models.opensora.vae"


def _require(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    return importlib.import_module(module)


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(json.loads(shape))
    return out


# --------------------------------------------------------------------------- configs
def test_released_settings() -> None:
    cfg = get_config()
    assert (cfg.stdit3_hub_id, cfg.vae_hub_id, cfg.text_hub_id) == (STDIT3_HUB_ID, VAE_HUB_ID, T5_HUB_ID)
    assert (cfg.fps, cfg.num_sampling_steps, cfg.cfg_scale, cfg.aes, cfg.seed, cfg.align) == (24, 30, 7.0, 6.5, 42, 5)
    assert (cfg.micro_frame_size, cfg.model_max_length, cfg.num_timesteps) == (17, 300, 1000)
    assert cfg.image_size == (240, 426) and cfg.num_frames == 51
    assert cfg.latent_size() == (15, 30, 53)
    assert cfg.latent_size(102, get_image_size("720p", "9:16")) == (30, 90, 160)
    assert cfg.stdit3["hidden_size"] == 1152 and cfg.stdit3["depth"] == 28 and cfg.stdit3["caption_channels"] == 4096
    assert {k: v["9:16"] for k, v in RESOLUTIONS.items()} == {
        "240p": (240, 426), "360p": (360, 640), "480p": (480, 854), "720p": (720, 1280)
    }
    assert LENGTHS["2s"] == 51 and get_num_frames("4s") == 102 and get_num_frames("8s") == 204
    assert get_num_frames("16s") == 408 and get_num_frames("image") == 1 and get_num_frames(17) == 17
    assert [latent_frames(n) for n in (1, 17, 20, 51, 102)] == [1, 5, 6, 15, 30]
    assert get_image_size((100, 200)) == (100, 200)
    with pytest.raises(Exception, match="aspect ratio"):
        get_image_size("240p", "4:3")
    assert get_config("tiny").is_tiny and get_config("OpenSora-v1.2").name == "opensora-v1.2"


def test_official_vae_config_json_maps_to_released_sizes() -> None:
    official = {
        "model_type": "VideoAutoencoderPipeline",
        "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                   "subfolder": "vae", "micro_batch_size": 4},
        "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
        "micro_frame_size": 17,
        "shift": [-0.10, 0.34, 0.27, 0.98],
        "scale": [3.85, 2.32, 2.33, 3.06],
    }
    assert vae_kwargs_from_config(official) == get_config().vae
    with pytest.raises(ModelError, match="unsupported"):
        vae_kwargs_from_config({"vae_2d": {"type": "Other"}})


# --------------------------------------------------------------------------- full-size key parity (meta)
def test_full_size_models_have_the_official_keys_without_allocating() -> None:
    _require(STDIT3_MODULE)
    _require(VAE_MODULE)
    cfg = get_config()
    start = time.perf_counter()
    model = ckpt.build_stdit3(cfg.stdit3, low_memory=True)
    vae = ckpt.build_vae(cfg.vae, low_memory=True)
    assert time.perf_counter() - start < 20
    assert all(p.is_meta for p in model.parameters()) and all(p.is_meta for p in vae.parameters())
    for m, name in ((model, "opensora_stdit3_xl2.tsv"), (vae, "opensora_vae_v1_2.tsv")):
        ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert ours == _tsv(name)
        ckpt.check_state_keys(m, _tsv(name))  # the released key list passes the strict check
    # non-persistent buffers stay real (computed), so they need no checkpoint entry
    assert not model.pos_embed.inv_freq.is_meta
    assert "pos_embed.inv_freq" not in model.state_dict()


# --------------------------------------------------------------------------- tiny folders
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    _require(STDIT3_MODULE)
    _require(VAE_MODULE)
    cfg = get_config("tiny")
    root = tmp_path_factory.mktemp("opensora")
    torch.manual_seed(0)
    model = ckpt.build_stdit3(cfg.stdit3).eval()
    with torch.no_grad():  # make every weight live (the port zero-initialises some layers)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = ckpt.build_vae(cfg.vae).eval()
    ckpt.save_pretrained(model, root / "stdit3", cfg.stdit3)
    ckpt.save_pretrained(vae, root / "vae", cfg.vae)
    return root, model, vae


def _stdit3_inputs(cfg, b: int = 2):
    g = torch.Generator().manual_seed(1)
    length, dim = cfg.stdit3["model_max_length"], cfg.stdit3["caption_channels"]
    x = torch.randn(b, 4, 3, 8, 8, generator=g)
    y = torch.randn(b, 1, length, dim, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    mask[0, :5] = 1
    mask[1, :9] = 1
    kw = dict(mask=mask, x_mask=torch.tensor([[False, True, True]] * b), fps=torch.full((b,), 24.0),
              height=torch.full((b,), 64.0), width=torch.full((b,), 64.0))
    return x, torch.tensor([900.0, 300.0][:b]), y, kw


def test_tiny_folder_round_trip_is_exact_and_fast(tiny_folders) -> None:
    root, model, vae = tiny_folders
    cfg = get_config("tiny")
    for low_memory in (True, False):
        loaded = ckpt.load_stdit3(root / "stdit3", low_memory=low_memory)
        assert not loaded.training
        ref_state, got_state = model.state_dict(), loaded.state_dict()
        assert list(ref_state) == list(got_state)
        assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
        assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
        assert loaded.rope.freqs.requires_grad is model.rope.freqs.requires_grad
        x, t, y, kw = _stdit3_inputs(cfg)
        with torch.no_grad():
            start = time.perf_counter()
            out = loaded(x, t, y, **kw)
            assert time.perf_counter() - start < 1.0
            assert torch.equal(out, model(x, t, y, **kw))
        assert out.shape == (2, 8, 3, 8, 8)
    # a model.safetensors file path works too; dtype is applied while reading
    half = ckpt.load_stdit3(root / "stdit3" / "model.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.y_embedder.y_embedding.dtype == torch.bfloat16
    v = ckpt.load_vae(root / "vae")
    assert all(torch.equal(a, b) for a, b in zip(v.state_dict().values(), vae.state_dict().values()))
    video = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        z = v.encode(video)
        assert z.shape == (1, 4, 5, 4, 4)
        assert v.decode(z, num_frames=17).shape == video.shape


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_loading_is_strict(tiny_folders, tmp_path) -> None:
    root, _, _ = tiny_folders
    src = root / "stdit3"
    missing = _rewrite(src, tmp_path / "missing", lambda s: s.pop("final_layer.linear.weight"))
    with pytest.raises(ModelError, match="lacks 1 STDiT3 tensor.*final_layer.linear.weight"):
        ckpt.load_stdit3(missing)
    extra = _rewrite(src, tmp_path / "extra", lambda s: s.__setitem__("spatial_blocks.9.attn.qkv.weight", torch.zeros(3)))
    with pytest.raises(ModelError, match="does not have.*spatial_blocks.9"):
        ckpt.load_stdit3(extra)
    shape = _rewrite(src, tmp_path / "shape", lambda s: s.__setitem__("t_block.1.bias", torch.zeros(7)))
    with pytest.raises(ModelError, match="wrong shape.*t_block.1.bias"):
        ckpt.load_stdit3(shape)
    vae_missing = _rewrite(root / "vae", tmp_path / "vae_missing", lambda s: s.pop("scale"))
    with pytest.raises(ModelError, match="lacks 1 Open-Sora VAE tensor.*scale"):
        ckpt.load_vae(vae_missing)
    # the documented ignore list: pos_embed.inv_freq in a file is accepted and skipped
    ignored = _rewrite(src, tmp_path / "ignored", lambda s: s.__setitem__("pos_embed.inv_freq", torch.zeros(5)))
    assert ckpt.load_stdit3(ignored).pos_embed.inv_freq.abs().sum() > 0
    # a VAE folder is not an STDiT3 folder (and vice versa)
    with pytest.raises(ModelError, match="VAE config, not STDiT3"):
        ckpt.load_stdit3(root / "vae")
    with pytest.raises(ModelError, match="not an Open-Sora VAE config"):
        ckpt.load_vae(root / "stdit3")
    for msg in (_message(lambda: ckpt.load_stdit3(missing)), _message(lambda: ckpt.load_stdit3(shape))):
        assert "\n" not in msg


def _message(fn) -> str:
    with pytest.raises(ModelError) as info:
        fn()
    return str(info.value)


def test_bad_sources_give_model_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        ckpt.load_stdit3(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no model.safetensors"):
        ckpt.load_stdit3(tmp_path / "empty")
    (tmp_path / "noconfig").mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "noconfig" / "model.safetensors"))
    with pytest.raises(ModelError, match="config.json"):
        ckpt.load_vae(tmp_path / "noconfig")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    if importlib.util.find_spec(STDIT3_MODULE) is not None:
        with pytest.raises(ModelError, match="safetensors"):
            ckpt.load_stdit3(tmp_path / "broken", config=get_config("tiny").stdit3)


@pytest.mark.parametrize("loader", [ckpt.load_stdit3, ckpt.load_vae])
def test_offline_hub_id_fails_fast(loader, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE") as info:
        loader(cache_dir=tmp_path)  # the official hub id, with an empty cache
    assert time.perf_counter() - start < 10
    assert "\n" not in str(info.value)


def test_offline_t5_fails_fast(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        T5TextEncoder.from_pretrained(T5_HUB_ID, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- text
def test_prompt_processing() -> None:
    assert append_scores("A cat.") == "A cat. aesthetic score: 6.5."
    assert append_scores("a cat. aesthetic score: 5.0.") == "a cat. aesthetic score: 5.0."
    assert append_scores("a cat", aes=None) == "a cat"
    assert append_scores("a cat", aes=6.5, flow=4.0) == "a cat aesthetic score: 6.5. motion score: 4.0."
    assert clean_caption("  A  Woman&amp;Dog  see https://x.y/z @someone ") == "a woman&dog see"
    assert text_preprocessing("A Man Smiling aesthetic score: 6.5.") == "a man smiling aesthetic score: 6.5."
    assert text_preprocessing("A Man", use_text_preprocessing=False) == "a man"


def test_tiny_text_encoder_shapes_mask_and_suffix() -> None:
    cfg = get_config("tiny")
    enc = T5TextEncoder.tiny(seed=0, d_model=cfg.text["d_model"], model_max_length=cfg.model_max_length)
    prompts = ["A Woman smiling", "a man talking to the camera in a room at night"]
    texts = enc.preprocess(prompts)
    assert texts == [
        "a woman smiling aesthetic score: 6.5.",
        "a man talking to the camera in a room at night aesthetic score: 6.5.",
    ]
    y, mask = enc.encode(prompts)
    length = cfg.model_max_length
    assert y.shape == (2, 1, length, cfg.text["d_model"]) and y.dtype == torch.float32
    assert mask.shape == (2, length) and mask.dtype == torch.int64
    ids, expected_mask = enc.tokenize(texts)
    assert torch.equal(mask, expected_mask)
    lens = mask.sum(dim=1)
    assert 0 < lens[0] < lens[1] <= length
    assert bool((mask[:, :-1] >= mask[:, 1:]).all())  # ones, then padding
    assert bool((ids[0, lens[0] - 1] == enc.tokenizer.eos_token_id))  # </s> ends the prompt
    # the aesthetic suffix is in the tokens: without it the prompt is shorter and encodes differently
    y_plain, mask_plain = enc.encode(prompts, aes=None)
    assert bool((mask_plain.sum(1) < lens).all())
    assert not torch.allclose(y_plain, y)
    # a padded sequence: the real tokens do not depend on the padding length
    enc_long = T5TextEncoder(enc.tokenizer, enc.model, model_max_length=length + 6)
    y_long, _ = enc_long.encode(prompts[:1])
    torch.testing.assert_close(y_long[0, 0, : lens[0]], y[0, 0, : lens[0]], atol=1e-5, rtol=1e-5)
    # free the encoder
    enc.encode(prompts[:1], free_encoder=True)
    assert enc.model is None
    with pytest.raises(ModelError, match="freed"):
        enc.encode(prompts)


def test_t5_loads_from_a_local_folder(tmp_path) -> None:
    enc = T5TextEncoder.tiny(seed=3, model_max_length=16)
    enc.tokenizer.save_pretrained(tmp_path)
    enc.model.save_pretrained(tmp_path)
    loaded = T5TextEncoder.from_pretrained(tmp_path, model_max_length=16)
    assert next(loaded.model.parameters()).dtype == torch.float32
    a, b = enc.encode(["a man smiling"]), loaded.encode(["a man smiling"])
    assert torch.equal(a.y, b.y) and torch.equal(a.mask, b.mask) and a.y.shape == (1, 1, 16, 32)


def test_tiny_pipeline_text_vae_stdit3_sampler() -> None:
    """The tiny parts fit together: T5 -> STDiT3 caption, VAE latent as the I2V reference, 4 RF steps."""
    _require(STDIT3_MODULE)
    _require(VAE_MODULE)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = ckpt.build_stdit3(cfg.stdit3).eval()
    vae = ckpt.build_vae(cfg.vae).eval()
    enc = T5TextEncoder.tiny(d_model=cfg.text["d_model"], model_max_length=cfg.model_max_length)
    y, mask = enc.encode(["a person smiling"])
    h, w = cfg.image_size
    n = cfg.num_frames
    with torch.no_grad():
        ref = vae.encode(torch.rand(1, 3, 1, h, w) * 2 - 1)
        t_lat, lh, lw = cfg.latent_size()
        z0 = torch.randn(1, 4, t_lat, lh, lw, generator=torch.Generator().manual_seed(cfg.seed))
        z, frame_mask = apply_reference(z0, ref)
        sampler = RFlowSampler(cfg.num_sampling_steps, cfg.num_timesteps, cfg.cfg_scale)
        start = time.perf_counter()
        out = sampler.sample(model, z, y, mask, height=h, width=w, num_frames=n, fps=cfg.fps, mask=frame_mask,
                             generator=torch.Generator().manual_seed(1))
        assert time.perf_counter() - start < 5
        video = vae.decode(out, num_frames=n)
    assert torch.equal(out[:, :, :1], ref)
    assert video.shape == (1, 3, n, h, w) and torch.isfinite(video).all()


def test_safetensors_header_is_enough_for_the_key_check(tiny_folders) -> None:
    """check_state_keys runs on header shapes only (no tensor data read) - the low-memory path."""
    root, model, _ = tiny_folders
    with safe_open(str(root / "stdit3" / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ckpt.check_state_keys(model, shapes, ignore=ckpt.STDIT3_IGNORED_KEYS)
