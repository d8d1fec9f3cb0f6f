"""Speed levers (`anti_i2v.acceleration`): each gives the loss and gradient of the plain path on a
tiny model, within float tolerance."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.acceleration import compile_denoiser, use_attention_kernel
from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.memory import apply_memory_mode
from anti_i2v.objectives import AntiI2VObjective, draw_step

PROMPT = "a person talking to the camera"


def _tiny(dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False):
    from anti_i2v.models.cogvideox import CogVideoXI2V

    model = CogVideoXI2V(CogVideoXI2V.tiny(seed=0).pipe, name="tiny-cogvideox", dtype=dtype,
                         gradient_checkpointing=gradient_checkpointing)
    model.condition(PROMPT)
    return model


def _loss_and_gradient(model, x: torch.Tensor, seed: int = 5) -> tuple[float, torch.Tensor]:
    objective = AntiI2VObjective(model, ProtectConfig(prompt=PROMPT))
    objective.prepare(model, x)
    draw = draw_step(torch.Generator().manual_seed(seed), objective.latent_shape(), (0, 999))
    x_adv = (x + 2 / 255).clamp(0, 1).requires_grad_(True)
    output = objective(x_adv, draw)
    (grad,) = torch.autograd.grad(output.loss, x_adv)
    return float(output.loss.detach()), grad.float()


@pytest.fixture(scope="module")
def photo(portrait):
    from anti_i2v.photo import resize_for_model

    return resize_for_model(portrait[0], 64, 96)


@pytest.fixture(scope="module")
def plain(photo):
    return _loss_and_gradient(_tiny(), photo)


@pytest.mark.slow
def test_the_compiled_denoiser_gives_the_plain_loss_and_gradient_also_when_streamed(photo, plain):
    loss, grad = plain
    compiled = compile_denoiser(_tiny())
    for _ in range(2):  # the first call compiles, the second runs the compiled code
        loss_c, grad_c = _loss_and_gradient(compiled, photo)
    assert compiled.compiled
    assert loss_c == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(grad_c, grad, rtol=1e-3, atol=1e-6)
    # the streamed blocks' hooks and checkpointing around compiled code (graph capture only: inductor ran above)
    streamed = compile_denoiser(apply_memory_mode(_tiny(gradient_checkpointing=True), "sequential"), backend="aot_eager")
    loss_s, grad_s = _loss_and_gradient(streamed, photo)
    assert loss_s == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(grad_s, grad, rtol=1e-3, atol=1e-6)


def test_every_block_of_a_unet_runs_compiled(photo):
    """DynamiCrafter's U-Net blocks share one ``forward`` in many shapes: past torch's default
    cache of 8 graphs the rest fell back to uncompiled code without a word."""
    from torch._dynamo.utils import counters

    from anti_i2v.api import protect
    from anti_i2v.models.registry import load_model

    torch._dynamo.reset()
    counters.clear()
    # torch's default, whatever ran before (its own patch: a monkeypatched torch config loses the setting on undo)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        model = compile_denoiser(load_model("tiny-dynamicrafter", device="cpu"), backend="eager")  # graph capture only
        protect(photo, model, steps=1, prompt=PROMPT)
    frames = counters["frames"]
    assert frames["total"] > 8  # more graphs than the default cache holds
    assert frames["ok"] == frames["total"]


def test_the_math_attention_kernel_gives_the_plain_loss_and_gradient(photo, plain):
    loss, grad = plain
    model = use_attention_kernel(_tiny(), "math")
    loss_m, grad_m = _loss_and_gradient(model, photo)
    assert model.attention_hooks.entered > 0
    assert loss_m == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(grad_m, grad, rtol=1e-3, atol=1e-6)


def test_a_kernel_that_cannot_serve_the_inputs_fails_rather_than_falling_back(photo):
    model = use_attention_kernel(_tiny(), "cudnn")  # a CUDA-only kernel, here on the CPU
    with pytest.raises(RuntimeError, match="(?i)kernel"):
        _loss_and_gradient(model, photo)
    with pytest.raises(ConfigError, match="attention kernel"):
        use_attention_kernel(_tiny(), "fastest")


def test_protect_passes_the_kernel_and_compilation_to_the_models_it_loads(photo, monkeypatch):
    import anti_i2v
    import anti_i2v.acceleration

    compiled = []
    monkeypatch.setattr(anti_i2v.acceleration, "compile_denoiser", lambda model: compiled.append(model) or model)
    anti_i2v.protect(photo[0], "tiny-cogvideox", device="cpu", compile=True, steps=1, prompt=PROMPT)
    assert [m.name for m in compiled] == ["tiny-cogvideox"]

    with pytest.raises(RuntimeError, match="(?i)kernel"):  # the CUDA-only kernel reached the model
        anti_i2v.protect(photo[0], "tiny-cogvideox", device="cpu", attention="cudnn", steps=1, prompt=PROMPT)
    with pytest.raises(ConfigError, match="attention kernel"):
        anti_i2v.protect(photo[0], "tiny-cogvideox", device="cpu", attention="fastest", steps=1, prompt=PROMPT)


def test_bf16_keeps_the_direction_of_the_gradient(photo, plain):
    """Sign-PGD steps along the gradient's sign: in bf16 it must agree with fp32 almost everywhere."""
    _, grad = plain
    _, grad_bf16 = _loss_and_gradient(_tiny(torch.bfloat16), photo)
    assert torch.nn.functional.cosine_similarity(grad.flatten(), grad_bf16.flatten(), dim=0) > 0.99
    assert (grad.sign() == grad_bf16.sign()).float().mean() > 0.95


def _draws_gradient(model, x: torch.Tensor) -> torch.Tensor:
    """The default objective's gradient at ``x`` + 2/255, summed over four seeded draws."""
    from anti_i2v.methods import get_method

    objective = get_method("anti-i2v").build(model, ProtectConfig.from_preset(prompt=PROMPT), None, None)
    objective.prepare(model, x)
    total = torch.zeros_like(x)
    for seed in range(4):
        draw = draw_step(torch.Generator().manual_seed(seed), objective.latent_shape(), (0, 999))
        x_adv = (x + 2 / 255).clamp(0, 1).requires_grad_(True)
        total += torch.autograd.grad(objective(x_adv, draw).loss, x_adv)[0]
    return total


@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-svd"])
def test_fewer_frames_keep_the_gradient_direction_and_every_frame_comes_back(name, portrait):
    """Optimising on half the frames changes the loss by design; its gradient must still point
    where the full-length one does (averaged over a few draws), and the model gets every frame back."""
    from anti_i2v.models.registry import load_model
    from anti_i2v.photo import resize_for_model

    model = load_model(name, device="cpu")
    model.condition(PROMPT)
    x = resize_for_model(portrait[0], *model.resolution)
    full = model.num_frames

    reference = _draws_gradient(model, x)
    with model.fewer_frames(0.5) as count:
        assert count < full
        fewer = _draws_gradient(model, x)
    assert model.num_frames == full
    assert torch.nn.functional.cosine_similarity(reference.flatten(), fewer.flatten(), dim=0) > 0.5


def test_protect_with_a_frame_share_records_it_and_restores_the_model(tiny_model, portrait):
    import anti_i2v

    full = tiny_model.num_frames
    result = anti_i2v.protect(portrait[0, :, :128, :192], tiny_model, steps=2, frame_share=0.5, prompt=PROMPT)
    assert result.config.frame_share == 0.5 and tiny_model.num_frames == full
    with pytest.raises(ConfigError, match="frame_share"):
        ProtectConfig(frame_share=0)


def test_full_frame_steps_finish_on_every_frame_and_an_interrupted_photo_resumes_there(tiny_model, portrait,
                                                                                        tmp_path, monkeypatch):
    """With ``full_frame_steps`` the last steps run on every frame, from where the steps on the share
    left off; a photo interrupted there resumes from its checkpoint without redoing the others,
    nor preparing their objective."""
    import numpy as np

    import anti_i2v

    photo = portrait[0, :, :128, :192]
    full = tiny_model.num_frames
    settings = dict(steps=3, frame_share=0.5, full_frame_steps=1, prompt=PROMPT, checkpoint_every=1)
    frames = []
    whole = anti_i2v.protect(photo, tiny_model, out=tmp_path / "whole", stem="p",
                             callback=lambda r: frames.append(tiny_model.num_frames), **settings)
    assert frames[0] == frames[1] < full and frames[2] == full == tiny_model.num_frames

    def crash(report):
        if report.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        anti_i2v.protect(photo, tiny_model, out=tmp_path / "resumed", stem="p", callback=crash, **settings)
    seen, prepared = [], []
    prepare = AntiI2VObjective.prepare
    monkeypatch.setattr(AntiI2VObjective, "prepare",
                        lambda self, model, x: (prepared.append(model.num_frames), prepare(self, model, x))[1])
    resumed = anti_i2v.protect(photo, tiny_model, out=tmp_path / "resumed", stem="p",
                               callback=lambda r: seen.append((r.step, tiny_model.num_frames)), **settings)
    assert seen == [(3, full)] and prepared == [full] and len(resumed.history) == 3
    assert np.array_equal(np.asarray(resumed.image), np.asarray(whole.image))
    with pytest.raises(ConfigError, match="full_frame_steps"):
        ProtectConfig(steps=3, full_frame_steps=4)


def test_fewer_frames_keep_cogvideox_learned_positions():
    """diffusers rebuilds the positional table as sin-cos for another frame count; the adapter cuts
    the learned one instead, so the model optimised on is the released one, and restores it."""
    model = _tiny()
    patch = model.transformer.patch_embed
    table, frames = patch.pos_embedding.clone(), patch.sample_frames
    with model.fewer_frames(0.5) as count:
        assert patch.sample_frames == count < frames  # diffusers then takes the table as it is
        assert torch.equal(patch.pos_embedding, table[:, : patch.pos_embedding.shape[1]])
        assert patch.pos_embedding.shape[1] < table.shape[1]
    assert patch.sample_frames == frames and torch.equal(patch.pos_embedding, table)


def test_a_noise_pool_gives_the_plain_loss_and_gradient_of_the_noise_it_picks(photo):
    """With ``sampler_noise_pool`` the clean photo's sampler runs are computed once; each step's
    loss and gradient must be the plain path's from the pool noise the step picked."""
    model = _tiny()
    settings = dict(prompt=PROMPT, weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1, sampler_steps=2)
    pooled = AntiI2VObjective(model, ProtectConfig(sampler_noise_pool=3, **settings))
    pooled.prepare(model, photo)
    plain = AntiI2VObjective(model, ProtectConfig(**settings))
    plain.prepare(model, photo)
    assert len(pooled.pool_noises) == 3

    def loss_and_gradient(objective, seed: int, noise: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        draw = draw_step(torch.Generator().manual_seed(seed), objective.latent_shape(), (0, 999))
        if noise is not None:
            draw.noise = noise
        x_adv = (photo + 2 / 255).clamp(0, 1).requires_grad_(True)
        output = objective(x_adv, draw)
        return float(output.loss.detach()), torch.autograd.grad(output.loss, x_adv)[0]

    picked = set()
    for seed in range(4):
        loss, grad = loss_and_gradient(pooled, seed)
        candidates = [loss_and_gradient(plain, seed, noise) for noise in pooled.pool_noises]
        matches = [i for i, (loss_p, grad_p) in enumerate(candidates)
                   if loss_p == pytest.approx(loss, rel=1e-5) and torch.allclose(grad_p, grad, rtol=1e-3, atol=1e-6)]
        assert len(matches) == 1
        picked.add(matches[0])
    assert len(picked) > 1  # the steps draw from the pool, not one noise every time
    with pytest.raises(ConfigError, match="sampler_noise_pool"):
        ProtectConfig(sampler_noise_pool=-1)


def test_a_noise_pool_runs_each_clean_run_once_and_only_when_picked(photo):
    """The pool's clean runs wait for a step to pick their noise: preparing runs none, a step that
    picks a new noise runs the clean run beside its own, a step that picks one seen before does not,
    so a run of fewer steps than noises pays only for the noises it draws."""
    model = _tiny()
    settings = dict(prompt=PROMPT, weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1, sampler_steps=2)
    passes: list[int] = []
    hook = model.transformer.register_forward_hook(lambda *_: passes.append(1))

    def counted(action) -> int:
        passes.clear()
        action()
        return len(passes)

    def step(objective, seed: int) -> None:
        draw = draw_step(torch.Generator().manual_seed(seed), objective.latent_shape(), (0, 999))
        objective((photo + 2 / 255).clamp(0, 1).requires_grad_(True), draw)

    plain = AntiI2VObjective(model, ProtectConfig(**settings))
    pooled = AntiI2VObjective(model, ProtectConfig(sampler_noise_pool=3, **settings))
    assert counted(lambda: pooled.prepare(model, photo)) == counted(lambda: plain.prepare(model, photo))
    per_run = counted(lambda: step(plain, 0)) // 2  # the clean run and the protected one
    per_step = [counted(lambda: step(pooled, seed)) for seed in range(7)]
    hook.remove()
    assert set(per_step) <= {per_run, 2 * per_run}
    assert per_step[0] == 2 * per_run  # the first pick always runs its clean run
    assert 1 <= per_step.count(2 * per_run) <= 3  # at most once per noise of the pool
    assert per_run in per_step  # 7 picks from 3 noises repeat one, whose clean run is kept


def test_the_default_step_runs_only_the_sampler_passes(photo):
    """The sampler divergence alone runs two passes per guided sampler step (conditional and
    unconditional), one per unguided step, and no pass on the noised reference video, which no
    term of it reads. The default guides the first two of its four sampler steps."""
    model = _tiny()
    objective = AntiI2VObjective(model, ProtectConfig.from_preset("balanced", "anti-i2v", prompt=PROMPT))
    objective.prepare(model, photo)
    passes = []

    def step() -> None:
        draw = draw_step(torch.Generator().manual_seed(0), objective.latent_shape(), (0, 999))
        objective((photo + 2 / 255).clamp(0, 1).requires_grad_(True), draw)

    step()  # the pool's clean run from the noise this draw picks: once, on its first pick
    hook = model.transformer.register_forward_hook(lambda *_: passes.append(1))
    step()
    hook.remove()
    config = objective.config
    assert (config.sampler_steps, config.sampler_guided_steps) == (4, 2)
    assert len(passes) == config.sampler_steps + config.sampler_guided_steps == 6


def test_differentiating_the_last_sampler_steps_keeps_the_loss_and_the_gradient_direction(photo):
    """``sampler_grad_steps`` changes no forward value; with every step it is the plain
    gradient, with fewer a truncated one that still points the same way."""
    model = _tiny()
    settings = dict(prompt=PROMPT, weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1, sampler_steps=3,
                    sampler_noise_pool=1)

    def loss_and_gradient(grad_steps: int) -> tuple[float, torch.Tensor]:
        objective = AntiI2VObjective(model, ProtectConfig(sampler_grad_steps=grad_steps, **settings))
        objective.prepare(model, photo)
        draw = draw_step(torch.Generator().manual_seed(3), objective.latent_shape(), (0, 999))
        x_adv = (photo + 2 / 255).clamp(0, 1).requires_grad_(True)
        output = objective(x_adv, draw)
        return float(output.loss.detach()), torch.autograd.grad(output.loss, x_adv)[0].flatten()

    plain_loss, plain_grad = loss_and_gradient(0)
    every_loss, every_grad = loss_and_gradient(3)
    assert every_loss == pytest.approx(plain_loss, rel=1e-6) and torch.allclose(every_grad, plain_grad)
    for grad_steps in (1, 2):
        loss, grad = loss_and_gradient(grad_steps)
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        assert not torch.allclose(grad, plain_grad)
        assert torch.cosine_similarity(grad, plain_grad, dim=0) > 0.3
    with pytest.raises(ConfigError, match="sampler_grad_steps"):
        ProtectConfig(sampler_grad_steps=-1)


def test_the_guidance_branch_without_gradients_keeps_the_loss_and_the_gradient_direction(photo):
    """``sampler_unconditional="detached"`` gives the plain loss and a gradient close to, but
    not equal to, the plain one; it runs no pass more than the plain path."""
    model = _tiny()
    settings = dict(prompt=PROMPT, weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1, sampler_steps=3,
                    sampler_noise_pool=1)

    def loss_and_gradient(mode: str) -> tuple[float, torch.Tensor, int]:
        objective = AntiI2VObjective(model, ProtectConfig(sampler_unconditional=mode, **settings))
        objective.prepare(model, photo)
        draw = draw_step(torch.Generator().manual_seed(3), objective.latent_shape(), (0, 999))
        x_adv = (photo + 2 / 255).clamp(0, 1).requires_grad_(True)
        passes = []
        hook = model.transformer.register_forward_hook(lambda *_: passes.append(1))
        output = objective(x_adv, draw)
        hook.remove()
        return float(output.loss.detach()), torch.autograd.grad(output.loss, x_adv)[0].flatten(), len(passes)

    plain_loss, plain_grad, plain_passes = loss_and_gradient("tracked")
    loss, grad, passes = loss_and_gradient("detached")
    assert loss == pytest.approx(plain_loss, rel=1e-6) and passes == plain_passes
    assert not torch.allclose(grad, plain_grad)
    assert torch.cosine_similarity(grad, plain_grad, dim=0) > 0.9
    with pytest.raises(ConfigError, match="sampler_unconditional"):
        ProtectConfig(sampler_unconditional="skipped")


def test_guiding_some_sampler_steps_runs_one_pass_in_the_others(photo):
    """``sampler_guided_steps`` k guides the first k sampler steps (the last -k when negative): the
    others run the conditional pass alone, for the clean run as for the protected photo's."""
    import anti_i2v.objectives.anti_i2v as anti

    model = _tiny()
    shape = model.encode_video(model.repeat_frames(photo)).shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    encoded = model.encode_image(photo, (), torch.Generator().manual_seed(0))

    def run(guided_steps: int) -> tuple[torch.Tensor, list[bool]]:
        guided = []
        unconditional = model.denoise_unconditional
        model.denoise_unconditional = lambda *a, **k: guided.append(True) or unconditional(*a, **k)
        try:
            with torch.no_grad():
                return anti.sampler_run(model, encoded, noise, 3, 999, guided_steps=guided_steps), guided
        finally:
            del model.denoise_unconditional

    every, every_passes = run(0)
    assert len(every_passes) == 3
    first, first_passes = run(1)
    last, last_passes = run(-2)
    assert len(first_passes) == 1 and len(last_passes) == 2
    assert not torch.allclose(first, every) and not torch.allclose(last, every) and not torch.allclose(first, last)
    torch.testing.assert_close(run(3)[0], every)
    torch.testing.assert_close(run(-3)[0], every)
    with torch.no_grad():
        assert not torch.allclose(anti.sampler_run(model, encoded, noise, 3, 999, guided=False), every)
    config = ProtectConfig(prompt=PROMPT, weight_irc=0, weight_ira=0, weight_dm=0, weight_sampler=1, sampler_steps=3,
                           sampler_noise_pool=1, sampler_guided_steps=1)
    objective = AntiI2VObjective(model, config)
    objective.prepare(model, photo)
    pooled_noise, pooled_run = objective.pooled(0)
    with torch.no_grad():
        clean_run = anti.sampler_run(model, objective.clean_encoded, pooled_noise, 3, objective.t_last, guided_steps=1)
    torch.testing.assert_close(pooled_run, clean_run)


def test_cogvideox_cuts_its_positional_table_where_the_table_now_is():
    """An ensemble parks a model's weights off its device between turns; the table cut for fewer
    frames must land where the patch embedding now is, not where the model was built."""
    model = _tiny()
    patch = model.transformer.patch_embed
    assert patch.pos_embedding is not None  # the tiny configuration has a table, as CogVideoX-5B-I2V does
    patch.pos_embedding = patch.pos_embedding.to("meta")  # as if parked elsewhere
    with model.fewer_frames(0.5, spread=True):
        assert patch.pos_embedding.device.type == "meta"
    assert patch.pos_embedding.device.type == "meta"


def test_spread_frames_keep_their_own_positions_in_cogvideox():
    """With ``spread``, the frames optimised on are spaced over the whole video and each keeps the
    rotary and table positions it has there (a lower frame rate); every position comes back after."""
    model = _tiny()
    patch = model.transformer.patch_embed
    table, rope = patch.pos_embedding.clone(), tuple(r.clone() for r in model._rope)
    text, full_latent = patch.max_text_seq_length, model.latent_frames
    per_frame = rope[0].shape[0] // full_latent
    rows = (table.shape[1] - text) // full_latent
    with model.fewer_frames(0.5, spread=True):
        positions = [0, full_latent - 1]  # two latent frames: the first and the last
        assert model.latent_frames == len(positions)
        for slot, position in enumerate(positions):
            assert torch.equal(model._rope[0][slot * per_frame:(slot + 1) * per_frame],
                               rope[0][position * per_frame:(position + 1) * per_frame])
            assert torch.equal(patch.pos_embedding[:, text + slot * rows: text + (slot + 1) * rows],
                               table[:, text + position * rows: text + (position + 1) * rows])
    assert torch.equal(patch.pos_embedding, table) and all(torch.equal(a, b) for a, b in zip(model._rope, rope))


def test_spread_frames_keep_the_gradient_direction(portrait):
    """As with the first frames: the gradient on frames spread over the video points where the
    full-length one does."""
    from anti_i2v.photo import resize_for_model

    model = _tiny()
    model.condition(PROMPT)
    x = resize_for_model(portrait[0], *model.resolution)

    reference = _draws_gradient(model, x)
    with model.fewer_frames(0.5, spread=True):
        spread = _draws_gradient(model, x)
    assert torch.nn.functional.cosine_similarity(reference.flatten(), spread.flatten(), dim=0) > 0.5


def test_svd_refuses_spread_frames_but_takes_the_default_and_protect_records_the_choice(tiny_model, portrait):
    import anti_i2v
    from anti_i2v.models.registry import load_model

    svd = load_model("tiny-svd", device="cpu")
    frames = svd.num_frames
    with pytest.raises(ConfigError, match="first frames"):
        with svd.fewer_frames(0.5, spread=True):
            pass
    assert svd.num_frames == frames
    with svd.fewer_frames(0.5, spread=None) as count:  # the default: the first frames where spreading cannot be
        assert svd.num_frames == count < frames
    assert svd.num_frames == frames
    full = tiny_model.num_frames
    result = anti_i2v.protect(portrait[0, :, :128, :192], tiny_model, steps=2, frame_share=0.5, frame_spread=True,
                              prompt=PROMPT)
    assert result.config.frame_spread and tiny_model.num_frames == full


def test_the_presets_take_the_long_video_route_on_cogvideox_5b_frame_counts(tiny_model, portrait):
    """A model is long when a quarter of its latent frames, spread, still numbers three: the 49-frame
    testbed (13 latent frames, as CogVideoX-5B) is; the 9-frame tiny model is not, and SVD, which
    cannot spread its frames, never is. There `balanced` optimises 5 steps on a quarter of the
    frames and 1 on every frame, records it, and leaves the model with every frame."""
    from pathlib import Path

    import anti_i2v
    from anti_i2v.config import LONG_VIDEO_PRESETS, is_long_video
    from anti_i2v.models.registry import load_model

    testbed = Path(__file__).resolve().parents[1] / "benchmarks" / "testbed" / "cogvideox-i2v-49f"
    long = load_model("cogvideox", str(testbed), device="cpu", dtype="fp32")
    svd = load_model("tiny-svd", device="cpu")
    assert (long.spread_frames_kept(0.25), tiny_model.spread_frames_kept(0.25), svd.spread_frames_kept(0.25)) == (3, 2, 0)
    assert is_long_video([long]) and not is_long_video([tiny_model]) and not is_long_video([long, svd])

    frames = long.num_frames
    steps = []
    result = anti_i2v.protect(portrait[0], long, prompt=PROMPT, callback=lambda report: steps.append(long.num_frames))
    route = LONG_VIDEO_PRESETS["balanced"]
    assert (result.config.steps, result.config.frame_share) == (route["steps"], route["frame_share"])
    # 3 latent frames (1 + 4 * 2 pixel frames), then all 13
    assert steps == [9] * (route["steps"] - 1) + [frames] and long.num_frames == frames == 49
    plain = anti_i2v.protect(portrait[0], tiny_model, prompt=PROMPT, steps=1)
    assert plain.config.frame_share == 1
