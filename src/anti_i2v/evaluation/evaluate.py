"""`evaluate`: protect a data set with several methods, generate, measure, tabulate.

Layout of the output folder, per model::

    <out>/<model>/protected/<method>/<stem>_protected.png (+ .json sidecar)
    <out>/<model>/results.jsonl     one row per (photo, method, purification), appended
    <out>/<model>/run.json, methods.json   the run's settings and each method's full config
    <out>/<model>/table.md, table.json   mean and worst case per method, every metric

Every method runs with the same budget, steps and seed. Rows already in
``results.jsonl`` are not computed again, so an interrupted evaluation resumes; a rerun
whose settings differ from the recorded ones (the run's, or a method's full config, which
another version of the tool may resolve differently) stops with an error instead of
mixing the two in one table.

Where neither the face metrics nor DINO can judge a photo's videos, the verdicts are
relative to the ``random`` method (uniform noise of the same budget, same seed and
sampler): each row is compared with the ``random`` row of the same photo and the same
purification (see `anti_i2v.evaluation.scoring.noise_verdict`). ``random`` then runs
first for that photo, and is added for it when it was not asked for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anti_i2v.api import protect
from anti_i2v.atomic import json_safe, write_atomic, write_json_atomic
from anti_i2v.batch import expand_inputs, is_done, model_sizes, output_stems, resume_settings
from anti_i2v.config import DEFAULT_PROMPT, ProtectConfig, is_long_video
from anti_i2v.errors import AntiI2VError, ConfigError, InputError
from anti_i2v.evaluation.generate import GenerationSettings, generate_video
from anti_i2v.evaluation.metrics.fidelity import fidelity
from anti_i2v.evaluation.purify import build_purifier
from anti_i2v.evaluation.scoring import SCORED_METRICS, VideoScorer, needs_noise_reference, verdict
from anti_i2v.methods import Method, get_method
from anti_i2v.models.base import VideoModel
from anti_i2v.photo import load_photo, output_path_for

logger = logging.getLogger(__name__)

CLEAN = "clean"
RANDOM = "random"  # the method whose rows are the same-budget noise reference
CHECKPOINT_EVERY = 50  # an interrupted optimisation resumes from its last checkpoint


@dataclass(frozen=True)
class Sample:
    """One photo of the data set and the prompt to animate it with."""

    path: Path
    prompt: str


def read_dataset(folder: str | Path, prompts: str | Path | None = None) -> list[Sample]:
    """Photos of ``folder`` with their prompts.

    ``prompts`` is a CSV with columns ``image,prompt`` or a JSON-lines file of
    ``{"image": ..., "prompt": ...}``; ``image`` is a file name in the folder. Photos
    without a prompt get the default prompt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data set '{folder}' is not a folder of photos")
    table: dict[str, str] = {}
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise InputError(f"prompts file '{path}' does not exist")
        try:
            if path.suffix.lower() in {".jsonl", ".json"}:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                with open(path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
            table = {Path(str(r["image"])).name: str(r["prompt"]) for r in rows}
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"cannot read prompts from '{path}': need columns/keys image and prompt ({err})") from err
    samples = [Sample(p, table.get(p.name, DEFAULT_PROMPT)) for p in expand_inputs([folder])]
    if not samples:
        raise InputError(f"data set '{folder}' holds no photos")
    return samples


def _load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            logger.warning("ignoring a damaged line of %s", path)
    return rows


def _append_row(path: Path, rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Append one result durably; keep in memory exactly what a resumed run will read back.

    A line left half-written by a crash is cut off first, so it cannot swallow this row.
    """
    row = json_safe(row)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    rows.append(row)


def _read_record(path: Path) -> Any:
    """The settings recorded in ``path`` by an earlier run, or None on first use."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"'{path}' is damaged; delete it to start this evaluation again") from err


def _check_same_run(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix results of different settings in one folder; record them on first use."""
    previous = _read_record(path)
    if previous is not None:
        if previous != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ConfigError(
                f"'{path.parent}' holds an evaluation with other settings ({', '.join(changed)}); "
                "pass another --out or delete that folder"
            )
    else:
        write_json_atomic(path, settings)


# settings that vary by photo or by how the run is carried out, not by method
_PER_PHOTO_KEYS = ("prompt", "checkpoint_every")


def method_settings(
    method: Method, families: Sequence[str], eps: float, steps: int, seed: int, long_video: bool = False
) -> dict[str, Any]:
    """Every setting ``method`` protects with in this evaluation (its preset, its own settings, its
    family's and on long videos its route), less those that vary by photo: what must match for a
    row to be reused."""
    config = ProtectConfig.from_preset(families=families, long_video=long_video, method=method.name, eps=eps,
                                       steps=steps, seed=seed)
    return {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k not in _PER_PHOTO_KEYS}


def _check_same_methods(path: Path, settings: dict[str, dict[str, Any]]) -> None:
    """Refuse to reuse a method's rows made with other settings of that method (e.g. by another
    version whose defaults differ); methods new to the folder are recorded and may join it."""
    recorded: dict[str, dict[str, Any]] = _read_record(path) or {}
    for name, current in settings.items():
        previous = recorded.get(name)
        if previous is not None and previous != current:
            changed = sorted(k for k in current.keys() | previous.keys() if previous.get(k) != current.get(k))
            raise ConfigError(
                f"'{path.parent}' holds results of '{name}' made with other settings of it ({', '.join(changed)}); "
                "pass another --out or delete that folder"
            )
    if not settings.keys() <= recorded.keys():
        write_json_atomic(path, {**recorded, **settings})


def with_noise_reference(methods: Sequence[Method], needed: bool) -> list[Method]:
    """``methods`` with ``random`` first (its rows are the other rows' reference), and added when
    ``needed`` (the verdict falls back to the noise reference) but not asked for."""
    ordered = sorted(methods, key=lambda method: method.name != RANDOM)  # stable: the rest keep their order
    if needed and not any(method.name == RANDOM for method in ordered):
        ordered.insert(0, get_method(RANDOM))
    return ordered


def noise_reference(rows: Sequence[dict[str, Any]], image: str, purify: str | None) -> dict[str, float] | None:
    """Scores of the ``random`` row of ``image`` after the same purification (else unpurified), or None."""
    fallback = None
    for row in rows:
        if row["image"] != image or row["method"] != RANDOM:
            continue
        if row.get("purify") == purify:
            return row["scores"]
        if row.get("purify") is None:
            fallback = row["scores"]
    return fallback


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (and purification): mean and worst case over photos of every metric.

    The worst case of a metric is its value on the photo where protection was weakest
    by that metric (the maximum for metrics where lower means protected).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row["method"] + (f"+{row['purify']}" if row.get("purify") else "")
        groups.setdefault(name, []).append(row)
    table = {}
    for name, members in groups.items():
        values: dict[str, list[float]] = {}
        for row in members:
            for metric, value in {**row["scores"], **(row.get("fidelity") or {})}.items():
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    values.setdefault(metric, []).append(float(value))
        summary: dict[str, Any] = {"photos": len(members)}
        for metric, vals in values.items():
            spec = SCORED_METRICS.get(metric)
            worst = min if spec is not None and spec.protection_direction == "higher" else max
            finite = [v for v in vals if math.isfinite(v)]
            summary[metric] = {"mean": sum(finite) / len(finite) if finite else None, "worst": worst(vals)}
        verdicts = [row["verdict"] for row in members]
        summary["protected_share"] = verdicts.count("protected") / len(verdicts)
        summary["weak_share"] = verdicts.count("weak") / len(verdicts)
        summary["frozen"] = verdicts.count("frozen")
        table[name] = summary
    return table


def cross_model_table(out_dir: str | Path, protected_with: Sequence[str], generated_with: Sequence[str],
                      method: str) -> dict[str, dict[str, float | None]]:
    """Transfer table of ``method``: rows protected against, columns generated with.

    Each cell is the mean of the first available metric among ISM, DINO and PSNR to the
    clean video (lower = better protection). Written to ``cross_model.md`` and ``.json``.
    """
    out = Path(out_dir)
    cells: dict[str, dict[str, float | None]] = {}
    chosen = None
    for a in protected_with:
        for b in generated_with:
            folder = out / b if a == b else out / b / f"from-{a}"
            path = folder / "table.json"
            row = json.loads(path.read_text())["table"].get(method, {}) if path.is_file() else {}
            chosen = chosen or next((m for m in ("ism", "dino", "psnr_to_clean_video") if row.get(m)), None)
            entry = row.get(chosen) if chosen else None
            cells.setdefault(a, {})[b] = entry["mean"] if entry else None
    lines = [f"# Transfer of {method}: {chosen or 'no metric'} (mean), rows protected against, columns generated with",
             "", "| protected against | " + " | ".join(generated_with) + " |", "|---|" + "---|" * len(generated_with)]
    for a in protected_with:
        values = ["-" if cells[a][b] is None else f"{cells[a][b]:.3f}" for b in generated_with]
        lines.append(f"| {a} | " + " | ".join(values) + " |")
    write_atomic(out / "cross_model.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_json_atomic(out / "cross_model.json", {"method": method, "metric": chosen, "cells": cells})
    return cells


def markdown_table(model: str, table: dict[str, dict[str, Any]]) -> str:
    """The summary as a Markdown table: mean (worst) per metric, one row per method."""
    metrics = sorted({m for s in table.values() for m, v in s.items() if isinstance(v, dict)})
    lines = [
        f"# {model}: mean (worst case per photo)",
        "",
        "| method | photos | protected | weak | frozen | " + " | ".join(metrics) + " |",
        "|---|---|---|---|---|" + "---|" * len(metrics),
    ]
    for name, s in table.items():
        cells = []
        for m in metrics:
            entry = s.get(m)
            if not entry or entry["mean"] is None:
                cells.append("-")
            else:
                cells.append(f"{entry['mean']:.3f} ({entry['worst']:.3f})")
        weak = s.get("weak_share", 0.0)
        lines.append(f"| {name} | {s['photos']} | {s['protected_share']:.0%} | {weak:.0%} | {s['frozen']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(
    samples: Sequence[Sample],
    model: VideoModel,
    methods: Sequence[Method],
    out_dir: str | Path,
    *,
    eps: float,
    steps: int,
    seed: int = 0,
    generation_steps: int = 50,
    guidance_scale: float | None = None,
    purifiers: Sequence[str] = (),
    scorer: VideoScorer | None = None,
    on_item: Callable[[str], None] | None = None,
    diffpure_model: str | None = None,
    protect_model: VideoModel | Sequence[VideoModel] | None = None,
) -> dict[str, dict[str, Any]]:
    """Protect, generate and score every (photo, method[, purification]); returns the summary table.

    A photo that cannot be read, or a method that does not apply to the model, is
    logged and skipped; the rest goes on. With ``protect_model`` (one model, or several
    for an ensemble), photos are protected against it and generated with ``model``
    (transfer); results then go to ``<out>/<model>/from-<name>/``, where an ensemble's
    name joins its members' with "+". For a photo that neither the face metrics nor
    DINO can judge, ``random`` runs first (and is added when not in ``methods``): its
    rows are the noise reference of the verdicts.
    """
    protectors = [model] if protect_model is None else (
        [protect_model] if isinstance(protect_model, VideoModel) else list(protect_model))
    protector_name = "+".join(m.name for m in protectors)
    protector = protectors[0] if len(protectors) == 1 else protectors
    ProtectConfig(eps=eps, steps=steps, seed=seed)  # same checks as protection, before anything is recorded
    if generation_steps < 1:
        raise ConfigError(f"generation steps must be at least 1 (got {generation_steps})")
    scorer = scorer if scorer is not None else VideoScorer(device=model.device)
    root = Path(out_dir) / model.name
    if protectors != [model]:
        root = root / f"from-{protector_name}"
    root.mkdir(parents=True, exist_ok=True)
    prompts = hashlib.sha256(json.dumps([[s.path.name, s.prompt] for s in samples]).encode()).hexdigest()[:16]
    _check_same_run(root / "run.json", {
        "model": model.identity, "protected_against": "+".join(m.identity for m in protectors), "eps": eps, "steps": steps, "seed": seed, "generation_steps": generation_steps,
        "guidance_scale": guidance_scale, "prompts_sha256": prompts, "identity_model": scorer.identity_model,
        "skipped_metrics": sorted(scorer.unavailable), "diffpure_model": diffpure_model,
    })
    families = [m.family for m in protectors]
    long_video = is_long_video(protectors)
    configs = {m.name: method_settings(m, families, eps, steps, seed, long_video)
               for m in with_noise_reference(methods, True)}
    _check_same_methods(root / "methods.json", configs)
    results = root / "results.jsonl"
    rows = _load_rows(results)
    done = {(r["image"], r["method"], r.get("purify")) for r in rows}
    cache = root / ".videos"  # clean videos only: every other video is consumed by one row
    stems = output_stems([s.path for s in samples])
    for sample in samples:
        try:
            original = load_photo(sample.path)
        except InputError as err:
            logger.warning("skipping %s: %s", sample.path.name, err)
            continue
        settings = GenerationSettings(sample.prompt, seed, generation_steps, guidance_scale)
        clean_video = generate_video(model, original.rgb, settings, cache)
        scorer.prepare(original.rgb, clean_video)
        clean_scores = scorer.score(clean_video)
        if (sample.path.name, CLEAN, None) not in done:
            row = {"image": sample.path.name, "method": CLEAN, "purify": None, "scores": clean_scores,
                   "verdict": "reference", "fidelity": None, "settings": asdict(settings)}
            _append_row(results, rows, row)
        needed = needs_noise_reference(clean_scores)
        if needed and not any(method.name == RANDOM for method in methods):
            logger.info("%s: no face or DINO verdict applies; adding '%s' as the noise reference",
                        sample.path.name, RANDOM)
        for method in with_noise_reference(methods, needed):
            keys = [(sample.path.name, method.name, p) for p in (None, *purifiers)]
            if all(k in done for k in keys):
                continue
            if on_item is not None:
                on_item(f"{sample.path.name} / {method.name}")
            folder = root / "protected" / method.name
            output = output_path_for(sample.path, folder, "png", stems[sample.path])
            try:
                made_with = resume_settings({"method": method.name, "eps": eps, "steps": steps, "seed": seed,
                                             "prompt": sample.prompt}, long_video, families)
                if not is_done(sample.path, output, made_with, sizes=model_sizes(protectors)):
                    protect(sample.path, protector, out=folder, method=method.name, eps=eps, steps=steps, seed=seed,
                            prompt=sample.prompt, stem=stems[sample.path], overwrite=True,
                            checkpoint_every=CHECKPOINT_EVERY, release_text_encoder=False)
            except AntiI2VError as err:
                logger.warning("%s on %s: %s", method.name, sample.path.name, err)
                continue
            protected = load_photo(output)
            image_fidelity = fidelity(original.rgb, protected.rgb)
            for key in keys:
                if key in done:
                    continue
                purify = key[2]
                if purify is None:
                    image = protected.rgb
                else:
                    image = build_purifier(purify, diffpure_model=diffpure_model, device=model.device)(protected.rgb, seed)
                scores = scorer.score(generate_video(model, image, settings))
                # the noise rows are their own reference; the others take the matching noise row
                noise = scores if method.name == RANDOM else noise_reference(rows, sample.path.name, purify)
                row = {"image": sample.path.name, "method": method.name, "purify": purify, "scores": scores,
                       "verdict": verdict(scores, clean_scores, scorer.identity_model, noise=noise),
                       "fidelity": image_fidelity}
                _append_row(results, rows, row)
    table = summarise(rows)
    write_json_atomic(root / "table.json", {"model": model.name, "eps": eps, "steps": steps, "seed": seed,
                                             "identity_model": scorer.identity_model, "skipped_metrics": scorer.unavailable,
                                             "table": table})
    write_atomic(root / "table.md", lambda tmp: tmp.write_text(markdown_table(model.name, table)))
    return table
