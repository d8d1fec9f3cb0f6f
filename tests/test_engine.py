"""The sign-PGD engine on tiny-cogvideox: it improves the objective, it beats random
noise of the same budget, it holds the budget, and it resumes from checkpoints."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from feature_shift import deep_feature_shift

from anti_i2v.config import ProtectConfig
from anti_i2v.engine import fingerprint, run_pgd
from anti_i2v.errors import ConfigError
from anti_i2v.objectives import AntiI2VObjective, draw_step
from anti_i2v.objectives.base import Objective, ObjectiveOutput
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


@pytest.mark.parametrize("space", ["lab", "dual"])
def test_a_gray_photo_is_perturbed_to_its_budget_in_the_lab_spaces(tiny_model, portrait_small, space):
    """Chroma steps on a gray photo would be averaged away by keeping it gray (1/255 was all that
    remained); the Lab stage moves its lightness instead."""
    gray = portrait_small.mean(dim=1, keepdim=True).expand_as(portrait_small).contiguous()
    config, objective, space_ = _setup(tiny_model, gray, steps=4, space=space)
    x_adv = run_pgd(objective, space_, gray, config, t_range=(0, 999), keep_gray=True).x_adv
    assert torch.equal(x_adv[:, 0], x_adv[:, 1]) and torch.equal(x_adv[:, 1], x_adv[:, 2])
    assert (x_adv - gray).abs().mean() > config.eps / 3, float((x_adv - gray).abs().mean() * 255)


def test_momentum_and_random_start_resume_to_the_same_result(tmp_path, tiny_model, portrait_small):
    """The momentum buffers are checkpointed with the rest, and the random start is drawn from the seed."""
    config, objective, space = _setup(tiny_model, portrait_small, steps=4, checkpoint_every=2, momentum=0.9,
                                      random_start=True, space="rgb")
    reference = run_pgd(objective, space, portrait_small, config, t_range=(0, 999)).x_adv
    plain = run_pgd(objective, space, portrait_small, ProtectConfig(prompt=PROMPT, steps=4, space="rgb"),
                    t_range=(0, 999)).x_adv
    assert not torch.equal(reference, plain)

    def crash(report):
        if report.step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run_pgd(objective, space, portrait_small, config, t_range=(0, 999), run_id="m", callback=crash,
                checkpoint_path=ckpt)
    resumed = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), run_id="m", checkpoint_path=ckpt)
    assert resumed.resumed_from == 2
    torch.testing.assert_close(resumed.x_adv, reference)


def test_a_run_split_in_two_with_its_state_carried_gives_the_whole_run(tiny_model, portrait_small):
    """A later run of steps (the full-frame steps after those on a share of the frames) goes on with
    the image, the draws and the momentum of the one before: split, the steps are the same steps."""
    config, objective, space = _setup(tiny_model, portrait_small, steps=4, momentum=0.9, random_start=True,
                                      space="rgb", step_schedule="cosine")
    whole = run_pgd(objective, space, portrait_small, config, t_range=(0, 999))
    seen = []
    first = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), steps=range(3),
                    callback=lambda r: seen.append((r.step, r.total)))
    last = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), steps=range(3, 4), carry=first,
                   callback=lambda r: seen.append((r.step, r.total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(last.history) == 4
    torch.testing.assert_close(last.x_adv, whole.x_adv)
    cold = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), steps=range(3, 4))
    assert not torch.allclose(cold.x_adv, whole.x_adv)  # without the carry it would start afresh


def test_early_stopping_watches_only_the_first_run_of_steps(tiny_model, portrait_small):
    """A flat loss stops the steps on the share of the frames; the full-frame steps after them always run."""
    config, objective, space = _setup(tiny_model, portrait_small, steps=8, early_stop=1, early_stop_tolerance=0.99)
    first = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), steps=range(6))
    assert first.stopped_early and len(first.history) < 6
    last = run_pgd(objective, space, portrait_small, config, t_range=(0, 999), steps=range(6, 8), carry=first)
    assert last.stopped_early and len(last.history) == len(first.history) + 2


def test_a_run_resumed_where_early_stopping_ended_it_takes_no_step_more(tmp_path, tiny_model, portrait_small):
    """The checkpoint saved at the step a run stopped early on resumes to that run's result, with no
    step more; the full-frame steps after it, resumed from their own checkpoint, still record the stop."""
    config, objective, space = _setup(tiny_model, portrait_small, steps=8, early_stop=1, early_stop_tolerance=0.99,
                                      checkpoint_every=1)
    run = functools.partial(run_pgd, objective, space, portrait_small, config, t_range=(0, 999), run_id="r",
                            checkpoint_path=tmp_path / "run.pt")
    first = run(steps=range(6))
    assert first.stopped_early and len(first.history) < 6
    seen: list[int] = []
    again = run(steps=range(6), callback=lambda r: seen.append(r.step))  # as after a crash in the steps after
    assert seen == [] and again.stopped_early and len(again.history) == len(first.history)
    torch.testing.assert_close(again.x_adv, first.x_adv)
    last = run(steps=range(6, 8), carry=first)
    resumed = run(steps=range(6, 8))  # as after a crash between the last checkpoint and the saved photo
    assert resumed.stopped_early and len(resumed.history) == len(last.history)
    torch.testing.assert_close(resumed.x_adv, last.x_adv)


class _Divergence(Objective):
    """Minus the squared distance from the clean image: at its minimum, flat, at the clean image itself."""

    def prepare(self, model, x):
        self.clean = x.clone()

    def latent_shape(self):
        return torch.Size([1])

    def __call__(self, x_adv, draw):
        loss = -(x_adv - self.clean).pow(2).sum()
        return ObjectiveOutput(loss, {"total": float(loss.detach())})


def test_an_objective_flat_at_the_photo_starts_from_a_random_point_and_others_do_not(portrait_small):
    """A divergence from the clean photo has no gradient at the photo: sign-PGD from there never moves, so
    the run starts from a random point of the budget; an objective with a gradient there starts at the photo."""
    config = ProtectConfig(steps=2, eps=8 / 255, step_size=2 / 255, space="rgb")
    objective = _Divergence()
    objective.prepare(None, portrait_small)
    result = run_pgd(objective, space_from_config(config), portrait_small, config, t_range=(0, 999))
    moved = (result.x_adv - portrait_small).abs()
    assert moved.max() <= 8 / 255 + 1e-6 and moved.mean() > 4 / 255
    assert result.history[0]["total"] < 0  # the first step's loss is the random point's, not the photo's zero
    later = run_pgd(objective, space_from_config(config), portrait_small, config, t_range=(0, 999), steps=range(1, 2))
    assert (later.x_adv - portrait_small).abs().mean() > 4 / 255  # a run resumed at the photo leaves it too

    class Shifted(_Divergence):  # its minimum is elsewhere: it has a gradient at the photo
        def prepare(self, model, x):
            self.clean = x + 0.5

    shifted = Shifted()
    shifted.prepare(None, portrait_small)
    runs = [run_pgd(shifted, space_from_config(cfg), portrait_small, cfg, t_range=(0, 999)).x_adv
            for cfg in (config, dataclasses.replace(config, seed=1))]
    torch.testing.assert_close(runs[0], runs[1])  # no random draw moved it: it started at the photo
    assert (runs[0] <= portrait_small).all() and (runs[0] < portrait_small).float().mean() > 0.9


def test_sign_momentum_follows_the_accumulated_direction():
    from anti_i2v.engine import SignMomentum

    momentum = SignMomentum(0.9)
    first = momentum("rgb", torch.tensor([1.0, -1.0, 2.0]))
    second = momentum("rgb", torch.tensor([-0.1, -1.0, -0.1]))
    assert torch.equal(torch.sign(second), torch.tensor([1.0, -1.0, 1.0]))  # a small reversal is outvoted
    assert torch.equal(SignMomentum(0.0)("rgb", torch.tensor([-0.1])), torch.tensor([-0.1]))
    assert first.abs().mean() == pytest.approx(1.0)


def test_the_sampler_term_pushes_the_sampled_video_further_than_random_noise(tiny_model, portrait_small):
    """The default's term: after a few steps the protected photo's guided sampler run lands further from
    the clean photo's than a random-noise photo's does, on the same noise draws."""
    from anti_i2v.objectives.anti_i2v import sampler_run

    config, objective, space = _setup(tiny_model, portrait_small, steps=8, space="rgb", step_size=1 / 255,
                                      weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1.0, sampler_steps=2)
    x_adv = run_pgd(objective, space, portrait_small, config, t_range=(0, 999)).x_adv
    noise = (torch.rand(portrait_small.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * config.eps
    noisy = project(portrait_small + noise, portrait_small, config.eps)

    def distance(image):
        total = 0.0
        for draw in _fixed_draws(objective, n=3):
            with torch.no_grad():
                encoded = tiny_model.encode_image(image, (), torch.Generator().manual_seed(0))
                ran = sampler_run(tiny_model, encoded, draw.noise, 2, 999)
                clean = sampler_run(tiny_model, objective.clean_encoded, draw.noise, 2, 999)
            total += float((ran - clean).pow(2).mean())
        return total

    assert distance(x_adv) >= 2 * distance(noisy)


@pytest.fixture
def recomputed(monkeypatch):
    """``(switch, calls)``: ``switch(on)`` makes the objective recompute its denoiser passes in the
    backward pass (as on an accelerator) or not; ``calls`` names each function checkpointed."""
    import anti_i2v.objectives.anti_i2v as anti

    calls: list[str] = []

    def counted_checkpoint(function, *args, **kwargs):
        calls.append(function.__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(anti, "checkpoint", counted_checkpoint)
    return (lambda on: monkeypatch.setattr(anti, "checkpoints_passes", lambda model: on)), calls


def test_checkpointed_sampler_passes_give_the_same_loss_and_gradient(tiny_model, portrait_small, recomputed):
    import anti_i2v.objectives.anti_i2v as anti

    noise = torch.randn(tiny_model.encode_video(tiny_model.repeat_frames(portrait_small)).shape,
                        generator=torch.Generator().manual_seed(2))
    switch, checkpointed_calls = recomputed

    def run(checkpointed):
        switch(checkpointed)
        x = portrait_small.clone().requires_grad_(True)
        encoded = tiny_model.encode_image(x, (), torch.Generator().manual_seed(0))
        out = anti.sampler_run(tiny_model, encoded, noise, 3, 999).pow(2).mean()
        return out, torch.autograd.grad(out, x)[0]

    (plain, plain_grad), (saved, saved_grad) = run(False), run(True)
    torch.testing.assert_close(saved, plain)
    torch.testing.assert_close(saved_grad, plain_grad, rtol=1e-4, atol=1e-7)
    # each guided step's two denoiser passes are checkpointed apart: one pass's activations at a time
    assert tiny_model.sampling_guidance() is not None
    assert checkpointed_calls == ["conditional", "guidance_branch"] * 3


def test_cosine_schedule_decays_to_a_tenth():
    from anti_i2v.engine import scheduled

    sizes = [scheduled(1.0, i, 5, "cosine") for i in range(5)]
    assert sizes[0] == pytest.approx(1.0) and sizes[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert scheduled(1.0, 3, 5, "constant") == 1.0
    with pytest.raises(Exception, match="step_schedule"):
        ProtectConfig(step_schedule="linear")


def test_the_psnr_floor_scales_the_perturbation_down_to_it_and_no_further():
    from anti_i2v.photo import limit_saved_psnr, load_photo, saved_psnr

    photo = load_photo(torch.full((3, 64, 96), 0.5))
    noise = torch.rand(photo.rgb.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    protected = photo.rgb + (8 / 255) * noise
    assert saved_psnr(photo, protected, 8 / 255) < 36.0
    limited = limit_saved_psnr(photo, protected, 8 / 255, 36.0)
    assert 36.0 <= saved_psnr(photo, limited, 8 / 255) < 36.001  # the budget under the floor is used
    assert (limited - photo.rgb).abs().max() <= 8 / 255
    assert torch.equal(limit_saved_psnr(photo, protected, 8 / 255, 25.0), protected)
    assert torch.equal(limit_saved_psnr(photo, protected, 8 / 255, None), protected)


def test_the_psnr_floor_is_met_tightly_where_the_perturbation_sits_at_one_level():
    """Scaling a +-3 level perturbation jumps from 38.6 dB to 42.1 dB (every pixel moves at once):
    the floor in between is met within a hundredth of a dB, gray photos included."""
    from anti_i2v.photo import limit_saved_psnr, load_photo, quantize_protected, saved_psnr

    sign = torch.randint(0, 2, (1, 64, 80), generator=torch.Generator().manual_seed(0)) * 2 - 1
    for photo in (load_photo(torch.full((3, 64, 80), 128 / 255)), load_photo(torch.full((64, 80), 128 / 255).numpy())):
        protected = photo.rgb + 3 / 255 * sign.expand(3, -1, -1)
        assert saved_psnr(photo, protected, 8 / 255) == pytest.approx(38.59, abs=0.01)
        limited = limit_saved_psnr(photo, protected, 8 / 255, 40.0)
        assert 40.0 <= saved_psnr(photo, limited, 8 / 255) < 40.01
        moved = set(np.abs(quantize_protected(photo, limited, 8 / 255).astype(int) - 128).ravel().tolist())
        assert moved == {2, 3}  # some pixels a level less, the rest where they were


def test_the_floor_measures_what_rounding_to_the_saved_file_gives():
    """`saved_psnr` (row blocks, bounds computed once) agrees with rounding the whole photo as
    saving does, on multi-block RGB and gray photos with off-range and non-finite values."""
    from anti_i2v import photo as photo_module
    from anti_i2v.photo import load_photo, quantize_protected, saved_psnr

    generator = torch.Generator().manual_seed(1)
    for photo in (load_photo(torch.rand(3, 300, 200, generator=generator)),
                  load_photo((torch.rand(300, 200, generator=generator) * 255).round().numpy().astype(np.uint8))):
        protected = photo.rgb + (torch.rand(photo.rgb.shape, generator=generator) - 0.5) * 0.2
        protected[0, 0, 0] = float("nan")
        saved = quantize_protected(photo, protected, 8 / 255, bit_depth=8).astype(np.float64) / 255
        saved = saved[None] if photo.is_gray else saved.transpose(2, 0, 1)
        original = (photo.rgb[:1] if photo.is_gray else photo.rgb).numpy().astype(np.float64)
        expected = -10 * np.log10(((saved - original) ** 2).mean())
        old_block = photo_module._LEVEL_BLOCK_VALUES
        try:
            photo_module._LEVEL_BLOCK_VALUES = 7 * 200  # many blocks, the last one short
            assert saved_psnr(photo, protected, 8 / 255) == pytest.approx(expected, abs=1e-9)
        finally:
            photo_module._LEVEL_BLOCK_VALUES = old_block


def test_protect_honours_the_psnr_floor_on_the_saved_file(tiny_model, portrait):
    import anti_i2v

    result = anti_i2v.protect(portrait[0, :, :128, :192], tiny_model, steps=3, min_psnr=33.0, prompt=PROMPT)
    assert result.budget.psnr >= 33.0 and result.budget.within_budget


def test_the_default_method_has_a_psnr_floor_that_zero_turns_off():
    from anti_i2v.photo import limit_saved_psnr, load_photo

    assert ProtectConfig.from_preset().min_psnr == pytest.approx(31.35)
    assert ProtectConfig.from_preset(min_psnr=0).min_psnr == 0
    photo = load_photo(torch.full((3, 64, 64), 0.5))
    protected = photo.rgb + 8 / 255
    assert torch.equal(limit_saved_psnr(photo, protected, 8 / 255, 0), protected)
    with pytest.raises(ConfigError, match="min_psnr"):
        ProtectConfig(min_psnr=5)


def test_the_reference_pass_beside_the_sampler_is_checkpointed_to_the_same_loss_and_gradient(
        tiny_model, portrait_small, recomputed):
    config = ProtectConfig(weight_irc=0.0, weight_ira=0.0, weight_dm=1.0, weight_sampler=1.0, sampler_steps=2,
                           sampler_noise_pool=1, reference="repeat")
    objective = AntiI2VObjective(tiny_model, config)
    objective.prepare(tiny_model, portrait_small)
    draw = draw_step(torch.Generator().manual_seed(3), objective.latent_shape(), (400, 400))
    switch, checkpointed_calls = recomputed

    def run(checkpointed):
        switch(checkpointed)
        x = portrait_small.clone().requires_grad_(True)
        output = objective(x, dataclasses.replace(draw, generator=torch.Generator().manual_seed(4)))
        return output.loss, torch.autograd.grad(output.loss, x)[0]

    (plain, plain_grad), (saved, saved_grad) = run(False), run(True)
    torch.testing.assert_close(saved, plain)
    torch.testing.assert_close(saved_grad, plain_grad, rtol=1e-4, atol=1e-7)
    assert checkpointed_calls[0] == "denoise" and checkpointed_calls.count("conditional") == 2
