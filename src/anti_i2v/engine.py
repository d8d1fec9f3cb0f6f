"""The sign-PGD loop: schedule, progress callbacks, checkpoints and resume.

The engine knows neither backbones nor losses: it moves the coordinates of the
active perturbation space against the gradient of an `Objective`, and projects to
the RGB L-infinity ball after every step (the space does that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anti_i2v.atomic import write_atomic
from anti_i2v.config import ProtectConfig
from anti_i2v.early_stop import EarlyStop
from anti_i2v.objectives.base import Objective, ObjectiveOutput, StepDraw, draw_step
from anti_i2v.spaces import Parametrisation, PerturbationSpace, project

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    """Progress of the loop after one step (fed to callbacks)."""

    step: int  # steps done, 1-based
    total: int
    stage: str
    parts: dict[str, float]
    elapsed: float  # seconds since this run (or resume) started
    resumed_from: int = 0

    @property
    def eta(self) -> float:
        """Seconds left at the average pace so far."""
        return self.elapsed / max(self.step - self.resumed_from, 1) * (self.total - self.step)


@dataclass
class PGDResult:
    """The optimised image at model resolution, the loss history and where the run stopped,
    with the random draws' and the momentum's state, from which a following run of steps goes on."""

    x_adv: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    stopped_early: bool = False
    generator_state: torch.Tensor | None = None
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def steps_done(self) -> int:
        """Optimisation steps taken (fewer than configured when the run stopped early)."""
        return len(self.history)


def fingerprint(x: torch.Tensor, config: ProtectConfig, model_id: str) -> str:
    """Identity of a run: the clean image, every setting and the model (name, weights, dtype)."""
    digest = hashlib.sha256(x.detach().float().cpu().numpy().tobytes())
    record = {k: v for k, v in config.to_dict().items() if k != "checkpoint_every"}
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    digest.update(model_id.encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the loop state atomically (temp file + rename)."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path | None, run_id: str) -> dict | None:
    """The saved state for this exact run, or None (missing, other run, unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means: start afresh
        logger.warning("ignoring unreadable checkpoint %s (%s)", path, type(err).__name__)
        return None
    expected = {"run_id", "step", "x_adv", "generator", "history"}
    if not isinstance(state, dict) or not expected <= state.keys():
        logger.warning("ignoring checkpoint %s: not an anti-i2v checkpoint", path)
        return None
    if state["run_id"] != run_id:
        logger.warning("ignoring checkpoint %s: it belongs to another photo or configuration", path)
        return None
    return state


def checkpoint_step(path: Path | None, run_id: str) -> int:
    """How many steps this run's checkpoint has done (0 without one)."""
    state = load_checkpoint(path, run_id)
    return 0 if state is None else int(state["step"])


def step_sizes(space: PerturbationSpace, config: ProtectConfig) -> dict[str, float]:
    """Step size of each stage, in the stage's own units (config overrides defaults)."""
    explicit = {"rgb": config.step_size, "lab": config.lab_step_size, "dct": config.dct_step_size}
    stages = {space.stage(i) for i in range(min(config.steps, 2 * config.dual_period))}
    return {
        s: explicit[s] if explicit[s] is not None else space.default_step_size(config.eps, config.steps, s)
        for s in stages
    }


View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""What the model sees of the optimised image at one step, given the step's generator (for EOT draws)."""


def scheduled(size: float, step: int, total: int, schedule: str) -> float:
    """The step size at step ``step`` (0-based) of ``total``: constant, or a half cosine from
    ``size`` down to ``size / 10`` at the last step."""
    if schedule == "constant" or total < 2:
        return size
    progress = step / (total - 1)
    return size * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _gradient(objective: Objective, space: PerturbationSpace, x_adv: torch.Tensor, x: torch.Tensor, eps: float,
              step: int, draw: StepDraw, view: View | None) -> tuple[Parametrisation, ObjectiveOutput, torch.Tensor]:
    """The objective at ``x_adv`` (seen through ``view``) and its gradient to the space's parameters."""
    param = space.parametrise(x_adv, x, eps, step)
    x_in = param.to_rgb()
    output = objective(view(x_in, draw.generator) if view is not None else x_in, draw)
    (grad,) = torch.autograd.grad(output.loss, param.params)
    return param, output, grad


def _gray(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv`` with every channel at their mean, in the budget: a gray photo stays gray."""
    return project(x_adv.mean(dim=1, keepdim=True).expand_as(x_adv), x, eps)


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A uniform draw in the eps ball around ``x``, projected to [0, 1]."""
    noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    return project(x + noise.to(x.device, x.dtype), x, eps)


class SignMomentum:
    """MI-FGSM momentum per stage: ``g <- mu g + grad / mean|grad|``; the sign step follows ``g``.

    With ``mu = 0`` the gradient passes through unchanged (plain sign-PGD).
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, stage: str, grad: torch.Tensor) -> torch.Tensor:
        if not self.decay:
            return grad
        grad = grad / grad.abs().mean().clamp_min(1e-12)
        previous = self.buffers.get(stage)
        if previous is not None and previous.shape == grad.shape:
            grad = self.decay * previous + grad
        self.buffers[stage] = grad.detach()
        return grad


def run_pgd(
    objective: Objective,
    space: PerturbationSpace,
    x: torch.Tensor,
    config: ProtectConfig,
    *,
    t_range: tuple[int, int],
    run_id: str = "",
    keep_gray: bool = False,
    view: View | None = None,
    callback: Callable[[StepReport], None] | None = None,
    checkpoint_path: Path | None = None,
    steps: range | None = None,
    carry: PGDResult | None = None,
) -> PGDResult:
    """Minimise ``objective`` over images in the eps-ball around ``x`` with sign-PGD.

    The run starts at ``x`` (or a uniform draw in the ball with ``config.random_start``); where the
    gradient at ``x`` itself is exactly zero (a divergence from the clean photo's own output, on a
    model that encodes without drawing noise), a sign step could never leave it, so that step is
    taken from a uniform draw in the ball instead.

    Args:
        objective: prepared objective (its `latent_shape` sizes the noise).
        space: perturbation space whose active stage moves at each step.
        x: clean image (1, 3, H, W) in [0, 1] at model resolution.
        config: eps, steps, step sizes, seed, checkpoint period.
        t_range: inclusive timestep range to sample from.
        run_id: identity of the run; a checkpoint is resumed only if it matches.
        keep_gray: keep the image gray (all channels equal) for gray photos.
        view: differentiable map from the optimised image (and the step's generator) to
            what the model sees (e.g. carried to the full-size photo, transformed for EOT,
            resized back); identity if None.
        callback: called after every step with a `StepReport`.
        checkpoint_path: where to save state every ``config.checkpoint_every`` steps; a saved
            state of this run within ``steps`` (or past them) is resumed.
        steps: which of the ``config.steps`` steps this call runs (default: all), e.g. the last
            one on every frame after the others ran on fewer (`ProtectConfig.frame_phases`). Step
            sizes and reports count over all the steps; early stopping watches only a run that
            starts at step 0.
        carry: the result of the run of steps before ``steps``, which this one continues.
    """
    steps = range(config.steps) if steps is None else steps
    generator = torch.Generator().manual_seed(config.seed)
    x = x.detach()
    momentum = SignMomentum(config.momentum)
    if carry is not None:
        x_adv = carry.x_adv.to(x.device, x.dtype)
        history = list(carry.history)
        if carry.generator_state is not None:
            generator.set_state(carry.generator_state)
        momentum.buffers = {k: v.to(x.device) for k, v in carry.momentum.items()}
        resumed_from, stopped_early = carry.resumed_from, carry.stopped_early
    else:
        x_adv = random_start(x, config.eps, generator) if config.random_start else x.clone()
        history, resumed_from, stopped_early = [], 0, False
    start = steps.start
    state = load_checkpoint(checkpoint_path, run_id)
    saved = -1 if state is None else int(state["step"])
    if state is not None and (saved > start or (saved == start and carry is None)):  # a carry stands at start
        x_adv = state["x_adv"].to(x.device, x.dtype)
        start = resumed_from = saved
        generator.set_state(state["generator"])
        history = [dict(h) for h in state["history"]]
        momentum.buffers = {k: v.to(x.device) for k, v in state.get("momentum", {}).items()}
        stopped_early = bool(state.get("stopped_early", False))  # an earlier run of steps stopped early
        logger.info("resuming from step %d of %d", start, config.steps)
    sizes = step_sizes(space, config)
    early_stop = EarlyStop(config.early_stop if steps.start == 0 else 0, config.early_stop_tolerance)
    if early_stop.replay(h["total"] for h in history) and start < steps.stop:
        stopped_early = True  # saved at the step this run stopped on: no step more
        start = steps.stop
    began = time.perf_counter()
    for i in range(start, steps.stop):
        draw = draw_step(generator, objective.latent_shape(), t_range)
        stage = space.stage(i)
        param, output, grad = _gradient(objective, space, x_adv, x, config.eps, i, draw, view)
        if not grad.any() and torch.equal(x_adv, x):
            # flat at the photo: a divergence from the clean photo's own sampler run is at its minimum there
            # when the model's encoding draws no noise (Wan, HunyuanVideo); start from a random point instead
            logger.info("the objective is flat at the photo: starting from a random point of the budget")
            x_adv = random_start(x, config.eps, generator)
            x_adv = _gray(x_adv, x, config.eps) if keep_gray else x_adv
            param, output, grad = _gradient(objective, space, x_adv, x, config.eps, i, draw, view)
        x_adv = param.step(momentum(stage, grad), scheduled(sizes[stage], i, config.steps, config.step_schedule))
        x_adv = _gray(x_adv, x, config.eps) if keep_gray else x_adv
        output.parts.setdefault("total", float(output.loss.detach()))  # what early stopping follows
        history.append(output.parts)
        if callback is not None:
            callback(StepReport(i + 1, config.steps, stage, output.parts, time.perf_counter() - began, start))
        if checkpoint_path is not None and config.checkpoint_every and (i + 1) % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint_path,
                {
                    "run_id": run_id,
                    "step": i + 1,
                    "x_adv": x_adv.detach().cpu(),
                    "generator": generator.get_state(),
                    "history": history,
                    "momentum": {k: v.cpu() for k, v in momentum.buffers.items()},
                    "stopped_early": stopped_early,
                },
            )
        if early_stop.update(output.parts["total"]):
            stopped_early = i + 1 < steps.stop
            logger.info("loss flat for %d steps: stopping at step %d of %d", config.early_stop, i + 1, config.steps)
            break
    return PGDResult(x_adv=x_adv.detach(), history=history, resumed_from=resumed_from, stopped_early=stopped_early,
                     generator_state=generator.get_state(), momentum=dict(momentum.buffers))
