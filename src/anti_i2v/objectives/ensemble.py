"""Several models at once: one perturbation against a weighted sum of their objectives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from anti_i2v.models.base import VideoModel
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, draw_step


@dataclass
class EnsembleMember:
    """One model of an ensemble: its prepared objective and how it sees the optimised image."""

    name: str
    objective: Objective
    view: Callable[[torch.Tensor], torch.Tensor]  # optimised image -> this model's input
    t_range: tuple[int, int]
    weight: float = 1.0


class EnsembleObjective(Objective):
    """Weighted sum of the members' losses; each member draws its own timestep and noise.

    The optimised image lives at the first member's input; every member sees it
    through its own view (carried to the full-size photo, then prepared as that
    model's pipeline prepares it), so models of different resolutions combine.
    """

    def __init__(self, members: list[EnsembleMember]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = members

    def prepare(self, model: VideoModel, x: torch.Tensor) -> None:
        """Members are prepared one by one when they are built; nothing to do here."""

    def latent_shape(self) -> torch.Size:
        return self.members[0].objective.latent_shape()

    def __call__(self, x_adv: torch.Tensor, draw: StepDraw) -> ObjectiveOutput:
        total: torch.Tensor | None = None
        parts: dict[str, float] = {}
        for index, member in enumerate(self.members):
            own = draw if index == 0 else draw_step(draw.generator, member.objective.latent_shape(), member.t_range)
            out = member.objective(member.view(x_adv), own)
            loss = member.weight * out.loss.to(x_adv.device)
            total = loss if total is None else total + loss
            parts.update({f"{member.name}.{k}": v for k, v in out.parts.items()})
        assert total is not None
        parts["total"] = float(total.detach())
        return ObjectiveOutput(total, parts)
