"""Parity tests of the Open-Sora 1.2 STDiT3 port against golden fixtures of the original.

* ``fixtures/ports/opensora_stdit3.{json,safetensors}``: a tiny configuration of the original STDiT3
  (its ``STDiT3Config`` arguments are in the json), its re-randomised state, and the inputs, outputs and
  input gradients of three calls (``i2v``: caption mask + x_mask, ``t2v``: caption mask only,
  ``nomask``: neither). Every size is read from the json, and the tests pick the cases by the inputs
  the json lists for them, not by name; ``ANTI_I2V_PORT_FIXTURES`` points the tests at another folder
  of fixtures of the same format (see ``opensora_fixtures``).
* ``fixtures/ports/keys/opensora_stdit3_xl2.tsv``: key/shape list of the official STDiT3-XL/2
  (``hpcai-tech/OpenSora-STDiT-v3``).

The largest relative errors seen (``max|port - expected| / max|expected|``) are kept in
``MAX_REL_ERRORS`` and reported in the assertion messages.
"""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest
import torch
from opensora_fixtures import KEYS, cases, spec
from opensora_fixtures import tensors as fixture_tensors

from anti_i2v.models.opensora import stdit3 as stdit3_module
from anti_i2v.models.opensora.stdit3 import STDiT3, STDiT3Config

NAME = "opensora_stdit3"
KEYS_PATH = KEYS / "opensora_stdit3_xl2.tsv"

# the original release: the official STDiT3-XL/2 (hpcai-tech/OpenSora-STDiT-v3, config.json fields).
OFFICIAL_CONFIG = {
    "model_type": "STDiT3",
    "architectures": ["STDiT3"],
    "caption_channels": 4096,
    "depth": 28,
    "hidden_size": 1152,
    "num_heads": 16,
    "patch_size": [1, 2, 2],
    "in_channels": 4,
    "input_sq_size": 512,
    "mlp_ratio": 4.0,
    "model_max_length": 300,
    "pred_sigma": True,
    "qk_norm": True,
    "enable_flash_attn": True,
    "enable_layernorm_kernel": True,
}
# the original release: parameters of the official model, rope.freqs (36) included, the 300 x 4096
# y_embedding buffer excluded.
OFFICIAL_PARAMS = 1_207_643_972

META = spec(NAME)
CASES = cases(NAME)
MAX_REL_ERRORS: dict[str, float] = {}


def _case_with(*names: str) -> str:
    """The first case whose inputs include ``names`` (a case with caption padding for ``mask``)."""
    for case in cases(NAME, lambda c, s: set(names) <= set(s["inputs"])):
        if "mask" not in names or (fixture_tensors(NAME)[f"input.{case}.mask"] == 0).any():
            return case
    pytest.skip(f"no {NAME} case has the inputs {names}" + (" with caption padding" if "mask" in names else ""))


def _constructor() -> dict:
    (kwargs,) = META["constructor"].values()  # {"STDiT3Config": {...}}
    return dict(kwargs)


# Every tensor is held to the json's tolerance. The gradient w.r.t. ``timestep`` is the most
# sensitive one: it sums 256 sinusoid channels whose terms are about 50 times larger than the result,
# so the sinusoid frequencies are computed in float64 (correctly rounded) before the float32 product.
GRAD_TOL_OVERRIDES: dict[str, float] = {}


def _tolerance(kind: str, name: str | None = None) -> float:
    if kind == "grads" and name in GRAD_TOL_OVERRIDES:
        return GRAD_TOL_OVERRIDES[name]
    return float(META["recommended_tolerance"]["per_tensor_relative_to_absmax"][kind])


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().float() - expected).abs().max() / expected.abs().max()).item()


def _check(name: str, actual: torch.Tensor, expected: torch.Tensor, kind: str, tensor: str | None = None) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = _rel_err(actual, expected)
    MAX_REL_ERRORS[name] = max(err, MAX_REL_ERRORS.get(name, 0.0))
    tol = _tolerance(kind, tensor)
    assert err <= tol, f"{name}: max|port - expected| / max|expected| = {err:.3e} > {tol:.0e}"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return fixture_tensors(NAME)


def _state(tensors: dict) -> dict[str, torch.Tensor]:
    return {k[len("state.") :]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("state.")}


@pytest.fixture(scope="module")
def model(tensors) -> STDiT3:
    net = STDiT3(STDiT3Config.from_dict(_constructor()))
    net.load_state_dict(_state(tensors), strict=True)
    return net.eval()


def _inputs(tensors: dict, case: str, grads: bool = True) -> dict[str, torch.Tensor]:
    spec = META["cases"][case]
    inputs = {name: tensors[f"input.{case}.{name}"].clone() for name in spec["inputs"]}
    if grads:
        for name in spec["grads"]:
            inputs[name].requires_grad_(True)
    return inputs


def _call(net: STDiT3, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # The fixture's call: out = model(x, timestep, y, mask=mask, x_mask=x_mask, fps=fps, height=height, width=width)
    kwargs = {k: v for k, v in inputs.items() if k not in ("x", "timestep", "y")}
    return net(inputs["x"], inputs["timestep"], inputs["y"], **kwargs)


def _loss(tensors: dict, case: str, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # README: loss = sum over outputs of (output * lossw).sum()
    return sum((out * tensors[f"lossw.{case}.{name}"]).sum() for name, out in outputs.items())


# --------------------------------------------------------------------------------------------------
# numerical parity with the original
# --------------------------------------------------------------------------------------------------


def test_fixture_config_and_state_load_strictly(tensors, model):
    cfg = _constructor()
    assert model.config.hidden_size == cfg["hidden_size"] and model.config.depth == cfg["depth"]
    state = _state(tensors)
    ours = model.state_dict()
    assert set(ours) == set(state)  # (safetensors stores keys sorted; the order is checked on the TSV)
    assert all(ours[k].shape == v.shape for k, v in state.items())
    assert "pos_embed.inv_freq" not in ours and "pos_embed.inv_freq" in dict(model.named_buffers())
    assert "rope.freqs" in dict(model.named_parameters()) and not model.rope.freqs.requires_grad
    assert "y_embedder.y_embedding" in dict(model.named_buffers())
    # the fixture keeps the constructor value of rope.freqs
    d = cfg["hidden_size"] // cfg["num_heads"]
    expected = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(state["rope.freqs"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_fixture_outputs_and_input_grads(model, tensors, case):
    spec = META["cases"][case]
    assert spec["call"].startswith("out = model(x, timestep, y"), spec["call"]
    inputs = _inputs(tensors, case)
    outputs = {"out": _call(model, inputs)}
    assert set(outputs) == set(spec["outputs"])
    for name, out in outputs.items():
        assert out.dtype == torch.float32
        _check(f"{case}.output.{name}", out, tensors[f"output.{case}.{name}"], "outputs")

    loss = _loss(tensors, case, outputs)
    # the loss cancels heavily, so compare it on the scale of sum |expected * W|
    scale = sum((tensors[f"output.{case}.{n}"] * tensors[f"lossw.{case}.{n}"]).abs().sum().item() for n in outputs)
    assert abs(loss.item() - spec["loss_value"]) <= _tolerance("outputs") * scale, (loss.item(), spec["loss_value"])
    loss.backward()
    for name in spec["grads"]:
        grad = inputs[name].grad
        assert grad is not None, f"{case}: no gradient reached input {name}"
        _check(f"{case}.grad.{name}", grad, tensors[f"grad.{case}.{name}"], "grads", name)

    pad = tensors[f"input.{case}.mask"] == 0 if inputs.get("mask") is not None else None
    if pad is not None and pad.any():  # padded caption tokens get exactly zero gradient
        assert torch.equal(inputs["y"].grad[:, 0][pad], torch.zeros_like(inputs["y"].grad[:, 0][pad]))


def test_gradient_checkpointing_gives_same_results(model, tensors):
    case = CASES[0]
    assert not model.gradient_checkpointing
    model.set_gradient_checkpointing(True)
    try:
        assert model.gradient_checkpointing
        inputs = _inputs(tensors, case)
        out = _call(model, inputs)
        _loss(tensors, case, {"out": out}).backward()
    finally:
        model.set_gradient_checkpointing(False)
    _check(f"{case}.output.out[checkpointed]", out, tensors[f"output.{case}.out"], "outputs")
    for name in META["cases"][case]["grads"]:
        _check(f"{case}.grad.{name}[checkpointed]", inputs[name].grad, tensors[f"grad.{case}.{name}"], "grads", name)


# --------------------------------------------------------------------------------------------------
# conventions: a "fixed" or simplified port must fail the fixture
# --------------------------------------------------------------------------------------------------


def _fixed_final_layer(self, x, t, x_mask=None, t0=None, T=None):
    """The final layer WITHOUT the original's quirk: the t0 branch normalises the unmodulated x."""
    shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
    normed = self.norm_final(x)
    out = normed * (1 + scale) + shift
    if x_mask is not None:
        shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
        out = stdit3_module._select_frames(x_mask, out, normed * (1 + scale0) + shift0, T)
    return self.linear(out)


def test_mutation_fixing_the_final_layer_quirk_fails(model, tensors, monkeypatch):
    case = _case_with("x_mask")
    inputs = _inputs(tensors, case, grads=False)
    with torch.no_grad():
        ref = _call(model, inputs)
        monkeypatch.setattr(stdit3_module.FinalLayer, "forward", _fixed_final_layer)
        fixed = _call(model, inputs)
    expected = tensors[f"output.{case}.out"]
    assert _rel_err(ref, expected) <= _tolerance("outputs")
    assert _rel_err(fixed, expected) > 0.05  # README: about 40 % of the max


def test_mutation_attending_caption_padding_fails(model, tensors):
    case = _case_with("mask")
    inputs = _inputs(tensors, case, grads=False)
    with torch.no_grad():
        ignored_mask = _call(model, {**inputs, "mask": None})
        # the padded tokens really are ignored: changing them changes nothing
        y = inputs["y"].clone()
        pad = inputs["mask"] == 0
        y[:, 0][pad] = torch.randn_like(y[:, 0][pad]) * 10
        changed_pad = _call(model, {**inputs, "y": y})
    expected = tensors[f"output.{case}.out"]
    assert _rel_err(ignored_mask, expected) > 0.05
    assert _rel_err(changed_pad, expected) <= _tolerance("outputs")


def test_mutation_swapping_pos_emb_axes_fails(model, tensors, monkeypatch):
    case = CASES[-1]
    inputs = _inputs(tensors, case, grads=False)
    original = stdit3_module.PositionEmbedding2D.forward

    def swapped(self, h, w, scale=1.0, base_size=None, dtype=None):
        emb = original(self, h, w, scale=scale, base_size=base_size, dtype=dtype)
        half = emb.shape[-1] // 2
        return torch.cat([emb[..., half:], emb[..., :half]], dim=-1)

    with torch.no_grad():
        monkeypatch.setattr(stdit3_module.PositionEmbedding2D, "forward", swapped)
        out = _call(model, inputs)
    assert _rel_err(out, tensors[f"output.{case}.out"]) > 1e-3


# --------------------------------------------------------------------------------------------------
# behaviour the adapter / sampler rely on
# --------------------------------------------------------------------------------------------------


def test_block_hooks_see_block_outputs_in_forward_order(model, tensors):
    case = CASES[0]
    inputs = _inputs(tensors, case, grads=False)
    b, _, t, h, w = inputs["x"].shape
    pt, ph, pw = model.patch_size
    tokens = -(-t // pt) * -(-h // ph) * -(-w // pw)
    seen: list[tuple[str, tuple[int, ...]]] = []
    blocks = []
    for i in range(model.depth):
        blocks += [(f"spatial_blocks.{i}", model.spatial_blocks[i]), (f"temporal_blocks.{i}", model.temporal_blocks[i])]
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: seen.append((n, tuple(out.shape)))) for n, m in blocks]
    try:
        with torch.no_grad():
            out = _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert [n for n, _ in seen] == [n for n, _ in blocks]
    assert all(shape == (b, tokens, model.hidden_size) for _, shape in seen)
    _check(f"{case}.output.out[hooked]", out, tensors[f"output.{case}.out"], "outputs")


def test_defaults_and_broadcasting(model, tensors):
    inputs = _inputs(tensors, _case_with("mask", "x_mask", "fps", "height", "width"), grads=False)
    b, _, _, h, w = inputs["x"].shape
    with torch.no_grad():
        ref = _call(model, inputs)
        # height/width default to 8x the latent size (the fixture uses exactly that)
        assert torch.equal(inputs["height"], torch.full((b,), 8.0 * h)) and torch.equal(
            inputs["width"], torch.full((b,), 8.0 * w)
        )
        no_size = model(inputs["x"], inputs["timestep"], inputs["y"], mask=inputs["mask"], x_mask=inputs["x_mask"],
                        fps=inputs["fps"])
        assert torch.equal(no_size, ref)
        # python scalars for fps/height/width, one shared timestep
        same_t = model(inputs["x"], inputs["timestep"][:1], inputs["y"], mask=inputs["mask"], fps=24.0,
                       height=float(8 * h), width=float(8 * w), extra_kwarg="ignored")
        explicit = model(inputs["x"], inputs["timestep"][:1].expand(b), inputs["y"], mask=inputs["mask"],
                         fps=torch.full((b,), 24.0), height=inputs["height"], width=inputs["width"])
        assert torch.equal(same_t, explicit)
        # all-True x_mask is the same as no x_mask
        all_true = model(inputs["x"], inputs["timestep"], inputs["y"], mask=inputs["mask"],
                         x_mask=torch.ones_like(inputs["x_mask"]), fps=inputs["fps"],
                         height=inputs["height"], width=inputs["width"])
        none = model(inputs["x"], inputs["timestep"], inputs["y"], mask=inputs["mask"], fps=inputs["fps"],
                     height=inputs["height"], width=inputs["width"])
        torch.testing.assert_close(all_true, none, rtol=0, atol=1e-6 * none.abs().max().item())
        # the null caption has the caption layout
        null = model.null_caption(b)
        assert null.shape == inputs["y"].shape


def test_skip_y_embedder_takes_the_packed_projected_caption(model, tensors):
    """``skip_y_embedder``: y is already projected and packed ``[1, sum(lens), C]``, mask holds the lengths."""
    case = _case_with("mask")
    inputs = _inputs(tensors, case, grads=False)
    skip = STDiT3(dataclasses.replace(model.config, skip_y_embedder=True))
    skip.load_state_dict(model.state_dict())
    skip.eval()
    with torch.no_grad():
        projected = model.y_embedder(inputs["y"])[:, 0]
        keep = inputs["mask"] != 0
        packed = projected[keep][None]
        lens = keep.sum(1).tolist()
        out = _call(skip, {**inputs, "y": packed, "mask": lens})
    _check(f"{case}.output.out[skip_y_embedder]", out, tensors[f"output.{case}.out"], "outputs")


def test_freezing_flags_only_change_requires_grad():
    small = {**_constructor(), "freeze_y_embedder": True}
    net = STDiT3(**small)
    assert not any(p.requires_grad for p in net.y_embedder.parameters())
    assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith(("y_embedder", "rope")))
    net = STDiT3(**{**_constructor(), "only_train_temporal": True})
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"temporal_blocks"}


def test_bfloat16_runs_and_returns_float32(model, tensors):
    case = CASES[0]
    inputs = _inputs(tensors, case, grads=False)
    low = STDiT3(model.config)
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16).eval()
    with torch.no_grad():
        out = _call(low, inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel_err(out, tensors[f"output.{case}.out"]) < 0.1


# --------------------------------------------------------------------------------------------------
# configuration and full-size key / shape / parameter-count parity with the official checkpoint
# --------------------------------------------------------------------------------------------------


def test_config_from_hf_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OFFICIAL_CONFIG, "torch_dtype": "float32", "transformers_version": "4.40.0"}))
    cfg = STDiT3Config.from_json_file(path)
    assert cfg.depth == 28 and cfg.hidden_size == 1152 and cfg.patch_size == (1, 2, 2)
    assert cfg.enable_flash_attn and cfg.enable_layernorm_kernel  # accepted, ignored
    assert cfg.out_channels == 8 and cfg.head_dim == 72
    # the fixture's constructor is the original field set
    fields = {f.name for f in dataclasses.fields(STDiT3Config)}
    assert set(_constructor()) <= fields
    with pytest.warns(UserWarning, match="unknown"):
        STDiT3Config.from_dict({"depth": 2, "not_a_field": 1})
    with pytest.raises(ValueError):
        STDiT3Config.from_dict({"model_type": "STDiT2"})


def _official_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEYS_PATH.read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = tuple(ast.literal_eval(shape))
    return keys


def test_full_size_state_dict_matches_official_keys():
    cfg = STDiT3Config.from_dict(OFFICIAL_CONFIG)
    with torch.device("meta"):
        net = STDiT3(cfg)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    official = _official_keys()
    missing = sorted(set(official) - set(ours))
    unexpected = sorted(set(ours) - set(official))
    assert not missing and not unexpected, f"missing {missing[:5]} unexpected {unexpected[:5]}"
    wrong = [(k, ours[k], official[k]) for k in official if ours[k] != official[k]]
    assert not wrong, f"shape mismatches: {wrong[:5]}"
    assert list(ours) == list(official), "key order differs from the original's"
    assert len(official) == 973

    # Parameters: every nn.Parameter incl. rope.freqs (36, requires_grad=False); buffers are not parameters.
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == OFFICIAL_PARAMS, n_params
    y_embedding = official["y_embedder.y_embedding"]
    assert y_embedding == (cfg.model_max_length, cfg.caption_channels)
    assert n_params + torch.Size(y_embedding).numel() == sum(torch.Size(s).numel() for s in official.values())
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == OFFICIAL_PARAMS - net.rope.freqs.numel()
    assert {n for n, _ in net.named_buffers()} == {"pos_embed.inv_freq", "y_embedder.y_embedding"}
