"""Tests for anti_i2v.photo: loading, resizing, carrying, quantizing, saving, measuring."""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from skimage import data as skdata

from anti_i2v.errors import ConfigError, InputError, OutputError
from anti_i2v.photo import (
    MIN_SIDE,
    BudgetReport,
    Photo,
    _ssim_mean,
    carry_perturbation,
    load_photo,
    measure_budget,
    output_path_for,
    quantize_protected,
    resize_for_model,
    save_protected,
)

EPS = 8 / 255
ORIENTATION = 0x0112


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A real 512x512 RGB portrait (uint8)."""
    return skdata.astronaut()


def _png16(arr: np.ndarray, color_type: int, path: Path) -> Path:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour)."""
    height, width = arr.shape[:2]

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def _bound_hitting(photo: Photo, eps: float, seed: int = 0) -> torch.Tensor:
    """Original + random-sign eps everywhere: every pixel sits on the budget bound."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, photo.rgb.shape, generator=gen).float() * 2 - 1
    return (photo.rgb + eps * sign).clamp(0, 1)


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _linf_255(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


# --------------------------------------------------------------------------- loading


def test_rgb_jpeg_loads_as_full_resolution_float_tensor(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(astronaut).save(path, quality=95)
    photo = load_photo(path)
    assert photo.rgb.shape == (3, 512, 512) and photo.rgb.dtype == torch.float32
    assert 0.0 <= photo.rgb.min() and photo.rgb.max() <= 1.0
    assert (photo.bit_depth, photo.is_gray, photo.source_mode, photo.source_format) == (8, False, "RGB", "JPEG")
    assert photo.alpha is None and photo.path == path and photo.size == (512, 512)


def test_str_path_and_pil_image_inputs_load(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    from_str = load_photo(str(path))
    with Image.open(path) as im:
        from_pil = load_photo(im)
    assert torch.equal(from_str.rgb, from_pil.rgb)
    assert torch.equal(from_str.rgb, torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255)
    assert from_pil.path == path


def test_rgba_png_alpha_is_preserved_byte_exact_after_save(tmp_path: Path, astronaut: np.ndarray) -> None:
    alpha = np.random.default_rng(1).integers(0, 256, astronaut.shape[:2], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([astronaut, alpha])).save(path)
    photo = load_photo(path)
    assert photo.alpha is not None and photo.alpha.dtype == np.uint8
    assert np.array_equal(photo.alpha, alpha)
    out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "out.png", EPS)
    with Image.open(out) as saved:
        assert saved.mode == "RGBA"
        arr = np.asarray(saved)
    assert np.array_equal(arr[..., 3], alpha)
    assert _linf_255(arr[..., :3], astronaut) <= 8


def test_palette_with_transparency_becomes_rgb_plus_alpha(tmp_path: Path, astronaut: np.ndarray) -> None:
    pal = Image.fromarray(astronaut).quantize(64)
    pal.info["transparency"] = 0
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)
    photo = load_photo(path)
    expected = np.array(pal.convert("RGBA"))
    assert photo.source_mode == "P" and not photo.is_gray
    assert photo.alpha is not None and np.array_equal(photo.alpha, expected[..., 3])
    assert (photo.alpha == 0).any() and (photo.alpha == 255).any()
    assert torch.equal(photo.rgb, torch.from_numpy(expected[..., :3]).permute(2, 0, 1).float() / 255)


def test_palette_without_transparency_and_pa_images_load(astronaut: np.ndarray) -> None:
    pal = Image.fromarray(astronaut).quantize(32)
    photo = load_photo(pal)
    assert photo.alpha is None and photo.rgb.shape == (3, 512, 512)
    assert torch.equal(photo.rgb, torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1).float() / 255)
    pa = load_photo(pal.convert("PA"))
    assert pa.alpha is not None and (pa.alpha == 255).all()


def test_cmyk_jpeg_becomes_rgb_and_its_icc_profile_is_dropped(
    tmp_path: Path, astronaut: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    cmyk = Image.fromarray(astronaut).convert("CMYK")
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95, icc_profile=b"\0" * 16 + b"CMYK" + b"\0" * 108)
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        photo = load_photo(path)
    assert photo.source_mode == "CMYK" and photo.icc_profile is None
    assert "CMYK" in caplog.text
    # JPEG stores CMYK lossily; the RGB result must still be the same picture.
    assert float((photo.rgb - torch.from_numpy(astronaut).permute(2, 0, 1) / 255).abs().mean()) < 0.03
    out = save_protected(photo, photo.rgb, tmp_path / "cmyk_protected.png", EPS)
    with Image.open(out) as saved:
        assert saved.mode == "RGB" and "icc_profile" not in saved.info


def test_gray_l_loads_gray_and_saves_as_l(tmp_path: Path, astronaut: np.ndarray) -> None:
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    path = tmp_path / "g.png"
    Image.fromarray(gray).save(path)
    photo = load_photo(path)
    assert photo.is_gray and photo.bit_depth == 8 and photo.source_mode == "L"
    assert torch.equal(photo.rgb[0], photo.rgb[2])
    out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "g_out.png", EPS)
    with Image.open(out) as saved:
        assert saved.mode == "L"
        assert _linf_255(np.asarray(saved), gray) <= 8


def test_gray_with_alpha_saves_as_la(tmp_path: Path, astronaut: np.ndarray) -> None:
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    alpha = np.full_like(gray, 200)
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([gray, alpha])).save(path)
    photo = load_photo(path)
    assert photo.is_gray and photo.source_mode == "LA"
    out = save_protected(photo, photo.rgb, tmp_path / "la_out.png", EPS)
    with Image.open(out) as saved:
        assert saved.mode == "LA" and np.array_equal(np.asarray(saved)[..., 1], alpha)


def test_one_bit_image_loads_as_gray() -> None:
    bw = Image.fromarray((np.indices((80, 96)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    photo = load_photo(bw)
    assert photo.is_gray and photo.source_mode == "1" and photo.bit_depth == 8
    assert set(torch.unique(photo.rgb).tolist()) == {0.0, 1.0}


def test_16bit_gray_png_keeps_16bit_precision_round_trip(tmp_path: Path) -> None:
    values = np.random.default_rng(2).integers(0, 65536, (96, 128), dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    photo = load_photo(path)
    assert photo.bit_depth == 16 and photo.is_gray and photo.source_mode.startswith("I;16")
    assert np.array_equal(np.rint(photo.rgb[0].numpy().astype(np.float64) * 65535).astype(np.uint16), values)
    eps = 7.5 / 255
    out = save_protected(photo, _bound_hitting(photo, eps), tmp_path / "g16_out.png", eps)
    with Image.open(out) as saved:
        assert saved.mode == "I;16"
        diff = _linf_255(np.asarray(saved), values)
    assert diff == math.floor(eps * 65535 + 1e-6)  # hits the bound, never crosses it
    unchanged = save_protected(photo, photo.rgb, tmp_path / "g16_same.png", eps)
    with Image.open(unchanged) as saved:
        assert np.array_equal(np.asarray(saved), values)


def test_32bit_integer_image_is_treated_as_16bit_gray() -> None:
    values = np.random.default_rng(11).integers(0, 65536, (80, 96)).astype(np.int32)
    im = Image.fromarray(values)
    assert im.mode == "I"
    photo = load_photo(im)
    assert photo.is_gray and photo.bit_depth == 16
    assert np.array_equal(np.rint(photo.rgb[1].numpy().astype(np.float64) * 65535), values)


def test_16bit_colour_png_is_read_at_8bit_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Pillow 13 decodes 16-bit RGB PNGs to 8-bit "RGB" (high byte); we can only warn.
    values = np.random.default_rng(3).integers(0, 65536, (70, 80, 3), dtype=np.uint16)
    path = _png16(values, 2, tmp_path / "rgb16.png")
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        photo = load_photo(path)
    assert photo.bit_depth == 8 and photo.source_mode == "RGB"
    assert "16-bit" in caplog.text
    assert np.abs(photo.rgb.permute(1, 2, 0).numpy() - values / 65535).max() < 1 / 255 + 1e-6


def test_a_16bit_colour_photo_stays_within_the_budget_of_its_own_16bit_values(tmp_path: Path, tiny_model) -> None:
    """Read at 8 bits, its values are up to 1/255 off: the protection spends that much less of the budget."""
    import anti_i2v

    smooth = np.linspace(0, 1, 96)[None, :, None] * np.linspace(0.2, 1, 80)[:, None, None]
    values = np.clip(smooth * [65535, 50000, 30000] + np.random.default_rng(5).integers(0, 3000, (80, 96, 3)),
                     0, 65535).astype(np.uint16)
    path = _png16(values, 2, tmp_path / "rgb16.png")
    assert load_photo(path).reading_error == pytest.approx(1 / 255)
    result = anti_i2v.protect(path, tiny_model, out=tmp_path / "out", steps=3, eps="4/255", method="anti-i2v-paper",
                              space="rgb")
    saved = np.asarray(Image.open(result.path).convert("RGB"), dtype=np.float64) / 255
    assert np.abs(saved - values / 65535).max() <= 4 / 255 + 1e-9
    assert np.abs(saved - load_photo(path).rgb.permute(1, 2, 0).numpy()).max() > 2 / 255  # it did protect
    assert result.budget.within_budget and result.budget.source_error == pytest.approx(1 / 255)
    assert result.budget.linf + result.budget.source_error <= 4 / 255 + 1e-6
    # in memory too, with an eps that is not a whole number of levels
    in_memory = anti_i2v.protect(path, tiny_model, steps=2, eps=0.03, method="anti-i2v-paper", space="rgb")
    assert in_memory.budget.within_budget and in_memory.budget.linf + 1 / 255 <= 0.03 + 1e-9
    for eps in ("1/255", "1.5/255"):  # less than one level would be left: this photo fails, with why
        with pytest.raises(InputError, match="2/255 or more"):
            anti_i2v.protect(path, tiny_model, steps=1, eps=eps)


def test_16bit_gray_alpha_png_is_recognised_as_gray(tmp_path: Path) -> None:
    values = np.random.default_rng(4).integers(0, 65536, (70, 80, 2), dtype=np.uint16)
    photo = load_photo(_png16(values, 4, tmp_path / "ga16.png"))
    assert photo.is_gray and photo.alpha is not None and photo.alpha.dtype == np.uint8


def test_exif_orientation_6_is_applied_and_saved_as_orientation_1(tmp_path: Path) -> None:
    stored = np.full((80, 120, 3), 100, dtype=np.uint8)
    stored[:10, :20] = (255, 0, 0)  # red mark at the stored top-left
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    exif[0x010F] = "TestCam"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    photo = load_photo(path)
    assert photo.size == (120, 80)  # now portrait
    top_right = photo.rgb[:, :5, -5:].mean(dim=(1, 2))
    assert top_right[0] > 0.9 and top_right[1] < 0.1  # the mark moved to the top-right
    parsed = Image.Exif()
    parsed.load(photo.exif)
    assert parsed[ORIENTATION] == 1 and parsed[0x010F] == "TestCam"

    out = save_protected(photo, photo.rgb, tmp_path / "rotated_protected.png", EPS)
    with Image.open(out) as saved:
        assert saved.size == (80, 120)
        assert saved.getexif()[ORIENTATION] == 1 and saved.getexif()[0x010F] == "TestCam"
    assert load_photo(out).size == (120, 80)  # not rotated a second time


def test_loading_a_pil_image_does_not_change_the_callers_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.zeros((80, 120, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    with Image.open(path) as im:
        assert load_photo(im).size == (120, 80)
        assert im.getexif()[ORIENTATION] == 6


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_is_kept(tmp_path: Path, astronaut: np.ndarray, suffix: str) -> None:
    icc = _srgb_icc()
    path = tmp_path / "icc.png"
    Image.fromarray(astronaut).save(path, icc_profile=icc)
    photo = load_photo(path)
    assert photo.icc_profile == icc
    out = save_protected(photo, photo.rgb, tmp_path / f"icc_out{suffix}", EPS)
    with Image.open(out) as saved:
        assert saved.info.get("icc_profile") == icc


def test_rgb_icc_profile_is_dropped_for_gray_output(
    tmp_path: Path, astronaut: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    gray = Image.fromarray(astronaut).convert("L")
    photo = load_photo(gray)
    photo.icc_profile = _srgb_icc()  # an RGB profile cannot describe an L image
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        out = save_protected(photo, photo.rgb, tmp_path / "g.png", EPS)
    assert "ICC" in caplog.text
    with Image.open(out) as saved:
        assert "icc_profile" not in saved.info


def test_numpy_arrays_load_with_their_bit_depth(astronaut: np.ndarray) -> None:
    rgb8 = load_photo(astronaut)
    assert rgb8.bit_depth == 8 and not rgb8.is_gray and rgb8.path is None
    gray8 = load_photo(astronaut[..., 0])
    assert gray8.is_gray and gray8.rgb.shape == (3, 512, 512)
    rgb16 = load_photo(astronaut.astype(np.uint16) * 257)
    assert rgb16.bit_depth == 16 and torch.allclose(rgb16.rgb, rgb8.rgb)
    as_float = load_photo(astronaut.astype(np.float64) / 255)
    assert as_float.bit_depth == 8 and torch.allclose(as_float.rgb, rgb8.rgb)
    rgba = load_photo(np.dstack([astronaut, astronaut[..., 0]]))
    assert rgba.alpha is not None and np.array_equal(rgba.alpha, astronaut[..., 0])


def test_torch_tensors_load(astronaut: np.ndarray) -> None:
    t = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255
    for source in (t, t[None]):
        photo = load_photo(source)
        assert torch.equal(photo.rgb, t) and photo.bit_depth == 8
    assert load_photo(t).rgb.data_ptr() != t.data_ptr()


@pytest.mark.parametrize(
    "source",
    [
        np.full((80, 80, 3), 1.5, dtype=np.float32),
        np.full((80, 80, 3), np.nan, dtype=np.float32),
        np.zeros((80, 80, 5), dtype=np.uint8),
        np.zeros((2, 80, 80, 3), dtype=np.uint8),
        np.zeros((80, 80, 3), dtype=np.int64),
        torch.full((3, 80, 80), -0.1),
        torch.zeros(80, 80, 3),
        torch.zeros(3, 80, 80, dtype=torch.uint8),
    ],
    ids=["float-above-1", "nan", "5-channels", "4d-array", "int64", "tensor-negative", "tensor-hwc", "tensor-uint8"],
)
def test_bad_arrays_and_tensors_give_input_error(source: object) -> None:
    with pytest.raises(InputError):
        load_photo(source)  # type: ignore[arg-type]


def _truncated_jpeg(tmp_path: Path, astronaut: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG", quality=95)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize("case", ["missing", "folder", "text-as-jpg", "truncated", "too-small", "empty"])
def test_unusable_input_files_give_one_line_input_error(tmp_path: Path, astronaut: np.ndarray, case: str) -> None:
    if case == "missing":
        path = tmp_path / "nope.jpg"
    elif case == "folder":
        path = tmp_path / "dir.jpg"
        path.mkdir()
    elif case == "text-as-jpg":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not a photo\n" * 20)
    elif case == "truncated":
        path = _truncated_jpeg(tmp_path, astronaut)
    elif case == "too-small":
        path = tmp_path / "small.png"
        Image.fromarray(astronaut[: MIN_SIDE - 1]).save(path)
    else:
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    with pytest.raises(InputError) as info:
        load_photo(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_too_small_array_gives_input_error() -> None:
    with pytest.raises(InputError, match="at least 64x64"):
        load_photo(np.zeros((MIN_SIDE, MIN_SIDE - 1, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- resize / carry


def test_resize_for_model_stretches_batches_and_is_differentiable(astronaut: np.ndarray) -> None:
    x = (torch.from_numpy(astronaut[:, :300]).permute(2, 0, 1).float() / 255).requires_grad_(True)
    y = resize_for_model(x, 320, 576)  # aspect ratio deliberately not preserved
    assert y.shape == (1, 3, 320, 576) and 0 <= y.min() and y.max() <= 1
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    batch = resize_for_model(torch.rand(2, 3, 100, 70), 64, 64)
    assert batch.shape == (2, 3, 64, 64)
    same = torch.rand(3, 64, 80)
    assert torch.allclose(resize_for_model(same, 64, 80)[0], same, atol=1e-6)
    with pytest.raises(ConfigError):
        resize_for_model(same, 0, 80)


def test_carry_perturbation_perturbs_every_pixel_of_an_odd_size_photo() -> None:
    gen = torch.Generator().manual_seed(5)
    original = torch.rand(3, 389, 517, generator=gen) * 0.6 + 0.2  # away from 0 and 1
    x_model = resize_for_model(original, 320, 512)
    # Nonzero everywhere and same sign: upsampling cannot cancel it anywhere.
    delta = EPS * (0.25 + 0.75 * torch.rand(1, 3, 320, 512, generator=gen))
    out = carry_perturbation(original, x_model, x_model + delta, EPS)
    change = out - original
    assert out.shape == original.shape
    assert (change != 0).all()
    assert change.abs().max() <= EPS + 1e-6


def test_carry_perturbation_with_random_signs_reaches_nearly_all_pixels() -> None:
    gen = torch.Generator().manual_seed(6)
    original = torch.rand(3, 389, 517, generator=gen) * 0.6 + 0.2
    x_model = resize_for_model(original, 320, 512)
    sign = torch.randint(0, 2, (1, 3, 320, 512), generator=gen).float() * 2 - 1
    change = carry_perturbation(original, x_model, x_model + EPS * sign, EPS) - original
    # +eps and -eps cancel exactly only where a bilinear weight is exactly 1/2.
    assert (change == 0).float().mean() < 0.005
    assert change.abs().max() <= EPS + 1e-6


def test_carry_perturbation_respects_eps_and_unit_range_even_for_oversized_delta() -> None:
    original = torch.zeros(3, 200, 300)
    original[:, :100] = 1.0
    x_model = resize_for_model(original, 64, 64)
    sign = torch.randint(0, 2, (1, 3, 64, 64), generator=torch.Generator().manual_seed(7)).float() * 2 - 1
    out = carry_perturbation(original, x_model, x_model + 5 * EPS * sign, EPS)
    assert 0 <= out.min() and out.max() <= 1
    assert (out - original).abs().max() <= EPS + 1e-6
    with pytest.raises(ConfigError):
        carry_perturbation(original, x_model, x_model, -1.0)


# --------------------------------------------------------------------------- quantize / save


def test_output_path_for_names_and_extensions(tmp_path: Path) -> None:
    assert output_path_for(Path("/x/me.JPG"), tmp_path) == tmp_path / "me_protected.png"
    assert output_path_for(Path("/x/me.png"), tmp_path, "jpeg") == tmp_path / "me_protected.jpg"
    assert output_path_for(None, tmp_path, "webp") == tmp_path / "photo_protected.webp"
    assert output_path_for(Path("a.png"), tmp_path, "png", stem="b") == tmp_path / "b_protected.png"
    with pytest.raises(ConfigError):
        output_path_for(None, tmp_path, "gif")


@pytest.mark.parametrize("eps_255", [8.0, 7.5, 0.4])
def test_saved_png_stays_within_eps_even_when_perturbation_hits_the_bound(
    tmp_path: Path, astronaut: np.ndarray, eps_255: float
) -> None:
    eps = eps_255 / 255
    photo = load_photo(astronaut)
    out = save_protected(photo, _bound_hitting(photo, eps), tmp_path / "out.png", eps)
    with Image.open(out) as saved:
        diff = _linf_255(np.asarray(saved), astronaut)
    assert diff == math.floor(eps_255)  # 8 -> 8, 7.5 -> 7, 0.4 -> 0
    report = measure_budget(photo, out, eps)
    assert report.within_budget and report.linf <= eps + 1e-6


def test_quantize_gray_and_16bit_shapes_and_dtypes(astronaut: np.ndarray) -> None:
    gray = load_photo(astronaut[..., 0])
    q = quantize_protected(gray, gray.rgb, EPS)
    assert q.shape == (512, 512) and q.dtype == np.uint8 and np.array_equal(q, astronaut[..., 0])
    deep = load_photo(astronaut.astype(np.uint16) * 257)
    q16 = quantize_protected(deep, deep.rgb, EPS)
    assert q16.shape == (512, 512, 3) and q16.dtype == np.uint16
    assert np.array_equal(q16, astronaut.astype(np.uint16) * 257)


def test_blockwise_processing_matches_single_block(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = load_photo(astronaut)
    protected = _bound_hitting(photo, 7.5 / 255)
    out = save_protected(photo, protected, tmp_path / "o.png", 7.5 / 255)
    whole_q = quantize_protected(photo, protected, 7.5 / 255)
    whole_report = measure_budget(photo, out, 7.5 / 255)
    monkeypatch.setattr("anti_i2v.photo._BLOCK_VALUES", 3 * 512 * 13)  # 13-row blocks
    assert np.array_equal(quantize_protected(photo, protected, 7.5 / 255), whole_q)
    blocked = measure_budget(photo, out, 7.5 / 255)
    assert blocked.linf == whole_report.linf
    assert blocked.psnr == pytest.approx(whole_report.psnr, rel=1e-9)
    assert blocked.ssim == pytest.approx(whole_report.ssim, abs=1e-6)


def test_16bit_colour_array_is_saved_as_8bit_within_eps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = np.random.default_rng(8).integers(0, 65536, (96, 128, 3), dtype=np.uint16)
    photo = load_photo(values)  # off the 8-bit grid almost everywhere
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "o.png", EPS)
    assert "8-bit" in caplog.text
    report = measure_budget(photo, out, EPS)
    assert report.within_budget, report


def test_16bit_gray_to_tiff_stays_16bit(tmp_path: Path) -> None:
    values = np.random.default_rng(9).integers(0, 65536, (80, 90), dtype=np.uint16)
    photo = load_photo(values)
    out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "o.tiff", EPS)
    with Image.open(out) as saved:
        assert saved.mode.startswith("I;16")
    assert measure_budget(photo, out, EPS).within_budget


def test_png_output_is_byte_deterministic(tmp_path: Path, astronaut: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    path = tmp_path / "in.jpg"
    Image.fromarray(astronaut).save(path, quality=95, exif=exif.tobytes(), icc_profile=_srgb_icc())
    photo = load_photo(path)
    protected = _bound_hitting(photo, EPS)
    first = save_protected(photo, protected, tmp_path / "a" / "x.png", EPS)
    second = save_protected(load_photo(path), protected.clone(), tmp_path / "b" / "x.png", EPS)
    assert first.read_bytes() == second.read_bytes()


def test_save_refuses_to_overwrite_the_input_photo(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = tmp_path / "me.png"
    Image.fromarray(astronaut).save(path)
    before = path.read_bytes()
    photo = load_photo(path)
    for target in (path, tmp_path / "." / "me.png"):
        with pytest.raises(OutputError, match="input photo"):
            save_protected(photo, _bound_hitting(photo, EPS), target, EPS, overwrite=True)
    link = tmp_path / "link.png"
    link.symlink_to(path)
    with pytest.raises(OutputError, match="input photo"):
        save_protected(photo, photo.rgb, link, EPS, overwrite=True)
    assert path.read_bytes() == before


def test_save_refuses_existing_output_unless_overwrite(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    target = tmp_path / "out.png"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        save_protected(photo, photo.rgb, target, EPS)
    assert target.read_bytes() == b"keep me"
    save_protected(photo, photo.rgb, target, EPS, overwrite=True)
    assert np.array_equal(np.asarray(Image.open(target)), astronaut)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp files left


def test_save_creates_missing_folders_and_leaves_no_temp_file(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    out = save_protected(photo, photo.rgb, tmp_path / "new" / "deeper" / "out.png", EPS)
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]
    assert (out.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_unwritable_folder_gives_output_error(tmp_path: Path, astronaut: np.ndarray) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")  # fails for root too, unlike chmod 0o500
    photo = load_photo(astronaut)
    with pytest.raises(OutputError, match=str(not_a_folder)):
        save_protected(photo, photo.rgb, not_a_folder / "out.png", EPS)
    with pytest.raises(OutputError):
        save_protected(photo, photo.rgb, not_a_folder / "sub" / "out.png", EPS)


def test_failed_write_removes_the_temp_file(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = load_photo(astronaut)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("anti_i2v.photo.os.fsync", broken_fsync)
    with pytest.raises(OutputError, match="No space left"):
        save_protected(photo, photo.rgb, tmp_path / "out.png", EPS)
    assert list(tmp_path.iterdir()) == []


def test_bad_output_names_are_refused(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    with pytest.raises(OutputError, match="unsupported format"):
        save_protected(photo, photo.rgb, tmp_path / "out.gif", EPS)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="folder"):
        save_protected(photo, photo.rgb, tmp_path / "dir.png", EPS, overwrite=True)
    with pytest.raises(ConfigError):
        save_protected(photo, photo.rgb, tmp_path / "o.jpg", EPS, quality=0)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_lossy_output_logs_a_warning(
    tmp_path: Path, astronaut: np.ndarray, caplog: pytest.LogCaptureFixture, suffix: str
) -> None:
    photo = load_photo(astronaut)
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / f"o{suffix}", EPS, quality=90)
    assert "lossy" in caplog.text
    with Image.open(out) as saved:
        assert saved.size == (512, 512)


def test_png_output_logs_no_warning(tmp_path: Path, astronaut: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    photo = load_photo(astronaut)
    with caplog.at_level(logging.WARNING, logger="anti_i2v.photo"):
        save_protected(photo, photo.rgb, tmp_path / "o.png", EPS)
    assert caplog.text == ""


def test_jpeg_cannot_take_alpha(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(np.dstack([astronaut, astronaut[..., 0]]))
    with pytest.raises(OutputError, match=r"\.png"):
        save_protected(photo, photo.rgb, tmp_path / "o.jpg", EPS)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- measuring


def test_measure_budget_for_random_sign_8_over_255(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "o.png", EPS)
    report = measure_budget(photo, out, EPS)
    assert isinstance(report, BudgetReport)
    assert report.within_budget and report.linf_255 == pytest.approx(8.0, abs=1e-3)
    # |d| <= eps everywhere gives PSNR >= 20 log10(1/eps) = 30.07 dB, with equality
    # when every value moves by eps; clipping at 0 and 1 makes it slightly higher.
    floor_db = 20 * math.log10(255 / 8)
    assert floor_db <= report.psnr < floor_db + 0.5
    assert 0.5 < report.ssim < 0.95  # visible as noise, structure intact
    assert report.to_dict()["within_budget"] is True and report.to_dict()["eps"] == EPS


def test_measure_budget_of_an_unchanged_photo(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    out = save_protected(photo, photo.rgb, tmp_path / "o.png", EPS)
    report = measure_budget(photo, out, EPS)
    # kornia's SSIM adds 1e-12 to its denominator, so identical images give 1 - ~1e-6.
    assert report.linf == 0.0 and math.isinf(report.psnr) and report.ssim == pytest.approx(1.0, abs=1e-5)


def test_measure_budget_flags_lossy_output_that_leaves_the_budget(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    out = save_protected(photo, _bound_hitting(photo, EPS), tmp_path / "o.jpg", EPS, quality=75)
    report = measure_budget(photo, out, EPS)
    assert not report.within_budget and report.linf > EPS


def test_measure_budget_refuses_a_different_size(tmp_path: Path, astronaut: np.ndarray) -> None:
    photo = load_photo(astronaut)
    other = tmp_path / "other.png"
    Image.fromarray(astronaut[:256]).save(other)
    with pytest.raises(OutputError, match="size|x"):
        measure_budget(photo, other, EPS)


def test_blockwise_ssim_equals_whole_image_ssim(astronaut: np.ndarray) -> None:
    from kornia.metrics import ssim

    a = torch.from_numpy(astronaut[:200, :150]).permute(2, 0, 1).float() / 255
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(10))).clamp(0, 1)
    whole = float(ssim(a[None], b[None], 11, max_val=1.0).mean())
    assert _ssim_mean(a, b, block_rows=37) == pytest.approx(whole, abs=1e-5)
    assert _ssim_mean(a, b) == pytest.approx(whole, abs=1e-5)
