"""`verify` and `evaluate` on tiny-cogvideox: the reports hold what they claim, the
measurements move the right way, and an interrupted evaluation resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import anti_i2v
from anti_i2v.errors import ConfigError
from anti_i2v.evaluation.evaluate import evaluate, read_dataset, summarise
from anti_i2v.evaluation.generate import GenerationSettings
from anti_i2v.evaluation.scoring import VideoScorer, verdict
from anti_i2v.evaluation.verify import verify
from anti_i2v.methods import parse_methods

SETTINGS = GenerationSettings(prompt="a person talking to the camera", seed=0, steps=2)


@pytest.fixture(scope="module")
def scorer():
    return VideoScorer(dino=None, qalign=None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, portrait):
    folder = tmp_path_factory.mktemp("dataset")
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((144, 96)).save(folder / "astronaut.png")
    Image.fromarray(array[:, ::-1]).resize((120, 80)).save(folder / "mirrored.jpg")
    return folder


def test_verify_writes_every_part_of_the_report(tmp_path, photos, tiny_model, scorer):
    protected = anti_i2v.protect(photos / "astronaut.png", tiny_model, out=tmp_path / "p", steps=3,
                                 prompt=SETTINGS.prompt).path
    report = verify(photos / "astronaut.png", protected, tiny_model, tmp_path / "report", SETTINGS,
                    purifiers=["jpeg30", "noise0.1"], scorer=scorer)
    out = tmp_path / "report"
    for name in ("report.json", "report.md", "side_by_side.mp4", "side_by_side.webp", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert list(saved["runs"]) == ["original", "protected", "protected+jpeg30", "protected+noise0.1"]
    assert saved["runs"]["original"]["verdict"] == "reference"
    assert saved["fidelity"]["linf_255"] <= 8 and saved["fidelity"]["ciede2000"] > 0
    assert saved["worst_case"] in saved["runs"]
    assert "dino" in saved["skipped_metrics"] and "qalign" in saved["skipped_metrics"]
    assert report["runs"]["protected"]["scores"]["psnr_to_clean_video"] < 200
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height >= 4 * 96  # one row per video
    assert "| protected+jpeg30 |" in (out / "report.md").read_text()


def test_verdicts_follow_the_stated_rules():
    clean = {"ism": 0.97, "fdfr": 0.0, "frozen": 0.0}
    assert verdict({"ism": 0.80, "fdfr": 0.0, "frozen": 0.0}, clean) == "protected"
    assert verdict({"ism": 0.95, "fdfr": 0.0, "frozen": 0.0}, clean) == "not protected"
    assert verdict({"ism": 0.95, "fdfr": 0.75, "frozen": 0.0}, clean) == "protected"
    assert verdict({"ism": 0.50, "fdfr": 0.0, "frozen": 1.0}, clean) == "frozen"
    no_face = {"ism": 0.0, "fdfr": 1.0, "frozen": 0.0}
    assert verdict(no_face, no_face) == "unknown"
    assert verdict({**no_face, "dino": 0.5}, {**no_face, "dino": 0.8}) == "protected"


def test_evaluation_tabulates_resumes_and_anti_i2v_beats_random_noise(tmp_path, photos, tiny_model, scorer, monkeypatch):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,prompt\nastronaut.png,a person talking to the camera\n")
    samples = read_dataset(photos, prompts)
    assert [s.prompt for s in samples][0] == "a person talking to the camera"
    methods = parse_methods("anti-i2v,random")
    table = evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=8 / 255, steps=12,
                     generation_steps=2, purifiers=["jpeg75"], scorer=scorer)
    root = tmp_path / "eval" / "tiny-cogvideox"
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (1 + 2 * 2)  # per photo: clean + (method, method+jpeg75) x 2
    assert set(table) == {"clean", "anti-i2v", "anti-i2v+jpeg75", "random", "random+jpeg75"}
    assert (root / "table.md").read_text().count("\n| ") == 1 + 5  # header and one row per method
    for name in ("anti-i2v", "random"):
        assert table[name]["linf_255"]["worst"] <= 8
    # the optimised perturbation changes the generated video more than random noise of the same budget
    assert table["anti-i2v"]["psnr_to_clean_video"]["mean"] < table["random"]["psnr_to_clean_video"]["mean"] - 5

    calls = []
    monkeypatch.setattr(anti_i2v.evaluation.evaluate, "protect", lambda *a, **k: calls.append(k))
    again = evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=8 / 255, steps=12,
                     generation_steps=2, purifiers=["jpeg75"], scorer=scorer)
    assert calls == [] and again == table
    assert len((root / "results.jsonl").read_text().splitlines()) == len(rows)
    with pytest.raises(ConfigError, match="other settings \\(eps\\)"):
        evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=4 / 255, steps=12, generation_steps=2,
                 scorer=scorer)


def test_evaluation_keeps_the_text_encoder_and_survives_bad_photos(tmp_path, photos, tiny_model, scorer, monkeypatch):
    """On a GPU `protect` frees the text encoder; evaluate needs it for every photo's prompt."""
    seen = []
    real_protect = anti_i2v.evaluation.evaluate.protect
    monkeypatch.setattr(anti_i2v.evaluation.evaluate, "protect",
                        lambda *a, **k: seen.append(k) or real_protect(*a, **k))
    dataset = tmp_path / "ds"
    dataset.mkdir()
    for photo in photos.iterdir():
        (dataset / photo.name).write_bytes(photo.read_bytes())
    (dataset / "broken.png").write_text("not a photo")
    Image.open(photos / "astronaut.png").save(dataset / "astronaut.jpg")  # same stem, other file
    table = evaluate(read_dataset(dataset), tiny_model, parse_methods("advdm"), tmp_path / "eval", eps=8 / 255,
                     steps=2, generation_steps=2, scorer=scorer)
    assert seen and all(k["release_text_encoder"] is False and k["checkpoint_every"] for k in seen)
    assert table["advdm"]["photos"] == 3  # broken.png skipped, the two astronaut files kept apart
    outputs = sorted(p.name for p in (tmp_path / "eval" / "tiny-cogvideox" / "protected" / "advdm").glob("*.png"))
    assert outputs == ["astronaut-png_protected.png", "astronaut_protected.png", "mirrored_protected.png"]


def test_summary_worst_case_is_the_weakest_photo():
    rows = [
        {"method": "m", "scores": {"ism": 0.2, "fdfr": 0.9}, "verdict": "protected", "fidelity": None},
        {"method": "m", "scores": {"ism": 0.6, "fdfr": 0.1}, "verdict": "not protected", "fidelity": None},
    ]
    summary = summarise(rows)["m"]
    assert summary["ism"] == {"mean": pytest.approx(0.4), "worst": 0.6}
    assert summary["fdfr"]["worst"] == 0.1 and summary["protected_share"] == 0.5
