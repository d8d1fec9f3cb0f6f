"""Tests for anti_i2v.spaces: DCT helpers, projections and the PGD parametrisations."""

from __future__ import annotations

import math

import pytest
import torch
from kornia.color import lab_to_rgb, rgb_to_lab

from anti_i2v.errors import ConfigError
from anti_i2v.spaces import (
    DCTSpace,
    DualSpace,
    LabSpace,
    Parametrisation,
    PerturbationSpace,
    RGBSpace,
    build_space,
    dct_2d,
    dct_matrix,
    idct_2d,
    low_band_mask,
    project,
    rgb_step_size,
)

EPS = 8 / 255


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(h: int = 24, w: int = 40, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=_gen(seed))


def _mid_image(h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    """Unsaturated image (values in [0.3, 0.7]) so small perturbations never hit [0, 1]."""
    return 0.3 + 0.4 * _image(h, w, b=1, seed=seed)


ALL_SPACES = [
    pytest.param(RGBSpace(), id="rgb"),
    pytest.param(LabSpace(), id="lab"),
    pytest.param(DCTSpace(0.25, 8), id="dct-block8"),
    pytest.param(DCTSpace(0.25, None), id="dct-global"),
    pytest.param(DualSpace(LabSpace(), DCTSpace(0.25, 8), period=2), id="dual"),
]


# --- DCT helpers ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13])
def test_dct_matrix_is_orthonormal(n: int) -> None:
    d = dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # Row 0 is the constant (DC) vector.
    assert torch.allclose(d[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("block", [None, 0, 4, 8, 16])
@pytest.mark.parametrize("hw", [(8, 8), (13, 21), (17, 9), (32, 40)])
def test_dct_idct_round_trip_is_exact_on_any_size(block: int | None, hw: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *hw, generator=_gen(1))
    c = dct_2d(x, block)
    assert c.shape == x.shape
    assert torch.allclose(idct_2d(c, block), x, atol=1e-5)


@pytest.mark.parametrize("block", [None, 8])
def test_dct_preserves_energy(block: int | None) -> None:
    x = torch.randn(1, 3, 19, 27, generator=_gen(2), dtype=torch.float64)
    assert torch.allclose(dct_2d(x, block).pow(2).sum(), x.pow(2).sum())


def test_blocked_dct_transforms_each_tile_independently() -> None:
    x = torch.randn(1, 1, 16, 24, generator=_gen(3), dtype=torch.float64)
    c = dct_2d(x, 8)
    d = dct_matrix(8, dtype=torch.float64)
    tile = x[..., 8:16, 16:24]
    assert torch.allclose(c[..., 8:16, 16:24], d @ tile @ d.T)


def test_dct_of_a_constant_has_only_dc_energy() -> None:
    x = torch.full((1, 1, 12, 20), 0.3, dtype=torch.float64)
    c = dct_2d(x, None)
    assert c[..., 0, 0].item() == pytest.approx(0.3 * math.sqrt(12 * 20))
    c[..., 0, 0] = 0
    assert c.abs().max() < 1e-12


def test_dct_keeps_half_precision_dtype() -> None:
    x = torch.rand(1, 3, 16, 16, generator=_gen(4)).to(torch.bfloat16)
    assert dct_2d(x, 8).dtype == torch.bfloat16
    assert idct_2d(dct_2d(x, 8), 8).dtype == torch.bfloat16


def test_dct_and_idct_pass_gradcheck() -> None:
    x = torch.randn(1, 2, 8, 8, generator=_gen(5), dtype=torch.float64, requires_grad=True)
    for block in (None, 4):
        assert torch.autograd.gradcheck(lambda t, b=block: dct_2d(t, b), (x,))
        assert torch.autograd.gradcheck(lambda t, b=block: idct_2d(t, b), (x,))


# --- low-band mask ----------------------------------------------------------


def test_low_band_mask_global_keeps_top_left_corner() -> None:
    mask = low_band_mask(20, 30, 0.25, None)
    assert mask.shape == (20, 30) and mask.dtype == torch.bool
    assert mask.sum() == 5 * 8  # ceil(0.25 * 20) x ceil(0.25 * 30)
    assert mask[:5, :8].all()


def test_low_band_mask_blocked_repeats_per_tile() -> None:
    mask = low_band_mask(16, 24, 0.25, 8)
    assert mask.shape == (16, 24)
    assert mask.sum() == 6 * 2 * 2  # 6 tiles, ceil(0.25 * 8) = 2 per axis
    tile = torch.zeros(8, 8, dtype=torch.bool)
    tile[:2, :2] = True
    assert torch.equal(mask, tile.repeat(2, 3))


def test_low_band_mask_edge_tiles_keep_the_same_fraction() -> None:
    # 20 = 8 + 8 + 4: the short tile keeps ceil(0.25 * 4) = 1 row.
    mask = low_band_mask(20, 8, 0.25, 8)
    assert mask[:, 0].nonzero().flatten().tolist() == [0, 1, 8, 9, 16]


def test_low_band_mask_counts_do_not_round_up_on_float_noise() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point.
    assert low_band_mask(10, 10, 0.3, None).sum() == 9


def test_low_band_mask_rejects_bad_band() -> None:
    with pytest.raises(ConfigError):
        low_band_mask(8, 8, 0.0, 8)
    with pytest.raises(ConfigError):
        low_band_mask(8, 8, 1.5, 8)


# --- projection -------------------------------------------------------------


def test_project_enforces_ball_and_unit_range() -> None:
    x = _image()
    x_adv = x + torch.randn(x.shape, generator=_gen(6))
    out = project(x_adv, x, EPS)
    assert (out - x).abs().max() <= EPS + 1e-6
    assert out.min() >= 0 and out.max() <= 1


def test_project_is_identity_inside_the_ball() -> None:
    x = _mid_image()
    x_adv = x + (EPS / 2) * torch.sign(torch.randn(x.shape, generator=_gen(7)))
    assert torch.equal(project(x_adv, x, EPS), x_adv)


def test_project_passes_gradient_inside_and_blocks_it_outside() -> None:
    x = torch.full((1, 3, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[..., 0, 0] += 1.0  # outside the ball
    x_adv.requires_grad_(True)
    project(x_adv, x, EPS).sum().backward()
    assert x_adv.grad[..., 0, 0].eq(0).all()
    assert x_adv.grad[..., 1, 1].eq(1).all()


# --- parametrisations: round trips ------------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES)
def test_parametrise_returns_leaf_params_that_require_grad(space: PerturbationSpace) -> None:
    x = _image()
    p = space.parametrise(x, x, EPS, 0)
    assert isinstance(p, Parametrisation)
    assert p.params.is_leaf and p.params.requires_grad
    assert p.stage == space.stage(0)


def test_lab_round_trip_reproduces_image_with_original_lightness() -> None:
    x = _image(23, 37)
    p = LabSpace().parametrise(x, x, EPS, 0)
    assert p.params.shape == (2, 2, 23, 37)
    assert torch.allclose(p.to_rgb(), x, atol=1e-4)


def test_lab_round_trip_reproduces_a_chroma_shifted_image() -> None:
    x = _mid_image()
    lab = rgb_to_lab(x)
    lab[:, 1:] += 2.0  # change a*, b*; keep L*
    x_adv = project(lab_to_rgb(lab, clip=False), x, 0.2)
    assert (x_adv - x).abs().max() < 0.2  # nothing was clipped
    out = LabSpace().parametrise(x_adv, x, 0.2, 0).to_rgb()
    assert torch.allclose(out, x_adv, atol=1e-4)


@pytest.mark.parametrize("block", [8, None])
def test_dct_round_trip_reproduces_image(block: int | None) -> None:
    x = _image(21, 35)
    x_adv = project(x + 0.02 * torch.randn(x.shape, generator=_gen(8)), x, EPS)
    p = DCTSpace(0.25, block).parametrise(x_adv, x, EPS, 0)
    assert p.params.shape == x.shape
    assert torch.allclose(p.to_rgb(), x_adv, atol=1e-6)


def test_rgb_round_trip_reproduces_image() -> None:
    x = _image()
    x_adv = project(x + 0.01, x, EPS)
    assert torch.allclose(RGBSpace().parametrise(x_adv, x, EPS, 0).to_rgb(), x_adv)


# --- gradients --------------------------------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES)
def test_gradients_flow_to_params(space: PerturbationSpace) -> None:
    x = _mid_image()
    for step in (0, 2):  # both stages of the dual space
        p = space.parametrise(x, x, EPS, step)
        p.to_rgb().pow(2).sum().backward()
        assert p.params.grad is not None
        assert p.params.grad.abs().sum() > 0


def test_lab_to_rgb_passes_gradcheck_away_from_clamps() -> None:
    x = (0.3 + 0.4 * torch.rand(1, 3, 8, 8, generator=_gen(9))).double()
    p = LabSpace().parametrise(x, x, 0.5, 0)  # large eps: no bound is active
    assert p.params.dtype == torch.float64
    params = p.params.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda ab: project(p._decode(ab), p.x, p.eps), (params,))


def test_dct_to_rgb_passes_gradcheck_away_from_clamps() -> None:
    x = (0.3 + 0.4 * torch.rand(1, 3, 8, 8, generator=_gen(10))).double()
    p = DCTSpace(0.5, 4).parametrise(x, x, 0.2, 0)
    params = p.params.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: project(p._decode(c), p.x, p.eps), (params,))


# --- projection holds after many steps --------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES)
def test_projection_holds_after_50_random_sign_steps(space: PerturbationSpace) -> None:
    # Uniform noise reaches 0 and 1, so the [0, 1] clamp and the ball are both active.
    x = _image(20, 28, seed=11)
    gen = _gen(12)
    x_adv = x.clone()
    steps = 50
    for t in range(steps):
        p = space.parametrise(x_adv, x, EPS, t)
        out = p.to_rgb()
        assert (out - x).abs().max() <= EPS + 1e-6
        grad = torch.randn(p.params.shape, generator=gen)
        # Big steps to push hard against the bounds.
        x_adv = p.step(grad, 4 * space.default_step_size(EPS, steps, space.stage(t)))
        assert not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it did move


# --- stage-specific behaviour ------------------------------------------------


def test_lab_step_keeps_lightness_and_moves_chroma() -> None:
    x = torch.tensor([0.5, 0.45, 0.55]).view(1, 3, 1, 1).expand(1, 3, 8, 8).contiguous()
    p = LabSpace().parametrise(x, x, EPS, 0)
    grad = torch.randn(p.params.shape, generator=_gen(13))
    x_adv = p.step(grad, 1.0)  # 1 a*/b* unit: well inside the 8/255 ball
    assert (x_adv - x).abs().max() < EPS - 1e-3  # no clipping happened
    lab0, lab1 = rgb_to_lab(x), rgb_to_lab(x_adv)
    assert (lab1[:, 0] - lab0[:, 0]).abs().max() < 0.5
    assert torch.allclose((lab1[:, 1:] - lab0[:, 1:]).abs(), torch.ones(1, 2, 8, 8), atol=0.05)


def test_a_lab_step_on_a_gray_image_moves_lightness_as_far_as_a_chroma_step_moves_a_colour_one() -> None:
    """A gray photo has no chroma to move (the protection keeps it gray): its Lab stage moves L*."""
    colour = _mid_image(32, 48)
    gray = colour.mean(dim=1, keepdim=True).expand_as(colour).contiguous()
    moved = {}
    for name, x in (("colour", colour), ("gray", gray)):
        p = LabSpace().parametrise(x, x, EPS, 0)
        x_adv = p.step(torch.randn(p.params.shape, generator=_gen(21)), 0.5)
        assert (x_adv - x).abs().max() < EPS - 1e-3  # no clipping happened
        moved[name] = float((x_adv - x).abs().mean())
    assert p.params.shape[1] == 1
    torch.testing.assert_close(x_adv[:, 0], x_adv[:, 1], atol=1e-4, rtol=0)  # D65 round-off
    torch.testing.assert_close(x_adv[:, 1], x_adv[:, 2], atol=1e-4, rtol=0)
    assert 0.8 < moved["gray"] / moved["colour"] < 1.25, moved


def test_lab_stage_resets_lightness_to_the_original() -> None:
    x = _mid_image()
    x_adv = x + 0.02  # brighter: L* changed
    out = LabSpace().parametrise(x_adv, x, 0.05, 0).to_rgb()
    assert (rgb_to_lab(out)[:, 0] - rgb_to_lab(x)[:, 0]).abs().max() < 1e-2


@pytest.mark.parametrize("block", [8, None])
def test_dct_step_moves_only_low_frequencies(block: int | None) -> None:
    x = _mid_image(16, 24)
    space = DCTSpace(0.25, block)
    p = space.parametrise(x, x, EPS, 0)
    grad = torch.randn(p.params.shape, generator=_gen(14))
    x_adv = p.step(grad, 0.005)
    delta = x_adv - x
    assert delta.abs().max() < EPS - 1e-3  # no clipping happened
    c = dct_2d(delta, block)
    mask = low_band_mask(16, 24, 0.25, block)
    outside = c[..., ~mask].pow(2).sum()
    inside = c[..., mask].pow(2).sum()
    assert inside > 0
    assert outside < 1e-8 * inside


def test_dct_step_on_odd_sizes_stays_inside_the_band() -> None:
    x = _mid_image(13, 21)
    p = DCTSpace(0.25, 8).parametrise(x, x, EPS, 0)
    x_adv = p.step(torch.randn(p.params.shape, generator=_gen(15)), 0.005)
    c = dct_2d(x_adv - x, 8)
    assert c[..., ~low_band_mask(13, 21, 0.25, 8)].abs().max() < 1e-6


@pytest.mark.parametrize("period", [1, 2, 3])
def test_dual_alternates_stages_with_the_period(period: int) -> None:
    space = DualSpace(LabSpace(), DCTSpace(), period=period)
    stages = [space.stage(t) for t in range(4 * period)]
    expected = (["lab"] * period + ["dct"] * period) * 2
    assert stages == expected
    x = _image(16, 16)
    for t in range(4 * period):
        assert space.parametrise(x, x, EPS, t).stage == expected[t]


def test_single_stage_spaces_report_their_stage() -> None:
    assert [RGBSpace().stage(t) for t in range(3)] == ["rgb"] * 3
    assert LabSpace().stage(5) == "lab"
    assert DCTSpace().stage(5) == "dct"


# --- step sizes --------------------------------------------------------------


def test_default_rgb_step_follows_madry_rule_with_floor() -> None:
    assert RGBSpace().default_step_size(8 / 255, 10, "rgb") == pytest.approx(2.5 * 8 / 255 / 10)
    assert RGBSpace().default_step_size(8 / 255, 1000, "rgb") == pytest.approx(0.5 / 255)
    assert rgb_step_size(8 / 255, 10) == pytest.approx(2 / 255)


@pytest.mark.parametrize("name", ["lab", "dct"])
def test_default_step_moves_rgb_about_as_much_as_an_rgb_step(name: str) -> None:
    # Smooth mid-range image: no clipping, natural-photo-like colour statistics.
    coarse = 0.3 + 0.4 * torch.rand(1, 3, 6, 8, generator=_gen(16))
    x = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear", align_corners=False)
    space = build_space(name)
    p = space.parametrise(x, x, 1.0, 0)
    s = space.default_step_size(EPS, 10, name)
    moved = (p.step(torch.randn(p.params.shape, generator=_gen(17)), s) - x).abs().mean()
    rgb = rgb_step_size(EPS, 10)
    assert 0.6 * rgb < moved < 1.6 * rgb


def test_default_step_rejects_a_stage_the_space_does_not_use() -> None:
    with pytest.raises(ConfigError):
        RGBSpace().default_step_size(EPS, 10, "dct")
    dual = build_space("dual")
    assert dual.default_step_size(EPS, 10, "lab") != dual.default_step_size(EPS, 10, "dct")


def test_default_step_rejects_bad_budget_or_steps() -> None:
    with pytest.raises(ConfigError):
        RGBSpace().default_step_size(-1.0, 10, "rgb")
    with pytest.raises(ConfigError):
        RGBSpace().default_step_size(EPS, 0, "rgb")


# --- descent ----------------------------------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES)
def test_descent_step_decreases_a_simple_loss(space: PerturbationSpace) -> None:
    x = _mid_image(16, 24)
    target = project(x + EPS * (2 * torch.rand(x.shape, generator=_gen(18)) - 1), x, EPS)
    x_adv = x.clone()
    for t in range(4):
        p = space.parametrise(x_adv, x, EPS, t)
        loss = (p.to_rgb() - target).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, p.params)
        x_adv = p.step(grad, 0.25 * space.default_step_size(EPS, 10, space.stage(t)))
        new_loss = (x_adv - target).pow(2).sum()
        assert new_loss < loss.detach()


# --- dtype --------------------------------------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES)
def test_output_keeps_input_dtype(space: PerturbationSpace) -> None:
    x = _mid_image().to(torch.bfloat16)
    p = space.parametrise(x, x, EPS, 0)
    assert p.params.dtype == torch.float32
    out = p.to_rgb()
    assert out.dtype == torch.bfloat16
    stepped = p.step(torch.ones_like(p.params), space.default_step_size(EPS, 10, space.stage(0)))
    assert stepped.dtype == torch.bfloat16


# --- factory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("rgb", RGBSpace), ("lab", LabSpace), ("dct", DCTSpace), ("DUAL", DualSpace)]
)
def test_build_space_returns_the_named_space(name: str, cls: type) -> None:
    space = build_space(name)
    assert isinstance(space, cls)
    assert space.name == name.lower()


def test_build_space_passes_dct_and_dual_options() -> None:
    space = build_space("dual", dct_band=0.5, dct_block=0, dual_period=3)
    assert isinstance(space, DualSpace)
    assert space.period == 3 and space.dct.band == 0.5 and space.dct.block is None


def test_build_space_unknown_name_raises_config_error_listing_choices() -> None:
    with pytest.raises(ConfigError, match="rgb, lab, dct, dual"):
        build_space("hsv")


@pytest.mark.parametrize(
    "kwargs",
    [{"dct_band": 0.0}, {"dct_band": 2.0}, {"dct_block": -8}, {"dct_block": 2.5}, {"dual_period": 0}],
)
def test_build_space_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_space("dual", **kwargs)
