"""End to end: one photo through `anti_i2v.protect` (load, optimise, carry, save, re-measure).

Prints JSON: wall seconds, seconds per step, peak memory and the budget measured on
the saved file, for ``tiny-cogvideox`` on every available device and, with a CUDA
GPU, for full-size configurations with random weights (``--models``, default the paper's three).

    python benchmarks/bench_photo.py [--steps 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import anti_i2v  # noqa: E402
from anti_i2v.models.base import VideoModel  # noqa: E402
from bench_protect import emit  # noqa: E402
from full_size import FULL_SIZE, PAPER_MODELS  # noqa: E402


def run_photo(model: str | VideoModel, device: str, steps: int) -> dict:
    """Protect the bundled sample photo once and report time, memory and budget."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        result = anti_i2v.protect(anti_i2v.sample_photo(), model, out=out, device=device, steps=steps)
        seconds = time.perf_counter() - began
    record = {
        "model": result.model,
        "device": device,
        "steps": steps,
        "wall_seconds": round(seconds, 2),
        "photo_size": list(result.image.size),
        "budget": result.budget.to_dict(),
        "loss_first": result.history[0],
        "loss_last": result.history[-1],
    }
    if device == "cuda":
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def main() -> None:
    """Print one JSON document with every run this machine allows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(PAPER_MODELS),
                        help=f"full-size models to run on a GPU, from: {', '.join(FULL_SIZE)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run_photo("tiny-cogvideox", "cpu", args.steps)]
    if torch.cuda.is_available():
        runs.append(run_photo("tiny-cogvideox", "cuda", args.steps))
        for name in args.models.split(","):
            runs.append(run_photo(FULL_SIZE[name](True), "cuda", args.steps))
            torch.cuda.empty_cache()
    emit({"torch": torch.__version__, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
