"""Every protection method runs in the same engine and budget; baselines do what they claim."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import anti_i2v
from anti_i2v.config import ProtectConfig, describe_preset
from anti_i2v.errors import ConfigError
from anti_i2v.methods import METHODS, get_method, parse_methods
from anti_i2v.objectives import draw_step
from anti_i2v.objectives.baselines import EncoderAttack, ScoreDistillationAttack

APPLICABLE = [name for name in METHODS if name != "clip-embed"]  # CogVideoX has no image encoder


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, portrait):
    path = tmp_path_factory.mktemp("m") / "face.png"
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((96, 64)).save(path)
    return path


@pytest.mark.parametrize("name", APPLICABLE)
def test_every_method_respects_the_budget_on_the_saved_file(name, tmp_path, photo_path, tiny_model):
    result = anti_i2v.protect(photo_path, tiny_model, out=tmp_path, method=name, steps=2, eps="4/255")
    original = np.asarray(Image.open(photo_path), dtype=np.int16)
    saved = np.asarray(Image.open(result.path), dtype=np.int16)
    assert np.abs(saved - original).max() <= 4 and (saved != original).any()
    assert result.config.method == name


def test_ablations_set_their_space_and_weights_but_explicit_values_win():
    config = ProtectConfig.from_preset("fast", method="anti-i2v-paper-lab")
    assert config.space == "lab" and config.weight_irc == 0 and config.weight_dm == 1
    assert ProtectConfig.from_preset("fast", method="anti-i2v-paper-lab", space="dct").space == "dct"
    assert ProtectConfig.from_preset("fast", method="anti-i2v-paper-ira").weight_ira == 1


def test_the_default_takes_its_family_settings_only_for_one_family_and_explicit_values_win():
    assert ProtectConfig.from_preset("fast").weight_dm == 0
    assert ProtectConfig.from_preset("fast", families=["svd"]).weight_dm == 1
    assert ProtectConfig.from_preset("fast", families=["svd", "svd"]).weight_dm == 1
    assert ProtectConfig.from_preset("fast", families=["svd", "cogvideox"]).weight_dm == 0
    assert ProtectConfig.from_preset("fast", families=["svd"], weight_dm=0.5).weight_dm == 0.5
    assert ProtectConfig.from_preset("fast", families=["svd"], method="advdm").weight_dm == 1  # its own L_DM
    assert ProtectConfig.from_preset("fast", families=["svd"], method="anti-i2v-paper").weight_irc == 1
    assert ProtectConfig.from_preset(families=["cogvideox"]).sampler_noise_pool == 2
    assert ProtectConfig.from_preset(families=["svd"]).sampler_noise_pool == 2


def test_presets_take_their_long_video_route_with_the_default_only_and_explicit_values_win():
    """On long videos `fast` and `balanced` optimise more steps on a quarter of the frames; `strong`,
    the baselines and the paper's method keep their settings, and a value given wins."""
    from anti_i2v.config import LONG_VIDEO_PRESETS, LONG_VIDEO_SHARE

    for preset, route in LONG_VIDEO_PRESETS.items():
        config = ProtectConfig.from_preset(preset, long_video=True)
        assert (config.steps, config.frame_share) == (route["steps"], LONG_VIDEO_SHARE)
        assert config.full_frame_steps == route.get("full_frame_steps", 0)
        plain = ProtectConfig.from_preset(preset)
        assert plain.frame_share == 1 and plain.full_frame_steps == 0 and plain.steps < config.steps
    balanced = ProtectConfig.from_preset("balanced", long_video=True)
    # 5 steps on the quarter, then 1 on every frame, all at the step of a 5-step run
    assert balanced.frame_phases() == [(LONG_VIDEO_SHARE, range(5)), (1.0, range(5, 6))]
    assert balanced.step_size == pytest.approx(8 / 255)
    assert ProtectConfig.from_preset("balanced", long_video=True, frame_share=1).frame_phases() == [(1.0, range(6))]
    assert ProtectConfig.from_preset("balanced", long_video=True, full_frame_steps=0).step_size == pytest.approx(
        40 / 6 / 255)  # then the run is its 6 steps on the quarter
    strong = ProtectConfig.from_preset("strong", long_video=True)
    assert (strong.steps, strong.frame_share) == (200, 1)
    for method in ("advdm", "anti-i2v-paper"):
        assert ProtectConfig.from_preset("balanced", long_video=True, method=method).frame_share == 1
    assert ProtectConfig.from_preset("balanced", long_video=True, frame_share=1).frame_share == 1
    assert ProtectConfig.from_preset("balanced", long_video=True, steps=20).steps == 20
    assert ("on long videos (CogVideoX-5B) 6 steps: 5 on 25% of the frames, spread, then 1 on every frame"
            in describe_preset("balanced"))
    assert "on long videos (CogVideoX-5B) 5 steps on 25% of the frames, spread" in describe_preset("fast")
    assert "long videos" not in describe_preset("strong")


def test_the_default_step_follows_the_run_length_unless_set():
    """5 eps / steps, between 1/255 and eps: short runs take larger steps, long ones the tuned 1/255."""
    assert ProtectConfig.from_preset("fast").step_size == pytest.approx(8 / 255)  # 3 steps: at most eps
    assert ProtectConfig.from_preset("balanced").step_size == pytest.approx(8 / 255)  # 5 steps
    assert ProtectConfig.from_preset("balanced", steps=10).step_size == pytest.approx(4 / 255)
    assert ProtectConfig.from_preset("balanced", steps=20).step_size == pytest.approx(2 / 255)  # explicit steps
    assert ProtectConfig.from_preset("balanced", steps=3).step_size == pytest.approx(8 / 255)  # at most eps
    assert ProtectConfig.from_preset("strong").step_size == 1 / 255
    assert ProtectConfig.from_preset("balanced", eps=16 / 255, steps=40).step_size == pytest.approx(2 / 255)
    assert ProtectConfig.from_preset("fast", step_size=0.5 / 255).step_size == 0.5 / 255  # explicit wins
    assert ProtectConfig.from_preset("fast", method="advdm").step_size == 1 / 255  # baselines keep theirs
    assert ProtectConfig.from_preset("fast", method="anti-i2v-paper").step_size is None  # the paper's own rule
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        ProtectConfig.from_preset(steps=0)


def test_protect_records_the_family_settings_it_used(photo_path, tmp_path, tiny_model):
    assert tiny_model.family == "cogvideox"
    result = anti_i2v.protect(photo_path, "tiny-svd", out=tmp_path, steps=1, sampler_steps=1)
    assert result.config.weight_dm == 1
    assert json.loads(result.sidecar.read_text())["config"]["weight_dm"] == 1


def test_unknown_methods_and_inapplicable_attacks_are_refused(photo_path, tiny_model):
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("anti-i2v,glaze")
    with pytest.raises(ConfigError, match="no image encoder"):
        anti_i2v.protect(photo_path, tiny_model, method="clip-embed", steps=1)
    assert [m.name for m in parse_methods("advdm, random")] == ["advdm", "random"]


def test_photoguard_pulls_the_latent_toward_its_target(tiny_model, portrait_small):
    config = ProtectConfig(method="photoguard", prompt="a person talking to the camera")
    attack = EncoderAttack(tiny_model, config)
    attack.prepare(tiny_model, portrait_small)
    result = anti_i2v.protect(portrait_small[0], tiny_model, method="photoguard", steps=10,
                              prompt="a person talking to the camera")
    protected = torch.from_numpy(np.asarray(result.image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    draw = draw_step(torch.Generator().manual_seed(0), attack.latent_shape(), (0, 999))
    assert attack(protected, draw).loss < attack(portrait_small, draw).loss


def test_sds_gradient_flows_through_the_encoder_only(tiny_model, portrait_small):
    config = ProtectConfig(method="sds", prompt="a person talking to the camera")
    attack = ScoreDistillationAttack(tiny_model, config)
    attack.prepare(tiny_model, portrait_small)
    x = portrait_small.clone().requires_grad_(True)
    draw = draw_step(torch.Generator().manual_seed(0), attack.latent_shape(), (0, 999))
    calls = []
    block = tiny_model.transformer.transformer_blocks[0]
    handle = block.register_full_backward_hook(lambda *a: calls.append(1))
    try:
        out = attack(x, draw)
        (grad,) = torch.autograd.grad(out.loss, x)
    finally:
        handle.remove()
    assert calls == [] and grad.abs().sum() > 0


def test_random_method_is_uniform_noise_of_the_full_budget(photo_path, tiny_model):
    result = anti_i2v.protect(photo_path, tiny_model, method="random", eps="8/255", seed=1)
    original = np.asarray(Image.open(photo_path), dtype=np.int16)
    diff = np.asarray(result.image, dtype=np.int16) - original
    assert np.abs(diff).max() == 8 and abs(diff.mean()) < 1 and diff.std() > 3
    assert get_method("random").build is None


def test_settings_the_default_never_reads_are_named_and_those_it_reads_are_not():
    """The default's sampler divergence reads no target, timestep range or IRC/IRA blocks: given, they change
    nothing, so `protect` warns; the paper's method and the baselines read them."""
    from anti_i2v.methods import unused_settings

    given = ["target", "t_min", "irc_deep", "ira_blocks", "eps", "momentum"]
    default = ProtectConfig.from_preset("balanced", target="t.png", t_min=100)
    assert unused_settings(default, given) == ["target", "t_min", "irc_deep", "ira_blocks"]
    assert unused_settings(ProtectConfig.from_preset("balanced", method="anti-i2v-paper"), given) == []
    assert unused_settings(ProtectConfig.from_preset("balanced", method="advdm"), given) == []
    with_dm = ProtectConfig.from_preset("balanced", weight_dm=1.0)  # a denoiser-pass term reads the timesteps
    assert unused_settings(with_dm, ["t_min", "reference", "target"]) == ["target"]

