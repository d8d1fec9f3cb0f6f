"""Several models at once: one perturbation against a weighted sum of their objectives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anti_i2v.models.base import VideoModel
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, draw_step, scalar
from anti_i2v.offload import Residency


@dataclass
class EnsembleMember:
    """One model of an ensemble: its prepared objective and how it sees the optimised image."""

    name: str
    objective: Objective
    view: Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # optimised image, step generator -> input
    t_range: tuple[int, int]
    weight: float = 1.0
    model: VideoModel | None = None  # whose weights must be resident for its turn


class EnsembleObjective(Objective):
    """Weighted sum of the members' losses; each member draws its own timestep and noise.

    The optimised image lives at the first member's input; every member sees it
    through its own view (carried to the full-size photo, then prepared as that
    model's pipeline prepares it), so models of different resolutions combine.

    Each member's gradient is taken in its own turn and its graph freed before the
    next member runs, so the peak memory is one member's, not the sum; between turns
    a `Residency` may park members' weights on the CPU. The returned loss has the
    summed value, and as its gradient the members' gradients, each scaled to a mean
    magnitude of its weight, summed: the sign step then gives every member its weight's
    say. Summed as they come, the gradients of a model whose loss is orders of magnitude
    smaller (Wan or HunyuanVideo near the photo, where their divergence starts from 0)
    decided no pixel beside a model whose encoding noise keeps its loss large.
    """

    def __init__(self, members: list[EnsembleMember], residency: Residency | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = members
        self.residency = residency

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        """Members are prepared one by one when they are built; nothing to do here."""

    def latent_shape(self) -> torch.Size:
        return self.members[0].objective.latent_shape()

    def _turn(self, member: EnsembleMember):
        if self.residency is None or member.model is None:
            return contextlib.nullcontext()
        return self.residency.turn(member.model)

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        image = x_adv.detach().requires_grad_(True)
        grad = torch.zeros_like(image)
        total = 0.0
        parts: dict[str, float] = {}
        for index, member in enumerate(self.members):
            own = draw if index == 0 else draw_step(draw.generator, member.objective.latent_shape(), member.t_range)
            with self._turn(member):
                out = member.objective(member.view(image, own.generator), own)
                (member_grad,) = torch.autograd.grad(out.loss, image, allow_unused=True)
            if member_grad is not None:
                member_grad = member_grad.to(grad)
                grad += member.weight * member_grad / member_grad.abs().mean().clamp_min(torch.finfo(grad.dtype).tiny)
            total += member.weight * scalar(out.loss)
            parts.update({f"{member.name}.{k}": v for k, v in out.parts.items()})
        parts["total"] = total
        # linear in x_adv with the combined gradient, valued at the summed loss
        surrogate = (x_adv * grad).sum()
        return ObjectiveOutput(surrogate - surrogate.detach() + total, parts)
