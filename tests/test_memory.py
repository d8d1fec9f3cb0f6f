"""Memory modes (`anti_i2v.memory`): each computes what the full mode computes, keeps less on the
accelerator, and an out-of-memory error ends with one line naming the mode that would fit."""

from __future__ import annotations

import pytest
import torch

from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.memory import (
    apply_memory_mode,
    denoiser_blocks,
    lighter_mode,
    out_of_memory_message,
    resident_weight_bytes,
)
from anti_i2v.objectives import AntiI2VObjective, draw_step

PROMPT = "a person talking to the camera"


def _tiny(mode: str, gradient_checkpointing: bool = False):
    from anti_i2v.models.cogvideox import CogVideoXI2V

    model = apply_memory_mode(CogVideoXI2V.tiny(seed=0, gradient_checkpointing=gradient_checkpointing), mode)
    model.condition(PROMPT)
    return model


def _loss_and_gradient(model, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    objective = AntiI2VObjective(model, ProtectConfig(prompt=PROMPT))
    objective.prepare(model, x)
    draw = draw_step(torch.Generator().manual_seed(5), objective.latent_shape(), (0, 999))
    x_adv = (x + 2 / 255).clamp(0, 1).requires_grad_(True)
    output = objective(x_adv, draw)
    (grad,) = torch.autograd.grad(output.loss, x_adv)
    return float(output.loss.detach()), grad


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sequential_mode_gives_the_loss_and_gradient_of_the_full_mode(portrait, checkpointing):
    from anti_i2v.photo import resize_for_model

    full = _tiny("full", checkpointing)
    x = resize_for_model(portrait[0], *full.resolution)
    loss, grad = _loss_and_gradient(full, x)
    streamed = _tiny("sequential", checkpointing)
    loss_s, grad_s = _loss_and_gradient(streamed, x)
    assert loss_s == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(grad_s, grad, rtol=1e-4, atol=1e-7)
    blocks = denoiser_blocks(streamed)
    # every block call got its own copy (twice per block with checkpointing: forward and recomputation)
    assert streamed.block_streamer.loads >= len(blocks) * (2 if checkpointing else 1)
    assert streamed.activation_offload.entered > 0  # the VAE encoder's saved activations went to the CPU
    # between calls the blocks hold their CPU masters again, not the copies
    masters = {m.data_ptr() for m in streamed.block_streamer.masters}
    assert all(p.data_ptr() in masters and p.device.type == "cpu" for b in blocks for p in b.parameters())


def test_lighter_modes_keep_fewer_weights_on_the_accelerator():
    model = _tiny("full")
    full, offload, sequential = (resident_weight_bytes(model, m) for m in ("full", "offload", "sequential"))
    assert resident_weight_bytes(model, "max") == full > offload > sequential > 0
    assert lighter_mode("max") == "full"
    assert lighter_mode("full") == "offload" and lighter_mode("offload") == "sequential"
    assert lighter_mode("sequential") is None
    with pytest.raises(ConfigError, match="memory mode"):
        apply_memory_mode(model, "tiny-card")


def test_models_load_in_the_mode_asked_and_sequential_serves_one_model():
    import anti_i2v
    from anti_i2v.models.registry import load_model

    model = load_model("tiny-cogvideox", memory="sequential")
    assert model.memory_mode == "sequential" and model.block_streamer.loads == 0
    with pytest.raises(ConfigError, match="sequential serves one model"):
        anti_i2v.protect(torch.rand(3, 64, 64), "tiny-cogvideox,tiny-svd", memory="sequential", steps=1)


def test_offload_mode_runs_the_text_encoder_on_the_cpu():
    model = _tiny("offload")
    assert model.text_on_cpu and model.text_device().type == "cpu"
    assert model.pipe.text_encoder is not None and next(model.pipe.text_encoder.parameters()).device.type == "cpu"


def test_max_mode_keeps_the_sampler_passes_activations_on_an_accelerator(monkeypatch):
    """``max`` moves no weight; on an accelerator it is the one mode whose sampler passes are not
    recomputed (checkpointed), and its out-of-memory line points to ``full``."""
    import anti_i2v.objectives.anti_i2v as anti

    model = _tiny("max")
    assert model.memory_mode == "max" and not model.text_on_cpu
    assert not anti.checkpoints_passes(model)  # the CPU never checkpoints them
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert not anti.checkpoints_passes(model)
    model.memory_mode = "full"
    assert anti.checkpoints_passes(model)
    assert "try --memory full" in out_of_memory_message([model], "max")


def test_the_out_of_memory_line_names_the_lighter_mode():
    model = _tiny("full")
    line = out_of_memory_message([model], "full")
    assert "try --memory offload" in line and "\n" not in line
    assert "GiB of weights" in line
    assert "lightest mode" in out_of_memory_message([model], "sequential")


def test_running_out_of_memory_ends_the_batch_with_one_line_and_writes_nothing_half(tmp_path, portrait, monkeypatch):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    import anti_i2v.api
    from anti_i2v.cli import app

    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(array).resize((96, 96)).save(folder / name)
    real_run_pgd, calls = anti_i2v.api.run_pgd, []

    def run_pgd_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second photo, halfway through its steps
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run_pgd(*args, **kwargs)

    monkeypatch.setattr(anti_i2v.api, "run_pgd", run_pgd_that_runs_out)
    result = CliRunner().invoke(app, ["protect", str(folder), "--model", "tiny-cogvideox", "--steps", "2",
                                      "--out", str(out)])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 5, result.output
    assert "out of memory" in text and "try --memory offload" in text
    assert "Traceback" not in result.output and "Tried to allocate" not in text
    assert sorted(p.name for p in out.iterdir()) == ["a_protected.json", "a_protected.png"]  # b: nothing, not half


def test_lighter_modes_decode_in_tiles_and_encode_whole(monkeypatch, portrait):
    from anti_i2v.photo import resize_for_model

    model = _tiny("offload")
    seen: dict[str, list[bool]] = {"_encode": [], "_decode": []}
    for name in seen:
        real = getattr(type(model.vae), name)

        def spy(vae, *args, _real=real, _name=name, **kwargs):
            seen[_name].append(vae.use_tiling)
            return _real(vae, *args, **kwargs)

        monkeypatch.setattr(type(model.vae), name, spy)
    model.encode_image(resize_for_model(portrait[0], *model.resolution))
    model.vae.decode(torch.randn(1, model.vae.config.latent_channels, 2, 8, 12))
    assert seen == {"_encode": [False], "_decode": [True]}  # the photo's encoding, whose gradient counts, is whole
    assert model.vae.use_tiling is False
    assert not getattr(_tiny("full").vae, "_tiles_decoding", False)


def test_sequential_refuses_models_that_checkpoint_parts_of_blocks():
    from anti_i2v.models.registry import load_model

    with pytest.raises(ConfigError, match="sequential does not serve"):
        load_model("tiny-svd", memory="sequential")


def test_ensemble_turns_leave_a_cpu_kept_text_encoder_on_the_cpu():
    from anti_i2v.offload import move_weights

    model = _tiny("offload")
    move_weights(model, torch.device("meta"))  # where an ensemble turn would move the weights
    assert next(model.transformer.parameters()).device.type == "meta"
    assert next(model.pipe.text_encoder.parameters()).device.type == "cpu"


def test_ensemble_turns_leave_a_text_encoder_inside_the_model_on_the_cpu():
    from anti_i2v.models.registry import load_model
    from anti_i2v.offload import move_weights

    model = load_model("tiny-dynamicrafter", memory="offload")  # its text tower sits inside `net`
    move_weights(model, torch.device("meta"))
    assert next(model.net.model.parameters()).device.type == "meta"
    assert next(model.net.cond_stage_model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("name", ["tiny-cogvideox", "tiny-opensora", "tiny-ltx-i2v", "tiny-hunyuan-i2v"])
def test_sequential_loading_builds_the_denoiser_off_the_accelerator(name):
    """A model too large for the GPU must never be placed on it whole: with placement deferred
    (as `load_model` does for 'sequential'), every adapter leaves its weights where they were built."""
    from anti_i2v.memory import deferred_placement
    from anti_i2v.models.registry import get_spec

    spec = get_spec(name)
    meta = torch.device("meta")  # stands for the accelerator: a weight placed there shows as 'meta'
    with deferred_placement():
        model = spec.build(None, meta, torch.float32)
    assert {p.device.type for b in denoiser_blocks(model) for p in b.parameters()} == {"cpu"}
    assert {p.device.type for m in model.weight_modules() for p in m.parameters()} == {"cpu"}
    placed = spec.build(None, meta, torch.float32)
    assert {p.device.type for b in denoiser_blocks(placed) for p in b.parameters()} == {"meta"}
