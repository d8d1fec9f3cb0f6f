"""Expectation over transformations: checked names, differentiable transforms, seeded draws."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.config import ProtectConfig
from anti_i2v.eot import ExpectationOverTransforms, blur, jpeg, parse_eot, resize_round_trip
from anti_i2v.errors import ConfigError


def test_names_are_checked_and_normalised():
    assert parse_eot("JPEG, resize,jpeg") == ("jpeg", "resize")
    assert parse_eot("none") == parse_eot("") == parse_eot(None) == ()
    with pytest.raises(ConfigError, match="unknown EOT"):
        parse_eot("jpeg,rotate")
    with pytest.raises(ConfigError, match="unknown EOT"):
        ProtectConfig(eot="sharpen")
    assert ProtectConfig(eot="resize, jpeg").eot == "resize,jpeg"


@pytest.mark.parametrize("transform", [lambda x: jpeg(x, 75.0), lambda x: resize_round_trip(x, 0.5),
                                       lambda x: blur(x, 1.0)])
def test_each_transform_keeps_shape_and_range_and_passes_gradients(transform):
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = transform(x)
    assert y.shape == x.shape and 0 <= float(y.detach().min()) and float(y.detach().max()) <= 1
    assert float((y - x).detach().abs().mean()) > 1e-3  # it does change the image
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_draws_follow_the_generator_and_include_the_untouched_image():
    eot = ExpectationOverTransforms(("jpeg", "resize", "blur", "noise"))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = [eot(x, g) for g in [torch.Generator().manual_seed(5)] for _ in range(12)]
    again = [eot(x, g) for g in [torch.Generator().manual_seed(5)] for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(torch.equal(a, x) for a in first) and any(not torch.equal(a, x) for a in first)
    assert not ExpectationOverTransforms(()) and ExpectationOverTransforms(()).__call__(x, None) is x


def test_protect_optimises_through_the_transforms_within_the_budget(tiny_model, portrait):
    import anti_i2v

    result = anti_i2v.protect(portrait[0, :, :96, :128], tiny_model, steps=3, eot="jpeg,resize,blur,noise",
                              prompt="a person talking to the camera")
    assert result.budget.within_budget and result.config.eot == "jpeg,resize,blur,noise"
