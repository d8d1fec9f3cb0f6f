"""The `anti-i2v` command line end to end, and every bad input it must survive."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anti_i2v.batch import is_done
from anti_i2v.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.replace("│", " ").split())  # rich wraps and boxes long lines
    return result


@pytest.fixture()
def photos(tmp_path, portrait):
    folder = tmp_path / "photos"
    folder.mkdir()
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((128, 128)).save(folder / "alice.jpg")
    Image.fromarray(array[::-1]).resize((100, 140)).save(folder / "bob.png")
    (folder / "notes.jpg").write_text("not a photo")
    Image.fromarray(array).resize((20, 20)).save(folder / "thumb.png")
    return folder


def test_protects_the_bundled_photo_and_prints_where_and_the_budget(tmp_path):
    result = run("protect", "--sample", "--model", "tiny-cogvideox", "--steps", "3", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    saved = tmp_path / "sample_protected.png"
    assert saved.is_file() and (tmp_path / "sample_protected.json").is_file()
    assert f"saved {saved}" in result.text
    assert "within eps 8/255" in result.text and "PSNR" in result.text
    assert "protects against nothing" in result.text


def test_folder_batch_keeps_going_past_bad_photos_and_a_rerun_skips_finished_ones(tmp_path, photos):
    out = tmp_path / "out"
    args = ("protect", photos, tmp_path / "missing.jpg", "--model", "tiny-cogvideox", "--steps", "2", "--out", out)
    first = run(*args)
    assert first.exit_code == 1
    assert (out / "alice_protected.png").is_file() and (out / "bob_protected.png").is_file()
    assert "failed" in first.text and "notes.jpg" in first.text and "thumb.png" in first.text
    assert "missing.jpg" in first.text
    assert "2 protected, 0 skipped, 3 failed" in first.text
    before = (out / "alice_protected.png").stat().st_mtime_ns
    second = run(*args)
    assert "0 protected, 2 skipped, 3 failed" in second.text
    assert (out / "alice_protected.png").stat().st_mtime_ns == before
    other = run(*args, "--eps", "4/255")  # other settings: protected again, not skipped
    assert "2 protected, 0 skipped, 3 failed" in other.text
    assert json.loads((out / "alice_protected.json").read_text())["config"]["eps_255"] == pytest.approx(4)


def test_a_batch_never_replaces_a_file_it_did_not_make_from_that_photo(tmp_path, photos):
    """A user's file, or another folder's photo of the same name, at a photo's output name fails that
    photo with a clear line and stays as it was; --overwrite replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "alice_protected.png"
    mine.write_bytes(b"my own file")
    first = run("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "1", "--out", out)
    assert first.exit_code == 1 and "exists and was not made from" in first.text and "--overwrite" in first.text
    assert mine.read_bytes() == b"my own file"
    other = tmp_path / "other"
    other.mkdir()
    (other / "bob.png").write_bytes((photos / "alice.jpg").read_bytes())  # another photo, the same name as bob's
    assert run("protect", photos / "bob.png", "--model", "tiny-cogvideox", "--steps", "1", "--out", out).exit_code == 0
    made = (out / "bob_protected.png").read_bytes()
    clash = run("protect", other / "bob.png", "--model", "tiny-cogvideox", "--steps", "1", "--out", out)
    assert clash.exit_code == 1 and "exists and was not made from" in clash.text
    assert (out / "bob_protected.png").read_bytes() == made
    forced = run("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "1", "--out", out,
                 "--overwrite")
    assert forced.exit_code == 0 and mine.read_bytes() != b"my own file"


def test_a_rerun_against_other_models_protects_again(tmp_path, photos):
    """A photo protected against one model is not done for another: the rerun protects it again."""
    out = tmp_path / "out"
    args = ("protect", photos / "alice.jpg", "--steps", "1", "--out", out)
    assert run(*args, "--model", "tiny-cogvideox").exit_code == 0
    assert "0 protected, 1 skipped" in run(*args, "--model", "tiny-cogvideox").text
    again = run(*args, "--model", "tiny-dynamicrafter")
    assert "1 protected, 0 skipped" in again.text, again.output
    assert json.loads((out / "alice_protected.json").read_text())["model"]["name"] == "tiny-dynamicrafter"


def test_a_rerun_in_another_format_is_not_taken_for_done(tmp_path, photos):
    """A photo protected as PNG is not done as JPEG; the JPEG would replace the PNG's record, so that photo
    fails with one line and both the PNG and its record stay."""
    out = tmp_path / "out"
    args = ("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "1", "--out", out)
    first = run(*args)
    assert first.exit_code == 0, first.output
    record = (out / "alice_protected.json").read_bytes()
    again = run(*args, "--format", "jpg")
    assert "0 protected, 0 skipped, 1 failed" in again.text and "is the record of" in again.text, again.output
    assert (out / "alice_protected.json").read_bytes() == record and not (out / "alice_protected.jpg").exists()
    (out / "alice_protected.jpg").write_bytes((out / "alice_protected.png").read_bytes())  # as older runs left
    assert is_done(photos / "alice.jpg", out / "alice_protected.png")
    assert not is_done(photos / "alice.jpg", out / "alice_protected.jpg")  # the record is the PNG's
    record = json.loads((out / "alice_protected.json").read_text())
    (out / "alice_protected.json").write_text(json.dumps({**record, "output": str(out / "alice_protected.jpg")}))
    for extra in ((), ("--overwrite",)):  # the JPEG's record now: --overwrite would not save the PNG either
        refused = run(*args, *extra)
        assert "1 failed" in refused.text and "is the record of" in refused.text, refused.output


def test_a_finished_photo_whose_record_shows_no_perturbation_is_protected_again(tmp_path, photos):
    """The default once left Wan and HunyuanVideo photos unchanged: a rerun does not take such a photo for done."""
    out = tmp_path / "out"
    args = ("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "1", "--out", out)
    assert run(*args).exit_code == 0
    sidecar = out / "alice_protected.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "budget": {**record["budget"], "linf": 0.0}}))
    again = run(*args)
    assert "1 protected, 0 skipped" in again.text, again.output


def test_the_package_runs_as_a_module():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "anti_i2v", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "protect" in done.stdout


def test_a_rerun_compares_the_long_video_route_only_where_it_is_known():
    """A batch that knows its model compares the route's steps and frames; a Ray driver, which
    loads no model, compares them only where they were given, so either route's photo is done."""
    from anti_i2v.batch import resume_settings

    plain, long = resume_settings({}), resume_settings({}, long_video=True)
    assert (plain["steps"], plain["frame_share"], plain["full_frame_steps"]) == (5, 1, 0)
    assert (long["steps"], long["frame_share"], long["full_frame_steps"]) == (6, 0.25, 1)
    unknown = resume_settings({}, long_video=None)
    assert "steps" not in unknown and "frame_share" not in unknown and unknown["eps"] == plain["eps"]
    assert resume_settings({"steps": 20}, long_video=None)["steps"] == 20
    assert resume_settings({"preset": "strong"}, long_video=None)["steps"] == 200  # no route: compared
    svd = resume_settings({}, families=["svd"])
    assert (svd["weight_dm"], svd["sampler_guided_steps"]) == (1.0, 0)  # what an SVD photo's record says
    assert "weight_dm" not in resume_settings({}, families=None) and "momentum" in resume_settings({}, families=None)
    assert resume_settings({"weight_dm": 0.5}, families=None)["weight_dm"] == 0.5


def test_a_rerun_skips_a_finished_photo_of_any_family_and_protects_again_when_any_setting_changed(tmp_path, photos):
    """SVD's own settings (the diffusion loss, every sampler step guided) are what its record says, so its
    finished photos are skipped; every setting that changes the photo, not a chosen few, is compared."""
    out = tmp_path / "out"
    args = ("protect", photos / "alice.jpg", "--model", "tiny-svd", "--steps", "1", "--out", out)
    assert run(*args).exit_code == 0
    assert "0 protected, 1 skipped" in run(*args).text
    for changed in (("--momentum", "0.5"), ("--weights", "dm=0.5")):
        again = run(*args, *changed)
        assert "1 protected, 0 skipped" in again.text, (changed, again.output)
    # the precision too: bf16 and fp32 optimise to different photos
    assert "1 protected, 0 skipped" in run(*args, "--dtype", "bf16").text
    assert "0 protected, 1 skipped" in run(*args, "--dtype", "bf16").text
    assert "1 protected, 0 skipped" in run(*args).text  # fp32, the tiny models' own


def test_a_rerun_protects_again_a_photo_its_model_now_runs_at_another_size(tmp_path, photos):
    """Wan sizes each photo by its aspect ratio: an output made when the portrait was stretched to the
    model's full size (as before such sizing, recorded in its sidecar) is not what a rerun would make."""
    out = tmp_path / "out"
    args = ("protect", photos / "bob.png", "--model", "tiny-wan-i2v", "--steps", "1", "--out", out)
    assert run(*args).exit_code == 0
    sidecar = out / "bob_protected.json"
    record = json.loads(sidecar.read_text())
    assert record["model"]["resolution"] == [64, 48]  # the 100x140 portrait, within the 64x64 area
    assert "0 protected, 1 skipped" in run(*args).text
    record["model"]["resolution"] = [64, 64]
    sidecar.write_text(json.dumps(record))
    assert "1 protected, 0 skipped" in run(*args).text


def test_a_long_video_model_gets_the_presets_route_and_the_run_says_so(tmp_path):
    """Against the 49-frame testbed (CogVideoX-5B's 13 latent frames) `balanced` optimises 5 steps on a
    quarter of the frames and 1 on every frame: the run's line and the sidecar say so."""
    from pathlib import Path

    testbed = Path(__file__).resolve().parents[1] / "benchmarks" / "testbed" / "cogvideox-i2v-49f"
    result = run("protect", "--sample", "--model", "cogvideox", "--model-path", testbed, "--device", "cpu",
                 "--dtype", "fp32", "--preset", "balanced", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "6 steps: 5 on 25% of the frames, then 1 on every frame" in " ".join(result.text.split())
    config = json.loads((tmp_path / "sample_protected.json").read_text())["config"]
    assert (config["steps"], config["frame_share"], config["full_frame_steps"]) == (6, 0.25, 1)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--model", "sora-9000"), 3, "unknown model 'sora-9000'"),
        (("--model", "cogvideox"), 3, "no weights for 'cogvideox'"),
        (("--model", "tiny-cogvideox", "--target", "/nonexistent/psi.png"), 2, "psi.png"),
        (("--model", "cogvideox", "--model-path", "/nonexistent/weights"), 3, "does not exist"),
        (("--model", "tiny-cogvideox", "--eps", "eight"), 2, "cannot read eps"),
        (("--model", "tiny-cogvideox", "--eps", "0.002"), 2, "below 1/255"),  # a saved photo could not change
        (("--model", "tiny-cogvideox", "--step-size", "-1"), 2, "step_size is a step length > 0"),
        (("--model", "tiny-cogvideox", "--checkpoint-every", "-1"), 2, "checkpoint_every is a number of steps"),
        (("--model", "tiny-cogvideox", "--preset", "max"), 2, "unknown preset"),
        (("--model", "tiny-cogvideox", "--space", "hsv"), 2, "rgb, lab, dct, dual"),
        (("--model", "tiny-cogvideox", "--weights", "irc=1,lpips=2"), 2, "--weights takes"),
        (("--model", "tiny-cogvideox", "--irc-deep", "last"), 2, "--irc-deep takes"),
    ],
)
def test_bad_options_end_with_one_clear_line(args, code, message):
    result = run("protect", "--sample", *args)
    assert result.exit_code == code, result.output
    assert message in result.text
    assert "Traceback" not in result.output


def test_eps_reads_levels_with_decimals_and_refuses_what_it_cannot_read():
    from anti_i2v.config import parse_eps
    from anti_i2v.errors import ConfigError

    assert parse_eps("3.5/255") == pytest.approx(3.5 / 255) and parse_eps(" 8/255 ") == pytest.approx(8 / 255)
    assert parse_eps("0.031") == pytest.approx(0.031)
    for bad in ("1/2/3", "8/0", "nan", "8/255/"):
        with pytest.raises(ConfigError):
            parse_eps(bad)


def test_unwritable_output_is_reported_and_nothing_is_written(tmp_path, photos):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    result = run("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "1", "--out", blocker)
    assert result.exit_code == 4
    assert "cannot write to output folder" in result.text
    assert blocker.read_text().startswith("a file")


def test_no_photo_given_says_what_to_do():
    result = run("protect", "--model", "tiny-cogvideox")
    assert result.exit_code != 0 and "--sample" in result.text


def test_models_lists_names_hub_ids_and_local_weights():
    result = run("models")
    assert result.exit_code == 0
    assert "tiny-cogvideox" in result.text and "THUDM/CogVideoX-5b-I2V" in result.text
    assert "built in code" in result.text and "no weights here" in result.text


def test_help_states_presets_in_unit_range():
    result = run("protect", "--help")
    flat = " ".join(result.text.replace("│", " ").split())  # the help box wraps lines
    assert "fast: eps 8/255 (0.0314), 3 steps" in flat and "200 steps, or fewer" in flat
    assert "[0,1] pixel units" in result.text


def test_method_options_reach_the_sidecar(tmp_path):
    result = run("protect", "--sample", "--model", "tiny-cogvideox", "--steps", "2", "--out", tmp_path,
                 "--space", "dct", "--dct-block", "0", "--dct-band", "0.1", "--weights", "irc=2,dm=0",
                 "--irc-deep", "-2,-1", "--eps", "4/255", "--seed", "5", "--t-min", "100", "--t-max", "800", "--min-psnr", "33",
                 "--sampler-steps", "1", "--sampler-noise-pool", "2", "--sampler-guided-steps", "-1",
                 "--frame-share", "0.5", "--first-frames")
    assert result.exit_code == 0, result.output
    import json

    config = json.loads((tmp_path / "sample_protected.json").read_text())["config"]
    assert config["space"] == "dct" and config["dct_block"] == 0 and config["dct_band"] == 0.1
    assert config["weight_irc"] == 2 and config["weight_dm"] == 0 and config["weight_aux"] == 0
    assert config["irc_deep"] == [-2, -1] and config["eps_255"] == 4 and config["seed"] == 5
    assert (config["t_min"], config["t_max"]) == (100, 800) and config["min_psnr"] == 33
    assert (config["sampler_steps"], config["sampler_noise_pool"], config["sampler_guided_steps"]) == (1, 2, -1)
    assert (config["frame_share"], config["frame_spread"]) == (0.5, False)


def test_photos_with_the_same_name_each_get_their_own_output(tmp_path, photos):
    other = tmp_path / "other"
    other.mkdir()
    Image.open(photos / "alice.jpg").save(photos / "alice.png")
    Image.open(photos / "bob.png").save(other / "alice.jpg")
    out = tmp_path / "out"
    args = ("protect", photos / "alice.jpg", photos / "alice.png", other / "alice.jpg",
            "--model", "tiny-cogvideox", "--steps", "1", "--out", out)
    first = run(*args)
    assert "3 protected, 0 skipped, 0 failed" in first.text, first.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["alice-jpg_protected.png", "alice-png_protected.png", "alice_protected.png"]
    assert "0 protected, 3 skipped" in run(*args).text
    Image.open(photos / "bob.png").save(photos / "alice.png")  # the photo itself changed
    assert "1 protected, 2 skipped" in run(*args).text


def test_verify_and_evaluate_run_from_the_command_line(tmp_path, photos):
    protected = tmp_path / "p"
    assert run("protect", photos / "alice.jpg", "--model", "tiny-cogvideox", "--steps", "2", "--out", protected).exit_code == 0
    result = run("verify", photos / "alice.jpg", protected / "alice_protected.png", "--model", "tiny-cogvideox",
                 "--steps", "2", "--purify", "jpeg75,social48", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "protected+jpeg75" in result.text and "worst case" in result.text and "random weights" in result.text
    assert "protected+social48" in result.text and "random noise (same" in result.text  # the table may crop the name
    assert (tmp_path / "report" / "report.md").is_file()
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (photos / "alice.jpg").rename(dataset / "alice.jpg")
    result = run("evaluate", dataset, "--model", "tiny-cogvideox", "--methods", "anti-i2v,random", "--steps", "2",
                 "--generation-steps", "2", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "tiny-cogvideox" / "table.md").is_file()


def test_verify_and_evaluate_refuse_bad_input_in_one_line(tmp_path, photos):
    result = run("verify", photos / "alice.jpg", photos / "bob.png", "--model", "tiny-cogvideox", "--steps", "1",
                 "--purify", "none", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "compare a photo with its own protected copy" in result.text
    result = run("verify", photos / "alice.jpg", photos / "alice.jpg", "--model", "tiny-cogvideox", "--purify", "sharpen")
    assert result.exit_code == 2 and "unknown purification" in result.text
    result = run("evaluate", photos, "--model", "tiny-cogvideox", "--methods", "anti-i2v,glaze")
    assert result.exit_code == 2 and "unknown method 'glaze'" in result.text
    assert "Traceback" not in result.output


def test_one_perturbation_against_two_models_from_the_command_line(tmp_path):
    result = run("protect", "--sample", "--model", "tiny-cogvideox,tiny-opensora", "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "tiny-cogvideox 64x96x9, tiny-opensora 64x64x17" in result.text
    assert (tmp_path / "sample_protected.png").is_file()
    weighted = run("protect", "--sample", "--model", "tiny-cogvideox,tiny-opensora", "--model-weights", "2,1",
                   "--steps", "1", "--out", tmp_path / "weighted")
    assert weighted.exit_code == 0, weighted.output
    sidecar = json.loads((tmp_path / "weighted" / "sample_protected.json").read_text())
    assert sidecar["config"]["model_weights"] == [2.0, 1.0]
    mismatch = run("protect", "--sample", "--model", "tiny-cogvideox,tiny-opensora", "--model-weights", "1",
                   "--out", tmp_path / "bad")
    assert mismatch.exit_code == 2 and "1 weights for 2 models" in mismatch.text


def test_verify_reports_on_each_model_of_an_ensemble(tmp_path, photos):
    protected = tmp_path / "p"
    run("protect", photos / "alice.jpg", "--model", "tiny-cogvideox,tiny-opensora", "--steps", "1", "--out", protected)
    result = run("verify", photos / "alice.jpg", protected / "alice_protected.png", "--model",
                 "tiny-cogvideox,tiny-opensora", "--steps", "1", "--purify", "none", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "report" / "summary.md").read_text()
    for name in ("tiny-cogvideox", "tiny-opensora"):
        assert (tmp_path / "report" / name / "report.md").is_file()
        assert f"against {name}" in result.text
        assert f"| {name} | " in summary and f"[{name}/report.md]" in summary


def test_evaluate_builds_the_transfer_table(tmp_path, photos):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (photos / "alice.jpg").rename(dataset / "alice.jpg")
    result = run("evaluate", dataset, "--model", "tiny-cogvideox,tiny-opensora", "--protect-with",
                 "tiny-cogvideox,tiny-opensora,tiny-cogvideox+tiny-opensora", "--methods", "anti-i2v", "--steps", "2",
                 "--generation-steps", "2", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    table = (tmp_path / "eval" / "cross_model.md").read_text()
    assert "| tiny-cogvideox |" in table and "| tiny-opensora |" in table and " - " not in table
    assert "| tiny-cogvideox+tiny-opensora |" in table  # the ensemble is a row of its own
    assert (tmp_path / "eval" / "tiny-opensora" / "from-tiny-cogvideox" / "table.md").is_file()


def test_errors_print_brackets_as_written(tmp_path):
    result = run("protect", tmp_path / "holiday[copy].png", "--model", "tiny-cogvideox", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "holiday[copy].png" in result.text
