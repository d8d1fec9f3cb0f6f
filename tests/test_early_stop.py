"""Early stopping: stops on a flat loss, never on one that still falls, and resumes consistently."""

from __future__ import annotations

import math

import pytest
import torch

from anti_i2v.config import ProtectConfig
from anti_i2v.early_stop import EarlyStop
from anti_i2v.engine import run_pgd
from anti_i2v.errors import ConfigError
from anti_i2v.objectives.base import Objective, ObjectiveOutput
from anti_i2v.spaces import space_from_config


def _first_stop(rule: EarlyStop, losses: list[float]) -> int | None:
    for step, loss in enumerate(losses, start=1):
        if rule.update(loss):
            return step
    return None


def _noise(n: int, scale: float) -> list[float]:
    return (torch.randn(n, generator=torch.Generator().manual_seed(0)) * scale).tolist()


def test_a_loss_that_falls_and_then_flattens_stops_soon_after_the_plateau():
    noise = _noise(400, 0.01)
    losses = [-min(t, 80) / 80 + noise[t] for t in range(400)]  # falls for 80 steps, then flat
    stop = _first_stop(EarlyStop(patience=20), losses)
    assert stop is not None and 80 < stop <= 160


def test_a_loss_that_still_falls_never_stops():
    noise = _noise(400, 0.01)
    steady = [-t / 100 + noise[t] for t in range(400)]
    slowing = [-math.sqrt(t) + noise[t] for t in range(400)]
    assert _first_stop(EarlyStop(patience=20), steady) is None
    assert _first_stop(EarlyStop(patience=20), slowing) is None


def test_nothing_stops_before_two_windows_or_with_patience_zero():
    flat = [1.0] * 100
    assert _first_stop(EarlyStop(patience=10), flat) == 20
    assert _first_stop(EarlyStop(patience=0), flat) is None


def test_replay_rebuilds_the_same_state_as_live_updates():
    losses = [-min(t, 30) / 30 for t in range(60)]
    live, resumed = EarlyStop(patience=10), EarlyStop(patience=10)
    decisions = [live.update(v) for v in losses]
    resumed.replay(losses[:25])
    assert [resumed.update(v) for v in losses[25:]] == decisions[25:]


class _Plateau(Objective):
    """Loss min(|delta|) saturates once the perturbation reaches the budget: a real plateau."""

    def prepare(self, model, x):
        self.x = x

    def latent_shape(self):
        return torch.Size((1, 1))

    def __call__(self, x_adv, draw):
        loss = -(x_adv - self.x).abs().mean()
        return ObjectiveOutput(loss, {"total": float(loss.detach())})


def test_the_engine_stops_early_on_a_plateau_and_says_so():
    x = torch.full((1, 3, 16, 16), 0.5)
    objective = _Plateau()
    objective.prepare(None, x)
    config = ProtectConfig(space="rgb", steps=200, step_size=1 / 255, early_stop=10, weight_irc=1)
    result = run_pgd(objective, space_from_config(config), x, config, t_range=(0, 999))
    assert result.stopped_early and result.steps_done < 60
    assert (result.x_adv - x).abs().max() <= config.eps + 1e-6
    plain = ProtectConfig(space="rgb", steps=60, step_size=1 / 255)
    full = run_pgd(objective, space_from_config(plain), x, plain, t_range=(0, 999))
    assert not full.stopped_early and full.steps_done == 60


def test_early_stop_settings_are_checked():
    with pytest.raises(ConfigError, match="early_stop"):
        ProtectConfig(early_stop=-1)
    with pytest.raises(ConfigError, match="early_stop"):
        ProtectConfig(early_stop_tolerance=1.5)


def test_the_sidecar_records_the_steps_taken_and_whether_the_run_stopped_early(tmp_path, tiny_model, portrait):
    import json

    import anti_i2v

    result = anti_i2v.protect(portrait[0, :, :128, :192], tiny_model, out=tmp_path, steps=3, early_stop=10,
                              prompt="a person talking to the camera")
    record = json.loads(result.sidecar.read_text())
    assert record["steps_done"] == 3 and record["stopped_early"] is False
    assert record["config"]["early_stop"] == 10
