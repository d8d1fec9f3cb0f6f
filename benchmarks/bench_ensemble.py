"""One perturbation against several models: seconds per step, peak memory and weight transfers, as JSON.

Always: ``tiny-cogvideox`` + ``tiny-dynamicrafter`` on the CPU (one thread). With a CUDA
GPU: full-size models as one ensemble (random weights, bf16, gradient checkpointing;
``--models``, default the paper's three: CogVideoX-5B-I2V, DynamiCrafter 512, Open-Sora
1.2). First with the whole GPU (they fit together, so no weights should move after the
first step), then with this process capped at ``--cap-gib`` (they do not, so they take
turns on the GPU).

    python benchmarks/bench_ensemble.py [--steps 4] [--models a,b] [--cap-gib 24] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import anti_i2v  # noqa: E402
from anti_i2v.models.base import VideoModel  # noqa: E402
from anti_i2v.models.registry import load_model  # noqa: E402
from anti_i2v.offload import park_for_next_load, peak_memory_allocated, reset_peak_memory  # noqa: E402
from bench_protect import emit  # noqa: E402
from full_size import FULL_SIZE, PAPER_MODELS  # noqa: E402


class _CountParks(logging.Handler):
    """Counts the Residency's "parked ... on the CPU" records: one per eviction."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("parked ")


def time_ensemble(models: list[VideoModel], steps: int, label: str) -> dict:
    """Protect a random 512x512 photo against ``models`` for ``steps`` steps; time every step."""
    photo = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
    parks = _CountParks()
    offload_log = logging.getLogger("anti_i2v.offload")
    offload_log.addHandler(parks)
    offload_log.setLevel(logging.INFO)
    stamps: list[float] = []
    parks_after_first: list[int] = []
    cuda = models[0].device.type == "cuda"
    if cuda:
        reset_peak_memory()

    def on_step(report) -> None:
        stamps.append(time.perf_counter())
        if report.step == 1:
            parks_after_first.append(parks.count)

    began = time.perf_counter()
    try:
        result = anti_i2v.protect(photo, models, steps=steps, callback=on_step)
    finally:
        offload_log.removeHandler(parks)
    record = {
        "case": label,
        "models": [m.name for m in models],
        "device": str(models[0].device),
        "steps": steps,
        "seconds_total": round(time.perf_counter() - began, 2),
        "seconds_first_step": round(stamps[0] - began, 2),  # includes loading onto the device and preparing
        "seconds_per_later_step": round((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), 3),
        "evictions_total": parks.count,
        "evictions_after_first_step": parks.count - (parks_after_first[0] if parks_after_first else 0),
        "linf_255": round(result.budget.linf * 255, 2),
    }
    if cuda:
        record["peak_gpu_memory_gib"] = round(peak_memory_allocated() / 2**30, 2)
        record["gpu"] = torch.cuda.get_device_name()
    return record


def full_size_members(names: list[str]) -> list[VideoModel]:
    """Full-size random-weight models, each parked on the CPU once built."""
    models = []
    for name in names:
        models.append(FULL_SIZE[name](True))
        park_for_next_load(models[-1])
    return models


def main() -> None:
    """Print one JSON document with every measurement this machine allows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(PAPER_MODELS),
                        help=f"full-size ensemble members on a GPU, from: {', '.join(FULL_SIZE)}")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory cap of the second GPU case")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"torch": torch.__version__, "python": platform.python_version(), "runs": []}
    tiny = [load_model("tiny-cogvideox", device="cpu"), load_model("tiny-dynamicrafter", device="cpu")]
    results["runs"].append(time_ensemble(tiny, args.steps, "tiny models, CPU"))
    if torch.cuda.is_available():
        models = full_size_members(args.models.split(","))
        for label, cap in (("whole GPU", None), (f"GPU capped at {args.cap_gib:g} GiB", args.cap_gib)):
            for model in models:
                park_for_next_load(model)
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap * 2**30 / total))
            try:
                results["runs"].append(time_ensemble(models, args.steps, label))
            except torch.OutOfMemoryError as err:
                results["runs"].append({"case": label, "error": f"out of memory: {str(err).splitlines()[0]}"})
    emit(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
