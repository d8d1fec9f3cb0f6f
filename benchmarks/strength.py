"""Protection strength on the trained testbeds: every method x testbed x held-out photo x prompt.

For each held-out photo (`testbed.data.held_out_photo`, a 3:4 photo at native size) and
prompt, the photo is protected through the user path (`anti_i2v.protect`, saved as PNG),
and videos are generated with the same seed, prompt and sampler from the clean photo,
the protected photo, and each of them after every purification of the battery. Reported:

- effect: mean absolute difference (MAD) and PSNR of the protected photo's video to the
  clean photo's video, and MAD as a ratio to AdvDM's and to uniform random noise's;
- after each purification p: ``kept = (MAD(V(p(x')), V(x)) - MAD(V(p(x)), V(x))) / MAD(V(x'), V(x))``,
  i.e. what is left of the effect once what p does to the clean photo's video is subtracted;
  the worst case over the battery is a column;
- visibility on the saved photo: PSNR, SSIM, CIEDE2000 and FLIP;
- seconds per protection.

    python benchmarks/strength.py                      # everything (hours on a CPU)
    python benchmarks/strength.py --testbeds cogvideox --methods anti-i2v,advdm,random --steps 60

Results are cached per run (``--work``), so an interrupted run resumes and several
processes (``--shard i/n``) can share the work. JSON goes to ``--out``, the tables to ``--md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

import torch  # noqa: E402

import anti_i2v  # noqa: E402
from anti_i2v.atomic import write_atomic, write_json_atomic  # noqa: E402
from anti_i2v.config import DEFAULT_PRESET, PRESETS, ProtectConfig  # noqa: E402
from anti_i2v.errors import ConfigError  # noqa: E402
from anti_i2v.evaluation.generate import GenerationSettings, generate_video  # noqa: E402
from anti_i2v.evaluation.metrics.fidelity import fidelity  # noqa: E402
from anti_i2v.evaluation.purify import build_purifier  # noqa: E402
from anti_i2v.methods import METHODS  # noqa: E402
from anti_i2v.photo import load_photo  # noqa: E402
from testbed.data import HELD_OUT, MOTIONS, held_out_photo  # noqa: E402
from testbed.proof import GENERATION, load_testbed  # noqa: E402

TESTBED_DIR = BENCHMARKS / "testbed"


@dataclass(frozen=True)
class Testbed:
    """A committed testbed: registry family, folder and the prompts it was trained on."""

    name: str
    family: str
    folder: Path
    prompts: tuple[str, ...]


TESTBEDS = {
    "cogvideox": Testbed("cogvideox", "cogvideox", TESTBED_DIR / "cogvideox-i2v", MOTIONS),
    "svd": Testbed("svd", "svd", TESTBED_DIR / "svd", ("zoom in",)),
    # the CogVideoX testbed fine-tuned on 49-frame clips: CogVideoX-5B-I2V's 13 latent frames
    "cogvideox-49f": Testbed("cogvideox-49f", "cogvideox", TESTBED_DIR / "cogvideox-i2v-49f", MOTIONS),
    # the Wan 2.1 I2V layout: a deterministic encoder (posterior mode), flow matching
    "wan": Testbed("wan", "wan", TESTBED_DIR / "wan-i2v", MOTIONS),
}
# The attacker's upload channel: JPEG and WebP, resizing, filters, noise, and
# resize + JPEG 75 as social networks do (`social`: 1080-px long edge; `social192`: the
# same ratio to a 128-px-wide testbed as 1080 px is to a 720-px-wide CogVideoX input).
BATTERY = ("jpeg95", "jpeg75", "jpeg50", "webp", "resize0.5", "long1080", "blur", "noise0.05", "cleaner",
           "social", "social192")
HEADLINE = ("jpeg75", "resize0.5", "social", "social192")  # the ones the default must survive
BASELINE, NOISE = "advdm", "random"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value;key=value"`` -> method name and config overrides.

    Values are numbers (fractions such as 1/255 allowed), true/false, or strings; ``|``
    separates list items (``eot=jpeg|resize``).
    """
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = _value(value.strip().replace("|", ","))
    return name, overrides


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        number = Fraction(text)
        return int(number) if number.denominator == 1 and "." not in text else float(number)
    except (ValueError, ZeroDivisionError):
        return text


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two videos in [0, 1]."""
    return float((a.float() - b.float()).abs().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(1 / mse)


class Runner:
    """Protects, generates and scores one testbed; every result is cached under ``work``."""

    def __init__(self, testbed: Testbed, work: Path, seed: int = 0) -> None:
        self.testbed = testbed
        self.work = work / testbed.name
        self.model = load_testbed(testbed.family, testbed.folder)
        self.settings = GENERATION[testbed.family]
        self.seed = seed
        self.purifiers = {}
        self.photos: dict[str, Path] = {}

    def photo_path(self, name: str) -> Path:
        """The held-out photo saved once as PNG (the file a user would protect)."""
        path = self.work / "photos" / f"{name}.png"
        if not path.is_file():
            from PIL import Image

            array = (held_out_photo(name).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        return path

    def video(self, image: torch.Tensor, prompt: str) -> torch.Tensor:
        settings = GenerationSettings(prompt=prompt, seed=self.seed, steps=self.settings["steps"],
                                      guidance_scale=self.settings["guidance_scale"])
        return generate_video(self.model, image, settings, cache_dir=self.work / "videos")

    def purify(self, name: str, image: torch.Tensor) -> torch.Tensor:
        if name not in self.purifiers:
            self.purifiers[name] = build_purifier(name)
        return self.purifiers[name](image, self.seed)

    def run(self, spec: str, photo: str, prompt: str, steps: int, eps: float, battery: tuple[str, ...]) -> dict:
        """One protection and its scores (cached as JSON by method spec, steps, eps, photo and prompt)."""
        key = f"{spec}|{steps}|{eps:.6f}|{photo}|{prompt}|{self.seed}"
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
        record_path = self.work / "runs" / f"{safe}.json"
        name, overrides = parse_method(spec)
        # every step and every frame count here, unless the spec says otherwise (the presets' long-video
        # route is measured as its own spec: `config.LONG_VIDEO_PRESETS`)
        overrides = {"early_stop": 0, "frame_share": 1.0, **overrides}
        config = ProtectConfig.from_preset(families=[self.model.family], method=name, steps=steps, eps=eps,
                                           prompt=prompt, seed=self.seed, **overrides).to_dict()
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            same = same_settings(record.get("config", config), json.loads(json.dumps(config)))
            if same and set(battery) <= set(record["purified"]):
                return record
        source = self.photo_path(photo)
        out_dir = self.work / "protected" / safe
        result = anti_i2v.protect(source, self.model, out=out_dir, method=name, steps=steps, eps=eps,
                                  prompt=prompt, seed=self.seed, overwrite=True, **overrides)
        clean = load_photo(source).rgb
        protected = load_photo(result.path).rgb
        clean_video = self.video(clean, prompt)
        video = self.video(protected, prompt)
        effect = mad(video, clean_video)
        record = {
            "testbed": self.testbed.name, "method": spec, "steps": steps, "eps_255": round(eps * 255, 4),
            "photo": photo, "prompt": prompt, "seed": self.seed, "seconds": round(result.seconds, 2),
            "steps_done": len(result.history),
            "visibility": {k: v for k, v in fidelity(clean, protected).items()},
            "mad": effect, "psnr": psnr(video, clean_video), "purified": {}, "config": config,
        }
        for p in battery:
            clean_p = mad(self.video(self.purify(p, clean), prompt), clean_video)
            prot_p = mad(self.video(self.purify(p, protected), prompt), clean_video)
            record["purified"][p] = {"mad": prot_p, "clean_mad": clean_p,
                                     "kept": (prot_p - clean_p) / effect if effect > 0 else 0.0}
        write_json_atomic(record_path, record)
        return record


# what must match for rows of two runs to share a table
COMPARABLE = ("eps_255", "seed", "photos", "generation")


def with_previous_rows(records: list[dict], previous: Path, settings: dict[str, Any] | None = None
                       ) -> tuple[list[dict], list[str]]:
    """``records`` plus the runs of ``previous`` (a result file) whose group (testbed, method,
    steps) this run did not produce, and the names of those groups. With ``settings`` (this
    run's), a previous file of other eps, seed, photos or generation settings is refused."""
    document = json.loads(previous.read_text())
    if settings is not None:
        mine, theirs = json.loads(json.dumps(settings)), document["settings"]
        if isinstance(theirs.get("generation"), dict):  # a family added since changes none of the earlier rows
            mine["generation"] = {k: mine.get("generation", {}).get(k) for k in theirs["generation"]}
        differ = [k for k in COMPARABLE if mine.get(k) != theirs.get(k)]
        if differ:
            raise SystemExit(f"--keep-from {previous}: its {', '.join(differ)} differ from this run's; "
                             "its rows would not compare")
    ran = {(r["testbed"], r["method"], r["steps"]) for r in records}
    kept = [r for r in document["runs"] if (r["testbed"], r["method"], r["steps"]) not in ran]
    groups = sorted({f"{r['testbed']}: {r['method']}@{r['steps']}" for r in kept})
    return records + kept, groups


def same_settings(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a cached run used the current settings; settings added to the config since it
    ran count as the same when they hold their default (they change nothing)."""
    defaults = json.loads(json.dumps(ProtectConfig().to_dict()))
    return all(saved[k] == v if k in saved else v == defaults.get(k) for k, v in current.items()) and (
        saved.keys() <= current.keys()
    )


def summarise(records: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per testbed and method (and steps): means over photos and prompts, ratios to AdvDM and noise."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["testbed"], r["method"], r["steps"]), []).append(r)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (testbed, method, steps), rows in groups.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        effect = mean([r["mad"] for r in rows])
        purifiers = sorted({p for r in rows for p in r["purified"]}, key=BATTERY.index)
        kept = {p: sum(r["purified"][p]["mad"] - r["purified"][p]["clean_mad"] for r in rows if p in r["purified"])
                / max(sum(r["mad"] for r in rows if p in r["purified"]), 1e-12) for p in purifiers}
        worst = min(kept, key=kept.get) if kept else None
        entry = {
            "runs": len(rows), "mad": effect, "psnr": mean([r["psnr"] for r in rows]),
            "seconds": mean([r["seconds"] for r in rows]),
            **{f"photo_{k}": mean([r["visibility"][k] for r in rows if k in r["visibility"]])
               for k in ("psnr", "ssim", "ciede2000", "flip", "linf_255") if any(k in r["visibility"] for r in rows)},
            "kept": kept, "worst_purifier": worst, "worst_kept": kept[worst] if worst else None,
        }
        table.setdefault(testbed, {})[f"{method}@{steps}"] = entry
    for entries in table.values():
        for key, entry in entries.items():
            steps = key.rsplit("@", 1)[1]
            for ref, column in ((BASELINE, "x_advdm"), (NOISE, "x_random")):
                other = entries.get(f"{ref}@{steps}")
                if other is None and ref == NOISE:  # noise does not depend on the step count
                    other = next((e for k, e in entries.items() if k.startswith(f"{NOISE}@")), None)
                entry[column] = entry["mad"] / other["mad"] if other and other["mad"] > 0 else None
    return table


def preset_method(name: str) -> str:
    """The method spec of the default that preset ``name`` runs, e.g. ``anti-i2v:early_stop=20``."""
    stop = PRESETS[name].get("early_stop")
    return f"anti-i2v:early_stop={stop}" if stop else "anti-i2v"


def preset_label(name: str) -> str:
    """The summary row of preset ``name`` and its name, e.g. ```anti-i2v@5` (`balanced`, the default)``."""
    default = ", the default" if name == DEFAULT_PRESET else ""
    return f"`{preset_method(name)}@{PRESETS[name]['steps']}` (`{name}`{default})"


SUMMARY_METHODS = (*dict.fromkeys(preset_method(n) for n in PRESETS), "advdm", "mist", "photoguard", "sds",
                   "anti-i2v-paper", "random")


def summary_markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One compact table over every testbed (the one README shows): the default, the paper's
    method and the baselines, with strength, visibility and what survives the upload channel."""
    lines = ["| testbed | method @ steps | x AdvDM | x random | photo PSNR | FLIP | kept JPEG 75 | kept resize x0.5 | "
             "kept resize + JPEG 75 | worst kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for testbed, entries in table.items():
        keys = [k for k in entries if k.rsplit("@", 1)[0] in SUMMARY_METHODS]
        for key in sorted(keys, key=lambda k: (int(k.rsplit("@", 1)[1]), -entries[k]["mad"])):
            e = entries[key]
            cells = [fmt(e["x_advdm"]), fmt(e["x_random"], 1), fmt(e.get("photo_psnr")), fmt(e.get("photo_flip"), 3),
                     *[fmt(e["kept"].get(p)) for p in ("jpeg75", "resize0.5", "social192")],
                     f"{fmt(e['worst_kept'])} ({e['worst_purifier']})"]
            lines.append(f"| {testbed} | `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(table: dict[str, dict[str, dict[str, Any]]], settings: dict[str, Any], skipped: dict[str, str]) -> str:
    """The tables of docs/results/strength.md."""
    lines = ["# Protection strength on the trained testbeds", "",
             f"Command: `{settings['command']}`", "",
             f"eps {settings['eps_255']}/255; held-out photos {', '.join(settings['photos'])}; "
             "same seed, prompt and sampler for every video. `video MAD`: mean absolute difference of the "
             "protected photo's video to the clean photo's video (higher = stronger); `x AdvDM`, `x random`: that "
             "MAD as a ratio to AdvDM's and to random noise's at the same steps; `kept <p>`: share of the effect "
             "left after purification p, net of what p does to the clean photo's video; photo columns measure "
             "the saved file against the original (FLIP: mean error, lower = less visible).", "",
             "## Summary", "", "Resize + JPEG 75 is `social192`: a 192-px cap on the long edge, then JPEG 75, which "
             "is to the testbeds' 128-px-wide input what a 1080-px upload cap is to CogVideoX's 720-px one. "
             "The presets are " + ", ".join(preset_label(n) for n in PRESETS) + ".", "",
             *[f"At {k} steps the battery is {', '.join(v)} only (worst kept over those)." for k, v in
               settings.get("battery_at", {}).items()], "", summary_markdown(table), ""]
    if settings.get("reused"):
        lines[-1:-1] = ["", "Rows re-run by this command replace the earlier ones; the others are the earlier "
                        "run's, unchanged: " + ", ".join(f"`{g}`" for g in settings["reused"]) + "."]
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for testbed, entries in table.items():
        headline = [p for p in HEADLINE if any(p in e["kept"] for e in entries.values())]
        lines += [f"## {testbed}", "",
                  "| method @ steps | video MAD | x AdvDM | x random | video PSNR | photo PSNR | SSIM | CIEDE2000 | "
                  "FLIP | " + " | ".join(f"kept {p}" for p in headline) + " | worst kept | s/photo |",
                  "|---|" + "---|" * (10 + len(headline))]
        for key, e in sorted(entries.items(), key=lambda kv: (int(kv[0].rsplit("@", 1)[1]), -kv[1]["mad"])):
            cells = [fmt(e["mad"], 4), fmt(e["x_advdm"], 2), fmt(e["x_random"], 1), fmt(e["psnr"], 2),
                     fmt(e.get("photo_psnr"), 2), fmt(e.get("photo_ssim"), 4), fmt(e.get("photo_ciede2000"), 3),
                     fmt(e.get("photo_flip"), 4), *[fmt(e["kept"].get(p), 2) for p in headline],
                     f"{fmt(e['worst_kept'], 2)} ({e['worst_purifier']})", fmt(e["seconds"], 1)]
            lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
        purifiers = sorted({p for e in entries.values() for p in e["kept"]}, key=BATTERY.index)
        if purifiers:
            lines += ["", f"Kept after every purification ({testbed}):", "",
                      "| method @ steps | " + " | ".join(purifiers) + " |", "|---|" + "---|" * len(purifiers)]
            for key, e in sorted(entries.items(), key=lambda kv: (int(kv[0].rsplit("@", 1)[1]), -kv[1]["mad"])):
                lines.append(f"| `{key}` | " + " | ".join(fmt(e["kept"].get(p), 2) for p in purifiers) + " |")
        lines.append("")
    if skipped:
        lines += ["Not applicable:", ""] + [f"- {what}: {why}" for what, why in skipped.items()] + [""]
    return "\n".join(lines)


def testbed_prompts(testbed: Testbed, requested: str) -> tuple[str, ...]:
    """The prompts a testbed runs: its own for ``"all"``, else those requested that it was trained on."""
    if requested == "all":
        return testbed.prompts
    prompts = tuple(p for p in requested.split(",") if p in testbed.prompts)
    if not prompts:
        raise SystemExit(f"testbed '{testbed.name}' was trained on none of '{requested}'; "
                         f"its prompts: {', '.join(testbed.prompts)}")
    return prompts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbeds", default="cogvideox,svd",
                        help=f"comma-separated, of {', '.join(TESTBEDS)} (cogvideox-49f: frame-count questions only)")
    parser.add_argument("--methods", default="all", help="'all' or comma-separated specs, e.g. advdm,anti-i2v:steps=60")
    parser.add_argument("--photos", default=",".join(HELD_OUT))
    parser.add_argument("--prompts", default="all",
                        help="'all' (each testbed's own) or comma-separated; each testbed runs those it was trained on")
    parser.add_argument("--steps", default="60,200", help="comma-separated step counts, e.g. 60,200")
    parser.add_argument("--methods-at", action="append", default=[], metavar="STEPS=SPECS",
                        help="run only these methods at this step count, e.g. 200=anti-i2v,advdm,random")
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--battery", default=",".join(BATTERY), help="purifiers, comma-separated ('' for none)")
    parser.add_argument("--battery-at", action="append", default=[], metavar="STEPS=PURIFIERS",
                        help="a smaller battery at this step count, e.g. 50=jpeg75,resize0.5,social192")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(BENCHMARKS / ".strength-cache"))
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th protection starting at i")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-from", default="", metavar="JSON",
                        help="a previous result file: its rows (testbed, method, steps) that this run does not "
                             "produce join the tables, e.g. when only a changed method is re-run "
                             "(same eps, seed, photos and generation; ignored with --shard)")
    parser.add_argument("--out", default=str(BENCHMARKS / "results" / "strength.json"), help="JSON ('' for none)")
    parser.add_argument("--md", default=str(BENCHMARKS.parent / "docs" / "results" / "strength.md"),
                        help="tables ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ANTI_I2V_CACHE", str(Path(args.work) / "cache"))  # generated references
    eps = float(Fraction(args.eps))
    battery = tuple(p for p in args.battery.split(",") if p)
    specs = list(METHODS) if args.methods == "all" else args.methods.split(",")
    only = {int(k): v.split(",") for k, _, v in (item.partition("=") for item in args.methods_at)}
    battery_at = {int(k): tuple(p for p in v.split(",") if p)
                  for k, _, v in (item.partition("=") for item in args.battery_at)}
    index, count = (int(v) for v in args.shard.split("/"))
    records, job = [], 0
    skipped: dict[str, str] = {}
    began = time.perf_counter()
    for name in args.testbeds.split(","):
        testbed = TESTBEDS[name]
        runner = Runner(testbed, Path(args.work), args.seed)
        prompts = testbed_prompts(testbed, args.prompts)
        for steps in (int(s) for s in args.steps.split(",")):
            for spec in only.get(steps, specs):
                for photo in args.photos.split(","):
                    for prompt in prompts:
                        job += 1
                        if (job - 1) % count != index:
                            continue
                        try:
                            record = runner.run(spec, photo, prompt, steps, eps, battery_at.get(steps, battery))
                        except ConfigError as err:  # e.g. clip-embed on a model without an image encoder
                            skipped.setdefault(f"{testbed.name}: {spec}", str(err))
                            continue
                        records.append(record)
                        print(json.dumps({k: record[k] for k in ("testbed", "method", "steps", "photo", "prompt",
                                                                  "mad", "seconds")}), flush=True)
    command = "python benchmarks/strength.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {"command": command.strip(), "eps_255": round(eps * 255, 4), "photos": args.photos.split(","),
                "battery": list(battery), "battery_at": {k: list(v) for k, v in battery_at.items()},
                "seed": args.seed, "generation": GENERATION, "reused": [],
                "seconds": round(time.perf_counter() - began, 1)}
    if args.keep_from and count == 1:
        records, settings["reused"] = with_previous_rows(records, Path(args.keep_from), settings)
        order = list(TESTBEDS)
        records.sort(key=lambda r: order.index(r["testbed"]) if r["testbed"] in order else len(order))
    table = summarise(records)
    # Each run's full config stays in the cache (it validates reuse); the method spec and steps name it here.
    runs = [{k: v for k, v in r.items() if k != "config"} for r in records]
    document = {"settings": settings, "summary": table, "skipped": skipped, "runs": runs}
    if count == 1:
        print(json.dumps(table, indent=2))
        if args.out:
            write_json_atomic(Path(args.out), document)
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(args.md), lambda tmp: Path(tmp).write_text(markdown(table, settings, skipped)))
    return document


if __name__ == "__main__":
    main()
