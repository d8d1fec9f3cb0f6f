"""The testbed trainer: data, every phase on a few steps, loading through the user path, and the proof."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from testbed import data  # noqa: E402
from testbed.train import main as train  # noqa: E402


def test_held_out_photos_never_reach_training():
    assert not set(data.HELD_OUT) & set(data.TRAINING)
    assert "astronaut" in data.HELD_OUT and len(data.HELD_OUT) >= 3


def test_every_motion_moves_the_window_its_own_way():
    image = data.photo("astronaut")
    clips = {m: data.canonical_clip(image, m, 9, (48, 64)) for m in data.MOTIONS}
    assert all(c.shape == (9, 3, 48, 64) for c in clips.values())
    # one start window; the anti-alias pre-shrink follows the path's mean window, so zooms start a little
    # sharper (in) or softer (out) than pans
    assert all((clips[m][0] - clips["pan left"][0]).abs().mean() < 0.04 for m in data.MOTIONS)
    start = data.Window(112.0, 112.0, 100.0)
    left, right = data.window_path(start, "pan left", 9), data.window_path(start, "pan right", 9)
    assert left[-1].cx == pytest.approx(start.cx - 0.25 * start.w) and right[-1].cx > start.cx
    zoom_in, zoom_out = data.window_path(start, "zoom in", 9), data.window_path(start, "zoom out", 9)
    assert zoom_in[-1].h == pytest.approx(100 / 1.35) and zoom_out[-1].h == pytest.approx(135)


def test_random_clips_stay_inside_the_photo_and_are_reproducible():
    a, prompts = data.training_batch(3, 5, (24, 32), np.random.default_rng(7))
    b, _ = data.training_batch(3, 5, (24, 32), np.random.default_rng(7))
    assert a.shape == (3, 5, 3, 24, 32) and torch.equal(a, b) and set(prompts) <= set(data.MOTIONS)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["cogvideox", "svd", "wan"])
def test_every_phase_runs_and_the_folder_loads_as_a_user_would(family, tmp_path):
    from testbed.proof import load_testbed, prove

    out = tmp_path / family
    record = train([family, "--out", str(out), "--vae-steps", "4", "--vae-frame-batch", "2", "--vae-clip-batch", "1",
                    "--bank-clips", "4", "--denoiser-steps", "2", "--batch", "2", "--threads", "1", "--no-proof"])
    assert (out / "model_index.json").is_file() and record["scaling_factor"] > 0
    assert json.loads((out / "training.json").read_text())["denoiser_steps"] == 2
    model = load_testbed(family, out)
    assert model.resolution == (96, 128) and model.num_frames == 9
    proof = prove(family, out, seeds=1, photos=("astronaut",))
    assert proof["videos"] == len(proof["motions"]) and np.isfinite(proof["vae_psnr_clip"])
    assert json.loads((out / "proof.json").read_text())["right_direction"] == proof["right_direction"]


@pytest.mark.slow
def test_a_longer_clip_copy_starts_from_the_trained_weights(tmp_path):
    from anti_i2v.models.registry import load_model

    short, long = tmp_path / "short", tmp_path / "long"
    common = ["--vae-frame-batch", "2", "--vae-clip-batch", "1", "--bank-clips", "2", "--batch", "2", "--threads", "1",
              "--no-proof"]
    train(["cogvideox", "--out", str(short), "--vae-steps", "2", "--denoiser-steps", "2", *common])
    # no fine-tuning steps: the copy must be the trained model at another clip length
    record = train(["cogvideox", "--out", str(long), "--frames", "13", "--init-from", str(short),
                    "--denoiser-steps", "0", *common])
    a, b = load_model("cogvideox", str(short), device="cpu"), load_model("cogvideox", str(long), device="cpu")
    assert (a.num_frames, b.num_frames) == (9, 13) and record["frames"] == 13 and record["init_from"] == "short"
    assert b.vae.config.scaling_factor == a.vae.config.scaling_factor
    for name in ("vae", "transformer", "text_encoder"):
        mine, theirs = getattr(b.pipe, name).state_dict(), getattr(a.pipe, name).state_dict()
        differ = [k for k in mine if mine[k].shape != theirs[k].shape or not torch.equal(mine[k], theirs[k])]
        assert differ == ([] if name != "transformer" else ["patch_embed.pos_embedding"]), name
    with pytest.raises(SystemExit, match="does not match"):
        train(["svd", "--out", str(tmp_path / "wrong"), "--init-from", str(short), "--denoiser-steps", "0", *common])
