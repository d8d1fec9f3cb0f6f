"""Protection strength on a committed trained testbed: the quick form of `benchmarks/strength.py`.

The testbed (`benchmarks/testbed/cogvideox-i2v`) learned image-conditioned camera motion,
so these assertions can fail: a protection that does not move the generated video, or
that is weaker than the AdvDM baseline at the same budget and steps, fails them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import strength  # noqa: E402

STEPS = 20


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    work = tmp_path_factory.mktemp("strength")
    document = strength.main([
        "--testbeds", "cogvideox", "--methods", "anti-i2v,advdm,random", "--photos", "astronaut",
        "--prompts", "zoom in", "--steps", str(STEPS), "--battery", "jpeg75", "--work", str(work),
        "--out", str(work / "strength.json"), "--md", str(work / "strength.md"),
    ])
    assert (work / "strength.md").read_text().startswith("# Protection strength")
    return document["summary"]["cogvideox"]


@pytest.mark.slow
def test_default_beats_random_noise_by_a_wide_margin(summary):
    assert summary[f"anti-i2v@{STEPS}"]["x_random"] >= 10


@pytest.mark.slow
def test_default_is_at_least_as_strong_as_advdm_at_the_same_budget_and_steps(summary):
    default, advdm = summary[f"anti-i2v@{STEPS}"], summary[f"advdm@{STEPS}"]
    assert default["mad"] >= advdm["mad"]
    # As visible, within a fraction of a dB (both push most pixels to the budget's edge);
    # docs/results/strength.md reports the exact figures on every testbed.
    assert default["photo_psnr"] >= advdm["photo_psnr"] - 0.5
    assert default["kept"]["jpeg75"] >= 0.8


@pytest.mark.slow
def test_the_default_protects_a_trained_model_whose_encoder_draws_no_noise(tmp_path):
    """On the Wan testbed the photo is encoded with the posterior mode, so the default's objective is
    flat at the photo: `balanced` must still move the video far more than noise of the same budget."""
    document = strength.main([
        "--testbeds", "wan", "--methods", "anti-i2v,random", "--photos", "astronaut", "--prompts", "pan left",
        "--steps", "5", "--battery", "", "--work", str(tmp_path), "--out", "", "--md", "",
    ])
    assert document["summary"]["wan"]["anti-i2v@5"]["x_random"] >= 10


def test_each_testbed_runs_only_the_requested_prompts_it_was_trained_on():
    svd, cogvideox = strength.TESTBEDS["svd"], strength.TESTBEDS["cogvideox"]
    assert strength.testbed_prompts(cogvideox, "pan left,zoom in") == ("pan left", "zoom in")
    assert strength.testbed_prompts(svd, "pan left,zoom in") == ("zoom in",)
    assert strength.testbed_prompts(svd, "all") == svd.prompts
    with pytest.raises(SystemExit, match="trained on none"):
        strength.testbed_prompts(svd, "pan left")


def test_a_cached_run_is_reused_only_with_the_same_settings():
    saved = {"method": "anti-i2v", "steps": 60}
    assert strength.same_settings(saved, {"method": "anti-i2v", "steps": 60})
    assert not strength.same_settings(saved, {"method": "anti-i2v", "steps": 200})
    # A setting added since the run counts as the same only at its default.
    assert strength.same_settings(saved, {"method": "anti-i2v", "steps": 60, "early_stop": 0})
    assert not strength.same_settings(saved, {"method": "anti-i2v", "steps": 60, "early_stop": 10})
    assert not strength.same_settings({**saved, "removed": 1}, {"method": "anti-i2v", "steps": 60})


def test_steps_curves_share_each_methods_last_point_and_advdm_at_60():
    import steps

    runs = [{"testbed": "t", "method": m, "steps": s, "mad": mad, "seconds": s / 10, **extra}
            for m, s, mad, extra in (("advdm", 60, 0.02, {}), ("anti-i2v", 20, 0.03, {}), ("anti-i2v", 200, 0.04, {}),
                                     ("anti-i2v:early_stop=10", 200, 0.038, {"steps_done": 50}))]
    table = steps.curves(runs, ["anti-i2v", "advdm", "anti-i2v:early_stop=10"])["t"]
    assert table["anti-i2v"][20]["share_of_most_steps"] == pytest.approx(0.75)
    assert table["anti-i2v"][20]["x_advdm_60"] == pytest.approx(1.5)
    assert table["anti-i2v:early_stop=10"][200]["steps_done"] == 50
    assert table["anti-i2v:early_stop=10"][200]["share_of_most_steps"] == pytest.approx(0.95)  # of plain anti-i2v
    assert "200 (50)" in steps.markdown({"t": table}, "python benchmarks/steps.py")


def test_rows_of_a_previous_result_fill_in_only_the_groups_not_rerun(tmp_path):
    import json

    def run(method, photo, mad):
        return {"testbed": "svd", "method": method, "steps": 60, "photo": photo, "mad": mad}

    settings = {"eps_255": 8.0, "seed": 0, "photos": ["a", "b"], "generation": {"svd": {"steps": 8}}}
    previous = tmp_path / "strength.json"
    previous.write_text(json.dumps({"settings": settings, "runs": [
        run("anti-i2v", "a", 1.0), run("advdm", "a", 0.5), run("advdm", "b", 0.7)]}))
    records, reused = strength.with_previous_rows([run("anti-i2v", "a", 2.0)], previous, settings)
    assert [r["mad"] for r in records] == [2.0, 0.5, 0.7] and reused == ["svd: advdm@60"]
    with pytest.raises(SystemExit, match="seed differ"):
        strength.with_previous_rows([], previous, {**settings, "seed": 1})
    # a testbed family added since brings its own generation settings; those of the others must match
    grown = {**settings, "generation": {"svd": {"steps": 8}, "wan": {"steps": 30}}}
    assert len(strength.with_previous_rows([], previous, grown)[0]) == 3
    with pytest.raises(SystemExit, match="generation differ"):
        strength.with_previous_rows([], previous, {**grown, "generation": {"svd": {"steps": 9}}})
    bare = tmp_path / "bare.json"  # a file that records no generation settings cannot be compared
    bare.write_text(json.dumps({"settings": {k: v for k, v in settings.items() if k != "generation"}, "runs": []}))
    with pytest.raises(SystemExit, match="generation differ"):
        strength.with_previous_rows([], bare, grown)


def test_the_49_frame_testbed_has_the_latent_frames_of_cogvideox_5b():
    from anti_i2v.models.registry import load_model

    testbed = strength.TESTBEDS["cogvideox-49f"]
    model = load_model(testbed.family, str(testbed.folder), device="cpu")
    # 13 latent frames as CogVideoX-5B-I2V's 49, so half the frames optimises 6 of them (21 frames)
    assert (model.num_frames, model.latent_frames, model.frame_count_for(0.5)) == (49, 13, 21)
    assert testbed.prompts == strength.TESTBEDS["cogvideox"].prompts


@pytest.mark.slow
def test_a_portrait_protected_at_the_size_wan_runs_it_moves_the_video_more_than_one_stretched(tmp_path):
    """Wan runs a 3:4 portrait at its own aspect ratio (128x96 on the testbed): the protection optimised
    there must move that video well beyond one optimised on the photo stretched to 96x128."""
    import photo_size

    document = photo_size.main(["--photos", "astronaut", "--prompts", "pan left", "--attackers", "area",
                                "--work", str(tmp_path), "--out", "", "--md", ""])
    summary = document["summary"]
    area, stretched = (summary[f"protected {p} / attacked area"]["mad"] for p in ("area", "fixed"))
    assert area >= 1.3 * stretched and area >= 10 * summary["protected noise / attacked area"]["mad"]
