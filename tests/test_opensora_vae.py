"""Open-Sora 1.2 video VAE (temporal VAE + VideoAutoencoderPipeline) against the golden fixtures of the originals.

Configurations, case names, shapes and tolerances come from the fixtures' json (a case is an encode or a
decode by its ``call``, not by its name); ``ANTI_I2V_PORT_FIXTURES`` points the tests at another folder
of fixtures of the same format (see ``opensora_fixtures``).
"""

from __future__ import annotations

import ast
import json
import math

import pytest
import torch
from opensora_fixtures import KEYS as KEYS_DIR
from opensora_fixtures import cases, spec, state, tensors

from anti_i2v.models.opensora.vae import (
    SPATIAL_SCALING,
    CausalConv3d,
    VAETemporal,
    VideoAutoencoderPipeline,
    full_size_vae_config,
    tiny_vae_config,
)

TEMPORAL = "opensora_vae_temporal"
PIPELINE = "opensora_vae_pipeline"
KEYS = KEYS_DIR / "opensora_vae_v1_2.tsv"


def _is_encode(case_spec: dict) -> bool:
    """An encode case (its call is ``... .encode(x)``); the others decode."""
    return ".encode(" in case_spec["call"]


def _encode_inputs(name: str) -> list[torch.Tensor]:
    """The pixel/latent input ``x`` of every encode case."""
    return [tensors(name)[f"input.{c}.x"] for c in cases(name, lambda c, s: _is_encode(s))]


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max|diff| {err:.3g} > {tol:g} * max|expected| {scale:.3g}"
    return err / scale


def _pipeline_kwargs(meta: dict) -> dict:
    c = meta["constructor"]
    pc = c["VideoAutoencoderPipelineConfig"]
    return {
        "spatial_config": c["spatial_AutoencoderKL_config"],
        "temporal_config": c["vae_temporal (VAE_Temporal)"],
        "micro_batch_size": c["vae_2d (VideoAutoencoderKL)"]["micro_batch_size"],
        "micro_frame_size": pc["micro_frame_size"],
        "scale": pc["scale"],
        "shift": pc["shift"],
    }


@pytest.fixture(scope="module")
def temporal_vae() -> VAETemporal:
    model = VAETemporal(**spec(TEMPORAL)["constructor"]["VAE_Temporal"]).eval()
    model.load_state_dict(state(TEMPORAL), strict=True)
    return model


@pytest.fixture(scope="module")
def pipeline() -> VideoAutoencoderPipeline:
    kwargs = _pipeline_kwargs(spec(PIPELINE))
    # build with the official constants so that only the loaded buffers can supply the fixture's values
    kwargs.pop("scale"), kwargs.pop("shift")
    model = VideoAutoencoderPipeline(**kwargs).eval()
    model.load_state_dict(state(PIPELINE), strict=True)
    return model


def _run_case(name: str, case: str, call) -> None:
    """Run ``call(inputs) -> {output name: tensor}``, check outputs, loss and input grads."""
    fixture, data = spec(name), tensors(name)
    tol = fixture["recommended_tolerance"]["per_tensor_relative_to_absmax"]
    cs = fixture["cases"][case]
    inputs = {}
    for iname, meta in cs["inputs"].items():
        if "value" in meta:
            inputs[iname] = meta["value"]
            continue
        t = data[f"input.{case}.{iname}"].clone()
        assert list(t.shape) == meta["shape"], iname
        if iname in cs["grads"]:
            t.requires_grad_(True)
        inputs[iname] = t
    outs = call(inputs)
    assert set(outs) == set(cs["outputs"])
    loss = 0.0
    for oname, out in outs.items():
        assert list(out.shape) == cs["outputs"][oname]["shape"], oname
        _assert_rel(out, data[f"output.{case}.{oname}"], tol["outputs"], f"{case}.{oname}")
        loss = loss + (out * data[f"lossw.{case}.{oname}"]).sum()
    assert loss.item() == pytest.approx(cs["loss_value"], rel=1e-4, abs=1e-4)
    loss.backward()
    for gname in cs["grads"]:
        grad = inputs[gname].grad
        assert grad is not None, gname
        _assert_rel(grad, data[f"grad.{case}.{gname}"], tol["grads"], f"{case}.grad.{gname}")


# ---------------------------------------------------------------------------------------------------
# temporal VAE fixture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases(TEMPORAL))
def test_temporal_vae_matches_fixture(temporal_vae: VAETemporal, case: str) -> None:
    def call(inp):
        if _is_encode(spec(TEMPORAL)["cases"][case]):
            posterior = temporal_vae.encode(inp["x"])
            return {"mean": posterior.mean, "logvar": posterior.logvar}
        return {"x": temporal_vae.decode(inp["z"], num_frames=inp["num_frames"])}

    _run_case(TEMPORAL, case, call)


def test_causal_conv_sees_only_past_frames() -> None:
    """CausalConv3d: output frame n depends on input frames < (n + 1) * stride only; H/W keep their size.

    (The whole temporal VAE is *not* causal: its GroupNorms pool statistics over all frames of a chunk.)
    """
    torch.manual_seed(0)
    for stride in (1, 2):
        conv = CausalConv3d(3, 5, 3, time_stride=stride)
        x = torch.randn(2, 3, 8, 5, 7)
        with torch.no_grad():
            y = conv(x)
            assert y.shape == (2, 5, 8 // stride, 5, 7)
            for n in range(y.shape[2]):
                changed = x.clone()
                changed[:, :, (n + 1) * stride :] += 1.0
                out = conv(changed)
                assert torch.equal(out[:, :, : n + 1], y[:, :, : n + 1])
                if n + 1 < y.shape[2]:
                    assert (out[:, :, n + 1] - y[:, :, n + 1]).abs().max() > 1e-3


def test_temporal_vae_frame_counts(temporal_vae: VAETemporal) -> None:
    f = temporal_vae.time_downsample_factor
    cfg = spec(TEMPORAL)["constructor"]["VAE_Temporal"]
    assert f == 2 ** sum(cfg["temporal_downsample"])
    assert [temporal_vae.latent_frames(n) for n in (1, f, f + 1, 17)] == [1, 1, 2, math.ceil(17 / f)]
    z = torch.zeros(1, cfg["embed_dim"], 3, 2, 3)
    with torch.no_grad():
        assert temporal_vae.decode(z).shape[2] == 3 * f
        assert temporal_vae.decode(z, num_frames=2 * f + 1).shape[2] == 2 * f + 1
    with pytest.raises(ValueError):
        temporal_vae.decode(z, num_frames=f)


# ---------------------------------------------------------------------------------------------------
# pipeline fixture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases(PIPELINE))
def test_pipeline_matches_fixture(pipeline: VideoAutoencoderPipeline, case: str) -> None:
    def call(inp):
        if _is_encode(spec(PIPELINE)["cases"][case]):
            noise = {k: inp[k] for k in ("eps_spatial", "eps_temporal") if k in inp}
            return {"z": pipeline.encode(inp["x"], **noise)}
        return {"x": pipeline.decode(inp["z"], num_frames=inp["num_frames"])}

    _run_case(PIPELINE, case, call)


def test_pipeline_uses_loaded_shift_scale(pipeline: VideoAutoencoderPipeline) -> None:
    pc = spec(PIPELINE)["constructor"]["VideoAutoencoderPipelineConfig"]
    c = pipeline.out_channels
    assert torch.equal(pipeline.scale, torch.tensor(pc["scale"]).view(1, c, 1, 1, 1))
    assert torch.equal(pipeline.shift, torch.tensor(pc["shift"]).view(1, c, 1, 1, 1))
    assert not torch.allclose(pipeline.scale, torch.tensor(full_size_vae_config()["scale"]).view(1, c, 1, 1, 1))


def test_pipeline_ignores_autoencoderkl_scaling_factor(pipeline: VideoAutoencoderPipeline) -> None:
    assert pipeline.spatial_vae.module.config.scaling_factor != SPATIAL_SCALING
    x = _encode_inputs(PIPELINE)[0]
    with torch.no_grad():
        spatial = pipeline.spatial_vae.encode(x)
        mean = pipeline.spatial_vae.module.encode(x[:, :, 0]).latent_dist.mean
    _assert_rel(spatial[:, :, 0], mean * SPATIAL_SCALING, 1e-6, "spatial latent")


def test_pipeline_sampling_draw_order(pipeline: VideoAutoencoderPipeline) -> None:
    """``sample_posterior=True`` draws one normal tensor per spatial micro-batch, then one per temporal chunk."""
    x = max(_encode_inputs(PIPELINE), key=lambda t: t.shape[2])  # the most frames: several chunks if any
    b, _, t, h, w = x.shape
    c = pipeline.out_channels
    lh, lw = pipeline.get_latent_size([t, h, w])[1:]
    mbs = pipeline.spatial_vae.micro_batch_size
    g = torch.Generator().manual_seed(123)
    spatial = torch.cat([torch.randn(min(mbs, b * t - i), c, lh, lw, generator=g) for i in range(0, b * t, mbs)])
    eps_spatial = spatial.reshape(b, t, c, lh, lw).transpose(1, 2)
    mfs = pipeline.micro_frame_size
    chunks = [pipeline.temporal_vae.latent_frames(min(mfs, t - s)) for s in range(0, t, mfs)]
    eps_temporal = torch.cat([torch.randn(b, c, n, lh, lw, generator=g) for n in chunks], dim=2)
    with torch.no_grad():
        drawn = pipeline.encode(x, sample_posterior=True, generator=torch.Generator().manual_seed(123))
        replay = pipeline.encode(x, eps_spatial=eps_spatial, eps_temporal=eps_temporal)
        again = pipeline.encode(x, sample_posterior=True, generator=torch.Generator().manual_seed(123))
        mean = pipeline.encode(x)
    assert torch.equal(drawn, again)
    _assert_rel(drawn, replay, 1e-6, "generator vs replayed noise")
    assert (drawn - mean).abs().max() > 1e-3


def test_pipeline_latent_sizes(pipeline: VideoAutoencoderPipeline) -> None:
    mfs = pipeline.micro_frame_size
    f = pipeline.temporal_vae.time_downsample_factor
    per_chunk = math.ceil(mfs / f)
    assert pipeline.micro_z_frame_size == per_chunk
    for frames in (1, mfs, mfs + 3, 3 * mfs, 6 * mfs):
        expected = (frames // mfs) * per_chunk + math.ceil((frames % mfs) / f)
        assert pipeline.latent_frames(frames) == expected
    # one 2x downsampling per spatial block after the first, as diffusers' AutoencoderKL
    f_hw = 2 ** (len(spec(PIPELINE)["constructor"]["spatial_AutoencoderKL_config"]["block_out_channels"]) - 1)
    assert pipeline.get_latent_size([None, 240, 426]) == [None, 240 // f_hw, 426 // f_hw]
    with pytest.raises(ValueError):
        pipeline.decode(torch.zeros(1, pipeline.out_channels, pipeline.latent_frames(mfs) + 1, 2, 4), num_frames=mfs)


def test_tiny_config_has_fixture_layout() -> None:
    """``tiny_vae_config()`` builds the architecture of the pipeline fixture (same keys and shapes).

    Skipped for a fixture made with another tiny configuration (its json says which).
    """
    tiny, fixture = tiny_vae_config(), _pipeline_kwargs(spec(PIPELINE))
    differ = [
        f"{part}.{key}"
        for part in ("spatial_config", "temporal_config")
        for key, value in tiny[part].items()
        if json.loads(json.dumps(value)) != fixture[part].get(key)
    ] + [key for key in ("micro_batch_size", "micro_frame_size") if tiny[key] != fixture[key]]
    if differ:
        pytest.skip(f"the {PIPELINE} fixture has another tiny configuration ({', '.join(differ)})")
    model = VideoAutoencoderPipeline(**tiny)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state(PIPELINE).items()}
    assert ours == theirs


# ---------------------------------------------------------------------------------------------------
# official checkpoint layout
# ---------------------------------------------------------------------------------------------------


def _official_keys() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(ast.literal_eval(shape))
    return out


@pytest.fixture(scope="module")
def full_size_meta() -> VideoAutoencoderPipeline:
    with torch.device("meta"):
        return VideoAutoencoderPipeline(**full_size_vae_config())


def test_full_size_keys_match_official(full_size_meta: VideoAutoencoderPipeline) -> None:
    official = _official_keys()
    ours = {k: tuple(v.shape) for k, v in full_size_meta.state_dict().items()}
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert len(ours) == len(official) == 517
    meta_state = {k: torch.empty(s, device="meta") for k, s in official.items()}
    full_size_meta.load_state_dict(meta_state, strict=True, assign=True)


def test_full_size_parameter_counts(full_size_meta: VideoAutoencoderPipeline) -> None:
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total, temporal, spatial = count(full_size_meta), count(full_size_meta.temporal_vae), count(full_size_meta.spatial_vae)
    assert total == temporal + spatial
    assert round(total / 1e6, 1) == 393.3
    assert round(temporal / 1e6, 1) == 309.7
    assert round(spatial / 1e6, 2) == 83.65
    official = _official_keys()
    assert total + sum(math.prod(official[k]) for k in ("scale", "shift")) == sum(math.prod(s) for s in official.values())
