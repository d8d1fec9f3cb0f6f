"""The web page's parts without a browser: workspace, pictures, upload checks, jobs and the check step."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from anti_i2v.errors import ConfigError, InputError
from anti_i2v.web.service import ProtectionService, check_upload
from anti_i2v.web.views import amplified_difference, busiest_window, comparison_panel
from anti_i2v.web.workspace import Workspace


def _photo(path, size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_workspace_sweeps_old_jobs_and_is_deleted_on_close(tmp_path):
    with Workspace(keep_seconds=60, parent=tmp_path) as workspace:
        first = workspace.new_job()
        (first / "result.png").write_bytes(b"x")
        second = workspace.new_job()
        assert first != second and workspace.root.parent == tmp_path
        assert workspace.sweep() == []  # both are new
        assert set(workspace.sweep(now=first.stat().st_mtime + 61)) == {first, second}
        assert not first.exists()
    assert not workspace.root.exists()


def test_the_picture_points_at_where_the_photo_changed():
    original = Image.new("RGB", (200, 120), (100, 100, 100))
    changed = np.asarray(original).copy()
    changed[60:90, 150:180] += 4
    protected = Image.fromarray(changed)
    left, top, right, bottom = busiest_window(original, protected)
    assert right - left == bottom - top == 30 and left >= 150 - 30 and top >= 60 - 30 and right <= 180 + 30
    difference = np.asarray(amplified_difference(original, protected, gain=8))
    assert difference[0, 0].tolist() == [128, 128, 128] and difference[70, 160].tolist() == [160, 160, 160]
    panel = comparison_panel(original, protected, width=600)
    assert panel.width == 600 and panel.height > 120


def test_uploads_that_are_empty_or_too_big_are_refused_by_name(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="'empty.png' is empty"):
        check_upload(empty, "empty.png")
    big = _photo(tmp_path / "big.png", size=(400, 300))
    with pytest.raises(InputError, match="400x300.*up to 0.1 MP"):
        check_upload(big, "big.png", max_megapixels=0.1)
    with pytest.raises(InputError, match="up to 0.001 MB"):
        check_upload(big, "big.png", max_upload_mb=0.001)
    text = tmp_path / "notes.png"
    text.write_text("not a photo")
    check_upload(text, "notes.png")  # not refused here: the protection's loader says why, in its words


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Four uploads, two with the same name, one corrupt, one too small: protected in one job."""
    root = tmp_path_factory.mktemp("uploads")
    (root / "a").mkdir()
    (root / "b").mkdir()
    good = [_photo(root / "a" / "me.png", seed=1), _photo(root / "b" / "me.png", seed=2)]
    corrupt = root / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    small = _photo(root / "tiny.png", size=(20, 20))
    empty = root / "empty.png"
    empty.write_bytes(b"")
    workspace = Workspace(keep_seconds=3600, parent=tmp_path_factory.mktemp("work"))
    service = ProtectionService(["tiny-cogvideox"], workspace, check_steps=2, options={"steps": 2})
    steps = []
    result = service.protect_uploads([good[0], corrupt, empty, good[1], small], "tiny-cogvideox", "fast",
                                     progress=lambda i, n, name, step: steps.append((i, n, name, step)))
    yield service, result, good, steps
    workspace.close()


def test_each_good_upload_is_protected_within_budget_and_bad_ones_say_why(job):
    _, result, good, steps = job
    assert [o.status for o in result.outcomes] == ["done", "failed", "failed", "done", "failed"]  # upload order
    assert "broken.jpg" in result.outcomes[1].message and "empty" in result.outcomes[2].message
    assert "64" in result.outcomes[4].message
    assert str(result.folder) not in result.outcomes[1].message  # the visitor's file name, not a server path
    first, second = result.done
    assert (first.name, second.name) == ("me.png", "me.png (2)") and first.output.name != second.output.name
    assert not (result.folder / "originals" / "empty.png").exists()  # refused before taking room
    for outcome, source in zip(result.done, good):
        saved = np.asarray(Image.open(outcome.output), dtype=np.int16)
        original = np.asarray(Image.open(source), dtype=np.int16)
        assert 0 < np.abs(saved - original).max() <= 8 and outcome.budget.linf_255 <= 8
        sidecar = json.loads(outcome.sidecar.read_text())
        assert sidecar["output_sha256"] and sidecar["input"] == outcome.name
        assert str(result.folder) not in outcome.sidecar.read_text()  # no server folder in what is downloaded
        assert outcome.panel.is_file() and "L-inf" in outcome.caption()
    with zipfile.ZipFile(result.archive) as archive:
        assert sorted(archive.namelist()) == sorted(
            [o.output.name for o in result.done] + [o.sidecar.name for o in result.done])
    reported = [s for s in steps if s[3] is not None]
    assert {s[0] for s in reported} == {0, 2} and reported[-1][3].step == reported[-1][3].total == 2


def test_models_are_offered_with_tiny_ones_labelled_and_unknown_ones_refused(job):
    service = job[0]
    assert service.choices() == [(service.label("tiny-cogvideox"), "tiny-cogvideox")]
    assert "protects against nothing" in service.label("tiny-cogvideox")
    with pytest.raises(ConfigError, match="not served here"):
        service.protect_uploads([job[2][0]], "tiny-svd")
    with pytest.raises(InputError, match="no photo uploaded"):
        service.protect_uploads([], "tiny-cogvideox")


def test_the_check_step_gives_a_verdict_sheet_and_video(job):
    service, result, _, _ = job
    checked = service.check(result, result.done[0].name)
    assert checked.verdict in {"protected", "weak", "not protected", "frozen", "unknown"}
    assert checked.contact_sheet.is_file() and checked.video.is_file()
    assert "random weights" in checked.report_markdown
    assert {"protected+jpeg75", "protected+social"} <= set(checked.report["runs"])
    with pytest.raises(InputError, match="not protected in this job"):
        service.check(result, "broken.jpg")


def test_serve_refuses_models_it_cannot_offer_and_leaves_no_folder(tmp_path):
    from typer.testing import CliRunner

    from anti_i2v.cli import app

    runner = CliRunner()
    unknown = runner.invoke(app, ["serve", "--model", "glaze", "--temp-dir", str(tmp_path)])
    assert unknown.exit_code != 0 and "unknown model 'glaze'" in unknown.output
    missing = runner.invoke(app, ["serve", "--model", "cogvideox", "--temp-dir", str(tmp_path)])
    assert missing.exit_code != 0 and "no weights for 'cogvideox'" in missing.output
    assert list(tmp_path.iterdir()) == []  # the temporary folder went with the refusal


def test_a_job_in_use_is_never_swept(tmp_path):
    with Workspace(keep_seconds=60, parent=tmp_path) as workspace:
        folder = workspace.new_job()
        with workspace.in_use(folder):
            assert workspace.sweep(now=folder.stat().st_mtime + 3600) == []
        assert workspace.sweep(now=folder.stat().st_mtime + 61) == [folder]


def test_closing_refuses_new_work_waits_for_the_running_job_then_deletes(tmp_path):
    import threading
    import time

    from anti_i2v.web.workspace import WorkspaceClosed

    workspace = Workspace(keep_seconds=60, parent=tmp_path, drain_seconds=10)
    folder = workspace.new_job()
    with workspace.in_use(folder):
        closer = threading.Thread(target=workspace.close)
        closer.start()
        time.sleep(0.3)
        assert folder.exists()  # the job in use is waited for
        with pytest.raises(WorkspaceClosed):
            workspace.check_open()
    closer.join(5)
    assert not closer.is_alive() and not workspace.root.exists()


def test_an_unexpected_error_on_one_photo_leaves_the_others_protected(tmp_path, monkeypatch):
    import anti_i2v.web.service as service_module

    calls = []

    def flaky(original, protected):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return comparison_panel(original, protected)

    monkeypatch.setattr(service_module, "comparison_panel", flaky)
    photos = [_photo(tmp_path / "one.png", seed=3), _photo(tmp_path / "two.png", seed=4)]
    with Workspace(keep_seconds=3600, parent=tmp_path) as workspace:
        service = ProtectionService(["tiny-cogvideox"], workspace, options={"steps": 1})
        result = service.protect_uploads(photos, "tiny-cogvideox", "fast")
    assert [o.status for o in result.outcomes] == ["failed", "done"]
    assert "unexpected error" in result.outcomes[0].message and "disk on fire" not in result.outcomes[0].message


def test_a_downloaded_sidecar_names_no_server_folder(tmp_path):
    from anti_i2v.web.service import _sidecar_without_server_paths

    sidecar = tmp_path / "me_protected.json"
    sidecar.write_text(json.dumps({"input": "/srv/jobs/1/originals/me.png", "output": "/srv/jobs/1/me_protected.png",
                                   "model": {"source": "/home/op/weights/CogVideoX-5b-I2V"}, "seed": 0}))
    _sidecar_without_server_paths(sidecar, "me.png")
    record = json.loads(sidecar.read_text())
    assert (record["input"], record["output"], record["model"]["source"]) == (
        "me.png", "me_protected.png", "CogVideoX-5b-I2V") and record["seed"] == 0
