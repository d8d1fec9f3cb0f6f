"""The purification battery: shapes, determinism, and that each purifier does what it says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anti_i2v.errors import ConfigError, InputError, ModelError
from anti_i2v.evaluation import purify as P

torch.set_num_threads(1)

EPS_8 = 8.0 / 255.0


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """skimage's astronaut, a real photo, shrunk to (3, 160, 128) in [0, 1] for speed."""
    from skimage import data

    full = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)
    return F.interpolate(full[None], size=(160, 128), mode="bicubic", antialias=True)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def sign_pattern(photo) -> torch.Tensor:
    """A seeded +-8/255 random sign perturbation of the photo's shape."""
    generator = torch.Generator().manual_seed(1234)
    return (torch.randint(0, 2, photo.shape, generator=generator).float() * 2 - 1) * EPS_8


@pytest.fixture(scope="module")
def tiny_diffpure() -> P.DiffPure:
    return P.DiffPure.tiny(seed=0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


def high_freq_energy(z: torch.Tensor, cutoff: float = 0.25) -> float:
    """Spectral energy above ``cutoff`` cycles/pixel (half Nyquist) along either axis."""
    spectrum = torch.fft.fft2(z).abs().pow(2)
    fy = torch.fft.fftfreq(z.shape[-2]).abs()[:, None]
    fx = torch.fft.fftfreq(z.shape[-1]).abs()[None, :]
    return float(spectrum[..., torch.maximum(fy, fx) > cutoff].sum())


def test_names_and_default_battery():
    assert P.PURIFIER_NAMES[-1] == "diffpure"
    assert P.DEFAULT_BATTERY == tuple(n for n in P.PURIFIER_NAMES if n != "diffpure")
    assert len(P.PURIFIER_NAMES) == 14
    after_resize = P.DEFAULT_BATTERY.index("resize0.5") + 1
    assert P.DEFAULT_BATTERY[after_resize : after_resize + 2] == ("long1080", "social")


@pytest.mark.parametrize("name", P.DEFAULT_BATTERY)
def test_purifier_contract(name, photo):
    """Same shape, float32, in [0, 1], deterministic for a seed, and the image changes."""
    purifier = P.build_purifier(name)
    out = purifier(photo, 3)
    assert out.shape == photo.shape
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, purifier(photo, 3))
    assert torch.equal(out, P.purify(name, photo, seed=3))
    if name.startswith("long"):  # the 160x128 photo is within the 1080 px limit: never upscaled, kept as is
        assert torch.equal(out, photo)
    else:
        assert float((out - photo).abs().mean()) > 1e-3, f"{name} left the image unchanged"


@pytest.mark.parametrize("name", P.DEFAULT_BATTERY)
def test_purifier_accepts_other_float_dtypes_and_odd_sizes(name, photo):
    odd = photo[:, :97, :65].to(torch.float64)
    out = P.build_purifier(name)(odd, 0)
    assert out.shape == odd.shape and out.dtype == torch.float32


def test_only_noise_depends_on_seed(photo):
    for name in P.DEFAULT_BATTERY:
        same = torch.equal(P.purify(name, photo, seed=0), P.purify(name, photo, seed=1))
        assert same == (not name.startswith("noise")), name


def test_codecs_round_to_8_bits_and_others_stay_float(photo):
    for name in ("jpeg95", "jpeg30", "webp"):
        levels = P.purify(name, photo) * 255
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
    levels = P.purify("blur", photo) * 255
    assert not torch.allclose(levels, levels.round(), atol=1e-4)


def test_jpeg_quality_orders_distortion(photo):
    q = {name: psnr(P.purify(name, photo), photo) for name in ("jpeg95", "jpeg75", "jpeg50", "jpeg30")}
    assert q["jpeg95"] > q["jpeg75"] > q["jpeg50"] > q["jpeg30"]
    assert q["jpeg95"] > 33.0 and q["jpeg30"] < 30.0


def test_jpeg_uses_420_subsampling(photo):
    """A pure-chroma checkerboard is averaged away by 4:2:0 but not by luma-only coding."""
    import io

    from PIL import Image

    checker = torch.zeros(3, 64, 64)
    checker[0, ::2, ::2] = checker[0, 1::2, 1::2] = 1.0
    checker[2] = 1 - checker[0]
    out = P.jpeg(95)(checker, 0)
    buffer = io.BytesIO()
    Image.fromarray((checker * 255).byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95, subsampling=0)
    full_chroma = torch.from_numpy(__import__("numpy").array(Image.open(buffer))).permute(2, 0, 1).float() / 255
    assert psnr(out, checker) < psnr(full_chroma, checker) - 3


def test_noise_std_matches_sigma(photo):
    mid = photo * 0.6 + 0.2  # keep away from 0 and 1 so clipping does not shrink the noise
    stds = {}
    for name, sigma in (("noise0.05", 0.05), ("noise0.1", 0.1)):
        stds[name] = float((P.purify(name, mid, seed=7) - mid).std())
        assert stds[name] == pytest.approx(sigma, rel=0.05)
    assert stds["noise0.1"] > stds["noise0.05"]
    # on the real photo clipping only ever shrinks the change
    assert float((P.purify("noise0.1", photo) - photo).std()) < 0.1
    assert psnr(P.purify("noise0.1", photo), photo) < psnr(P.purify("noise0.05", photo), photo)


@pytest.mark.parametrize("name", ["resize0.5", "blur"])
def test_low_pass_removes_perturbation_more_than_image(name, photo, sign_pattern):
    purifier = P.build_purifier(name)
    attacked = (photo + sign_pattern).clamp(0, 1)
    perturbation = attacked - photo
    clean_out, attacked_out = purifier(photo, 0), purifier(attacked, 0)
    residual = attacked_out - clean_out  # what is left of the perturbation
    # high-frequency energy: almost all of the perturbation's goes, much of the photo's stays
    kept_perturbation = high_freq_energy(residual) / high_freq_energy(perturbation)
    kept_photo = high_freq_energy(clean_out) / high_freq_energy(photo)
    assert kept_perturbation < 0.05
    assert kept_perturbation < 0.5 * kept_photo
    # overall: most of the perturbation's energy is gone, the photo changes by a few percent
    assert residual.pow(2).sum() < 0.25 * perturbation.pow(2).sum()
    assert (clean_out - photo).pow(2).sum() < 0.02 * photo.pow(2).sum()


def test_cleaner_brings_perturbed_photo_closer_to_original(photo, sign_pattern):
    attacked = (photo + sign_pattern).clamp(0, 1)
    cleaned = P.cleaner()(attacked, 0)
    assert psnr(cleaned, photo) > psnr(attacked, photo) + 1.5
    # and it barely touches the clean photo itself
    assert psnr(P.cleaner()(photo, 0), photo) > 35.0


def test_crop_zooms_into_the_centre():
    ramp = torch.linspace(0, 1, 200).expand(3, 100, 200).contiguous()
    out = P.center_crop(0.5)(ramp, 0)
    assert out.shape == ramp.shape
    # the central half of the ramp (0.25..0.75) is stretched over the full width
    assert float(out[0, 50, 0]) == pytest.approx(0.25, abs=0.02)
    assert float(out[0, 50, -1]) == pytest.approx(0.75, abs=0.02)


def test_resize_back_identity_at_scale_one(photo):
    assert torch.allclose(P.resize_back(1.0)(photo, 0), photo)


def test_long_edge_shrinks_to_the_limit_and_never_upscales(photo):
    assert P.long_edge_size(160, 128, 80) == (80, 64)
    assert P.long_edge_size(128, 160, 80) == (64, 80)
    assert P.long_edge_size(160, 128, 160) == (160, 128)
    assert P.long_edge_size(160, 128, 4000) == (160, 128)  # never an upscale
    assert P.long_edge_size(1000, 3, 10) == (10, 1)
    small = P.build_purifier("long64")(photo, 0)
    assert small.shape == photo.shape and small.dtype == torch.float32
    assert float(small.min()) >= 0.0 and float(small.max()) <= 1.0
    assert torch.equal(small, P.resize_long_edge(64)(photo, 5))  # deterministic, seed ignored
    # down to 64x51 and back: the same as resizing by hand, and a real (low-pass) change
    by_hand = F.interpolate(photo[None], size=(64, 51), mode="bicubic", antialias=True).clamp(0, 1)
    by_hand = F.interpolate(by_hand, size=photo.shape[-2:], mode="bicubic").clamp(0, 1)[0]
    assert torch.allclose(small, by_hand, atol=1e-6)
    assert 20.0 < psnr(small, photo) < 40.0
    assert high_freq_energy(small) < 0.3 * high_freq_energy(photo)  # above the small copy's Nyquist
    # a smaller limit removes more
    assert psnr(P.resize_long_edge(32)(photo, 0), photo) < psnr(small, photo)
    # at or above the photo's long edge nothing happens
    for limit in (160, 1080):
        assert torch.equal(P.resize_long_edge(limit)(photo, 0), photo)
    assert torch.equal(P.build_purifier("long1080")(photo.double(), 0), photo)


def test_chain_equals_applying_in_order(photo):
    steps = (P.resize_long_edge(100), P.gaussian_noise(0.05), P.jpeg(50))
    chained = P.chain(*steps)
    expected = photo
    for step in steps:
        expected = step(expected, 7)
    assert torch.equal(chained(photo, 7), expected)
    assert not torch.equal(chained(photo, 7), chained(photo, 8))  # the seed reaches the noise step
    assert torch.equal(P.chain(P.jpeg(75))(photo, 0), P.jpeg(75)(photo, 0))
    # the order matters: JPEG last leaves the result on the 8-bit grid, noise last does not
    levels = P.chain(P.gaussian_noise(0.05), P.jpeg(50))(photo, 0) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    levels = P.chain(P.jpeg(50), P.gaussian_noise(0.05))(photo, 0) * 255
    assert not torch.allclose(levels, levels.round(), atol=1e-4)
    assert "resize_long_edge(long_edge=100)" in chained.__name__ and "jpeg(quality=50)" in chained.__name__


def test_social_is_long_edge_then_jpeg75(photo):
    social64 = P.build_purifier("social64")
    assert torch.equal(social64(photo, 0), P.jpeg(75)(P.resize_long_edge(64)(photo, 0), 0))
    # plain "social" caps the long edge at 1080 px: a small photo only gets the JPEG
    assert torch.equal(P.build_purifier("social")(photo, 0), P.jpeg(75)(photo, 0))
    assert P.build_purifier("social") is P.build_purifier("social1080")
    assert psnr(social64(photo, 0), photo) < psnr(P.jpeg(75)(photo, 0), photo)
    levels = social64(photo, 0) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # ends with a JPEG: 8-bit values


def test_sized_names_are_checked():
    for name in ("long720", "long1", "social2048", "social"):
        assert P.is_purifier_name(name), name
    for name in ("long", "long0", "long07", "long-5", "long1.5", "social_1080", "sociall", "sharpen"):
        assert not P.is_purifier_name(name), name
        with pytest.raises(ConfigError, match="long<N>"):
            P.build_purifier(name)
    for make in (lambda: P.resize_long_edge(0), lambda: P.resize_long_edge(12.5), lambda: P.chain(),
                 lambda: P.chain(P.jpeg(75), "jpeg75")):
        with pytest.raises(ConfigError):
            make()


def test_build_purifier_caches_and_maps_parameters():
    assert P.build_purifier("jpeg75") is P.build_purifier("jpeg75")
    assert "quality=50" in P.build_purifier("jpeg50").__name__
    assert "sigma=0.1" in P.build_purifier("noise0.1").__name__
    assert "scale=0.5" in P.build_purifier("resize0.5").__name__


def test_unknown_name_and_bad_parameters_raise_config_error():
    with pytest.raises(ConfigError, match="jpeg95, jpeg75"):
        P.build_purifier("jpeg10")
    for make in (
        lambda: P.jpeg(0),
        lambda: P.jpeg(101),
        lambda: P.webp(-5),
        lambda: P.resize_back(0.0),
        lambda: P.resize_back(1.5),
        lambda: P.gaussian_blur(0),
        lambda: P.gaussian_noise(-0.1),
        lambda: P.center_crop(0),
        lambda: P.cleaner(bilateral_rounds=-1),
        lambda: P.DiffPure.tiny(t_star=0),
        lambda: P.DiffPure(P.DiffPure.tiny().unet, P.DiffPure.tiny().scheduler, steps=0),
    ):
        with pytest.raises(ConfigError):
            make()


def test_bad_images_raise_input_error(photo):
    with pytest.raises(InputError):
        P.jpeg(90)(photo[None], 0)
    with pytest.raises(InputError):
        P.gaussian_blur()((photo * 255).byte(), 0)


def test_diffpure_tiny_runs_and_is_seeded(tiny_diffpure, photo):
    out = tiny_diffpure(photo, 0)
    assert out.shape == photo.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, tiny_diffpure(photo, 0))
    assert not torch.equal(out, tiny_diffpure(photo, 1))
    assert torch.equal(P.DiffPure.tiny(seed=0)(photo, 0), out)  # same seed, same weights
    assert tiny_diffpure.timestep == 20  # round(0.2 * 100 training timesteps)


def test_diffpure_ddim_steps(tiny_diffpure, photo):
    fast = P.DiffPure(tiny_diffpure.unet, tiny_diffpure.scheduler, t_star=0.3, steps=4)
    out = fast(photo, 5)
    assert out.shape == photo.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, fast(photo, 5))
    assert not torch.equal(out, fast(photo, 6))  # the forward noise is seeded


def test_diffpure_from_pretrained_folder(tmp_path, tiny_diffpure, photo):
    tiny_diffpure.unet.save_pretrained(tmp_path / "unet")
    tiny_diffpure.scheduler.save_pretrained(tmp_path / "scheduler")
    assert P.diffpure_available(str(tmp_path))
    loaded = P.DiffPure.from_pretrained(str(tmp_path), t_star=0.2, device="cpu")
    assert torch.allclose(loaded(photo, 0), tiny_diffpure(photo, 0), atol=1e-5)
    via_registry = P.build_purifier("diffpure", diffpure_model=str(tmp_path), device="cpu")
    assert via_registry(photo, 0).shape == photo.shape


def test_diffpure_from_pretrained_flat_folder(tmp_path, tiny_diffpure, photo):
    """The google/ddpm-* repositories keep config.json and scheduler_config.json at the top."""
    tiny_diffpure.unet.save_pretrained(tmp_path)
    tiny_diffpure.scheduler.save_pretrained(tmp_path)
    assert P.diffpure_available(str(tmp_path))
    loaded = P.DiffPure.from_pretrained(str(tmp_path), device="cpu")
    assert torch.allclose(loaded(photo, 0), tiny_diffpure(photo, 0), atol=1e-5)


def test_missing_diffpure_model_raises_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        str(tmp_path / "nowhere"): "does not exist",
        "no-such-org/no-such-ddpm": "not in the local Hugging Face cache",
    }
    for source, message in cases.items():
        assert not P.diffpure_available(source)
        with pytest.raises(ModelError, match=message):
            P.DiffPure.from_pretrained(source, device="cpu")
        with pytest.raises(ModelError, match=message):
            P.build_purifier("diffpure", diffpure_model=source, device="cpu")
    (tmp_path / "empty").mkdir()
    assert not P.diffpure_available(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="could not be loaded"):
        P.DiffPure.from_pretrained(str(tmp_path / "empty"), device="cpu")


def test_diffpure_default_model_not_available_offline(tmp_path, monkeypatch):
    """With an empty hub cache the default model is reported missing, without any download."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert P.diffpure_available() is False
    assert P.diffpure_available(P.DEFAULT_DIFFPURE_MODEL) is False


def test_diffpure_available_reads_the_hub_cache(tmp_path, monkeypatch):
    """A cached snapshot (flat google/ddpm-* layout) counts as available."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--google--ddpm-ema-celebahq-256" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "diffusion_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "models--google--ddpm-ema-celebahq-256" / "refs").mkdir()
    (tmp_path / "models--google--ddpm-ema-celebahq-256" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert P.diffpure_available() is True
