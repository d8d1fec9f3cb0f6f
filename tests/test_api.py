"""`anti_i2v.protect` end to end on tiny-cogvideox: budget on the saved file,
reproducibility, metadata, and nothing lost on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import anti_i2v
from anti_i2v.errors import ConfigError, InputError, OutputError

STEPS = 4


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, portrait):
    path = tmp_path_factory.mktemp("in") / "face.jpg"
    array = (portrait[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((150, 120)).save(path, quality=95)
    return path


def test_saved_file_respects_the_budget_and_keeps_the_size(tmp_path, photo_path, tiny_model):
    result = anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=STEPS, eps="6/255")
    assert result.path == tmp_path / "face_protected.png"
    original = np.asarray(Image.open(photo_path).convert("RGB"), dtype=np.int16)
    saved = np.asarray(Image.open(result.path).convert("RGB"), dtype=np.int16)
    assert saved.shape == original.shape
    assert np.abs(saved - original).max() <= 6
    assert (saved != original).any()
    assert result.budget.within_budget and result.budget.linf <= 6 / 255 + 1e-9


def test_same_photo_config_and_seed_give_identical_bytes(tmp_path, photo_path):
    first = anti_i2v.protect(photo_path, "tiny-cogvideox", out=tmp_path / "a", steps=STEPS, seed=7)
    second = anti_i2v.protect(photo_path, "tiny-cogvideox", out=tmp_path / "b", steps=STEPS, seed=7)
    other = anti_i2v.protect(photo_path, "tiny-cogvideox", out=tmp_path / "c", steps=STEPS, seed=8)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()


def test_sidecar_records_model_config_seed_and_figures(tmp_path, photo_path, tiny_model):
    result = anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=STEPS, seed=3)
    record = json.loads(result.sidecar.read_text())
    assert result.sidecar == tmp_path / "face_protected.json"
    assert record["model"]["name"] == "tiny-cogvideox" and record["seed"] == 3
    assert record["config"]["steps"] == STEPS and record["config"]["space"] == "rgb"
    assert record["method"] == "anti-i2v" and record["config"]["weight_sampler"] == 1
    assert record["budget"]["linf"] == pytest.approx(result.budget.linf)
    assert record["budget"]["within_budget"] is True
    assert set(record["budget"]) >= {"linf", "linf_255", "psnr", "ssim"}


def test_in_memory_protection_returns_image_and_figures(photo_path, tiny_model):
    result = anti_i2v.protect(Image.open(photo_path), tiny_model, steps=STEPS)
    assert result.path is None and result.image.size == (150, 120)
    assert result.budget.within_budget and result.budget.psnr > 30


def test_alpha_channel_is_kept_unchanged(tmp_path, photo_path, tiny_model):
    rgba = Image.open(photo_path).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (120, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "cutout.png")
    result = anti_i2v.protect(tmp_path / "cutout.png", tiny_model, out=tmp_path / "out", steps=2)
    saved = Image.open(result.path)
    assert saved.mode == "RGBA"
    assert np.array_equal(np.asarray(saved)[..., 3], alpha)


def test_existing_output_and_the_input_itself_are_never_overwritten(tmp_path, photo_path, tiny_model):
    before = photo_path.read_bytes()
    anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1)
    with pytest.raises(OutputError, match="already exists"):
        anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1)
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "face_protected.png").symlink_to(photo_path)  # output name leads back to the input
    with pytest.raises(OutputError):
        anti_i2v.protect(photo_path, tiny_model, out=trap, steps=1, overwrite=True)
    assert photo_path.read_bytes() == before


def test_a_second_format_in_the_same_folder_never_replaces_the_firsts_record(tmp_path, photo_path, tiny_model):
    """``<stem>_protected.json`` names one output: saving the photo as PNG beside its JPEG would replace the
    JPEG's record, so it is refused before any work (with --overwrite too) and nothing changes."""
    first = anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1, fmt="jpg")
    record = first.sidecar.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is the record of .*face_protected.jpg"):
            anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1, fmt="png", overwrite=overwrite)
    assert first.sidecar.read_bytes() == record and not (tmp_path / "face_protected.png").exists()
    first.path.unlink()  # once the JPEG is gone its record stands for nothing: the PNG may take the name
    assert anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1, fmt="png").path.exists()


def test_a_photo_whose_record_cannot_be_written_is_not_kept(tmp_path, photo_path, tiny_model, monkeypatch):
    """A disk that fills up between the photo and its sidecar ends in one clear error, and the photo
    without its record is removed: a rerun must not take it for someone else's file."""
    import anti_i2v.api as api

    def full_disk(path, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "write_json_atomic", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        anti_i2v.protect(photo_path, tiny_model, out=tmp_path, steps=1)
    assert not list(tmp_path.glob("face_protected.*"))


def test_bad_settings_fail_before_any_work(photo_path, tiny_model):
    with pytest.raises(ConfigError, match="eps"):
        anti_i2v.protect(photo_path, tiny_model, eps="80/255")
    with pytest.raises(ConfigError, match="preset"):
        anti_i2v.protect(photo_path, tiny_model, preset="max")
    with pytest.raises(ConfigError, match="unknown setting"):
        anti_i2v.protect(photo_path, tiny_model, stepz=3)
    with pytest.raises(InputError):
        anti_i2v.protect(photo_path.with_name("missing.jpg"), tiny_model)


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "CMYK"])
def test_other_photo_modes_are_protected_within_budget(tmp_path, photo_path, tiny_model, mode):
    source = Image.open(photo_path)
    if mode == "I;16":
        gray = np.asarray(source.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(tmp_path / "photo.png")
    else:
        source.convert(mode).save(tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png"))
    path = next(tmp_path.glob("photo.*"))
    result = anti_i2v.protect(path, tiny_model, out=tmp_path / "out", steps=2)
    assert result.budget.within_budget and result.image.size == (150, 120)
    saved = Image.open(result.path)
    if mode in ("L", "I;16"):
        assert saved.mode == mode  # gray stays gray, 16-bit stays 16-bit


def test_a_setting_the_method_never_reads_is_warned_about(photo_path, tiny_model, caplog):
    with caplog.at_level("WARNING", logger="anti_i2v.api"):
        anti_i2v.protect(photo_path, tiny_model, steps=1, t_min=100)
    assert "does not read t_min" in caplog.text

