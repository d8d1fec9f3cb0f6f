"""`anti-i2v protect --ray`: a batch on a local Ray instance on the CPU, with a tiny model and two
workers; a rerun skips finished photos, a bad photo is recorded and the others go on, a worker
that dies mid-photo has its photo retried once, then marked failed, and a run killed halfway
resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from anti_i2v.errors import InputError  # noqa: E402
from anti_i2v.photo import load_photo  # noqa: E402
from anti_i2v.ray_batch import FAILED_RECORD, protect_batch_on_ray  # noqa: E402

MODEL = "tiny-cogvideox"
OPTIONS = {"steps": 2, "prompt": "a person talking to the camera"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture()
def photos(tmp_path, portrait) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for index, name in enumerate(("a", "b", "c", "d")):
        Image.fromarray(np.roll(array, 40 * index, axis=1)).resize((96, 96)).save(folder / f"{name}.png")
    (folder / "notes.png").write_text("not a photo")
    return folder


def test_two_workers_protect_a_folder_record_a_bad_photo_and_a_rerun_skips_the_finished(photos, tmp_path):
    out = tmp_path / "out"
    items, summary = protect_batch_on_ray([photos], MODEL, out, workers=2, **OPTIONS)
    assert [i.source.name for i in items] == ["a.png", "b.png", "c.png", "d.png", "notes.png"]
    assert (summary.done, summary.skipped, summary.failed) == (4, 0, 1) and summary.photos_per_minute > 0
    for name in "abcd":
        sidecar = json.loads((out / f"{name}_protected.json").read_text())
        assert sidecar["budget"]["linf"] <= 8 / 255 + 1e-9 and sidecar["model"]["name"] == MODEL
    failed = json.loads((out / FAILED_RECORD).read_text())
    assert list(failed) == [str(photos / "notes.png")]
    with pytest.raises(InputError) as refused:  # worded as a local batch words it
        load_photo(photos / "notes.png")
    assert failed[str(photos / "notes.png")] == str(refused.value)
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.tmp"))  # nothing half-written left behind
    before = (out / "a_protected.png").stat().st_mtime_ns
    _, again = protect_batch_on_ray([photos], MODEL, out, workers=2, **OPTIONS)
    assert (again.done, again.skipped, again.failed) == (0, 4, 1)
    assert (out / "a_protected.png").stat().st_mtime_ns == before
    # a precision asked for is compared with the one recorded (fp32: the tiny models' own)
    _, same = protect_batch_on_ray([photos / "b.png"], MODEL, out, workers=1, dtype="fp32", **OPTIONS)
    assert (same.done, same.skipped) == (0, 1)
    _, half = protect_batch_on_ray([photos / "b.png"], MODEL, out, workers=1, dtype="bf16", **OPTIONS)
    assert (half.done, half.skipped) == (1, 0)
    # done against one model is not done against another: the driver compares the models it would load
    _, other = protect_batch_on_ray([photos / "a.png"], "tiny-dynamicrafter", out, workers=1, **OPTIONS)
    assert (other.done, other.skipped) == (1, 0)
    assert json.loads((out / "a_protected.json").read_text())["model"]["name"] == "tiny-dynamicrafter"


def test_a_photo_whose_worker_dies_is_retried_once_then_marked_failed(photos, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "c-died-once"

    def hook(source: Path) -> None:  # b's worker dies every time, c's only the first time
        if source.stem == "c" and not marker.exists():
            marker.touch()
            os._exit(1)
        if source.stem == "b":
            os._exit(1)

    items, summary = protect_batch_on_ray([photos / "a.png", photos / "b.png", photos / "c.png"], MODEL, out,
                                          workers=2, before_photo=hook, **OPTIONS)
    outcome = {i.source.stem: i for i in items}
    assert outcome["a"].status == "done"
    assert outcome["c"].status == "done" and (out / "c_protected.png").is_file()  # retried on a fresh worker
    assert outcome["b"].status == "failed" and "died 2 times" in outcome["b"].error
    assert not (out / "b_protected.png").exists()
    assert (summary.done, summary.failed) == (2, 1)
    assert list(json.loads((out / FAILED_RECORD).read_text())) == [str(photos / "b.png")]


def test_a_model_that_cannot_load_stops_the_batch_with_its_own_error(photos, tmp_path):
    from anti_i2v.errors import ConfigError

    with pytest.raises(ConfigError, match="takes no --model-path"):
        protect_batch_on_ray([photos / "a.png"], MODEL, tmp_path / "out", workers=1, model_path=str(tmp_path),
                             **OPTIONS)


@pytest.mark.slow
def test_a_run_killed_halfway_resumes_where_it_stopped(photos, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "anti_i2v.cli", "protect", str(photos), "--model", MODEL, "--steps", "10",
               "--out", str(out), "--ray", "local", "--ray-workers", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*_protected.json")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)  # the driver (a worker may still finish the photo it holds)
    run.wait()
    first = sorted(out.glob("*_protected.png"))
    assert 1 <= len(first) < 4
    stamp = first[0].stat().st_mtime_ns
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr  # notes.png fails
    text = " ".join(done.stdout.split())
    counts = re.search(r"(\d+) protected, (\d+) skipped, 1 failed; [\d.]+ photos per minute", text)
    assert counts, text
    protected, skipped = int(counts[1]), int(counts[2])
    assert protected + skipped == 4 and skipped >= 1 and protected >= 1
    assert len(list(out.glob("*_protected.png"))) == 4 and first[0].stat().st_mtime_ns == stamp
