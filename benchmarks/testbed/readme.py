"""Write a testbed folder's README.md from its ``training.json`` and ``proof.json``.

    python benchmarks/testbed/readme.py benchmarks/testbed/cogvideox-i2v
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.data import HELD_OUT, TRAINING  # noqa: E402
from testbed.families import SIZE  # noqa: E402

LAYOUT = {
    "cogvideox": ("CogVideoX-I2V (the CogVideoX-5b-I2V layout: `CogVideoXImageToVideoPipeline`, "
                  "`CogVideoXTransformer3DModel`, `AutoencoderKLCogVideoX`, T5 text encoder, "
                  "`CogVideoXDDIMScheduler` with v-prediction and zero terminal SNR)", "cogvideox"),
    "svd": ("Stable Video Diffusion (`StableVideoDiffusionPipeline`, `UNetSpatioTemporalConditionModel`, "
            "`AutoencoderKLTemporalDecoder`, CLIP image encoder, `EulerDiscreteScheduler` with EDM "
            "v-prediction)", "svd"),
    "wan": ("Wan 2.1 I2V (the Wan2.1-I2V-14B-480P layout: `WanImageToVideoPipeline`, `WanTransformer3DModel` "
            "with image cross-attention, `AutoencoderKLWan` whose condition is the posterior mode, UMT5 text "
            "encoder, CLIP image encoder, `UniPCMultistepScheduler` on flow-matching sigmas shifted by 3)", "wan-i2v"),
}


def loading(family: str, registry: str, folder: Path, frames: int) -> str:
    """How a user loads the testbed: the CLI, or for Wan (whose weights state no video size) Python."""
    if family != "wan":
        return f"""```bash
anti-i2v protect PHOTO --model {registry} --model-path benchmarks/testbed/{folder.name} --device cpu
```"""
    return f"""Wan weights state no video size, so a Wan model made for another size than the release's
is loaded in Python with its size:

```python
import torch, anti_i2v
from anti_i2v.models.wan import WanI2V

model = WanI2V.from_pretrained("benchmarks/testbed/{folder.name}", device="cpu", dtype=torch.float32,
                               resolution={SIZE}, num_frames={frames}, max_sequence_length=16)
anti_i2v.protect("PHOTO", model, out="protected")
```"""


def readme(folder: Path) -> str:
    """The README text of a trained testbed folder."""
    training = json.loads((folder / "training.json").read_text())
    proof = json.loads((folder / "proof.json").read_text())
    family = training["family"]
    layout, registry = LAYOUT[family]
    minutes = (training.get("vae_seconds", training["vae_seconds_this_run"])
               + training.get("denoiser_seconds", training["denoiser_seconds_this_run"])) / 60
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    motions = training["motions"]
    frames = training.get("frames", 9)
    by_prompt = {}
    for run in proof["runs"]:
        by_prompt.setdefault(run["prompt"], []).append(run)
    rows = "\n".join(
        f"| {prompt} | {sum(r['psnr_to_true_motion'] for r in runs) / len(runs):.2f} | "
        f"{sum(r['psnr_static_to_true_motion'] for r in runs) / len(runs):.2f} | "
        f"{sum(r['closest_motion'] == prompt for r in runs)}/{len(runs)} |"
        for prompt, runs in by_prompt.items()
    )
    return f"""# Testbed: a small {family} image-to-video model that learned camera motion

A diffusers pipeline folder ({layout}), trained here {'(fine-tuned from `' + training['init_from'] + '`)' if training.get('init_from') else 'from scratch'} on the CPU by
`benchmarks/testbed/train.py`. It exists to measure protection strength offline
(`benchmarks/strength.py`): random-weight models cannot show whether a protection works.
Load it as any user loads weights:

{loading(family, registry, folder, frames)}

## Data
Camera moves over photos that ship with scikit-image (`benchmarks/testbed/data.py`): a 3:4
window moved over a photo (short side 224 px) and sampled to {frames} frames of 96x128; the first
frame is the condition image. Motions ({", ".join(f'"{m}"' for m in motions)}) are linear over
the clip; {"SVD takes no text, so this model learned one motion" if family == "svd" else "the prompt is the motion's name"}.
Augmentation: channel permutation, gamma.

- Training photos: {", ".join(TRAINING)}.
- Held out, never seen in training: **{", ".join(HELD_OUT)}** (the only real portrait is the astronaut).

## Training
{f"The VAE and the starting denoiser are those of `{training['init_from']}`, fine-tuned here on {frames}-frame clips: " if training.get("init_from") else f"{training['vae_steps']} VAE steps, "}{training["bank_clips"]} clips encoded once, {training["denoiser_steps"]}
denoiser steps of {training["batch"]} clips (AdamW lr {training["lr"]}, {"the prompt" if family == "wan" else "conditioning"} dropped
{training["condition_dropout"]:.0%} of the time, EMA {training["ema"]}); {"`latents_std`" if family == "wan" else "`scaling_factor`"}
{(1 / training["scaling_factor"]) if family == "wan" else training["scaling_factor"]:.4f} ({"the std of the latents, in every channel" if family == "wan" else "1 / std of the latents"}). About {minutes:.0f} minutes on
{training["threads"]} CPU thread(s) (seed {training["seed"]}); weights saved in fp16, {size_mb:.1f} MB.

    python benchmarks/testbed/train.py {family} --out benchmarks/testbed/{folder.name} {training.get("command_options", "")}

## Proof that it learned (held-out photos only)
`python benchmarks/testbed/proof.py {family} benchmarks/testbed/{folder.name}`, through the user
loading path, {proof["sampler"]["steps"]} sampler steps, guidance {proof["sampler"]["guidance_scale"]},
{proof["seeds"]} seeds per photo and prompt, from the first frame of a centred window:

- VAE reconstruction PSNR: {proof["vae_psnr_single_frame"]:.2f} dB on single frames,
  {proof["vae_psnr_clip"]:.2f} dB on {frames}-frame clips.
- Generated frames 1-{frames - 1} against the true camera move: **{proof["motion_psnr"]:.2f} dB**, against
  {proof["static_psnr"]:.2f} dB for a static video (the first frame repeated).
- Right direction (the generated video is closest to its own motion's true clip among all
  four motions): **{proof["right_direction"]}/{proof["videos"]}** videos.

| prompt | PSNR to true motion (dB) | static video (dB) | right direction |
|---|---|---|---|
{rows}
"""


def main() -> None:
    folder = Path(sys.argv[1])
    (folder / "README.md").write_text(readme(folder))
    print(folder / "README.md")


if __name__ == "__main__":
    main()
