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


def test_photo_benchmark_reports_the_saved_budget(tmp_path):
    out = tmp_path / "photo.json"
    subprocess.run([sys.executable, "bench_photo.py", "--steps", "1", "--out", str(out)], cwd=BENCHMARKS,
                   check=True, capture_output=True, timeout=300)
    run = json.loads(out.read_text())["runs"][0]
    assert run["budget"]["within_budget"] and run["photo_size"] == [512, 512]


def test_ensemble_benchmark_reports_steps_and_evictions(tmp_path):
    out = tmp_path / "ensemble.json"
    subprocess.run([sys.executable, "bench_ensemble.py", "--steps", "2", "--out", str(out)], cwd=BENCHMARKS,
                   check=True, capture_output=True, timeout=300)
    run = json.loads(out.read_text())["runs"][0]
    assert run["models"] == ["tiny-cogvideox", "tiny-dynamicrafter"] and run["seconds_per_later_step"] > 0
    assert run["evictions_total"] == 0 and run["linf_255"] <= 8  # CPU models never move
