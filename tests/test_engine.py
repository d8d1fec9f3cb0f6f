"""The sign-PGD engine on tiny-cogvideox: it improves the objective, it beats random
noise of the same budget, it holds the budget, and it resumes from checkpoints."""

from __future__ import annotations

import pytest
import torch

from feature_shift import deep_feature_shift

from anti_i2v.config import ProtectConfig
from anti_i2v.engine import fingerprint, run_pgd
from anti_i2v.objectives import AntiI2VObjective, draw_step
from anti_i2v.spaces import project, space_from_config

PROMPT = "a person talking to the camera"


def _setup(model, x, **overrides):
    config = ProtectConfig(prompt=PROMPT, **overrides)
    objective = AntiI2VObjective(model, config)
    objective.prepare(model, x)
    space = space_from_config(config)
    return config, objective, space


def _fixed_draws(objective, n=6, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [draw_step(g, objective.latent_shape(), (0, 999)) for _ in range(n)]


def _mean_loss(objective, x_adv, draws):
    with torch.no_grad():
        return sum(objective(x_adv, d).parts["total"] for d in draws) / len(draws)


@pytest.fixture(scope="module")
def optimised(tiny_model, portrait_small):
    config, objective, space = _setup(tiny_model, portrait_small, steps=40)
    result = run_pgd(objective, space, portrait_small, config, t_range=(0, 999))
    return config, objective, result


def test_objective_improves_over_the_steps(optimised, portrait_small):
    config, objective, result = optimised
    draws = _fixed_draws(objective)
    assert _mean_loss(objective, result.x_adv, draws) < _mean_loss(objective, portrait_small, draws) - 0.1
    assert len(result.history) == config.steps


def test_perturbation_moves_deep_features_twice_as_far_as_random_noise(optimised, tiny_model, portrait_small):
    config, objective, result = optimised
    draws = _fixed_draws(objective, n=4)
    noise = (torch.rand(portrait_small.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1) * config.eps
    random_adv = project(portrait_small + noise, portrait_small, config.eps)
    attacked = deep_feature_shift(tiny_model, objective, portrait_small, result.x_adv, draws)
    baseline = deep_feature_shift(tiny_model, objective, portrait_small, random_adv, draws)
    assert attacked >= 2 * baseline, (attacked, baseline)


def test_result_stays_in_the_budget(optimised, portrait_small):
    config, _, result = optimised
    assert (result.x_adv - portrait_small).abs().max() <= config.eps + 1e-6
    assert 0 <= result.x_adv.min() and result.x_adv.max() <= 1


def test_every_space_runs_and_respects_the_budget(tiny_model, portrait_small):
    for space_name in ("rgb", "lab", "dct"):
        config, objective, space = _setup(tiny_model, portrait_small, steps=3, space=space_name)
        x_adv = run_pgd(objective, space, portrait_small, config, t_range=(0, 999)).x_adv
        assert (x_adv - portrait_small).abs().max() <= config.eps + 1e-6
        assert not torch.equal(x_adv, portrait_small)


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, tiny_model, portrait_small):
    config, objective, space = _setup(tiny_model, portrait_small, steps=6, checkpoint_every=2)
    run_id = fingerprint(portrait_small, config, tiny_model.identity)
    ckpt = tmp_path / "run.pt"
    reference = run_pgd(objective, space, portrait_small, config, t_range=(0, 999)).x_adv

    def crash(report):
        if report.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pgd(objective, space, portrait_small, config, t_range=(0, 999), run_id=run_id, callback=crash,
                checkpoint_path=ckpt)
    assert ckpt.is_file()
    steps_seen = []
    resumed = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), run_id=run_id,
                      callback=lambda r: steps_seen.append(r.step), checkpoint_path=ckpt)
    assert resumed.resumed_from == 4 and steps_seen == [5, 6]
    torch.testing.assert_close(resumed.x_adv, reference)
    other = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), run_id="another photo",
                    checkpoint_path=ckpt)
    assert other.resumed_from == 0


def test_gray_photos_stay_gray(tiny_model, portrait_small):
    gray = portrait_small.mean(dim=1, keepdim=True).expand_as(portrait_small).contiguous()
    config, objective, space = _setup(tiny_model, gray, steps=2)
    x_adv = run_pgd(objective, space, gray, config, t_range=(0, 999), keep_gray=True).x_adv
    assert torch.allclose(x_adv[:, 0], x_adv[:, 1]) and torch.allclose(x_adv[:, 1], x_adv[:, 2])
    assert (x_adv - gray).abs().max() <= config.eps + 1e-6
