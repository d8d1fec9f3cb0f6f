"""What the web page does, without the page: check uploads, protect them, package the results, verify one.

One `ProtectionService` serves every visitor of a server. It keeps one model loaded at a
time (the page runs one job at a time per GPU) and writes each job into its own folder of
the `Workspace`: the uploads as received, the protected photos and sidecars exactly as
`anti-i2v protect` writes them, a comparison picture per photo and one zip of them all.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from anti_i2v.atomic import write_atomic, write_json_atomic
from anti_i2v.batch import output_stems, protect_photo
from anti_i2v.config import DEFAULT_PRESET, ProtectConfig
from anti_i2v.engine import StepReport
from anti_i2v.extras import require_extra
from anti_i2v.errors import AntiI2VError, ConfigError, InputError, ModelError
from anti_i2v.models.base import VideoModel
from anti_i2v.models.diffusers_common import to_pil_8bit
from anti_i2v.models.registry import DEMONSTRATION_NOTE, get_spec, load_model, weights_present
from anti_i2v.photo import BudgetReport, load_photo
from anti_i2v.web.views import comparison_panel
from anti_i2v.web.workspace import Workspace

logger = logging.getLogger(__name__)

MAX_MEGAPIXELS = 50.0
MAX_UPLOAD_MB = 50.0
# the check step's purifications: the upload channel every shared photo goes through
CHECK_PURIFIERS = ("jpeg75", "social")
ARCHIVE_NAME = "anti-i2v-protected.zip"

# progress: (index of the photo, number of photos, its name, the step just done or None)
ProgressCallback = Callable[[int, int, str, "StepReport | None"], None]


@dataclass
class PhotoOutcome:
    """One uploaded file and what became of it."""

    name: str  # the file name as uploaded ("name (2)" for a second file of the same name)
    status: str  # "done" or "failed"
    message: str = ""  # why it failed
    original: Path | None = None
    output: Path | None = None
    sidecar: Path | None = None
    panel: Path | None = None
    budget: BudgetReport | None = None

    def caption(self) -> str:
        """``name: L-inf 8.00/255, PSNR 31.4 dB`` for a protected photo (the budget measured on the saved file)."""
        return f"{self.name}: L-inf {self.budget.linf_255:.2f}/255, PSNR {self.budget.psnr:.2f} dB"


@dataclass
class JobResult:
    """Every photo of one upload, and the zip of the protected ones."""

    folder: Path
    model: str
    preset: str
    outcomes: list[PhotoOutcome] = field(default_factory=list)
    archive: Path | None = None

    @property
    def done(self) -> list[PhotoOutcome]:
        """The photos that were protected."""
        return [o for o in self.outcomes if o.status == "done"]


@dataclass
class CheckResult:
    """What `verify` made of one protected photo."""

    report: dict[str, Any]  # as `verify` returns it
    report_markdown: str
    contact_sheet: Path
    video: Path

    @property
    def verdict(self) -> str:
        """The verdict on the protected photo's video."""
        from anti_i2v.evaluation.verify import PROTECTED  # the eval extra, present once a check ran

        return self.report["runs"][PROTECTED]["verdict"]

    @property
    def worst_case(self) -> str | None:
        """The run where the protection held least."""
        return self.report["worst_case"]


def check_upload(path: Path, name: str, max_megapixels: float = MAX_MEGAPIXELS,
                 max_upload_mb: float = MAX_UPLOAD_MB) -> None:
    """Refuse an empty or oversized file, or a photo of too many pixels, with a message naming it
    (files that are no image, or a corrupt or too small one, are refused by `load_photo`)."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"'{name}' is empty")
    if size > max_upload_mb * 1e6:
        raise InputError(f"'{name}' is {size / 1e6:.1f} MB; this page takes files up to {max_upload_mb:g} MB")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise InputError(f"'{name}' has too many pixels to open safely; downscale it first") from None
    except (OSError, SyntaxError, ValueError):
        return  # not an image: `load_photo` says so in its own words
    if width * height > max_megapixels * 1e6:
        raise InputError(f"'{name}' is {width}x{height} ({width * height / 1e6:.0f} MP); this page takes photos "
                         f"up to {max_megapixels:g} MP: downscale it first")


def _display_names(names: Sequence[str]) -> list[str]:
    """The upload names, a repeated one numbered ("me.jpg (2)") so that each names one photo."""
    seen: dict[str, int] = {}
    shown = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        shown.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return shown


def _sidecar_without_server_paths(sidecar: Path, name: str) -> None:
    """The sidecar as `protect` writes it, with the server's folders left out of the file names."""
    record = json.loads(sidecar.read_text())
    record["input"] = name
    record["output"] = Path(record["output"]).name
    for model in record["model"] if isinstance(record["model"], list) else [record["model"]]:
        if Path(model["source"]).is_absolute():  # local weights: their folder's name, not where it is
            model["source"] = Path(model["source"]).name
    write_json_atomic(sidecar, record)


class ProtectionService:
    """Protects uploads against one of ``models`` (registry names whose weights are present).

    ``options`` are `ProtectConfig` settings applied to every job (on top of the preset).
    """

    def __init__(
        self,
        models: Sequence[str],
        workspace: Workspace,
        *,
        model_path: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        memory: str = "full",
        max_megapixels: float = MAX_MEGAPIXELS,
        max_upload_mb: float = MAX_UPLOAD_MB,
        check_steps: int = 50,
        options: dict[str, Any] | None = None,
    ) -> None:
        if not models:
            raise ConfigError("name at least one model to serve")
        if model_path is not None and len(models) > 1:
            raise ConfigError("--model-path serves one model; load the others from the hub cache")
        for name in models:
            spec = get_spec(name)
            if not weights_present(spec, model_path):
                raise ModelError(f"no weights for '{name}' here; download {spec.hub_id} or pass --model-path DIR")
        self.models = list(models)
        self.workspace = workspace
        self.model_path, self.device, self.dtype, self.memory = model_path, device, dtype, memory
        self.max_megapixels, self.max_upload_mb = max_megapixels, max_upload_mb
        self.check_steps = check_steps
        self.options = dict(options or {})
        self._loaded: tuple[str, VideoModel] | None = None

    @staticmethod
    def label(name: str) -> str:
        """How the page lists a model: tiny ones say they protect against nothing."""
        return f"{name} (demonstration: {DEMONSTRATION_NOTE})" if get_spec(name).is_tiny else name

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) of every served model, real ones first."""
        return [(self.label(n), n) for n in sorted(self.models, key=lambda n: get_spec(n).is_tiny)]

    def _check_served(self, name: str) -> None:
        if name not in self.models:
            raise ConfigError(f"model '{name}' is not served here; choose one of {', '.join(self.models)}")

    def model(self, name: str) -> VideoModel:
        """The loaded model ``name``; the one loaded before is released first."""
        self._check_served(name)
        self.workspace.check_open()
        if self._loaded is not None and self._loaded[0] == name:
            return self._loaded[1]
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_model(name, self.model_path, self.device, self.dtype, self.memory)
        self._loaded = (name, model)
        return model

    def protect_uploads(
        self,
        uploads: Sequence[str | Path],
        model: str,
        preset: str = DEFAULT_PRESET,
        progress: ProgressCallback | None = None,
    ) -> JobResult:
        """Protect every uploaded file into a new job folder; a bad file is a failed outcome with its
        reason and the others go on. Model, configuration and memory errors are raised."""
        if not uploads:
            raise InputError("no photo uploaded: drop one or more photos on the page")
        ProtectConfig.from_preset(preset, **self.options)  # an unknown preset or setting fails here
        self._check_served(model)
        folder = self.workspace.new_job()
        with self.workspace.in_use(folder):
            return self._protect_into(JobResult(folder, model, preset), uploads, progress)

    def _protect_into(self, job: JobResult, uploads: Sequence[str | Path], progress: ProgressCallback | None) -> JobResult:
        """Check and copy the uploads into the job, protect each, then zip the protected ones."""
        originals = job.folder / "originals"
        originals.mkdir()
        uploads = [Path(u) for u in uploads]
        names = _display_names([u.name for u in uploads])
        stems = output_stems(uploads)  # distinct, also for two files of one name
        outcomes: dict[int, PhotoOutcome] = {}  # by upload order
        accepted: list[tuple[int, str, Path]] = []
        for position, (upload, name) in enumerate(zip(uploads, names)):
            try:  # before copying: a file refused here never takes room in the job
                check_upload(upload, name, self.max_megapixels, self.max_upload_mb)
            except InputError as err:
                outcomes[position] = PhotoOutcome(name, "failed", str(err))
                continue
            copy = originals / f"{stems[upload]}{upload.suffix}"
            shutil.copyfile(upload, copy)
            accepted.append((position, name, copy))
        model = self.model(job.model) if accepted else None
        for index, (position, name, source) in enumerate(accepted):
            if progress is not None:
                progress(index, len(accepted), name, None)

            def on_step(report: StepReport, index: int = index, name: str = name) -> None:
                self.workspace.check_open()
                if progress is not None:
                    progress(index, len(accepted), name, report)

            outcomes[position] = self._protect_one(job, model, name, source, source.stem, on_step)
        job.outcomes = [outcomes[p] for p in sorted(outcomes)]
        if job.done:
            job.archive = job.folder / ARCHIVE_NAME
            write_atomic(job.archive, lambda tmp: _zip(job.done, Path(tmp)))
        return job

    def _protect_one(self, job: JobResult, model: VideoModel, name: str, source: Path, stem: str,
                     on_step: Callable[[StepReport], None]) -> PhotoOutcome:
        """One accepted photo: protected as `anti-i2v protect` does, with its comparison picture. A
        problem with this photo alone is its failed outcome; model, setting, memory errors are raised."""
        try:
            item = protect_photo(source, model, job.folder / "protected", "png", stem, callback=on_step,
                                 preset=job.preset, release_text_encoder=False, **self.options)
            if item.status != "done":  # the visitor's file name, never a server path
                return PhotoOutcome(name, "failed", (item.error or "failed").replace(str(source), name))
            _sidecar_without_server_paths(item.result.sidecar, name)
            panel = job.folder / "views" / f"{stem}.png"
            panel.parent.mkdir(exist_ok=True)
            picture = comparison_panel(*(to_pil_8bit(load_photo(p).rgb) for p in (source, item.output)))
            write_atomic(panel, lambda tmp: picture.save(tmp, format="PNG"))
        except AntiI2VError:
            raise
        except Exception:  # noqa: BLE001 - one photo's surprise must not cost the others theirs
            logger.exception("protecting %s failed", name)
            return PhotoOutcome(name, "failed", f"'{name}' could not be protected (an unexpected error; "
                                                "the server's log has the details)")
        return PhotoOutcome(name, "done", original=source, output=item.output, sidecar=item.result.sidecar,
                            panel=panel, budget=item.result.budget)

    def check(self, job: JobResult, name: str) -> CheckResult:
        """Run `verify` on the protected photo uploaded as ``name`` with the job's model: videos from
        the original, the protected photo, same-budget noise and the upload channel's purifications."""
        require_extra("eval", "checking")
        from anti_i2v.evaluation.generate import GenerationSettings
        from anti_i2v.evaluation.scoring import VideoScorer
        from anti_i2v.evaluation.verify import RANDOM_WEIGHTS_NOTE, markdown_report, verify

        outcome = next((o for o in job.done if o.name == name), None)
        if outcome is None:
            raise InputError(f"'{name}' was not protected in this job; protect it first")
        with self.workspace.in_use(job.folder):
            if not outcome.output.is_file():
                raise InputError(f"the results of '{name}' were deleted after a while; protect it again")
            model = self.model(job.model)
            sidecar_prompt = _sidecar_prompt(outcome.sidecar)
            settings = GenerationSettings(steps=self.check_steps,
                                          **({"prompt": sidecar_prompt} if sidecar_prompt else {}))
            out = job.folder / "checks" / outcome.output.stem
            report = verify(outcome.original, outcome.output, model, out, settings, CHECK_PURIFIERS,
                            scorer=VideoScorer(device=model.device),
                            note=RANDOM_WEIGHTS_NOTE if get_spec(job.model).is_tiny else None)
        return CheckResult(report, markdown_report(report), out / "contact_sheet.png", out / "side_by_side.mp4")


def _sidecar_prompt(sidecar: Path | None) -> str | None:
    """The prompt the protection optimised for (so the check generates with the same one)."""
    if sidecar is None or not sidecar.is_file():
        return None
    return json.loads(sidecar.read_text()).get("config", {}).get("prompt")


def _zip(outcomes: Sequence[PhotoOutcome], path: Path) -> None:
    """The protected photos and their sidecars, stored as they are (PNG is compressed already)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for outcome in outcomes:
            for file in (outcome.output, outcome.sidecar):
                if file is not None:
                    archive.write(file, arcname=file.name)
