"""DynamiCrafter Resampler (``image_proj_model``) against the golden fixture of the original module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anti_i2v.models.dynamicrafter.resampler import Resampler

FIXTURES = Path(__file__).parent / "fixtures" / "ports"
NAME = "dynamicrafter_resampler"
PREFIX = "image_proj_model."


def _spec() -> dict:
    return json.loads((FIXTURES / f"{NAME}.json").read_text())


def _tensors() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{NAME}.safetensors"))


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> float:
    err = (actual.detach().double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * max|expected| {scale:.3g}"
    return err / scale


def _constructor(spec: dict, key: str = "constructor") -> dict:
    return dict(spec[key]["Resampler"])


def test_resampler_matches_fixture() -> None:
    spec = _spec()
    data = _tensors()
    tol = spec["recommended_tolerance"]["per_tensor_relative_to_absmax"]
    model = Resampler(**_constructor(spec)).eval()
    state = {k[len("state.") :]: v.float() for k, v in data.items() if k.startswith("state.")}
    model.load_state_dict(state, strict=True)

    case = spec["cases"]["main"]
    x = data["input.x"].clone().requires_grad_(True)
    assert list(x.shape) == case["inputs"]["x"]["shape"]
    out = model(x)
    assert list(out.shape) == case["outputs"]["out"]["shape"]
    _assert_rel(out, data["output.out"], tol["outputs"], "out")

    loss = (out * data["lossw.out"]).sum()
    assert loss.item() == pytest.approx(case["loss_value"], rel=1e-4, abs=1e-4)
    loss.backward()
    for name in case["grads"]:
        grad = x.grad if name == "x" else None
        assert grad is not None, name
        _assert_rel(grad, data[f"grad.{name}"], tol["grads"], f"grad.{name}")


def test_resampler_frames_own_consecutive_tokens() -> None:
    cfg = _constructor(_spec())
    model = Resampler(**cfg).eval()
    n = cfg["num_queries"] * cfg["video_length"]
    assert model.latents.shape == (1, n, cfg["dim"])
    out = model(torch.randn(3, 7, cfg["embedding_dim"]))
    assert out.shape == (3, n, cfg["output_dim"])


def _expected_full_keys(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The official key/shape layout written out from the original release section 2.2."""
    dim, inner = cfg["dim"], cfg["dim_head"] * cfg["heads"]
    hidden = dim * cfg["ff_mult"]
    keys: dict[str, tuple[int, ...]] = {
        "latents": (1, cfg["num_queries"] * cfg["video_length"], dim),
        "proj_in.weight": (dim, cfg["embedding_dim"]),
        "proj_in.bias": (dim,),
        "proj_out.weight": (cfg["output_dim"], dim),
        "proj_out.bias": (cfg["output_dim"],),
        "norm_out.weight": (cfg["output_dim"],),
        "norm_out.bias": (cfg["output_dim"],),
    }
    for i in range(cfg["depth"]):
        p = f"layers.{i}."
        for norm in ("norm1", "norm2"):
            keys[f"{p}0.{norm}.weight"] = (dim,)
            keys[f"{p}0.{norm}.bias"] = (dim,)
        keys[f"{p}0.to_q.weight"] = (inner, dim)
        keys[f"{p}0.to_kv.weight"] = (2 * inner, dim)
        keys[f"{p}0.to_out.weight"] = (dim, inner)
        keys[f"{p}1.0.weight"] = (dim,)
        keys[f"{p}1.0.bias"] = (dim,)
        keys[f"{p}1.1.weight"] = (hidden, dim)
        keys[f"{p}1.3.weight"] = (dim, hidden)
    return keys


def _build_full_on_meta() -> Resampler:
    cfg = _constructor(_spec(), "real_checkpoint_constructor")
    with torch.device("meta"):
        return Resampler(**cfg)


def test_full_size_resampler_layout_and_size() -> None:
    cfg = _constructor(_spec(), "real_checkpoint_constructor")
    model = _build_full_on_meta()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_full_keys(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 1) == 48.8  # the original release: image_proj_model 48.8 M


def _find_keys_tsv() -> Path | None:
    candidates = [FIXTURES / "keys" / "dynamicrafter_512.tsv"]
    env = os.environ.get("ANTI_I2V_PORT_FIXTURES")
    if env:
        candidates.append(Path(env) / "keys" / "dynamicrafter_512.tsv")
    shared = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ports"
    candidates.append(shared / "keys" / "dynamicrafter_512.tsv")
    return next((p for p in candidates if p.is_file()), None)


def test_full_size_resampler_matches_official_key_list() -> None:
    tsv = _find_keys_tsv()
    if tsv is None:
        pytest.skip("keys/dynamicrafter_512.tsv not available")
    expected: dict[str, tuple[int, ...]] = {}
    for line in tsv.read_text().splitlines():
        if not line.startswith(PREFIX):
            continue
        key, shape = line.split("\t")
        dims = shape.strip().strip("()[]").replace(" ", "")
        expected[key[len(PREFIX) :]] = tuple(int(d) for d in dims.split(",") if d)
    assert expected, f"no {PREFIX}* entries in {tsv}"
    got = {k: tuple(v.shape) for k, v in _build_full_on_meta().state_dict().items()}
    assert got == expected
