"""`verify`: does protection hold for this photo? Generate, purify, measure, report.

One video is generated from the original photo, one from the protected photo, one from
the original plus uniform random noise of the protected file's L-inf budget (the
model's own reference: what a perturbation of that size does by chance), and one from
the protected photo after each purification of the battery, all with the same prompt,
seed and sampler settings. Each is scored against the clean photo and the clean video;
the report folder holds ``report.json``, ``report.md``, a side-by-side video
(``side_by_side.mp4`` and ``side_by_side.webp``) and ``contact_sheet.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from anti_i2v.atomic import write_atomic, write_json_atomic
from anti_i2v.errors import InputError
from anti_i2v.evaluation.generate import GenerationSettings, generate_video
from anti_i2v.evaluation.media import contact_sheet, tile_videos, write_animation, write_mp4
from anti_i2v.evaluation.metrics.fidelity import fidelity
from anti_i2v.evaluation.purify import DEFAULT_BATTERY, build_purifier
from anti_i2v.evaluation.scoring import VERDICT_RULES, VideoScorer, identity_applies, needs_noise_reference, verdict
from anti_i2v.models.base import VideoModel
from anti_i2v.photo import Photo, load_photo

logger = logging.getLogger(__name__)

CLEAN, PROTECTED = "original", "protected"
RANDOM_WEIGHTS_NOTE = (
    "This report used a model with random weights: it shows the pipeline works, and says nothing about "
    "how well the photo is protected against real models."
)
NOISE = "random noise (same budget)"
REFERENCES = (CLEAN, NOISE)  # rows that are yardsticks, not attacks
PURIFIED_NOTE = (  # shown when the verdicts are noise-referenced and purified copies were tested
    "Each purified copy is compared with the noise photo passed through the same purification, so the "
    "purifier's own change of the photo does not count as protection."
)
# Metrics shown in tables, in order; the first present one ranks the worst case.
TABLE_METRICS = ("ism", "fdfr", "dino", "qalign_video", "face_quality", "warp_error", "motion", "psnr_to_clean_video")
WEAKEST_FIRST = {"ism": max, "dino": max, "qalign_video": max, "psnr_to_clean_video": max}


def same_budget_noise(photo: Photo, linf: float, seed: int) -> torch.Tensor:
    """``photo`` plus uniform random noise in ``[-linf, linf]``, drawn from a generator seeded with ``seed``.

    Returns a ``(3, H, W)`` float32 image in [0, 1] at the photo's full resolution.
    Gray photos get one noise plane for all three channels (they stay gray); 8-bit
    photos are rounded to 8 bits, as a saved file would be, which keeps every pixel
    within ``linf`` when ``linf`` is a whole number of 8-bit steps.
    """
    if not 0.0 <= linf <= 1.0:
        raise InputError(f"the noise budget must be an L-inf in [0, 1] pixel units, got {linf}")
    generator = torch.Generator().manual_seed(int(seed))
    channels = 1 if photo.is_gray else 3
    noise = (torch.rand((channels, *photo.size), generator=generator) * 2 - 1) * linf
    noisy = (photo.rgb + noise.expand_as(photo.rgb)).clamp(0, 1)
    if photo.bit_depth == 8:
        noisy = noisy.mul(255).round().div(255)
    return noisy.float()


def weakest_run(rows: dict[str, dict[str, float]], clean: dict[str, float] | None = None) -> str | None:
    """The run where protection is weakest: highest ISM, else DINO, else closest to the clean video.

    With the clean video's scores ``clean``, ISM is passed over when the clean video shows
    no face (every ISM is then 0 and says nothing).
    """
    for metric, pick in WEAKEST_FIRST.items():
        if metric == "ism" and clean is not None and not identity_applies(clean):
            continue
        candidates = {name: scores[metric] for name, scores in rows.items() if metric in scores}
        if candidates:
            return pick(candidates, key=candidates.get)
    return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _fidelity_row(name: str, scores: dict[str, float]) -> str:
    """One Markdown row of the photo table: L-inf, PSNR, SSIM, CIEDE2000 and FLIP against the original."""
    return "| {name} | {linf_255:.2f} | {psnr:.2f} | {ssim:.4f} | {ciede2000:.3f} | {flip:.4f} |".format(
        name=name, **scores)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, fidelity, one row per video, skipped metrics, rules."""
    runs = report["runs"]
    metrics = [m for m in TABLE_METRICS if any(m in r["scores"] for r in runs.values())]
    lines = [
        f"# Protection report: {Path(report['protected']).name}",
        "",
        f"Model `{report['model']}`, prompt \"{report['settings']['prompt']}\", seed {report['settings']['seed']}, "
        f"{report['settings']['steps']} sampling steps"
        + (f", at {report['resolution'][0]}x{report['resolution'][1]}." if report.get("resolution") else "."),
        "",
        "## The protected photo",
        "",
        "Against the original; FLIP is NVIDIA's perceptual difference (0 identical, a few hundredths "
        "near the threshold of visibility).",
        "",
        "| photo | L-inf (/255) | PSNR (dB) | SSIM | CIEDE2000 | FLIP |",
        "|---|---|---|---|---|---|",
        _fidelity_row(PROTECTED, report["fidelity"]),
    ]
    if report.get("noise_reference"):
        lines.append(_fidelity_row(NOISE, report["noise_reference"]["fidelity"]))
    lines += [
        "",
        "## Generated videos",
        "",
        "| video | verdict | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name, run in runs.items():
        cells = [_format(run["scores"].get(m, "-")) for m in metrics]
        lines.append(f"| {name} | {run['verdict']} | " + " | ".join(cells) + " |")
    lines += ["", f"Worst case (weakest protection): **{report['worst_case']}**.", ""]
    if report["skipped_metrics"]:
        lines += ["## Metrics not computed", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped_metrics"].items()]
        lines.append("")
    lines += ["## How to read it", "", VERDICT_RULES + ".", ""]
    if report.get("noise_reference"):
        noise = report["noise_reference"]
        text = (f"The noise video's photo is the original plus uniform noise in [-{noise['linf_255']:.2f}, "
                f"{noise['linf_255']:.2f}]/255 (the protected file's L-inf), seed {noise['seed']}.")
        purified = any(name.startswith(f"{PROTECTED}+") for name in runs)
        if purified and needs_noise_reference(runs[CLEAN]["scores"]):
            text += " " + PURIFIED_NOTE
        lines += [text, ""]
    if report.get("note"):
        lines += [report["note"], ""]
    return "\n".join(lines)


def verify(
    original: str | Path,
    protected: str | Path,
    model: VideoModel,
    out_dir: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    purifiers: Sequence[str] = DEFAULT_BATTERY,
    scorer: VideoScorer | None = None,
    on_video: Callable[[str], None] | None = None,
    note: str | None = None,
    diffpure_model: str | None = None,
) -> dict[str, Any]:
    """Generate and score videos from the original, the protected photo, same-budget noise and purified copies.

    The noise video's photo is the original plus uniform noise of the protected file's
    measured L-inf (:func:`same_budget_noise`, seeded with ``settings.seed``); it is the
    verdict's reference when no face metric and no DINO applies, and then each purified copy's
    is the noise photo through the same purification (one more video per purification).
    Returns the report (also written to ``out_dir/report.json``). ``on_video`` is called
    with each video's name before it is generated (for progress display);
    ``diffpure_model`` is the image diffusion model of the "diffpure" purification.
    """
    clean_photo, protected_photo = load_photo(original), load_photo(protected)
    if clean_photo.size != protected_photo.size:
        raise InputError(
            f"'{protected}' is {protected_photo.size[1]}x{protected_photo.size[0]} but '{original}' is "
            f"{clean_photo.size[1]}x{clean_photo.size[0]}; compare a photo with its own protected copy"
        )
    out_dir = Path(out_dir)
    cache = out_dir / ".videos"
    protected_fidelity = fidelity(clean_photo.rgb, protected_photo.rgb)
    noisy = same_budget_noise(clean_photo, protected_fidelity["linf"], settings.seed)
    images = {CLEAN: clean_photo.rgb, PROTECTED: protected_photo.rgb, NOISE: noisy}
    purify = {name: build_purifier(name, diffpure_model=diffpure_model, device=model.device) for name in purifiers}
    for name in purifiers:
        images[f"{PROTECTED}+{name}"] = purify[name](protected_photo.rgb, settings.seed)
    videos = {}
    for name, image in images.items():
        if on_video is not None:
            on_video(name)
        videos[name] = generate_video(model, image, settings, cache)

    scorer = scorer if scorer is not None else VideoScorer()
    scorer.prepare(clean_photo.rgb, videos[CLEAN])
    scores = {name: scorer.score(video) for name, video in videos.items()}
    attacked = {name: s for name, s in scores.items() if name not in REFERENCES}
    noise_scores = scores[NOISE]
    purified_noise: dict[str, dict[str, float]] = {}
    if needs_noise_reference(scores[CLEAN]):  # a purified copy's reference is the noise photo purified alike
        for name in purifiers:
            if on_video is not None:
                on_video(f"{NOISE}+{name}")
            purified_noise[name] = scorer.score(generate_video(model, purify[name](noisy, settings.seed), settings,
                                                               cache))
    references = {f"{PROTECTED}+{name}": s for name, s in purified_noise.items()}  # others: the noise video
    report = {
        "model": model.name,
        "model_source": model.source,
        "resolution": list(model.resolution_for(*clean_photo.size)),  # the size every video here ran at
        "original": str(original),
        "protected": str(protected),
        "settings": asdict(settings),
        "fidelity": protected_fidelity,
        "noise_reference": {
            "run": NOISE,
            "seed": settings.seed,
            "linf": protected_fidelity["linf"],
            "linf_255": protected_fidelity["linf_255"],
            "fidelity": fidelity(clean_photo.rgb, noisy),
            "purified_scores": purified_noise,
        },
        "runs": {
            name: {
                "scores": s,
                "verdict": "reference" if name == CLEAN else verdict(
                    s, scores[CLEAN], scorer.identity_model, noise=references.get(name, noise_scores)),
            }
            for name, s in scores.items()
        },
        "worst_case": weakest_run(attacked, scores[CLEAN]),
        "identity_model": scorer.identity_model,
        "skipped_metrics": dict(scorer.skipped),
        "verdict_rules": VERDICT_RULES,
        "note": note,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    write_atomic(out_dir / "report.md", lambda tmp: tmp.write_text(markdown_report(report)))
    grid = tile_videos(videos)
    write_mp4(grid, out_dir / "side_by_side.mp4")
    write_animation(grid, out_dir / "side_by_side.webp")
    sheet = contact_sheet(videos, images)
    write_atomic(out_dir / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
    return report


def write_models_summary(reports: dict[str, dict[str, Any]], out_dir: str | Path) -> Path:
    """One row per model for a photo verified against several: the protected photo's verdict,
    the worst case and its verdict. Writes ``summary.json`` and ``summary.md``; returns the latter."""
    rows = {
        name: {
            "protected": report["runs"][PROTECTED]["verdict"],
            "worst_case": report["worst_case"],
            "worst_case_verdict": report["runs"][report["worst_case"]]["verdict"] if report["worst_case"] else None,
            "report": f"{name}/report.md",
        }
        for name, report in reports.items()
    }
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "summary.json", rows)
    lines = ["# Protection against each model", "", "| model | protected photo | worst case | its verdict | report |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['protected']} | {r['worst_case']} | {r['worst_case_verdict']} | [{r['report']}]({r['report']}) |"
              for name, r in rows.items()]
    return write_atomic(out_dir / "summary.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
