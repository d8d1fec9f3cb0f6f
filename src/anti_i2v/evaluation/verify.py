"""`verify`: does protection hold for this photo? Generate, purify, measure, report.

One video is generated from the original photo, one from the protected photo, and one
from the protected photo after each purification of the battery, all with the same
prompt, seed and sampler settings. Each is scored against the clean photo and the
clean video; the report folder holds ``report.json``, ``report.md``, a side-by-side
video (``side_by_side.mp4`` and ``side_by_side.webp``) and ``contact_sheet.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any


from anti_i2v.atomic import write_atomic, write_json_atomic
from anti_i2v.errors import InputError
from anti_i2v.evaluation.generate import GenerationSettings, generate_video
from anti_i2v.evaluation.media import contact_sheet, tile_videos, write_animation, write_mp4
from anti_i2v.evaluation.metrics.fidelity import fidelity
from anti_i2v.evaluation.purify import DEFAULT_BATTERY, build_purifier
from anti_i2v.evaluation.scoring import VERDICT_RULES, VideoScorer, verdict
from anti_i2v.models.base import VideoModel
from anti_i2v.photo import load_photo

logger = logging.getLogger(__name__)

CLEAN, PROTECTED = "original", "protected"
# Metrics shown in tables, in order; the first present one ranks the worst case.
TABLE_METRICS = ("ism", "fdfr", "dino", "qalign_video", "face_quality", "warp_error", "motion", "psnr_to_clean_video")
WEAKEST_FIRST = {"ism": max, "dino": max, "qalign_video": max, "psnr_to_clean_video": max}


def weakest_run(rows: dict[str, dict[str, float]]) -> str | None:
    """The run where protection is weakest: highest ISM, else DINO, else closest to the clean video."""
    for metric, pick in WEAKEST_FIRST.items():
        candidates = {name: scores[metric] for name, scores in rows.items() if metric in scores}
        if candidates:
            return pick(candidates, key=candidates.get)
    return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, fidelity, one row per video, skipped metrics, rules."""
    runs = report["runs"]
    metrics = [m for m in TABLE_METRICS if any(m in r["scores"] for r in runs.values())]
    lines = [
        f"# Protection report: {Path(report['protected']).name}",
        "",
        f"Model `{report['model']}`, prompt \"{report['settings']['prompt']}\", seed {report['settings']['seed']}, "
        f"{report['settings']['steps']} sampling steps.",
        "",
        "## The protected photo",
        "",
        "| L-inf (/255) | PSNR (dB) | SSIM | CIEDE2000 |",
        "|---|---|---|---|",
        "| {linf_255:.2f} | {psnr:.2f} | {ssim:.4f} | {ciede2000:.3f} |".format(**report["fidelity"]),
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
    """Generate and score videos from the original, the protected photo and its purified copies.

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
    images = {CLEAN: clean_photo.rgb, PROTECTED: protected_photo.rgb}
    for name in purifiers:
        images[f"{PROTECTED}+{name}"] = build_purifier(name, diffpure_model=diffpure_model, device=model.device)(
            protected_photo.rgb, settings.seed
        )
    videos = {}
    for name, image in images.items():
        if on_video is not None:
            on_video(name)
        videos[name] = generate_video(model, image, settings, cache)

    scorer = scorer if scorer is not None else VideoScorer()
    scorer.prepare(clean_photo.rgb, videos[CLEAN])
    scores = {name: scorer.score(video) for name, video in videos.items()}
    attacked = {name: s for name, s in scores.items() if name != CLEAN}
    report = {
        "model": model.name,
        "model_source": model.source,
        "original": str(original),
        "protected": str(protected),
        "settings": asdict(settings),
        "fidelity": fidelity(clean_photo.rgb, protected_photo.rgb),
        "runs": {
            name: {
                "scores": s,
                "verdict": "reference" if name == CLEAN else verdict(s, scores[CLEAN], scorer.identity_model),
            }
            for name, s in scores.items()
        },
        "worst_case": weakest_run(attacked),
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
