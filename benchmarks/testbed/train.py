"""Train a testbed: a small image-to-video model that really learned camera motion.

    python benchmarks/testbed/train.py cogvideox --out benchmarks/testbed/cogvideox-i2v
    python benchmarks/testbed/train.py svd --out benchmarks/testbed/svd

Phases (each resumable from ``--work``): (1) the VAE on single frames and clips,
(2) a bank of clips encoded once with the frozen VAE, whose latent scale sets
``scaling_factor``, (3) the denoiser on that bank (AdamW, warm-up, cosine decay,
conditioning dropped 10% of the time so that guidance works, EMA of the weights),
(4) the pipeline with the EMA weights saved in fp16 with ``save_pretrained``, and
(5) the proof that it learned (`testbed.proof`), written to ``proof.json``.
Runs on the CPU (``--threads``).

``--frames 49 --init-from benchmarks/testbed/cogvideox-i2v`` makes a longer-clip copy of a
trained testbed: its VAE is kept (no phase 1, the same ``scaling_factor``) and its denoiser is
fine-tuned on clips of that length.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from testbed.data import TRAINING, training_batch  # noqa: E402
from testbed.families import FAMILIES, FRAMES, SIZE, LatentBank  # noqa: E402


def log(**record) -> None:
    print(json.dumps(record), flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def start_from(family, parts: dict, folder: Path) -> float:
    """Load a trained testbed's weights into ``parts`` (for a longer-clip copy of it); returns its scaling factor.

    Every tensor whose shape matches is taken; only the learned positional table, which
    diffusers sizes by the clip length, may differ (it was never trained: its sin-cos start).
    """
    scaling = None
    for name, module in parts.items():
        if not isinstance(module, torch.nn.Module) or not (folder / name).is_dir():
            continue
        config = json.loads((folder / name / "config.json").read_text())
        stored = config.get("_class_name") or (config.get("architectures") or [None])[0]  # diffusers / transformers
        if stored != type(module).__name__:
            raise SystemExit(f"{folder / name} does not match this configuration: a {stored}, not a {type(module).__name__}")
        trained = type(module).from_pretrained(folder, subfolder=name, torch_dtype=torch.float32)
        own = module.state_dict()
        kept = {k: v for k, v in trained.state_dict().items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(kept))
        if any("pos_embedding" not in k for k in skipped):
            raise SystemExit(f"{folder / name} does not match this configuration: {skipped[:5]}")
        module.load_state_dict(kept, strict=False)
        if name == "vae":
            scaling = family.scaling({"vae": trained})
            module.eval().requires_grad_(False)
    if scaling is None:
        raise SystemExit(f"{folder} has no vae/ folder")
    return scaling


def train_vae(family, parts, args, work: Path) -> None:
    """Phase 1: AdamW on L1 + L2 + KL, alternating batches of single frames and clips (every 4th)."""
    path = work / "vae.pt"
    vae = parts["vae"]
    if path.is_file():
        vae.load_state_dict(torch.load(path, weights_only=True))
        return
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    began, running = time.perf_counter(), []
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, min(50, args.vae_steps // 5 + 1))
        clips = step % 4 == 3
        videos, _ = training_batch(args.vae_clip_batch if clips else args.vae_frame_batch,
                                   family.frames if clips else 1, SIZE, rng, photos=TRAINING)
        loss = family.vae_loss(vae, videos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == args.vae_steps:
            log(phase="vae", step=step + 1, loss=round(float(np.mean(running)), 5),
                seconds=round(time.perf_counter() - began, 1))
            running = []
    vae.eval().requires_grad_(False)
    torch.save(vae.state_dict(), path)


def build_bank(family, parts, args, work: Path) -> LatentBank:
    """Phase 2: encode ``bank_clips`` clips once (motions balanced) with the frozen VAE."""
    path = work / "bank.pt"
    if path.is_file():
        return LatentBank(**torch.load(path, weights_only=True))
    rng = np.random.default_rng(args.seed + 1)
    fields: dict[str, list] = {k: [] for k in ("video_mean", "video_std", "image_mean", "image_std")}
    prompts: list[int] = []
    clip_embeddings = []
    chunk = 16
    for start in range(0, args.bank_clips, chunk):
        count = min(chunk, args.bank_clips - start)
        videos, names = training_batch(count, family.frames, SIZE, rng, motions=family.motions, photos=TRAINING)
        for key, value in zip(fields, family.encode(parts["vae"], videos)):
            fields[key].append(value.half())
        prompts += [family.motions.index(n) for n in names]
        if hasattr(family, "image_embeddings"):
            clip_embeddings.append(family.image_embeddings(parts, videos[:, 0]).half())
    record = {k: torch.cat(v) for k, v in fields.items()} | {"prompts": prompts}
    record["extra"] = {"clip": torch.cat(clip_embeddings)} if clip_embeddings else {}
    torch.save(record, path)
    return LatentBank(**record)


def latent_scale(bank: LatentBank) -> float:
    """1 / std of the video latents: the VAE's ``scaling_factor``."""
    return float(1.0 / bank.video_mean.float().std())


def train_denoiser(family, parts, bank: LatentBank, args, work: Path) -> torch.nn.Module:
    """Phase 3: the denoiser on the bank; returns the EMA copy."""
    path = work / "denoiser.pt"
    table = family.prompt_table(parts)  # first: a family may build its adapter, which freezes the denoiser
    denoiser = family.denoiser(parts)
    denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=0.01)
    ema = AveragedModel(denoiser, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
    start = 0
    if path.is_file():
        state = torch.load(path, weights_only=True)
        denoiser.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
    generator = torch.Generator().manual_seed(args.seed + 2 + start)
    scale = family.scaling(parts)
    began, running = time.perf_counter(), []
    for step in range(start, args.denoiser_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.denoiser_steps, args.lr, min(200, args.denoiser_steps // 5 + 1))
        index = torch.randint(0, len(bank), (args.batch,), generator=generator)
        loss = family.denoiser_loss(parts, bank, index, table, scale, args.drop, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        ema.update_parameters(denoiser)
        running.append(float(loss.detach()))
        done = step + 1
        if done % 100 == 0 or done == args.denoiser_steps:
            log(phase="denoiser", step=done, loss=round(float(np.mean(running)), 5),
                seconds=round(time.perf_counter() - began, 1))
            running = []
        if done % args.checkpoint_every == 0 or done == args.denoiser_steps:
            torch.save({"model": denoiser.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                        "step": done}, path)
    denoiser.load_state_dict(ema.module.state_dict())
    return denoiser.eval().requires_grad_(False)


def save(family, parts, out: Path, dtype: torch.dtype) -> None:
    """Phase 4: ``save_pretrained`` of the whole pipeline (diffusers layout, safetensors)."""
    pipe = family.pipeline(parts)
    pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


def options_line(args: argparse.Namespace) -> str:
    """The training options of a run, as command-line flags (to repeat it)."""
    keys = ("seed", "threads", "frames", "vae_steps", "vae_frame_batch", "vae_clip_batch", "bank_clips", "denoiser_steps",
            "batch", "lr")
    line = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys)
    return line + (f" --init-from {Path(args.init_from).as_posix()}" if args.init_from else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--work", default=None, help="resumable phase outputs (default: <out>.work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per clip (1 + 4k for CogVideoX)")
    parser.add_argument("--init-from", default=None,
                        help="a trained testbed folder: keep its VAE (no VAE phase) and fine-tune its denoiser")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-frame-batch", type=int, default=8)
    parser.add_argument("--vae-clip-batch", type=int, default=4)
    parser.add_argument("--bank-clips", type=int, default=3000)
    parser.add_argument("--denoiser-steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="share of steps without conditioning")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the saved weights")
    parser.add_argument("--proof-seeds", type=int, default=2)
    parser.add_argument("--no-proof", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    family = FAMILIES[args.family](frames=args.frames)
    parts = family.build(args.seed)
    scaling = start_from(family, parts, Path(args.init_from)) if args.init_from else None
    began = time.perf_counter()
    if not args.init_from:  # a copy keeps the trained VAE
        train_vae(family, parts, args, work)
    vae_seconds = time.perf_counter() - began
    bank = build_bank(family, parts, args, work)
    # A fine-tuned denoiser keeps the latent scale it learned with.
    family.set_scaling(parts, scaling if scaling is not None else latent_scale(bank))
    began = time.perf_counter()
    train_denoiser(family, parts, bank, args, work)
    denoiser_seconds = time.perf_counter() - began
    save(family, parts, out, torch.float16 if args.dtype == "fp16" else torch.float32)
    training = {
        "family": args.family, "seed": args.seed, "threads": args.threads, "device": "cpu", "frames": args.frames,
        "init_from": Path(args.init_from).name if args.init_from else None,
        "vae_steps": args.vae_steps, "bank_clips": args.bank_clips, "denoiser_steps": args.denoiser_steps,
        "batch": args.batch, "lr": args.lr, "ema": args.ema, "condition_dropout": args.drop,
        "scaling_factor": family.scaling(parts),
        "vae_seconds_this_run": round(vae_seconds, 1), "denoiser_seconds_this_run": round(denoiser_seconds, 1),
        "motions": list(family.motions),
        "command_options": options_line(args),
    }
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    log(phase="saved", out=str(out))
    if args.no_proof:
        return training
    from testbed.proof import prove

    from testbed.readme import readme

    proof = prove(args.family, out, seeds=args.proof_seeds)
    log(phase="proof", **{k: v for k, v in proof.items() if not isinstance(v, (list, dict))})
    (out / "README.md").write_text(readme(out))
    return training


if __name__ == "__main__":
    main()
