"""The benchmark scripts keep running (their numbers are recorded, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_step_benchmark_prints_json(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench_protect.py", "--steps", "1", "--out", str(out)], cwd=BENCHMARKS,
                   check=True, capture_output=True, timeout=300)
    run = json.loads(out.read_text())["runs"][0]
    assert run["model"] == "tiny-cogvideox" and run["seconds_per_step"] > 0 and run["peak_rss_mib"] > 0


def test_photo_benchmark_reports_the_whole_photo_per_backbone(tmp_path):
    out = tmp_path / "photo.json"
    subprocess.run([sys.executable, "bench_photo.py", "--steps", "3", "--out", str(out)], cwd=BENCHMARKS,
                   check=True, capture_output=True, timeout=300)
    document = json.loads(out.read_text())
    run = document["runs"][0]
    assert {"model", "preset", "steps", "seconds", "peak_gib", "device"} <= run.keys() and document["device"] == "cpu"
    assert run["model"] == "tiny-cogvideox" and run["steps"] == 3 and run["seconds"] > 0 and run["peak_gib"] > 0
    assert 0 < run["step_seconds"] and 2 * run["step_seconds"] + run["first_step_seconds"] < run["seconds"]
    assert run["budget"]["within_budget"] and run["photo_size"] == [512, 512]


def test_ensemble_benchmark_reports_steps_and_evictions(tmp_path):
    out = tmp_path / "ensemble.json"
    subprocess.run([sys.executable, "bench_ensemble.py", "--steps", "2", "--out", str(out)], cwd=BENCHMARKS,
                   check=True, capture_output=True, timeout=300)
    run = json.loads(out.read_text())["runs"][0]
    assert run["models"] == ["tiny-cogvideox", "tiny-dynamicrafter"] and run["seconds_per_later_step"] > 0
    assert run["evictions_total"] == 0 and run["linf_255"] <= 8  # CPU models never move


def test_full_size_configurations_have_the_released_sizes():
    """The random-weight stand-ins have the released shapes: block counts and parameter counts."""
    printed = subprocess.run([sys.executable, "full_size.py"], cwd=BENCHMARKS, check=True, capture_output=True,
                             text=True, timeout=300).stdout
    counts = json.loads(printed)
    released = {  # registry name: (denoiser blocks, denoiser parameters in billions, resolution, frames)
        "cogvideox": (42, 5.57, [480, 720], 49),
        "svd-xt": (9, 1.52, [576, 1024], 25),
        "wan-i2v": (40, 16.4, [480, 832], 81),
        "wan2.2-i2v": (40, 14.3, [480, 832], 81),
        "wan2.2-ti2v": (30, 5.0, [704, 1280], 121),
        "ltx-i2v": (28, 1.92, [512, 704], 161),
        "hunyuan-i2v": (60, 12.8, [720, 1280], 129),
    }
    for name, (blocks, billions, resolution, frames) in released.items():
        record = counts[name]
        assert record["denoiser_blocks"] == blocks and record["resolution"] == resolution, name
        assert record["frames"] == frames, name
        denoisers = [b for kind, b in record["billion_parameters"] if "Transformer" in kind or "UNet" in kind]
        assert abs(denoisers[0] - billions) / billions < 0.02, (name, denoisers)
    assert len([k for k, _ in counts["wan2.2-i2v"]["billion_parameters"] if k == "WanTransformer3DModel"]) == 2


def test_every_full_size_configuration_runs_one_step_on_the_meta_device():
    """Each adapter's path (conditioning, tokens, taps, loss, gradient) holds at the released size."""
    names = "cogvideox,dynamicrafter-512,svd-xt,wan-i2v,wan2.2-i2v,wan2.2-ti2v,ltx-i2v,hunyuan-i2v"
    printed = subprocess.run([sys.executable, "full_size.py", "--meta-step", names], cwd=BENCHMARKS, check=True,
                             capture_output=True, text=True, timeout=600).stdout
    steps = json.loads(printed)
    assert steps["wan2.2-ti2v"]["latents"] == [1, 48, 31, 44, 80]
    assert steps["hunyuan-i2v"]["t100"]["features"]["denoiser.3"] == [1, 33 * 45 * 80, 3072]
    for name, record in steps.items():
        height, width = record["t100"]["gradient"][-2:]
        assert record["t950"]["gradient"] == record["t100"]["gradient"] and height * width > 0, name
        assert record["default"]["gradient"] == record["t100"]["gradient"], name
        assert "sampler" in record["default"]["terms"], name
    assert "dm" in steps["svd-xt"]["default"]["terms"]  # the family's own setting


def test_peak_memory_per_mode_is_estimated_on_the_meta_device():
    """Weights plus the working memory counted as a GPU runs a step; lighter modes hold less."""
    printed = subprocess.run([sys.executable, "full_size.py", "--peak-memory", "cogvideox", "--frame-shares", "0.25",
                              "--method", "anti-i2v:sampler_steps=1;sampler_noise_pool=1"], cwd=BENCHMARKS,
                             check=True, capture_output=True, text=True, timeout=600).stdout
    (row,) = json.loads(printed)["cogvideox"]
    kept, full, offload, sequential = row["max"], row["full"], row["offload"], row["sequential"]
    assert row["frames"] == 9 and full["weights_gib"] > offload["weights_gib"] > 5 > sequential["weights_gib"]
    # max keeps every sampler pass's activations: more working memory for the same weights
    assert kept["weights_gib"] == full["weights_gib"] and kept["step_working_gib"] > full["step_working_gib"]
    for mode in (kept, full, offload, sequential):
        assert mode["peak_gib"] >= mode["weights_gib"] and mode["step_working_gib"] > 0.5
    # the VAE encoder's saved activations wait in CPU memory in sequential
    assert sequential["step_working_gib"] < offload["step_working_gib"] == full["step_working_gib"]
    assert sequential["peak_gib"] < offload["peak_gib"] < full["peak_gib"]


def test_step_times_split_the_steps_on_a_share_of_the_frames_from_those_on_every_frame():
    """Each run of steps reports its own seconds and where it began: the full-frame steps are timed apart."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_photo import step_times

    assert step_times([(0, 2.0), (0, 3.0), (0, 4.0), (0, 5.0)]) == {
        "first_step_seconds": 2.0, "step_seconds": 1.0, "full_frame_step_seconds": None}
    assert step_times([(0, 2.0), (0, 3.0), (0, 4.0), (3, 6.0), (3, 12.0)]) == {
        "first_step_seconds": 2.0, "step_seconds": 1.0, "full_frame_step_seconds": 6.0}
