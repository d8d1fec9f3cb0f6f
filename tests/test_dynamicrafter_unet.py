"""Parity tests of the DynamiCrafter 3-D UNet port against golden fixtures of the original.

* ``fixtures/ports/dynamicrafter_unet.{json,safetensors}``: a tiny configuration of the original
  ``UNetModel`` (constructor arguments in the json), its re-randomised state, the inputs, outputs and
  input gradients of two calls (per-frame and shared image context). Every size is read from the json.
* ``fixtures/ports/keys/dynamicrafter_{256,512,1024}.tsv``: key/shape lists of the official models;
  the ``model.diffusion_model.*`` entries are the UNet.

The largest relative errors seen (``max|port - expected| / max|expected|``) are kept in
``MAX_REL_ERRORS`` and reported in the assertion messages.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anti_i2v.models.dynamicrafter.unet import UNetModel

FIXTURES = Path(__file__).parent / "fixtures" / "ports"
JSON_PATH = FIXTURES / "dynamicrafter_unet.json"
TENSORS_PATH = FIXTURES / "dynamicrafter_unet.safetensors"
KEYS_DIR = FIXTURES / "keys"
UNET_PREFIX = "model.diffusion_model."
# docs/the original release section 2.1: parameters of the official 512/1024 UNet; the 256 model adds 16 scalar alphas.
OFFICIAL_UNET_PARAMS = 1_438_854_980
OFFICIAL_ALPHAS_256 = 16

META = json.loads(JSON_PATH.read_text())
CASES = list(META["cases"])
MAX_REL_ERRORS: dict[str, float] = {}


def _constructor() -> dict:
    (kwargs,) = META["constructor"].values()  # one entry, keyed by a description of the names
    return dict(kwargs)


def _tolerance(kind: str) -> float:
    return float(META["recommended_tolerance"]["per_tensor_relative_to_absmax"][kind])


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().float() - expected).abs().max() / expected.abs().max()).item()


def _check(name: str, actual: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = _rel_err(actual, expected)
    MAX_REL_ERRORS[name] = max(err, MAX_REL_ERRORS.get(name, 0.0))
    tol = _tolerance(kind)
    assert err <= tol, f"{name}: max|port - expected| / max|expected| = {err:.3e} > {tol:.0e}"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(str(TENSORS_PATH))


@pytest.fixture(scope="module")
def unet(tensors) -> UNetModel:
    model = UNetModel(**_constructor())
    state = {k[len("state.") :]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("state.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _inputs(tensors: dict, case: str) -> dict[str, torch.Tensor]:
    spec = META["cases"][case]
    inputs = {name: tensors[f"input.{case}.{name}"].clone() for name in spec["inputs"]}
    for name in spec["grads"]:
        inputs[name].requires_grad_(True)
    return inputs


def _call(model: UNetModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # The fixture's call: out = unet(x, timesteps, context=context, fs=fs)
    kwargs = {k: v for k, v in inputs.items() if k not in ("x", "timesteps")}
    return model(inputs["x"], inputs["timesteps"], **kwargs)


def _loss(tensors: dict, case: str, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((out * tensors[f"lossw.{case}.{name}"]).sum() for name, out in outputs.items())


# --------------------------------------------------------------------------------------------------
# numerical parity with the original
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fixture_outputs_and_input_grads(unet, tensors, case):
    spec = META["cases"][case]
    assert spec["call"].startswith("out = unet(x, timesteps"), spec["call"]
    inputs = _inputs(tensors, case)
    outputs = {"out": _call(unet, inputs)}
    assert set(outputs) == set(spec["outputs"])
    for name, out in outputs.items():
        assert out.dtype == torch.float32
        _check(f"{case}.output.{name}", out, tensors[f"output.{case}.{name}"], "outputs")

    loss = _loss(tensors, case, outputs)
    expected_loss = spec["loss_value"]
    assert abs(loss.item() - expected_loss) <= 1e-4 * max(1.0, abs(expected_loss)), (loss.item(), expected_loss)
    loss.backward()
    for name in spec["grads"]:
        grad = inputs[name].grad
        assert grad is not None, f"{case}: no gradient reached input {name}"
        _check(f"{case}.grad.{name}", grad, tensors[f"grad.{case}.{name}"], "grads")


def test_gradient_checkpointing_gives_same_results(unet, tensors):
    case = CASES[0]
    assert not unet.gradient_checkpointing
    unet.set_gradient_checkpointing(True)
    try:
        assert unet.gradient_checkpointing
        inputs = _inputs(tensors, case)
        out = _call(unet, inputs)
        _loss(tensors, case, {"out": out}).backward()
    finally:
        unet.set_gradient_checkpointing(False)
    _check(f"{case}.output.out[checkpointed]", out, tensors[f"output.{case}.out"], "outputs")
    for name in META["cases"][case]["grads"]:
        _check(f"{case}.grad.{name}[checkpointed]", inputs[name].grad, tensors[f"grad.{case}.{name}"], "grads")


# --------------------------------------------------------------------------------------------------
# behaviour the adapter relies on
# --------------------------------------------------------------------------------------------------


def test_block_hooks_see_block_outputs_in_forward_order(unet, tensors):
    case = CASES[0]
    inputs = _inputs(tensors, case)
    b, _, t, h, w = inputs["x"].shape
    seen: list[tuple[str, tuple[int, ...]]] = []
    blocks = [(f"input_blocks.{i}", m) for i, m in enumerate(unet.input_blocks)]
    blocks.append(("middle_block", unet.middle_block))
    blocks += [(f"output_blocks.{i}", m) for i, m in enumerate(unet.output_blocks)]
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: seen.append((n, tuple(out.shape)))) for n, m in blocks]
    try:
        with torch.no_grad():
            out = _call(unet, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert [n for n, _ in seen] == [n for n, _ in blocks]
    cfg = _constructor()
    assert seen[0][1] == (b * t, cfg["model_channels"], h, w)
    assert seen[-1][1] == (b * t, cfg["model_channels"] * cfg["channel_mult"][0], h, w)
    assert all(shape[0] == b * t for _, shape in seen)
    assert torch.equal(out, _call(unet, {k: v.detach() for k, v in inputs.items()}).detach())


def test_default_fs_and_zero_adapter_features(unet, tensors):
    case = CASES[0]
    inputs = {k: v.detach() for k, v in _inputs(tensors, case).items()}
    with torch.no_grad():
        ref = _call(unet, inputs)
        fs_default = torch.full_like(inputs["fs"], unet.default_fs)
        explicit = unet(inputs["x"], inputs["timesteps"], context=inputs["context"], fs=fs_default)
        implicit = unet(inputs["x"], inputs["timesteps"], context=inputs["context"])
        assert torch.equal(explicit, implicit)

        # features_adapter: one tensor per group of three input blocks, added after input_blocks[3k+2]
        taps = {}
        hooks = [
            unet.input_blocks[i].register_forward_hook(lambda _m, _a, o, i=i: taps.__setitem__(i, o))
            for i in range(2, len(unet.input_blocks), 3)
        ]
        try:
            _call(unet, inputs)
        finally:
            for hook in hooks:
                hook.remove()
        zeros = [torch.zeros_like(taps[i]) for i in sorted(taps)]
        with_adapter = unet(inputs["x"], inputs["timesteps"], context=inputs["context"], fs=inputs["fs"],
                            features_adapter=zeros)
        assert torch.equal(with_adapter, ref)
        with pytest.raises(ValueError):
            unet(inputs["x"], inputs["timesteps"], context=inputs["context"], fs=inputs["fs"],
                 features_adapter=zeros + zeros[:1])


def test_256_checkpoint_name_framestride_embed_is_accepted(unet):
    state = unet.state_dict()
    renamed = {k.replace("fps_embedding.", "framestride_embed.", 1) if k.startswith("fps_embedding.") else k: v
               for k, v in state.items()}
    assert any(k.startswith("framestride_embed.") for k in renamed)
    model = UNetModel(**_constructor())
    model.load_state_dict(renamed, strict=True)
    assert torch.equal(model.fps_embedding[2].weight, unet.fps_embedding[2].weight)
    assert all(not k.startswith("framestride_embed") for k in model.state_dict())


# --------------------------------------------------------------------------------------------------
# full-size key / shape / parameter-count parity with the official checkpoints
# --------------------------------------------------------------------------------------------------


def _parse_value(text: str):
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    return ast.literal_eval(text)


def _pairs(text: str) -> dict:
    return {m.group(1): _parse_value(m.group(2)) for m in re.finditer(r"(\w+) (\[[^\]]*\]|[\w.\-]+)", text)}


def _official_constructor(variant: str) -> dict:
    """The official UNet kwargs: the json's ``real_checkpoint_constructor`` over the fixture's flags."""
    text = META["real_checkpoint_constructor"]
    body = text.split(":", 1)[1].split("; other flags as here")[0]
    main, _, per_variant = body.partition("(")
    kwargs = {**_constructor(), **_pairs(main)}
    for part in per_variant.rstrip(")").split(";"):
        name, _, overrides = part.partition(":")
        if name.strip() == variant:
            kwargs.update(_pairs(overrides))
    return kwargs


def _official_unet_keys(variant: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS_DIR / f"dynamicrafter_{variant}.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        if key.startswith(UNET_PREFIX):
            keys[key[len(UNET_PREFIX) :]] = tuple(ast.literal_eval(shape))
    return keys


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_full_size_state_dict_matches_official_keys(variant):
    kwargs = _official_constructor(variant)
    assert kwargs["model_channels"] != _constructor()["model_channels"], "official constructor not parsed"
    with torch.device("meta"):
        model = UNetModel(**kwargs)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_unet_keys(variant)
    missing = sorted(set(official) - set(ours))
    unexpected = sorted(set(ours) - set(official))
    assert not missing and not unexpected, f"missing {missing[:5]} unexpected {unexpected[:5]}"
    wrong = [(k, ours[k], official[k]) for k in official if ours[k] != official[k]]
    assert not wrong, f"shape mismatches: {wrong[:5]}"
    assert list(ours) == list(official), "key order differs from the original's"

    n_alpha = sum(1 for k in official if k.endswith(".attn2.alpha"))
    assert n_alpha == (OFFICIAL_ALPHAS_256 if variant == "256" else 0)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == OFFICIAL_UNET_PARAMS + n_alpha, n_params
    assert n_params == sum(torch.Size(s).numel() for s in official.values())
    assert len(list(model.buffers())) == 0


def test_learnable_image_scale_alpha(unet, tensors):
    """256 variant: ``alpha`` per image cross-attention, scale ``tanh(alpha) + 1`` (1 at alpha = 0)."""
    model = UNetModel(**{**_constructor(), "image_cross_attention_scale_learnable": True}).eval()
    alphas = [k for k in model.state_dict() if k.endswith("attn2.alpha")]
    n_spatial = sum(1 for k in unet.state_dict() if k.endswith("attn2.to_k_ip.weight"))
    assert len(alphas) == n_spatial > 0
    state = {**unet.state_dict(), **{k: torch.zeros(()) for k in alphas}}
    model.load_state_dict(state, strict=True)
    case = CASES[0]
    inputs = {k: v.detach() for k, v in _inputs(tensors, case).items()}
    out = _call(model, inputs)
    _check(f"{case}.output.out[alpha=0]", out, tensors[f"output.{case}.out"], "outputs")
    _loss(tensors, case, {"out": out}).backward()
    assert all(model.get_parameter(k).grad is not None for k in alphas)
    with torch.no_grad():
        for k in alphas:
            model.get_parameter(k).fill_(1.0)
        changed = _call(model, inputs)
    assert _rel_err(changed, tensors[f"output.{case}.out"]) > 1e-3
