"""Ensemble members taking turns on one accelerator, and the per-member gradients of an ensemble."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.objectives.base import Objective, ObjectiveOutput, draw_step
from anti_i2v.objectives.ensemble import EnsembleMember, EnsembleObjective
from anti_i2v.offload import Residency, moved_weight_bytes, weight_bytes


class FakeAcceleratedModel:
    """Just what `Residency` reads of a model: a name, an accelerator device, weight modules, and the
    frames and input size its working memory depends on."""

    text_on_cpu = False
    resolution = (64, 64)

    def __init__(self, name: str, width: int) -> None:
        self.name = name
        self.device = torch.device("meta")  # any non-CPU device counts as an accelerator
        self.layer = torch.nn.Linear(width, width)
        self.frames = "9"

    def frame_layout(self) -> str:
        return self.frames

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.layer]

    def text_encoders(self) -> list[torch.nn.Module]:
        return []


class FakeAccelerator:
    """A device of fixed capacity: free memory is what the resident models' weights leave."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: list[FakeAcceleratedModel] = []
        self.log: list[tuple[str, str]] = []

    def free_bytes(self, _device: torch.device) -> int:
        return self.capacity - sum(moved_weight_bytes(m) for m in self.resident)

    def move(self, model: FakeAcceleratedModel, device: torch.device) -> None:
        self.log.append((model.name, device.type))
        if device.type == "cpu":
            self.resident.remove(model)
        else:
            assert self.free_bytes(device) >= moved_weight_bytes(model), "moved in without room"
            self.resident.append(model)


def _rounds(residency: Residency, models, rounds: int) -> None:
    for _ in range(rounds):
        for model in models:
            with residency.turn(model):
                assert residency.is_resident(model)


def test_models_that_fit_together_stay_resident_after_the_first_round():
    a, b = FakeAcceleratedModel("a", 64), FakeAcceleratedModel("b", 64)
    device = FakeAccelerator(capacity=3 * weight_bytes(a))
    residency = Residency([a, b], free_bytes=device.free_bytes, move=device.move)
    _rounds(residency, [a, b], 2)
    moves_after_two = residency.moves
    _rounds(residency, [a, b], 5)
    assert residency.moves == moves_after_two  # no transfer once both are known to fit
    assert {m.name for m in device.resident} == {"a", "b"}


@pytest.mark.parametrize("change", ["frames", "resolution"])
def test_a_model_whose_frames_or_input_size_change_runs_alone_to_be_measured_again(change):
    """The working memory of a turn on a share of the frames says nothing of a turn on every frame, nor
    one at a photo's size of one at another's: after either changes, a model's next turn runs alone,
    as its first did."""
    a, b = FakeAcceleratedModel("a", 64), FakeAcceleratedModel("b", 64)
    device = FakeAccelerator(capacity=3 * weight_bytes(a))
    residency = Residency([a, b], free_bytes=device.free_bytes, move=device.move)
    _rounds(residency, [a, b], 2)
    assert {m.name for m in device.resident} == {"a", "b"}
    if change == "frames":
        a.frames = "33"
    else:
        a.resolution = (128, 96)
    with residency.turn(a):
        assert [m.name for m in device.resident] == ["a"]
    _rounds(residency, [a, b], 1)
    assert {m.name for m in device.resident} == {"a", "b"}  # measured, they fit together again


def test_models_that_do_not_fit_together_take_turns():
    a, b = FakeAcceleratedModel("a", 64), FakeAcceleratedModel("b", 64)
    device = FakeAccelerator(capacity=weight_bytes(a) + weight_bytes(a) // 2)
    residency = Residency([a, b], free_bytes=device.free_bytes, move=device.move)
    _rounds(residency, [a, b], 3)
    assert len(device.resident) <= 1  # never both on the device
    # every turn after the first parks the other model and brings this one in
    assert device.log[-4:] == [("b", "cpu"), ("a", "meta"), ("a", "cpu"), ("b", "meta")]
    assert residency.moves == 1 + 2 * 5


def test_a_text_encoder_kept_on_the_cpu_takes_no_room_on_the_accelerator():
    class ModelWithCpuText(FakeAcceleratedModel):
        text_on_cpu = True

        def __init__(self, name: str) -> None:
            super().__init__(name, 64)
            self.text = torch.nn.Linear(256, 256)  # 16x the denoiser stand-in

        def weight_modules(self) -> list[torch.nn.Module]:
            return [self.layer, self.text]

        def text_encoders(self) -> list[torch.nn.Module]:
            return [self.text]

    a, b = ModelWithCpuText("a"), ModelWithCpuText("b")
    assert moved_weight_bytes(a) == weight_bytes(a) - weight_bytes(FakeAcceleratedModel("x", 256))
    device = FakeAccelerator(capacity=3 * moved_weight_bytes(a))  # far less than one whole model
    residency = Residency([a, b], free_bytes=device.free_bytes, move=device.move)
    _rounds(residency, [a, b], 2)
    moves_after_two = residency.moves
    _rounds(residency, [a, b], 3)
    assert residency.moves == moves_after_two and {m.name for m in device.resident} == {"a", "b"}


def test_cpu_models_are_never_moved():
    class CpuModel(FakeAcceleratedModel):
        def __init__(self) -> None:
            super().__init__("cpu-model", 8)
            self.device = torch.device("cpu")

    model = CpuModel()
    moved = []
    residency = Residency([model, CpuModel()], free_bytes=lambda _d: 0, move=lambda m, d: moved.append(d))
    _rounds(residency, residency.models, 2)
    assert moved == [] and residency.moves == 0


class Quadratic(Objective):
    """A toy loss ``sum(w * x^2)``, enough to check how the ensemble combines gradients."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def prepare(self, model, x) -> None:
        pass

    def latent_shape(self) -> torch.Size:
        return torch.Size([2])

    def __call__(self, x_adv, draw) -> ObjectiveOutput:
        loss = (self.weight * x_adv.pow(2)).sum()
        return ObjectiveOutput(loss, {"q": float(loss.detach())})


def test_ensemble_loss_is_the_weighted_sum_and_its_gradient_gives_each_member_its_weights_say():
    members = [
        EnsembleMember("a", Quadratic(1.0), lambda x, g: x, (0, 9), weight=1.0),
        EnsembleMember("b", Quadratic(3.0), lambda x, g: x * 0.5 + 0.1, (0, 9), weight=0.5),
    ]
    x = torch.rand(1, 3, 4, 4, requires_grad=True)
    draw = draw_step(torch.Generator().manual_seed(0), torch.Size([2]), (0, 9))
    out = EnsembleObjective(members)(x, draw)
    (grad,) = torch.autograd.grad(out.loss, x)

    y = x.detach().requires_grad_(True)
    (grad_a,) = torch.autograd.grad(y.pow(2).sum(), y)
    (grad_b,) = torch.autograd.grad((3.0 * (y * 0.5 + 0.1).pow(2)).sum(), y)
    expected = (y.pow(2)).sum() + 0.5 * (3.0 * (y * 0.5 + 0.1).pow(2)).sum()
    expected_grad = grad_a / grad_a.abs().mean() + 0.5 * grad_b / grad_b.abs().mean()
    assert torch.allclose(out.loss, expected) and abs(out.parts["total"] - float(expected)) < 1e-4
    assert torch.allclose(grad, expected_grad)
    assert set(out.parts) == {"a.q", "b.q", "total"}


class Linear(Objective):
    def __init__(self, direction: torch.Tensor, scale: float) -> None:
        self.direction, self.scale = direction, scale

    def prepare(self, model, x) -> None:
        pass

    def latent_shape(self) -> torch.Size:
        return torch.Size([2])

    def __call__(self, x_adv, draw) -> ObjectiveOutput:
        return ObjectiveOutput(self.scale * (x_adv * self.direction).sum())


def test_a_member_whose_loss_is_tiny_still_steers_the_sign_step():
    """A model whose loss is a millionth of another's (a divergence just leaving 0) decides its share of the
    pixels: summed as they came, its gradient agreed with the step only where the other's did (half)."""
    u, v = torch.randn((2, 1, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    members = [EnsembleMember("loud", Linear(u, 1.0), lambda x, g: x, (0, 9)),
               EnsembleMember("quiet", Linear(v, 1e-6), lambda x, g: x, (0, 9))]
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = EnsembleObjective(members)(x, draw_step(torch.Generator().manual_seed(0), torch.Size([2]), (0, 9)))
    (grad,) = torch.autograd.grad(out.loss, x)
    assert (grad.sign() == v.sign()).float().mean() > 0.65
    assert (grad.sign() == u.sign()).float().mean() > 0.65
