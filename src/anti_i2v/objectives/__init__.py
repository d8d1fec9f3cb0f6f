"""Losses over the protected image; each sees backbones only through `VideoModel`."""

from anti_i2v.objectives.anti_i2v import AntiI2VObjective
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, draw_step

__all__ = ["AntiI2VObjective", "Objective", "ObjectiveOutput", "StepDraw", "draw_step"]
