"""One photo end to end per backbone: seconds and peak memory of a whole protection.

``seconds`` covers what a user waits for once the model is loaded: prompt encoding,
optimisation (early stopping included), carrying the perturbation to full size, saving
and re-measuring the file. ``peak_gib`` is the accelerator's peak allocation on a GPU and
the process's peak resident memory on the CPU. Backbones (``--models``, comma-separated):

- a registry name (``tiny-cogvideox``, or ``cogvideox`` with its weights in the cache),
- ``NAME=FOLDER``: a registry family with local weights (``cogvideox=benchmarks/testbed/cogvideox-i2v``),
- ``full:NAME``: the released configuration with random weights (`full_size.py`; GPU-sized,
  random prompt embeddings stand in for the text encoder, so prompt encoding is not timed).

    python benchmarks/bench_photo.py                                  # tiny-cogvideox, fast preset
    python benchmarks/bench_photo.py --models full:cogvideox,full:opensora --preset balanced
    python benchmarks/bench_photo.py --models full:cogvideox --memory full,offload,sequential
    python benchmarks/bench_photo.py --models full:cogvideox --compile --method "anti-i2v:frame_share=0.5"

Writes ``benchmarks/results/bench_photo_<device>.json`` (``cpu``, or the GPU's model, e.g. ``h200``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import anti_i2v  # noqa: E402
from anti_i2v.config import ProtectConfig  # noqa: E402
from anti_i2v.acceleration import compile_denoiser, use_attention_kernel  # noqa: E402
from anti_i2v.memory import apply_memory_mode, deferred_placement  # noqa: E402
from anti_i2v.models.base import VideoModel  # noqa: E402
from anti_i2v.models.registry import load_model  # noqa: E402
from bench_protect import emit  # noqa: E402
from full_size import FULL_SIZE  # noqa: E402
from strength import parse_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def device_label(device: str) -> str:
    """``cpu``, or the GPU's model in lower case (``NVIDIA H200`` -> ``h200``)."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def build(
    spec: str, device: str, memory: str = "full", compile: bool = False, attention: str = "auto"
) -> VideoModel:
    """The backbone a ``--models`` entry names, loaded on ``device`` in memory mode ``memory``, its
    denoiser compiled when ``compile``, with the attention kernel ``attention``."""
    if spec.startswith("full:"):
        name = spec.removeprefix("full:")
        if name not in FULL_SIZE:
            raise SystemExit(f"unknown full-size model '{name}'; choose from {', '.join(FULL_SIZE)}")
        with deferred_placement() if memory == "sequential" else contextlib.nullcontext():  # as load_model does
            model = FULL_SIZE[name](True, device)
        model = use_attention_kernel(apply_memory_mode(model, memory), attention)
        return compile_denoiser(model) if compile else model
    name, _, folder = spec.partition("=")
    return load_model(name, folder or None, device, None, memory, compile, attention)


def step_times(elapsed: list[tuple[int, float]]) -> dict[str, float | None]:
    """The first step's seconds (it compiles, with ``--compile``) and the median of the others
    (the steady pace, from which a preset's time is projected), from each step's report: the
    step its run of steps began at and the seconds into that run. A second run of steps is the
    full-frame steps (`ProtectConfig.full_frame_steps`), whose median is ``full_frame_step_seconds``.
    A step that first picks one of the pool's sampler noises also runs that noise's clean run, so
    a single full-frame step's seconds include its clean run."""
    runs: dict[int, list[float]] = {}
    for began_at, seconds in elapsed:
        runs.setdefault(began_at, []).append(seconds)
    durations = [[b - a for a, b in zip([0.0, *run], run)] for run in runs.values()]
    first = durations[0] if durations else []
    later = first[1:]
    return {"first_step_seconds": round(first[0], 3) if first else None,
            "step_seconds": round(statistics.median(later), 3) if later else None,
            "full_frame_step_seconds": round(statistics.median(durations[1]), 3) if len(durations) > 1 else None}


def run_photo(
    model: VideoModel, spec: str, device: str, preset: str, steps: int | None, method: str = "anti-i2v"
) -> dict:
    """Protect the bundled sample photo once with the method spec ``method`` (``name:key=value;...``);
    time, peak memory and the budget on the saved file."""
    name, overrides = parse_method(method)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elapsed: list[tuple[int, float]] = []  # (first step of its run, seconds into that run) after each step
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        result = anti_i2v.protect(anti_i2v.sample_photo(), model, out=out, device=device, preset=preset, steps=steps,
                                  method=name, callback=lambda report: elapsed.append((report.resumed_from, report.elapsed)), **overrides)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    if device.startswith("cuda"):
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {
        "model": result.model, "spec": spec, "preset": preset, "steps": result.config.steps,
        "frame_share": result.config.frame_share, "full_frame_steps": result.config.full_frame_steps,
        "steps_done": len(result.history),
        "early_stop": result.config.early_stop,
        "method": method, "memory": model.memory_mode, "compiled": model.compiled,
        "attention": model.attention_kernel, "seconds": round(seconds, 2), "peak_gib": round(peak_gib, 2),
        **step_times(elapsed),
        "device": device_label(device),
        "prompt_encoding_timed": not spec.startswith("full:"), "photo_size": list(result.image.size),
        "budget": result.budget.to_dict(),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every backbone asked and write one JSON document per device."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-cogvideox", help="comma-separated backbones (see the module doc)")
    parser.add_argument("--preset", default="fast", help="strength preset")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--memory", default="full", help="comma-separated memory modes, each run in turn")
    parser.add_argument("--method", default="anti-i2v", help="method spec, e.g. anti-i2v:frame_share=0.5")
    parser.add_argument("--compile", action="store_true", help="compile the denoiser blocks (torch.compile)")
    parser.add_argument("--attention", default="auto", help="attention kernel: auto, flash, efficient, cudnn, math")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--out", default=None, help="JSON path (default: results/bench_photo_<device>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ProtectConfig.from_preset(args.preset)  # an unknown preset fails before any model loads
    runs = []
    for spec in args.models.split(","):
        for memory in args.memory.split(","):
            model = build(spec, args.device, memory, args.compile, args.attention)
            runs.append(run_photo(model, spec, args.device, args.preset, args.steps, args.method))
            print(json.dumps(runs[-1]), flush=True)
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    document = {"torch": torch.__version__, "device": device_label(args.device), "runs": runs}
    emit(document, args.out or str(RESULTS / f"bench_photo_{device_label(args.device)}.json"))
    return document


if __name__ == "__main__":
    main()
