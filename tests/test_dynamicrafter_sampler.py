"""DynamiCrafter schedule + DDIM sampler against the golden fixture of the original loop.

Three levels: (a) the schedule tables and DDIM timesteps; (b) the whole 4-step trajectory with the
UNet replaced by a replay of the model outputs the fixture recorded; (c) end to end with the port's
UNet (skipped only while ``anti_i2v.models.dynamicrafter.unet`` does not exist yet).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from anti_i2v.models.dynamicrafter.sampler import DDIMSampler, hybrid_model_fn, make_ddim_timesteps
from anti_i2v.models.dynamicrafter.schedule import DynamiCrafterSchedule

FIXTURES = Path(__file__).parent / "fixtures" / "ports"
NAME = "dynamicrafter_ddim"
UNET_NAME = "dynamicrafter_unet"
UNET_MODULE = "anti_i2v.models.dynamicrafter.unet"

SPEC: dict = json.loads((FIXTURES / f"{NAME}.json").read_text())
CASES = sorted(SPEC["cases"])
TOL = SPEC["recommended_tolerance"]["per_tensor_relative_to_absmax"]
TABLE_TOL = TOL["alphas_cumprod, sqrt_*, ddim_*, scale_arr"]
TRAJ_TOL = TOL["model_out_*, pred_x0, x_after_step, samples"]

SCHEDULE_TABLES = ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr")
DDIM_TABLES = (
    "ddim_alphas",
    "ddim_alphas_prev",
    "ddim_sigmas",
    "ddim_sqrt_one_minus_alphas",
    "ddim_scale_arr",
    "ddim_scale_arr_prev",
)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{NAME}.safetensors"))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = (actual.detach().double() - expected.double()).abs().max().item()
    return err / max(expected.double().abs().max().item(), 1e-30)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rel = _rel_err(actual, expected)
    assert rel <= tol, f"{what}: max|diff| / max|expected| = {rel:.3g} > {tol:g}"


def _schedule(case: str) -> DynamiCrafterSchedule:
    s = SPEC["cases"][case]["schedule"]
    return DynamiCrafterSchedule(
        timesteps=s["timesteps"],
        linear_start=s["linear_start"],
        linear_end=s["linear_end"],
        beta_schedule=s["beta_schedule"],
        parameterization=s["parameterization"],
        rescale_betas_zero_snr=s["rescale_betas_zero_snr"],
        use_dynamic_rescale=s["use_dynamic_rescale"],
        base_scale=s["base_scale"],
        turning_step=s["turning_step"],
    )


def _sampler(case: str) -> DDIMSampler:
    call = SPEC["cases"][case]["sampler_call"]
    return DDIMSampler(_schedule(case), num_steps=call["S"], timestep_spacing=call["timestep_spacing"], eta=call["eta"])


def _conds(data: dict[str, torch.Tensor], case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """cond / uncond as in the fixture's procedure: the same c_concat, different cross-attention context."""
    c_concat = data[f"input.{case}.c_concat"]
    cond = {"c_concat": [c_concat], "c_crossattn": [data[f"input.{case}.cond_context"]]}
    uncond = {"c_concat": [c_concat], "c_crossattn": [data[f"input.{case}.uncond_context"]]}
    return cond, uncond


def _run(sampler: DDIMSampler, case: str, data: dict[str, torch.Tensor], model_fn) -> tuple[torch.Tensor, dict]:
    call = SPEC["cases"][case]["sampler_call"]
    cond, uncond = _conds(data, case)
    x_T = data[f"input.{case}.x_T"]
    assert list(x_T.shape) == [call["batch_size"], *call["shape"]]
    return sampler.sample(
        model_fn,
        x_T,
        cond,
        uncond,
        guidance_scale=call["unconditional_guidance_scale"],
        guidance_rescale=call["guidance_rescale"],
        noise=data[f"input.{case}.step_noise"],
        return_intermediates=True,
    )


# --------------------------------------------------------------------------- (a) tables
@pytest.mark.parametrize("case", CASES)
def test_schedule_tables(case: str, data: dict[str, torch.Tensor]) -> None:
    sch = _schedule(case)
    for name in SCHEDULE_TABLES:
        key = f"output.{case}.{name}"
        if key not in data:
            assert name != "scale_arr" or not sch.use_dynamic_rescale
            continue
        table = getattr(sch, name)
        assert table is not None, name
        _assert_rel(table, data[key], TABLE_TOL, name)
    if SPEC["cases"][case]["schedule"]["rescale_betas_zero_snr"]:
        assert sch.alphas_cumprod[-1].item() == 0.0


@pytest.mark.parametrize("case", CASES)
def test_ddim_timesteps_and_tables(case: str, data: dict[str, torch.Tensor]) -> None:
    sampler = _sampler(case)
    expected_ts = data[f"output.{case}.ddim_timesteps"]
    assert sampler.ddim_timesteps.dtype == torch.int64
    assert torch.equal(sampler.ddim_timesteps, expected_ts)
    assert sampler.ddim_timesteps.tolist() == SPEC["cases"][case]["ddim_timesteps"]
    for name in DDIM_TABLES:
        key = f"output.{case}.{name}"
        if key not in data:
            continue
        _assert_rel(getattr(sampler, name), data[key], TABLE_TOL, name)
    dtypes = SPEC["cases"][case]["dtypes"]
    for name, dtype in dtypes.items():
        assert str(getattr(sampler, name).dtype) == dtype, name


def test_released_timestep_spacings() -> None:
    """the original release: 50 trailing steps are 19, 39, ..., 999; 50 uniform steps are 1, 21, ..., 981."""
    assert make_ddim_timesteps(50, "uniform_trailing").tolist() == list(range(19, 1000, 20))
    assert make_ddim_timesteps(50, "uniform").tolist() == list(range(1, 1000, 20))


@pytest.mark.parametrize("case", CASES)
def test_variant_presets_match_fixture_schedules(case: str) -> None:
    variant = {"v": "512", "eps": "256"}[SPEC["cases"][case]["schedule"]["parameterization"]]
    preset, ref = DynamiCrafterSchedule.for_variant(variant), _schedule(case)
    assert torch.equal(preset.alphas_cumprod, ref.alphas_cumprod)
    assert preset.parameterization == ref.parameterization
    assert preset.use_dynamic_rescale == ref.use_dynamic_rescale
    if ref.scale_arr is not None:
        assert preset.scale_arr is not None and torch.equal(preset.scale_arr, ref.scale_arr)


# --------------------------------------------------------------------------- (b) replay
@pytest.mark.parametrize("case", CASES)
def test_trajectory_replaying_recorded_model_outputs(case: str, data: dict[str, torch.Tensor]) -> None:
    out = lambda name: data[f"output.{case}.{name}"]  # noqa: E731
    sampler = _sampler(case)
    cond, uncond = _conds(data, case)
    x_T = data[f"input.{case}.x_T"]
    z_before = torch.cat([x_T[None], out("x_after_step")[:-1]])  # the input of step i
    calls: list[tuple[int, str]] = []

    def replay(x: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
        i = len(calls) // 2
        which = "cond" if c["c_crossattn"][0] is cond["c_crossattn"][0] else "uncond"
        if which == "uncond":
            assert c["c_crossattn"][0] is uncond["c_crossattn"][0]
        # the original calls the conditional branch first, then the unconditional one
        assert which == ("cond" if len(calls) % 2 == 0 else "uncond")
        assert c["c_concat"][0] is cond["c_concat"][0]
        assert t.dtype == torch.int64 and torch.equal(t, out("step_t")[i])
        _assert_rel(x, z_before[i], TRAJ_TOL, f"model input at step {i}")
        calls.append((i, which))
        return out(f"model_out_{which}")[i].clone()

    samples, inter = _run(sampler, case, data, replay)
    assert len(calls) == 2 * SPEC["cases"][case]["sampler_call"]["S"]
    assert torch.equal(inter["step_t"], out("step_t"))
    for name in ("pred_x0", "x_after_step"):
        _assert_rel(inter[name], out(name), TRAJ_TOL, name)
    _assert_rel(samples, out("samples"), TRAJ_TOL, "samples")
    _assert_rel(inter["z_before_step"], z_before, TRAJ_TOL, "z_before_step")


def test_noise_callable_and_gradients_flow(data: dict[str, torch.Tensor]) -> None:
    """The per-step noise can come from a callable, and the loop is differentiable (no no_grad)."""
    case = CASES[0]
    sampler = _sampler(case)
    cond, uncond = _conds(data, case)
    step_noise = data[f"input.{case}.step_noise"]
    x_T = data[f"input.{case}.x_T"].clone().requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, x_T[0].numel()).reshape(x_T.shape[1:])
    seen: list[int] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
        bias = c["c_crossattn"][0].mean() + t.float().mean() / 1000
        return torch.tanh(x * weight + bias)

    def noise_fn(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        seen.append(i)
        return step_noise[i]

    call = SPEC["cases"][case]["sampler_call"]
    kwargs = dict(guidance_scale=call["unconditional_guidance_scale"], guidance_rescale=call["guidance_rescale"])
    a = sampler.sample(model_fn, x_T, cond, uncond, noise=noise_fn, **kwargs)
    b = sampler.sample(model_fn, x_T, cond, uncond, noise=list(step_noise), **kwargs)
    assert seen == list(range(call["S"]))
    assert torch.equal(a, b)
    a.square().sum().backward()
    assert x_T.grad is not None and torch.isfinite(x_T.grad).all() and x_T.grad.abs().sum() > 0


def test_training_helpers_are_consistent() -> None:
    """q_sample / v_target / predict_* agree with each other, including the dynamic rescale."""
    torch.manual_seed(0)
    for case in CASES:
        sch = _schedule(case)
        x0 = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)
        noise = torch.randn_like(x0)
        t = torch.tensor([0, 417, 998])
        z = sch.q_sample(x0, t, noise)
        x0s = sch.rescale_x0(x0, t)
        if sch.use_dynamic_rescale:
            scale = sch.scale_arr[t].double().view(-1, 1, 1, 1, 1)
            torch.testing.assert_close(x0s, x0 * scale)
        v = sch.v_target(x0, noise, t)
        torch.testing.assert_close(sch.predict_x0_from_v(z, t, v), x0s, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sch.predict_eps_from_v(z, t, v), noise, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sch.predict_x0_from_eps(z, t, noise), x0s, atol=1e-5, rtol=1e-5)
        target = v if sch.parameterization == "v" else noise
        assert sch.training_loss(target, x0, noise, t).item() == pytest.approx(0.0, abs=1e-12)
        per = sch.training_loss(target + 1.0, x0, noise, t, reduction="per_sample")
        torch.testing.assert_close(per, torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- (c) end to end
def _unet_module():
    if importlib.util.find_spec(UNET_MODULE) is None:
        pytest.skip(f"{UNET_MODULE} does not exist yet")
    return importlib.import_module(UNET_MODULE)  # import errors of an existing module fail the test


@pytest.fixture(scope="module")
def unet():
    module = _unet_module()
    spec = json.loads((FIXTURES / f"{UNET_NAME}.json").read_text())
    (kwargs,) = spec["constructor"].values()
    model = module.UNetModel(**kwargs).eval()
    state = load_file(str(FIXTURES / f"{UNET_NAME}.safetensors"))
    weights = {k[len("state.") :]: v.float() for k, v in state.items() if k.startswith("state.")}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parametrize("case", CASES)
def test_end_to_end_with_unet_port(case: str, data: dict[str, torch.Tensor], unet) -> None:
    out = lambda name: data[f"output.{case}.{name}"]  # noqa: E731
    sampler = _sampler(case)
    model_fn = hybrid_model_fn(unet, fs=data[f"input.{case}.fs"])
    with torch.no_grad():
        samples, inter = _run(sampler, case, data, model_fn)
    assert torch.equal(inter["step_t"], out("step_t"))
    for name in ("model_out_cond", "model_out_uncond", "pred_x0", "x_after_step"):
        _assert_rel(inter[name], out(name), TRAJ_TOL, name)
    _assert_rel(samples, out("samples"), TRAJ_TOL, "samples")
