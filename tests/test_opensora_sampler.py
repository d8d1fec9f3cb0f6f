"""Open-Sora 1.2 rectified-flow sampler against the golden fixture of the original loop.

Three levels: (a) the timestep tables (the fixture's cases and the released 30-step settings); (b) the
whole I2V trajectories with STDiT3 replaced by a replay of the velocities the fixture recorded (the
fake model checks every input it gets); (c) end to end with the port's STDiT3 and the
``opensora_stdit3`` state (skipped only while ``anti_i2v.models.opensora.stdit3`` does not exist).
Plus the training-objective helpers.

Case names, step counts, sizes and tolerances come from the fixture's json (the cases are picked by
what their ``mask_values`` and ``first_timestep`` say, not by name); ``ANTI_I2V_PORT_FIXTURES`` points
the tests at another folder of fixtures of the same format (see ``opensora_fixtures``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest
import torch
from opensora_fixtures import cases, spec, state, tensors

from anti_i2v.models.opensora.sampler import (
    IMAGE_FPS,
    RFlowSampler,
    apply_reference,
    make_timesteps,
    multi_resolution_info,
    rf_noisy,
    rf_training_loss,
    rf_training_target,
    sample_training_timesteps,
    stdit3_model_fn,
    timestep_transform,
)

NAME = "opensora_rflow"
MODEL_NAME = "opensora_stdit3"
STDIT3_MODULE = "anti_i2v.models.opensora.stdit3"

SPEC: dict = spec(NAME)
CASES = sorted(cases(NAME))
CTOR = SPEC["constructor"]["RFLOW"]
TOL = SPEC["recommended_tolerance"]["per_tensor_relative_to_absmax"]
TS_TOL = TOL["timesteps, timesteps30.*"]
TRAJ_TOL = TOL["z_before_step, pred_v, z_final"]
assert TOL["x_mask"] == "exact"


def _frame0_ratios(case_spec: dict) -> set[float]:
    """The conditioning frame's mask value (the edit ratio) of every sample."""
    return {row[0] for row in case_spec["mask_values"]}


def _first_step_noises_nothing(case_spec: dict) -> bool:
    """The float32 edge: the first timestep exceeds ``num_timesteps``, so no frame is noised at step 0."""
    return case_spec["first_timestep"] > CTOR["num_timesteps"]


# the cases by what the fixture records: plain I2V (edit ratio 0), edit (0 < ratio < 1), first-step edge
I2V_CASES = sorted(cases(NAME, lambda c, s: _frame0_ratios(s) == {0.0} and not _first_step_noises_nothing(s)))
EDIT_CASES = sorted(cases(NAME, lambda c, s: all(0.0 < r < 1.0 for r in _frame0_ratios(s))))
EDGE_CASES = sorted(cases(NAME, lambda c, s: _first_step_noises_nothing(s)))


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return tensors(NAME)


@pytest.fixture(scope="module")
def y_null() -> torch.Tensor:
    return tensors(MODEL_NAME)["state.y_embedder.y_embedding"]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = (actual.detach().double() - expected.double()).abs().max().item()
    return err / max(expected.double().abs().max().item(), 1e-30)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rel = _rel_err(actual, expected)
    assert rel <= tol, f"{what}: max|diff| / max|expected| = {rel:.3g} > {tol:g}"


def _steps(case: str) -> int:
    """The case's number of sampling steps (the constructor's when the case does not say)."""
    return int(SPEC["cases"][case].get("steps", CTOR["num_sampling_steps"]))


def _size(case: str) -> dict[str, int]:
    """The case's pixel-space ``height``, ``width`` and ``num_frames``."""
    return dict(zip(("height", "width", "num_frames"), SPEC["cases"][case]["height_width_num_frames"]))


def _sampler(case: str) -> RFlowSampler:
    return RFlowSampler(
        num_sampling_steps=_steps(case),
        num_timesteps=CTOR["num_timesteps"],
        cfg_scale=CTOR["cfg_scale"],
        use_timestep_transform=CTOR["use_timestep_transform"],
        use_discrete_timesteps=CTOR["use_discrete_timesteps"],
    )


def _inp(data: dict[str, torch.Tensor], case: str, name: str) -> torch.Tensor:
    return data[f"input.{case}.{name}"]


def _out(data: dict[str, torch.Tensor], case: str, name: str) -> torch.Tensor:
    return data[f"output.{case}.{name}"]


def _run(data: dict[str, torch.Tensor], case: str, model: Any, y_null: torch.Tensor | None, **kw: Any):
    g = lambda n: _inp(data, case, n)  # noqa: E731
    return _sampler(case).sample(
        model,
        g("z"),
        g("y"),
        g("text_mask"),
        height=g("height"),
        width=g("width"),
        num_frames=g("num_frames"),
        fps=g("fps"),
        mask=g("mask"),
        y_null=y_null,
        noise=g("randn_like"),
        return_intermediates=True,
        **kw,
    )


# --------------------------------------------------------------------------- (a) timesteps
@pytest.mark.parametrize("name", sorted(SPEC["timesteps30_settings"]))
def test_released_30_step_timestep_tables(name: str, data: dict[str, torch.Tensor]) -> None:
    s = SPEC["timesteps30_settings"][name]
    expected = data[f"output.timesteps30.{name}"]
    steps = expected.shape[0]
    ts = make_timesteps(steps, batch_size=1, height=s["height"], width=s["width"], num_frames=s["num_frames"])
    assert ts.dtype == torch.float32 and ts.shape == (steps, 1)
    _assert_rel(ts[:, 0], expected, TS_TOL, name)
    assert ts[0, 0].item() == expected[0].item()  # the first step comes out exactly
    assert bool((ts[1:, 0] < ts[:-1, 0]).all())


@pytest.mark.parametrize("case", CASES)
def test_case_timesteps_including_float32_edge(case: str, data: dict[str, torch.Tensor]) -> None:
    g = lambda n: _inp(data, case, n)  # noqa: E731
    ts = _sampler(case).timesteps(g("z").shape[0], g("height"), g("width"), g("num_frames"))
    expected = _out(data, case, "timesteps")
    _assert_rel(ts, expected, TS_TOL, "timesteps")
    # the first step must come out exactly as the original's float32 arithmetic (1000.0001 in the edge case)
    assert ts[0].tolist() == expected[0].tolist()
    assert ts[0, 0].item() == SPEC["cases"][case]["first_timestep"]


def test_timestep_transform_image_and_identity() -> None:
    t = torch.tensor([1000.0, 500.0, 0.0])
    one = torch.ones(3)
    # 512x512 single image: ratio 1, the transform is the identity
    same = timestep_transform(t, one * 512, one * 512, one)
    torch.testing.assert_close(same, t)
    # num_frames == 1 uses a time factor of 1 (not sqrt(1 // 17 * 5) = 0)
    img = timestep_transform(t, one * 360, one * 640, one)
    r = (360 * 640 / 512**2) ** 0.5
    torch.testing.assert_close(img[1], torch.tensor(r * 0.5 / (1 + (r - 1) * 0.5) * 1000))
    # 17 frames -> 5 latent frames -> ratio * sqrt(5)
    vid = timestep_transform(t, one * 512, one * 512, one * 17)
    r = 5**0.5
    torch.testing.assert_close(vid[1], torch.tensor(r * 0.5 / (1 + (r - 1) * 0.5) * 1000))
    raw = make_timesteps(4, batch_size=2, use_timestep_transform=False)
    assert raw[:, 0].tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_multi_resolution_info_matches_fixture_and_image_fps(data: dict[str, torch.Tensor]) -> None:
    for case in CASES:
        g = lambda n: _inp(data, case, n)  # noqa: E731
        info = multi_resolution_info(g("z").shape[0], fps=g("fps")[0].item(), **_size(case))
        for key in ("height", "width", "num_frames", "fps", "ar"):
            assert torch.equal(info[key], g(key)), (case, key)
    assert multi_resolution_info(1, 360, 640, 1, 24)["fps"].item() == IMAGE_FPS


# --------------------------------------------------------------------------- image conditioning
@pytest.mark.parametrize("case", CASES)
def test_apply_reference_reproduces_mask_strategy(case: str, data: dict[str, torch.Tensor]) -> None:
    g = lambda n: _inp(data, case, n)  # noqa: E731
    edit_ratio = float(SPEC["cases"][case]["mask_strategy"].split(",")[5]) if "," in SPEC["cases"][case]["mask_strategy"] else 0.0
    z, mask = apply_reference(g("z_noise"), g("ref"), edit_ratio=edit_ratio)
    assert torch.equal(z, g("z"))
    assert torch.equal(mask, g("mask"))
    assert mask.tolist() == SPEC["cases"][case]["mask_values"]
    # a shared [C, 1, H, W] reference is broadcast over the batch
    z2, _ = apply_reference(g("z_noise")[:1], g("ref")[0], edit_ratio=edit_ratio)
    assert torch.equal(z2, g("z")[:1])


# --------------------------------------------------------------------------- (b) replay
@pytest.mark.parametrize("case", CASES)
def test_trajectory_replaying_recorded_velocities(case: str, data: dict[str, torch.Tensor], y_null) -> None:
    g = lambda n: _inp(data, case, n)  # noqa: E731
    o = lambda n: _out(data, case, n)  # noqa: E731
    b = g("z").shape[0]
    steps = _steps(case)
    calls: list[int] = []

    def replay(z_in, t, y, mask, x_mask, **kwargs) -> torch.Tensor:
        i = len(calls)
        calls.append(i)
        # CFG rows [cond; uncond]: the same latent and timestep twice
        _assert_rel(z_in, torch.cat([o("z_before_step")[i]] * 2), TRAJ_TOL, f"model input at step {i}")
        assert torch.equal(t, torch.cat([o("timesteps")[i]] * 2))
        # the null caption is y_embedding repeated, and it reuses the prompt's text mask
        assert torch.equal(y, torch.cat([g("y"), y_null[None, None].expand(b, 1, -1, -1)]))
        assert torch.equal(mask, g("text_mask").repeat(2, 1))
        assert x_mask.dtype == torch.bool and torch.equal(x_mask, o("x_mask")[i])
        assert torch.equal(kwargs["fps"], g("fps").repeat(2))
        assert torch.equal(kwargs["height"], g("height").repeat(2))
        assert torch.equal(kwargs["width"], g("width").repeat(2))
        return o("pred_v")[i].clone()

    z_final, inter = _run(data, case, replay, y_null)
    assert calls == list(range(steps))
    assert torch.equal(inter["x_mask"], o("x_mask"))
    _assert_rel(inter["timesteps"], o("timesteps"), TS_TOL, "timesteps")
    _assert_rel(inter["z_before_step"], o("z_before_step"), TRAJ_TOL, "z_before_step")
    _assert_rel(inter["pred_v"], o("pred_v"), TRAJ_TOL, "pred_v")
    _assert_rel(z_final, o("z_final"), TRAJ_TOL, "z_final")
    assert torch.equal(inter["z_after_step"][-1], z_final)


def _replayer(data: dict[str, torch.Tensor], case: str):
    """A model_fn returning the recorded velocities of ``case`` in step order."""
    steps = iter(range(_steps(case)))
    return lambda *args, **kwargs: _out(data, case, "pred_v")[next(steps)].clone()


@pytest.mark.parametrize("case", I2V_CASES)
def test_i2v_reference_frame_is_kept_exactly(case: str, data: dict[str, torch.Tensor], y_null) -> None:
    z_final, inter = _run(data, case, _replayer(data, case), y_null)
    ref = _inp(data, case, "ref")
    assert torch.equal(z_final[:, :, :1], ref)
    assert torch.equal(inter["z_before_step"][:, :, :, :1], ref[None].expand(_steps(case), *ref.shape))
    assert not inter["x_mask"][:, :, 0].any() and inter["x_mask"][:, :, 1:].all()
    # the random draws never reach z: other draws (from a generator) give the same result
    g = lambda n: _inp(data, case, n)  # noqa: E731
    other = _sampler(case).sample(
        _replayer(data, case), g("z"), g("y"), g("text_mask"), height=g("height"), width=g("width"),
        num_frames=g("num_frames"), mask=g("mask"), y_null=y_null, generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(other, z_final)


@pytest.mark.parametrize("case", EDIT_CASES)
def test_edit_frame_is_renoised_at_first_step_below_edit_ratio(
    case: str, data: dict[str, torch.Tensor], y_null
) -> None:
    o = lambda n: _out(data, case, n)  # noqa: E731
    ts = o("timesteps")[:, 0]
    edit_t = _inp(data, case, "mask")[0, 0] * CTOR["num_timesteps"]  # float32 mask_t, as the original
    below = torch.nonzero(ts <= edit_t)
    assert len(below), f"{case}: no step reaches the edit ratio {edit_t.item()}"
    first = int(below[0])
    xm = o("x_mask")
    assert not xm[:first, :, 0].any() and xm[first:, :, 0].all()
    _, inter = _run(data, case, _replayer(data, case), y_null)
    ref = _inp(data, case, "ref")[:, :, 0]
    s = ts[first] / CTOR["num_timesteps"]
    expected = (1 - s) * ref + (1 - (1 - s)) * _inp(data, case, "randn_like")[first][:, :, 0]
    torch.testing.assert_close(inter["z_before_step"][first][:, :, 0], expected)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_lowres_edge_case_first_step_is_a_no_op(case: str, data: dict[str, torch.Tensor], y_null) -> None:
    o = lambda n: _out(data, case, n)  # noqa: E731
    assert not o("x_mask")[0].any()
    _, inter = _run(data, case, _replayer(data, case), y_null)
    assert torch.equal(inter["z_after_step"][0], _inp(data, case, "z"))


def test_text_to_video_draws_no_noise_and_gradients_flow(data: dict[str, torch.Tensor], y_null) -> None:
    case = CASES[0]
    g = lambda n: _inp(data, case, n)  # noqa: E731
    z = g("z").clone().requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, z[0].numel()).reshape(z.shape[1:])
    drawn: list[int] = []

    def model_fn(z_in, t, y, mask, x_mask, **kwargs):
        assert x_mask is None
        return torch.tanh(z_in * weight + y.mean() + t.view(-1, 1, 1, 1, 1) / 1000)

    def noise(i, t, x):
        drawn.append(i)
        return torch.zeros_like(x)

    out = _sampler(case).sample(model_fn, z, g("y"), g("text_mask"), **_size(case), y_null=y_null, noise=noise)
    assert drawn == []
    out.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("case", EDIT_CASES[:1])
def test_noise_callable_equals_tensor_and_scale_one_skips_uncond(
    case: str, data: dict[str, torch.Tensor], y_null
) -> None:
    g = lambda n: _inp(data, case, n)  # noqa: E731
    b = g("z").shape[0]

    def model_fn(z_in, t, y, mask, x_mask, **kwargs):
        rows.append(z_in.shape[0])
        return torch.sin(z_in) + y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1) + x_mask.float()[:, None, :, None, None]

    kw = dict(**_size(case), mask=g("mask"), y_null=y_null)
    rows: list[int] = []
    sampler = _sampler(case)
    tensor = sampler.sample(model_fn, g("z"), g("y"), g("text_mask"), noise=g("randn_like"), **kw)
    called = sampler.sample(model_fn, g("z"), g("y"), g("text_mask"), noise=lambda i, t, x: g("randn_like")[i], **kw)
    assert torch.equal(tensor, called) and set(rows) == {2 * b}
    rows.clear()
    sampler.sample(model_fn, g("z"), g("y"), g("text_mask"), noise=g("randn_like"), guidance_scale=1.0, **kw)
    assert set(rows) == {b}
    with pytest.raises(ValueError, match="y_null"):
        sampler.sample(model_fn, g("z"), g("y"), g("text_mask"), **_size(case))


# --------------------------------------------------------------------------- training objective
def test_rf_training_helpers() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, 7, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.0, 400.0, 1000.0])
    xt = rf_noisy(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.6 * x0[1] + 0.4 * noise[1])
    # the velocity target points from noise to data: x_t + v * t/1000 = x0
    v = rf_training_target(x0, noise, t)
    torch.testing.assert_close(xt + v * (t / 1000).view(-1, 1, 1, 1, 1), x0)
    # masked-out frames (image_head) get the t = 0 input
    fm = torch.ones(3, 5, dtype=torch.bool)
    fm[:, 0] = False
    xm = rf_noisy(x0, noise, t, frame_mask=fm)
    torch.testing.assert_close(xm[:, :, 0], x0[:, :, 0])
    torch.testing.assert_close(xm[:, :, 1:], xt[:, :, 1:])
    # loss: zero at the target, 8-channel output sliced, masked frames dropped via mean over the mask
    assert rf_training_loss(v, x0, noise, t).item() == pytest.approx(0.0, abs=1e-12)
    eight = torch.cat([v, torch.randn_like(v)], dim=1)
    assert rf_training_loss(eight, x0, noise, t).item() == pytest.approx(0.0, abs=1e-12)
    bad = v.clone()
    bad[:, :, 0] += 100.0  # only the masked-out frame is wrong
    assert rf_training_loss(bad, x0, noise, t, fm).item() == pytest.approx(0.0, abs=1e-12)
    off = v + 1.0
    per = rf_training_loss(off, x0, noise, t, fm, reduction="per_sample")
    torch.testing.assert_close(per, torch.ones(3, dtype=torch.float64))
    fm2 = fm.clone()
    fm2[0] = False
    fm2[0, 3] = True
    off2 = v.clone()
    off2[0, :, 3] += 2.0
    per2 = rf_training_loss(off2, x0, noise, t, fm2, reduction="per_sample")
    assert per2[0].item() == pytest.approx(4.0) and per2[1:].abs().max().item() < 1e-12


def test_training_timesteps_are_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_training_timesteps(256, height=240, width=426, num_frames=51, generator=g)
    assert t.shape == (256,) and bool((t > 0).all() and (t < 1000).all())
    raw = sample_training_timesteps(256, use_timestep_transform=False, generator=torch.Generator().manual_seed(0))
    assert bool((t >= raw - 1e-3).all())  # the transform (ratio > 1) only shifts towards noise


# --------------------------------------------------------------------------- (c) end to end
def _stdit3_module():
    if importlib.util.find_spec(STDIT3_MODULE) is None:
        pytest.skip(f"{STDIT3_MODULE} does not exist yet")
    return importlib.import_module(STDIT3_MODULE)  # import errors of an existing module fail the test


@pytest.fixture(scope="module")
def stdit3():
    module = _stdit3_module()
    (kwargs,) = spec(MODEL_NAME)["constructor"].values()
    model = module.STDiT3(module.STDiT3Config.from_dict(kwargs)).eval()
    model.load_state_dict(state(MODEL_NAME), strict=True)
    return model


@pytest.mark.parametrize("case", CASES)
def test_end_to_end_with_stdit3_port(case: str, data: dict[str, torch.Tensor], stdit3) -> None:
    o = lambda n: _out(data, case, n)  # noqa: E731
    with torch.no_grad():
        z_final, inter = _run(data, case, stdit3, None)  # y_null from the model's y_embedding
    assert torch.equal(inter["x_mask"], o("x_mask"))
    _assert_rel(inter["timesteps"], o("timesteps"), TS_TOL, "timesteps")
    for name in ("z_before_step", "pred_v"):
        _assert_rel(inter[name], o(name), TRAJ_TOL, name)
    _assert_rel(z_final, o("z_final"), TRAJ_TOL, "z_final")


def test_end_to_end_through_model_fn_adapter(data: dict[str, torch.Tensor], stdit3) -> None:
    case = (EDIT_CASES or CASES)[0]
    with torch.no_grad():
        z_final, _ = _run(data, case, stdit3_model_fn(stdit3), stdit3.y_embedder.y_embedding)
    _assert_rel(z_final, _out(data, case, "z_final"), TRAJ_TOL, "z_final")
