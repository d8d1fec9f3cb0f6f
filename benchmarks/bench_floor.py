"""The saved-file stage of one protection on a large photo: seconds of each part, one CPU thread.

After the optimisation, `protect` meets the visibility floor on the saved pixels
(`limit_saved_psnr`: a bisection on rounded pixels, then the fill), writes the PNG and
re-measures it. On a 12-megapixel photo that stage is a visible part of a protection's
minute, so it is timed here: a photo of ``--megapixels`` (a 4:3 crop-free upscale of the
bundled portrait) with a +-8/255 sign perturbation, which the default floor (31.35 dB) has
to scale down.

    python benchmarks/bench_floor.py --megapixels 12 --out benchmarks/results/bench_floor_cpu.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anti_i2v.api import sample_photo
from anti_i2v.config import ProtectConfig
from anti_i2v.photo import limit_saved_psnr, load_photo, measure_budget, save_protected, saved_psnr
from bench_protect import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width = int(round(math.sqrt(args.megapixels * 1e6 * 4 / 3)))
    height = width * 3 // 4
    image = Image.open(sample_photo()).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    photo = load_photo(np.asarray(image))
    eps, floor = 8 / 255, ProtectConfig.from_preset().min_psnr
    sign = torch.randint(0, 2, photo.rgb.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    protected = (photo.rgb + eps * sign).clamp(0, 1)
    seconds = {}
    began = time.perf_counter()
    before = saved_psnr(photo, protected, eps)
    seconds["saved_psnr"] = time.perf_counter() - began
    began = time.perf_counter()
    limited = limit_saved_psnr(photo, protected, eps, floor)
    seconds["floor"] = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo_protected.png"
        began = time.perf_counter()
        save_protected(photo, limited, path, eps)
        seconds["save_png"] = time.perf_counter() - began
        began = time.perf_counter()
        budget = measure_budget(photo, path, eps)
        seconds["measure_saved_file"] = time.perf_counter() - began
    emit({
        "photo": f"{width}x{height}", "megapixels": round(width * height / 1e6, 2), "threads": args.threads,
        "min_psnr": floor, "psnr_before_floor": round(before, 3), "psnr_saved": round(budget.psnr, 3),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "seconds_saved_file_stage": round(sum(v for k, v in seconds.items() if k != "saved_psnr"), 2),
    }, args.out)


if __name__ == "__main__":
    main()
