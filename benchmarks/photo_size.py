"""Does it matter at which size a photo is protected? Crops of one aspect ratio on the trained Wan testbed.

Wan's reference code runs each photo at its own aspect ratio within the release's pixel
area (the adapter's ``sizing="area"``); a pipeline called without a size stretches every
photo to one (``sizing="fixed"``). For a landscape 4:3 photo both give the testbed's
96 x 128; a 3:4 portrait runs at 128 x 96 under area sizing and is stretched to 96 x 128
under fixed sizing. Each held-out photo's central crop of ``--aspect`` (native size) is
protected under each sizing and attacked under each: the video MAD of the protected
photo's video to the clean photo's, as is and after JPEG 75 (the clean photo's own MAD
after JPEG 75 subtracted), with same-budget uniform noise as the floor.

The testbed learned only 96 x 128: at 128 x 96 it runs outside what it was trained on, so
the area rows say how far the perturbation moves the model's output there, not how a
motion it learned breaks.

    python benchmarks/photo_size.py                  # 3:4 portraits, about 15 minutes on two CPU threads
    python benchmarks/photo_size.py --aspect 16/9    # wide landscapes (80 x 144 under area sizing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

import torch  # noqa: E402

import anti_i2v  # noqa: E402
from anti_i2v.config import DEFAULT_PRESET  # noqa: E402
from anti_i2v.atomic import write_atomic, write_json_atomic  # noqa: E402
from anti_i2v.evaluation.generate import GenerationSettings, generate_video  # noqa: E402
from anti_i2v.evaluation.purify import build_purifier  # noqa: E402
from anti_i2v.photo import load_photo  # noqa: E402
from strength import TESTBEDS, mad  # noqa: E402
from testbed.data import HELD_OUT, MOTIONS, held_out_photo  # noqa: E402
from testbed.proof import GENERATION, load_testbed  # noqa: E402

SIZINGS = ("area", "fixed")
PROTECTIONS = (*SIZINGS, "noise")
UPLOAD = "jpeg75"


def save_png(image: torch.Tensor, path: Path) -> Path:
    """Write (3, H, W) in [0, 1] as an 8-bit PNG once."""
    if not path.is_file():
        from PIL import Image

        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=",".join(HELD_OUT))
    parser.add_argument("--prompts", default=",".join(MOTIONS))
    parser.add_argument("--attackers", default=",".join(SIZINGS), help="how the attacker sizes the photo")
    parser.add_argument("--aspect", default="3/4", help="width / height of the crop, e.g. 3/4 or 9/16")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(BENCHMARKS / ".photo-size-cache"))
    parser.add_argument("--out", default=None,
                        help="JSON ('' for none; default benchmarks/results/photo_size_<aspect>.json)")
    parser.add_argument("--md", default=None,
                        help="the table as Markdown ('' for none; default docs/results/photo_size_<aspect>.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps = float(Fraction(args.eps))
    attackers = args.attackers.split(",")
    if unknown := set(attackers) - set(SIZINGS):
        raise SystemExit(f"unknown attacker sizing {', '.join(sorted(unknown))}; choose from {', '.join(SIZINGS)}")
    testbed = TESTBEDS["wan"]
    model = load_testbed(testbed.family, testbed.folder)
    generation = GENERATION[testbed.family]
    jpeg = build_purifier(UPLOAD)
    label = args.aspect.replace("/", "-")
    work = Path(args.work) / label  # photos and videos of one crop
    out = BENCHMARKS / "results" / f"photo_size_{label}.json" if args.out is None else args.out
    md = BENCHMARKS.parent / "docs" / "results" / f"photo_size_{label}.md" if args.md is None else args.md
    rows = []
    for photo in args.photos.split(","):
        source = save_png(held_out_photo(photo, float(Fraction(args.aspect))), work / "photos" / f"{photo}.png")
        clean = load_photo(source).rgb
        for prompt in args.prompts.split(","):
            protected, seconds = {}, {}
            for sizing in SIZINGS:
                model.sizing = sizing
                began = time.perf_counter()
                result = anti_i2v.protect(source, model, out=work / "protected" / sizing / prompt.replace(" ", "_"),
                                          preset=args.preset, eps=eps, prompt=prompt, seed=0, overwrite=True)
                seconds[sizing] = time.perf_counter() - began
                protected[sizing] = load_photo(result.path).rgb
            linf = float((protected["area"] - clean).abs().max())
            generator = torch.Generator().manual_seed(0)
            protected["noise"] = (clean + (torch.rand(clean.shape, generator=generator) * 2 - 1) * linf).clamp(0, 1)
            protected["noise"] = (protected["noise"] * 255).round() / 255
            settings = GenerationSettings(prompt=prompt, seed=0, **generation)
            for attack in attackers:
                model.sizing = attack
                video = lambda image: generate_video(model, image, settings, cache_dir=work / "videos")  # noqa: E731
                clean_video = video(clean)
                clean_jpeg = mad(video(jpeg(clean, 0)), clean_video)
                for name in PROTECTIONS:
                    effect = mad(video(protected[name]), clean_video)
                    after = mad(video(jpeg(protected[name], 0)), clean_video) - clean_jpeg
                    rows.append({"photo": photo, "prompt": prompt, "protected": name, "attacked": attack,
                                 "size": list(model.resolution_for(*clean.shape[-2:])), "mad": effect,
                                 f"mad_after_{UPLOAD}": after, "seconds": seconds.get(name)})
                    print(json.dumps(rows[-1]), flush=True)
    model.sizing = "area"
    summary = {}
    for attack in attackers:
        for name in PROTECTIONS:
            picked = [r for r in rows if r["attacked"] == attack and r["protected"] == name]
            summary[f"protected {name} / attacked {attack}"] = {
                "mad": sum(r["mad"] for r in picked) / len(picked),
                f"mad_after_{UPLOAD}": sum(r[f"mad_after_{UPLOAD}"] for r in picked) / len(picked),
                "runs": len(picked),
            }
    document = {"testbed": testbed.name, "attackers": attackers, "aspect": args.aspect, "preset": args.preset,
                "eps_255": eps * 255, "generation": generation, "summary": summary, "runs": rows,
                "command": " ".join(["python benchmarks/photo_size.py", *(argv if argv is not None else sys.argv[1:])])}
    if out:
        write_json_atomic(Path(out), document)
    table = markdown(document)
    if md:
        write_atomic(Path(md), lambda tmp: tmp.write_text(table))
    print(table)
    return document


def markdown(document: dict) -> str:
    """The summary as a Markdown table, with the ratios to noise and to the stretched protection."""
    summary = document["summary"]
    area = " x ".join(str(v) for v in next(r["size"] for r in document["runs"] if r["attacked"] == "area")) \
        if "area" in document["attackers"] else "its own size"
    lines = [
        f"# Photo size: {document['aspect']} crops on the {document['testbed']} testbed",
        "",
        f"`{document['command']}`: preset `{document['preset']}`, eps {document['eps_255']:.0f}/255, "
        f"{next(iter(summary.values()))['runs']} photo x prompt pairs per row. Video MAD of the "
        f"protected photo's video to the clean photo's; after {UPLOAD}, less the clean photo's own change.",
        "",
        f"`area`: as Wan's reference code sizes the photo (its aspect ratio within the testbed's 96 x 128 "
        f"pixels: {area}); `fixed`: stretched to 96 x 128, as a pipeline called without a size does; "
        f"`noise`: uniform noise of the protection's L-inf. The testbed learned only 96 x 128, so at "
        f"{area} it runs outside what it was trained on: the `area` rows say how far the perturbation "
        "moves its output there, not how a motion it learned breaks.",
        "",
        f"| attacker sizes by | protected at | video MAD | x noise | x stretched | MAD after {UPLOAD} |",
        "|---|---|---|---|---|---|",
    ]
    for attack in document["attackers"]:
        noise = summary[f"protected noise / attacked {attack}"]["mad"]
        stretched = summary[f"protected fixed / attacked {attack}"]["mad"]
        for name in PROTECTIONS:
            row = summary[f"protected {name} / attacked {attack}"]
            lines.append(f"| {attack} | {name} | {row['mad']:.4f} | {row['mad'] / noise:.1f} | "
                         f"{row['mad'] / stretched:.2f} | {row[f'mad_after_{UPLOAD}']:.4f} |")
    lines += ["", "Pair by pair, the protection at the model's own size against the stretched one "
              "(ratio of their video MADs on the same photo and prompt):", "",
              "| attacker sizes by | prompts | pairs higher | median ratio | lowest | highest |", "|---|---|---|---|---|---|"]
    for attack in document["attackers"]:
        for prompts, ratios in pair_ratios(document["runs"], attack).items():
            ratios = sorted(ratios)
            lines.append(f"| {attack} | {prompts} | {sum(r > 1 for r in ratios)} of {len(ratios)} | "
                         f"{statistics.median(ratios):.2f} | {ratios[0]:.2f} | {ratios[-1]:.2f} |")
    return "\n".join(lines) + "\n"


def pair_ratios(runs: list[dict], attack: str) -> dict[str, list[float]]:
    """Per photo and prompt, MAD(area) / MAD(fixed) under ``attack``: for all prompts, then per prompt
    kind (the first word: pan, zoom)."""
    mads = {(r["photo"], r["prompt"], r["protected"]): r["mad"] for r in runs if r["attacked"] == attack}
    pairs = [(prompt, mads[(photo, prompt, "area")] / mads[(photo, prompt, "fixed")])
             for photo, prompt, name in mads if name == "area"]
    groups = {"all": [ratio for _, ratio in pairs]}
    for prompt, ratio in pairs:
        groups.setdefault(prompt.split()[0] if prompt else "(none)", []).append(ratio)
    return groups


if __name__ == "__main__":
    main()
