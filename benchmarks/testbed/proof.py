"""The proof that a testbed learned: measured on held-out photos only, through the user path.

- VAE reconstruction PSNR of held-out frames, single frames and whole clips: a blurry
  VAE would make JPEG and resizing look harmless.
- Motion: from the first frame of each held-out photo's canonical clip (`data.canonical_clip`),
  the pipeline generates a video per prompt and seed; its frames 1..F-1 are compared
  with the true camera move (PSNR), against a static video (the first frame repeated).
- Direction: the generated video is closest (PSNR) to the true clip of its own motion
  among the four motions, for every photo, prompt and seed.

    python benchmarks/testbed/proof.py cogvideox benchmarks/testbed/cogvideox-i2v
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from anti_i2v.models.registry import load_model  # noqa: E402
from testbed.data import HELD_OUT, MOTIONS, canonical_clip, photo  # noqa: E402
from testbed.families import FAMILIES, SIZE  # noqa: E402

# Sampler settings of the proof and of the strength benchmark (the released defaults' kind).
GENERATION = {"cogvideox": {"steps": 30, "guidance_scale": 6.0}, "svd": {"steps": 25, "guidance_scale": 3.0},
              "wan": {"steps": 30, "guidance_scale": 5.0}}


def load_testbed(family: str, folder: str | Path):
    """A testbed's adapter on the CPU in fp32, loaded from its folder as a user's weights load.

    CogVideoX and SVD read their size from the denoiser's config (`load_model`); a Wan folder
    states none, so its size is passed as a user passes a fine-tuned Wan's to
    ``WanI2V.from_pretrained``: the clip size it was trained on and its 16 text tokens.
    """
    if family != "wan":
        return load_model(family, str(folder), device="cpu", dtype="fp32")
    from anti_i2v.models.wan import WanI2V

    training = json.loads((Path(folder) / "training.json").read_text())
    return WanI2V.from_pretrained(str(folder), device="cpu", dtype=torch.float32, resolution=SIZE,
                                  num_frames=training["frames"], max_sequence_length=FAMILIES["wan"].text_length)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [0, 1]."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(1 / mse)


@torch.no_grad()
def vae_psnr(family: str, model, clips: list[torch.Tensor]) -> dict[str, float]:
    """Mean reconstruction PSNR of the clips' first frames alone and of whole clips (F, 3, H, W)."""
    vae = model.vae
    single, whole = [], []
    for clip in clips:
        if family in ("cogvideox", "wan"):
            pixels = clip.permute(1, 0, 2, 3).unsqueeze(0) * 2 - 1  # (1, 3, F, H, W)
            first = vae.decode(vae.encode(pixels[:, :, :1]).latent_dist.mode()).sample
            full = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
            first, full = first[0, :, 0], full[0].permute(1, 0, 2, 3)
        else:
            pixels = clip * 2 - 1
            first = vae.decode(vae.encode(pixels[:1]).latent_dist.mode(), num_frames=1).sample[0]
            full = vae.decode(vae.encode(pixels).latent_dist.mode(), num_frames=clip.shape[0]).sample
        single.append(psnr((first + 1) / 2, clip[0]))
        whole.append(psnr(((full + 1) / 2).clamp(0, 1), clip))
    return {"vae_psnr_single_frame": sum(single) / len(single), "vae_psnr_clip": sum(whole) / len(whole)}


def prove(family: str, folder: str | Path, seeds: int = 2, photos: tuple[str, ...] = HELD_OUT) -> dict:
    """Measure the proof on held-out photos and write ``proof.json`` into ``folder``."""
    began = time.perf_counter()
    model = load_testbed(family, folder)
    motions = FAMILIES[family]().motions
    settings = GENERATION[family]
    frames = model.num_frames  # the clip length it was trained on
    truth = {(p, m): canonical_clip(photo(p), m, frames, SIZE) for p in photos for m in MOTIONS}
    record: dict = {"family": family, "held_out": list(photos), "motions": list(motions), "seeds": seeds,
                    "sampler": settings, **vae_psnr(family, model, [truth[p, m] for p in photos for m in MOTIONS])}
    rows = []
    for p in photos:
        for motion in motions:
            first = truth[p, motion][:1]
            static = first.expand(frames - 1, -1, -1, -1)
            for seed in range(seeds):
                video = model.generate(first, motion, steps=settings["steps"], seed=seed,
                                       guidance_scale=settings["guidance_scale"])
                scores = {m: psnr(video[1:], truth[p, m][1:]) for m in MOTIONS}
                rows.append({
                    "photo": p, "prompt": motion, "seed": seed,
                    "psnr_to_true_motion": scores[motion],
                    "psnr_static_to_true_motion": psnr(static, truth[p, motion][1:]),
                    "closest_motion": max(scores, key=scores.get),
                })
    record["runs"] = rows
    record["motion_psnr"] = sum(r["psnr_to_true_motion"] for r in rows) / len(rows)
    record["static_psnr"] = sum(r["psnr_static_to_true_motion"] for r in rows) / len(rows)
    record["right_direction"] = sum(r["closest_motion"] == r["prompt"] for r in rows)
    record["videos"] = len(rows)
    record["seconds"] = round(time.perf_counter() - began, 1)
    (Path(folder) / "proof.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("folder")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = prove(args.family, args.folder, args.seeds)
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
