"""Seconds per Anti-I2V step and peak memory, printed as JSON.

Always: ``tiny-cogvideox`` on the CPU (one thread). With a CUDA GPU: full-size
configurations with random weights (`full_size.py`; ``--models``, default the paper's
three), in bf16, with and without gradient checkpointing. Random weights have the
real speed and memory; nothing is downloaded.

    python benchmarks/bench_protect.py [--steps 10] [--models cogvideox,svd-xt] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anti_i2v.config import ProtectConfig  # noqa: E402
from anti_i2v.engine import run_pgd  # noqa: E402
from anti_i2v.models.base import VideoModel  # noqa: E402
from anti_i2v.models.cogvideox import CogVideoXI2V  # noqa: E402
from anti_i2v.objectives import AntiI2VObjective  # noqa: E402
from anti_i2v.spaces import build_space  # noqa: E402
from full_size import FULL_SIZE, PAPER_MODELS  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(model: VideoModel, steps: int, warmup: int = 2) -> dict:
    """Run warm-up steps, then time ``steps`` steps of the full Anti-I2V objective."""
    x = torch.rand(1, 3, *model.resolution, generator=torch.Generator().manual_seed(0)).to(model.device)
    config = ProtectConfig(steps=warmup)
    objective = AntiI2VObjective(model, config)
    objective.prepare(model, x)
    space = build_space("dual")
    run_pgd(objective, space, x, config, t_range=(0, 999))
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        prepare_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    config = ProtectConfig(steps=steps)
    began = time.perf_counter()
    run_pgd(objective, space, x, config, t_range=(0, 999))
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / steps
    record = {
        "model": model.name,
        "resolution": list(model.resolution),
        "frames": model.num_frames,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "steps_timed": steps,
        "seconds_per_step": round(seconds, 4),
    }
    if cuda:
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_gpu_memory_prepare_gib"] = round(prepare_peak / 2**30, 2)
        record["gpu"] = torch.cuda.get_device_name()
    else:
        record["peak_rss_mib"] = round(_peak_rss_mb(), 1)
    return record


def emit(results: dict, out: str | None) -> None:
    """Print the results as JSON, and write them to ``out`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")


def main() -> None:
    """Print one JSON document with every measurement this machine allows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", default=",".join(PAPER_MODELS),
                        help=f"full-size models to time on a GPU, from: {', '.join(FULL_SIZE)}")
    parser.add_argument("--checkpointing", default="on,off", help="gradient checkpointing settings to time")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": [],
    }
    results["runs"].append(time_steps(CogVideoXI2V.tiny(), args.steps))
    if torch.cuda.is_available():
        for name in args.models.split(","):
            for checkpointing in (c == "on" for c in args.checkpointing.split(",")):
                try:
                    record = time_steps(FULL_SIZE[name](checkpointing), max(1, args.steps // 2))
                except torch.OutOfMemoryError as err:
                    record = {"model": name, "error": f"out of memory: {str(err).splitlines()[0]}"}
                record["gradient_checkpointing"] = checkpointing
                results["runs"].append(record)
                gc.collect()
                torch.cuda.empty_cache()
    emit(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
