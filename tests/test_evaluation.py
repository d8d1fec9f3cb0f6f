"""`verify` and `evaluate` on tiny-cogvideox: the reports hold what they claim, the
measurements move the right way, and an interrupted evaluation resumes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import anti_i2v
from anti_i2v.errors import ConfigError
from anti_i2v.evaluation.evaluate import (
    _check_same_methods,
    evaluate,
    method_settings,
    noise_reference,
    read_dataset,
    summarise,
    with_noise_reference,
)
from anti_i2v.evaluation.generate import GenerationSettings
from anti_i2v.evaluation.scoring import (
    NOISE_PROTECTED_DB,
    NOISE_WEAK_DB,
    VERDICT_RULES,
    VideoScorer,
    needs_noise_reference,
    noise_verdict,
    verdict,
)
from anti_i2v.evaluation.verify import NOISE, PURIFIED_NOTE, same_budget_noise, verify, weakest_run
from anti_i2v.methods import METHODS, get_method, parse_methods
from anti_i2v.photo import load_photo

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


def test_what_one_photo_cannot_give_is_not_skipped_for_the_next(portrait):
    scorer = VideoScorer(dino=None, qalign=None)  # its own: this test changes what it skips
    assert set(scorer.unavailable) >= {"dino", "qalign"} and scorer.skipped == scorer.unavailable
    face = portrait[0]
    video = face.unsqueeze(0).repeat(2, 1, 1, 1)
    scorer.prepare(torch.zeros_like(face), video)  # no face in it
    assert "ism" in scorer.skipped
    scorer.skipped["motion"] = "what scoring this photo's videos could not measure"
    scorer.prepare(face, video)
    assert scorer.skipped == scorer.unavailable and "ism" not in scorer.unavailable


def test_verify_writes_every_part_of_the_report(tmp_path, photos, tiny_model, scorer):
    protected = anti_i2v.protect(photos / "astronaut.png", tiny_model, out=tmp_path / "p", steps=3,
                                 prompt=SETTINGS.prompt).path
    report = verify(photos / "astronaut.png", protected, tiny_model, tmp_path / "report", SETTINGS,
                    purifiers=["jpeg30", "noise0.1"], scorer=scorer)
    out = tmp_path / "report"
    for name in ("report.json", "report.md", "side_by_side.mp4", "side_by_side.webp", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert list(saved["runs"]) == ["original", "protected", NOISE, "protected+jpeg30", "protected+noise0.1"]
    assert saved["runs"]["original"]["verdict"] == "reference"
    assert saved["fidelity"]["linf_255"] <= 8 and saved["fidelity"]["ciede2000"] > 0
    assert 0 < saved["fidelity"]["flip"] < 1
    assert saved["noise_reference"]["linf_255"] == saved["fidelity"]["linf_255"]
    assert saved["worst_case"] not in ("original", NOISE)
    assert saved["worst_case"] in saved["runs"]
    assert "dino" in saved["skipped_metrics"] and "qalign" in saved["skipped_metrics"]
    assert report["runs"]["protected"]["scores"]["psnr_to_clean_video"] < 200
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height >= 5 * 96  # one row per video
    markdown = (out / "report.md").read_text()
    assert "| protected+jpeg30 |" in markdown and f"| {NOISE} |" in markdown
    assert "| FLIP |" in markdown and f"{NOISE_PROTECTED_DB:g} dB below the noise video's" in markdown
    assert PURIFIED_NOTE in markdown  # no face, no DINO: purified rows are measured against purified noise
    assert set(saved["noise_reference"]["purified_scores"]) == {"jpeg30", "noise0.1"}


def test_purified_copies_of_an_unprotected_photo_are_not_called_protected(tmp_path, photos, tiny_model, scorer):
    """Compared with the unpurified noise video, the purifier's own change of the photo read as protection."""
    copy = tmp_path / "copy.png"
    copy.write_bytes((photos / "astronaut.png").read_bytes())
    purifiers = ["jpeg30", "noise0.1", "blur", "resize0.5"]
    report = verify(photos / "astronaut.png", copy, tiny_model, tmp_path / "report", SETTINGS, purifiers=purifiers,
                    scorer=scorer)
    verdicts = {name: report["runs"][f"protected+{name}"]["verdict"] for name in purifiers}
    assert "protected" not in verdicts.values(), verdicts


def _checkerboard(photo: np.ndarray, step: int, square: int = 16) -> np.ndarray:
    """``photo`` (H, W, 3 uint8) plus +-step/255 in squares of ``square`` pixels: a clearly visible change."""
    rows, cols = np.indices(photo.shape[:2])
    sign = ((rows // square + cols // square) % 2 * 2 - 1)[..., None]
    return np.clip(photo.astype(int) + step * sign, 0, 255).astype(np.uint8)


def test_verify_judges_against_noise_of_the_same_budget(tmp_path, photos, tiny_model, scorer):
    """Without faces or DINO, the verdict compares with the video of the same-budget noise."""
    original = photos / "astronaut.png"
    clean = np.array(Image.open(original))
    Image.fromarray(_checkerboard(clean, 8)).save(tmp_path / "checker.png")
    report = verify(original, tmp_path / "checker.png", tiny_model, tmp_path / "report", SETTINGS,
                    purifiers=["jpeg75"], scorer=scorer)
    runs = report["runs"]
    assert needs_noise_reference(runs["original"]["scores"])  # no face in the tiny model's videos, no DINO
    # the noise photo has the checkerboard's budget, and its video moves less than the checkerboard's
    assert report["noise_reference"]["linf_255"] == pytest.approx(8.0)
    assert report["noise_reference"]["fidelity"]["linf_255"] == pytest.approx(8.0)
    assert report["noise_reference"]["fidelity"]["flip"] < report["fidelity"]["flip"]  # noise is less visible
    assert runs[NOISE]["scores"]["psnr_to_clean_video"] < 100
    assert runs["protected"]["verdict"] == "protected"
    assert runs["protected+jpeg75"]["verdict"] == "protected"
    assert runs[NOISE]["verdict"] == "not protected"
    # no face: the worst case is the attacked video closest to the clean one, not the first of equal ISMs
    attacked = {name: run["scores"]["psnr_to_clean_video"] for name, run in runs.items() if name.startswith("protected")}
    assert report["worst_case"] == max(attacked, key=attacked.get)
    clean_scores, noise_scores = runs["original"]["scores"], runs[NOISE]["scores"]
    assert verdict(clean_scores, clean_scores, noise=noise_scores) == "not protected"

    # a "protected" file that is the original itself: zero budget, so the noise video is the clean video
    Image.fromarray(clean).save(tmp_path / "same.png")
    same = verify(original, tmp_path / "same.png", tiny_model, tmp_path / "same", SETTINGS, purifiers=[],
                  scorer=scorer)
    assert same["noise_reference"]["linf"] == 0.0
    assert same["runs"][NOISE]["scores"]["psnr_to_clean_video"] == 100.0
    assert same["runs"]["protected"]["verdict"] == "not protected"


def test_same_budget_noise_is_seeded_and_within_budget(photos, tmp_path):
    photo = load_photo(photos / "astronaut.png")
    noisy = same_budget_noise(photo, 8 / 255, seed=3)
    assert noisy.shape == photo.rgb.shape and noisy.dtype == torch.float32
    assert torch.equal(noisy, same_budget_noise(photo, 8 / 255, seed=3))
    assert not torch.equal(noisy, same_budget_noise(photo, 8 / 255, seed=4))
    change = (noisy - photo.rgb).abs()
    assert float(change.max()) * 255 == pytest.approx(8.0, abs=1e-3)  # the whole budget is used
    assert float(change.mean()) * 255 == pytest.approx(4.0, abs=0.3)  # uniform: mean |noise| = eps / 2
    assert torch.allclose(noisy * 255, (noisy * 255).round(), atol=1e-4)  # an 8-bit photo stays 8-bit
    Image.open(photos / "astronaut.png").convert("L").save(tmp_path / "gray.png")
    gray = same_budget_noise(load_photo(tmp_path / "gray.png"), 8 / 255, seed=3)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # gray stays gray


def test_verdicts_follow_the_stated_rules():
    clean = {"ism": 0.97, "fdfr": 0.0, "frozen": 0.0}
    assert verdict({"ism": 0.80, "fdfr": 0.0, "frozen": 0.0}, clean) == "protected"
    assert verdict({"ism": 0.95, "fdfr": 0.0, "frozen": 0.0}, clean) == "not protected"
    assert verdict({"ism": 0.95, "fdfr": 0.75, "frozen": 0.0}, clean) == "protected"
    assert verdict({"ism": 0.50, "fdfr": 0.0, "frozen": 1.0}, clean) == "frozen"
    no_face = {"ism": 0.0, "fdfr": 1.0, "frozen": 0.0}
    assert verdict(no_face, no_face) == "unknown"
    assert verdict({**no_face, "dino": 0.5}, {**no_face, "dino": 0.8}) == "protected"


def test_noise_referenced_verdicts_follow_the_stated_rules():
    assert (NOISE_WEAK_DB, NOISE_PROTECTED_DB) == (3.0, 6.0)
    assert f"at least {NOISE_PROTECTED_DB:g} dB below" in VERDICT_RULES and "weak" in VERDICT_RULES
    clean = {"fdfr": 1.0, "ism": 0.0, "frozen": 0.0, "psnr_to_clean_video": 100.0}
    noise = {"fdfr": 1.0, "ism": 0.0, "frozen": 0.0, "psnr_to_clean_video": 50.0}

    def row(psnr: float, **extra: float) -> dict[str, float]:
        return {"fdfr": 1.0, "ism": 0.0, "frozen": 0.0, "psnr_to_clean_video": psnr, **extra}

    assert needs_noise_reference(clean)
    assert verdict(row(44.0), clean, noise=noise) == "protected"  # exactly 6 dB below
    assert verdict(row(30.0), clean, noise=noise) == "protected"
    assert verdict(row(44.01), clean, noise=noise) == "weak"
    assert verdict(row(47.0), clean, noise=noise) == "weak"  # exactly 3 dB below
    assert verdict(row(47.01), clean, noise=noise) == "not protected"
    assert verdict(row(55.0), clean, noise=noise) == "not protected"  # closer to the clean video than noise
    assert verdict(noise, clean, noise=noise) == "not protected"  # the reference itself
    assert verdict(clean, clean, noise=noise) == "not protected"  # the clean photo
    assert verdict(row(30.0), clean) == "unknown"  # no reference given
    assert noise_verdict({"frozen": 0.0}, noise) == "unknown"  # a video of another shape has no PSNR
    # frozen, the face rule and DINO come first wherever they apply
    assert verdict(row(30.0, frozen=1.0), clean, noise=noise) == "frozen"
    face = {"ism": 0.97, "fdfr": 0.0, "frozen": 0.0, "psnr_to_clean_video": 100.0}
    assert not needs_noise_reference(face)
    assert verdict({**face, "psnr_to_clean_video": 30.0}, face, noise=noise) == "not protected"
    assert verdict({**face, "ism": 0.8, "psnr_to_clean_video": 60.0}, face, noise=noise) == "protected"
    dino = {**clean, "dino": 0.8}
    assert not needs_noise_reference(dino)
    assert verdict(row(30.0, dino=0.79), dino, noise=noise) == "not protected"
    assert verdict(row(60.0, dino=0.5), dino, noise=noise) == "protected"


def test_worst_case_passes_over_ism_when_the_clean_video_shows_no_face():
    rows = {"protected": {"ism": 0.0, "fdfr": 1.0, "psnr_to_clean_video": 40.0},
            "protected+jpeg75": {"ism": 0.0, "fdfr": 1.0, "psnr_to_clean_video": 45.0}}
    assert weakest_run(rows, {"ism": 0.0, "fdfr": 1.0}) == "protected+jpeg75"  # closest to the clean video
    faces = {"protected": {"ism": 0.9, "fdfr": 0.0, "psnr_to_clean_video": 40.0},
             "protected+jpeg75": {"ism": 0.7, "fdfr": 0.0, "psnr_to_clean_video": 45.0}}
    assert weakest_run(faces, {"ism": 0.97, "fdfr": 0.0}) == "protected"  # the identity kept best


def test_evaluation_takes_the_matching_random_row_as_reference():
    rows = [
        {"image": "a.png", "method": "random", "purify": None, "scores": {"psnr_to_clean_video": 50.0}},
        {"image": "a.png", "method": "random", "purify": "jpeg75", "scores": {"psnr_to_clean_video": 45.0}},
        {"image": "b.png", "method": "random", "purify": None, "scores": {"psnr_to_clean_video": 60.0}},
        {"image": "a.png", "method": "advdm", "purify": None, "scores": {"psnr_to_clean_video": 30.0}},
    ]
    assert noise_reference(rows, "a.png", "jpeg75")["psnr_to_clean_video"] == 45.0
    assert noise_reference(rows, "a.png", None)["psnr_to_clean_video"] == 50.0
    assert noise_reference(rows, "a.png", "cleaner")["psnr_to_clean_video"] == 50.0  # unpurified fallback
    assert noise_reference(rows, "b.png", "jpeg75")["psnr_to_clean_video"] == 60.0
    assert noise_reference(rows, "c.png", None) is None
    methods = parse_methods("advdm,random,photoguard")
    assert [m.name for m in with_noise_reference(methods, needed=False)] == ["random", "advdm", "photoguard"]
    assert [m.name for m in with_noise_reference(parse_methods("advdm"), needed=True)] == ["random", "advdm"]
    assert [m.name for m in with_noise_reference(parse_methods("advdm"), needed=False)] == ["advdm"]


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
    # ... and the verdicts, measured against the random rows of the same photo and purification, say so
    verdicts = {(r["image"], r["method"], r["purify"]): r["verdict"] for r in rows}
    for image in ("astronaut.png", "mirrored.jpg"):
        assert verdicts[(image, "random", None)] == verdicts[(image, "random", "jpeg75")] == "not protected"
        assert verdicts[(image, "anti-i2v", None)] == "protected"
    assert table["random"]["protected_share"] == 0.0 and table["anti-i2v"]["protected_share"] == 1.0
    assert "| weak |" in (root / "table.md").read_text()

    calls = []
    monkeypatch.setattr(anti_i2v.evaluation.evaluate, "protect", lambda *a, **k: calls.append(k))
    again = evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=8 / 255, steps=12,
                     generation_steps=2, purifiers=["jpeg75"], scorer=scorer)
    assert calls == [] and again == table
    assert len((root / "results.jsonl").read_text().splitlines()) == len(rows)
    with pytest.raises(ConfigError, match="other settings \\(eps\\)"):
        evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=4 / 255, steps=12, generation_steps=2,
                 scorer=scorer)
    # a version of the tool whose default resolves differently does not reuse these rows
    changed = dataclasses.replace(METHODS["anti-i2v"], overrides={**METHODS["anti-i2v"].overrides, "sampler_noise_pool": 8})
    monkeypatch.setitem(METHODS, "anti-i2v", changed)
    with pytest.raises(ConfigError, match="results of 'anti-i2v' made with other settings of it \\(sampler_noise_pool\\)"):
        evaluate(samples, tiny_model, methods, tmp_path / "eval", eps=8 / 255, steps=12, generation_steps=2,
                 purifiers=["jpeg75"], scorer=scorer)
    assert calls == []


def test_method_settings_are_recorded_and_new_methods_may_join(tmp_path):
    record = tmp_path / "methods.json"
    advdm, default = (method_settings(m, ["cogvideox"], 8 / 255, 20, 0) for m in parse_methods("advdm,anti-i2v"))
    assert advdm["method"] == "advdm" and advdm["eps"] == 8 / 255 and "prompt" not in advdm
    assert method_settings(get_method("anti-i2v"), ["svd"], 8 / 255, 20, 0)["weight_dm"] != default["weight_dm"]
    _check_same_methods(record, {"advdm": advdm})
    _check_same_methods(record, {"advdm": advdm, "anti-i2v": default})  # a new method joins the folder
    assert set(json.loads(record.read_text())) == {"advdm", "anti-i2v"}
    with pytest.raises(ConfigError, match="'advdm' made with other settings of it \\(steps\\)"):
        _check_same_methods(record, {"advdm": {**advdm, "steps": 60}})
    record.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        _check_same_methods(record, {"advdm": advdm})


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
    # no face in the tiny model's videos and no DINO: random runs as the verdicts' reference
    assert table["random"]["photos"] == 3 and table["random"]["protected_share"] == 0.0
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


def test_evaluation_protects_again_an_output_its_model_now_runs_at_another_size(tmp_path, photos, scorer, monkeypatch):
    """Outputs recorded at another input size (Wan ones from before it sized each photo) are not reused."""
    from anti_i2v.models.wan import WanI2V

    model = WanI2V.tiny()
    samples = [s for s in read_dataset(photos, None) if s.path.name == "astronaut.png"]
    methods = parse_methods("anti-i2v")

    def run():
        return evaluate(samples, model, methods, tmp_path / "eval", eps=8 / 255, steps=1, generation_steps=1,
                        scorer=scorer)

    run()
    root = tmp_path / "eval" / model.name
    sidecar = next((root / "protected" / "anti-i2v").glob("*.json"))
    record = json.loads(sidecar.read_text())
    assert record["model"]["resolution"] == list(model.resolution_for(*record["input_size"]))
    (root / "results.jsonl").unlink()  # the rows go: the protected output would be reused as it is
    calls = []
    real = anti_i2v.evaluation.evaluate.protect
    monkeypatch.setattr(anti_i2v.evaluation.evaluate, "protect", lambda *a, **k: calls.append(1) or real(*a, **k))
    run()
    assert calls == []  # same size: reused
    (root / "results.jsonl").unlink()
    sidecar.write_text(json.dumps({**record, "model": {**record["model"], "resolution": [16, 16]}}))
    run()
    assert len(calls) == 1  # made at another size: protected again
