"""The Gradio page of `anti-i2v serve`: upload photos, protect them, see the change, download, check.

Gradio is imported here only (the `web` extra). `serve` makes the workspace first and points
Gradio's own upload folder into it, so that everything a visitor sends or receives lives in
one temporary folder, swept after ``keep_minutes`` and deleted when the server stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anti_i2v.config import DEFAULT_PRESET, PRESETS, describe_preset
from anti_i2v.errors import AntiI2VError, OutOfMemory
from anti_i2v.web.service import CHECK_PURIFIERS, JobResult, ProtectionService
from anti_i2v.web.workspace import Workspace

logger = logging.getLogger(__name__)
GPU_QUEUE = "model"  # protect and check share it: one job at a time on the model
INTRO = """# anti-i2v
Protect photos of people from being turned into videos by image-to-video models. The change to each
photo is capped (the budget below) and measured on the saved file. Keep the protected PNG: it carries the
protection; re-saving it as a low-quality JPEG weakens it.
"""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a file name may hold any character)."""
    return "".join("\\" + c if c in "\\`*_[]<>|#" else c for c in text.replace("\n", " "))


def _status_table(job: JobResult) -> str:
    """A Markdown table: one row per uploaded file with its budget or the reason it failed."""
    rows = ["| photo | result | L-inf (1/255 levels) | PSNR (dB) |", "|---|---|---|---|"]
    for o in job.outcomes:
        if o.budget is not None:
            rows.append(f"| {_cell(o.name)} | protected | {o.budget.linf_255:.2f} | {o.budget.psnr:.2f} |")
        else:
            rows.append(f"| {_cell(o.name)} | **not protected**: {_cell(o.message)} | - | - |")
    done = len(job.done)
    return f"**{done} of {len(job.outcomes)} photo(s) protected** against `{job.model}` ({job.preset}).\n\n" + "\n".join(rows)


@contextlib.contextmanager
def _page_errors(error: Callable[[str], Exception]) -> Iterator[None]:
    """Errors of a page action as one line on the page (``error`` builds Gradio's), never a trace."""
    try:
        yield
    except OutOfMemory:
        raise error("the server's GPU ran out of memory for this model; its operator can restart the page "
                    "with a lighter --memory mode") from None
    except AntiI2VError as err:
        raise error(str(err)) from None
    except Exception:  # noqa: BLE001 - the visitor gets a line, the log the details
        logger.exception("page action failed")
        raise error("something went wrong on the server; its log has the details") from None


def build_app(service: ProtectionService, keep_seconds: int = 3600) -> Any:
    """The page's `gradio.Blocks` (not launched), one job at a time per model."""
    import gradio as gr

    def error(message: str) -> Exception:
        return gr.Error(message, print_exception=False)

    def protect(files: list[str] | None, model: str, preset: str, progress: gr.Progress = gr.Progress()) -> tuple:
        def report(index: int, total: int, name: str, step: Any) -> None:
            if step is None:
                progress((index, total), desc=f"photo {index + 1}/{total}: {name}", unit="photos")
                return
            progress((step.step, step.total), unit="steps",
                     desc=f"photo {index + 1}/{total}: {name}, step {step.step}/{step.total}, "
                          f"about {step.eta:.0f} s left for this photo")

        with _page_errors(error):
            job = service.protect_uploads(files or [], model, preset, progress=report)
        for outcome in job.outcomes:
            if outcome.status != "done":
                gr.Warning(outcome.message if outcome.name in outcome.message else f"{outcome.name}: {outcome.message}")
        gallery = [(str(o.panel), o.caption()) for o in job.done]
        downloads = [str(o.output) for o in job.done] + ([str(job.archive)] if job.archive else [])
        names = [o.name for o in job.done]
        return (_status_table(job), gallery, downloads or None, job,
                gr.Dropdown(choices=names, value=names[0] if names else None))

    def check(job: JobResult | None, name: str | None) -> tuple:
        if job is None or not name:
            raise error("protect a photo first, then check it")
        with _page_errors(error):
            result = service.check(job, name)
        headline = f"### Verdict for {_cell(name)}: **{result.verdict}** (worst case: {result.worst_case})\n\n"
        return headline + result.report_markdown, str(result.contact_sheet), str(result.video)

    choices = service.choices()
    with gr.Blocks(title="anti-i2v", analytics_enabled=False,
                   delete_cache=(min(keep_seconds, 600), keep_seconds)) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            uploads = gr.File(label="Photos (drop one or several)", file_count="multiple", elem_id="uploads")
            with gr.Column():
                model = gr.Dropdown(choices, value=choices[0][1], label="Protect against", elem_id="model")
                preset = gr.Radio([(describe_preset(n), n) for n in PRESETS], value=DEFAULT_PRESET, label="Strength",
                                  elem_id="preset")
                start = gr.Button("Protect", variant="primary", elem_id="protect")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="original | protected; below, the most changed crop of both and the change x8",
                             columns=2, fit_columns=False, height="auto", object_fit="contain", elem_id="views")
        downloads = gr.File(label="Download (each PNG with its JSON sidecar inside the zip)", file_count="multiple",
                            interactive=False, elem_id="downloads")
        job = gr.State()
        with gr.Accordion("Check it: generate videos from the original and the protected photo", open=False):
            gr.Markdown(f"Generates videos with the same model from the original, the protected photo, random noise "
                        f"of the same budget, and the protected photo after {', '.join(CHECK_PURIFIERS)}; "
                        "then gives the verdict.")
            which = gr.Dropdown(label="Photo", choices=[], elem_id="which")
            run_check = gr.Button("Check", elem_id="check")
            verdict = gr.Markdown(elem_id="verdict")
            with gr.Row():
                sheet = gr.Image(label="Contact sheet", type="filepath", elem_id="sheet")
                video = gr.Video(label="Side by side", elem_id="video")
        start.click(protect, [uploads, model, preset], [status, gallery, downloads, job, which],
                    concurrency_limit=1, concurrency_id=GPU_QUEUE)
        run_check.click(check, [job, which], [verdict, sheet, video], concurrency_limit=1, concurrency_id=GPU_QUEUE)
    page.queue(default_concurrency_limit=1)
    return page


def serve(
    models: list[str],
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    keep_minutes: float = 60.0,
    temp_dir: str | Path | None = None,
    on_ready: Callable[[str, Path], None] | None = None,
    **service_options: Any,
) -> None:
    """Run the page until interrupted (Ctrl-C, SIGTERM or SIGHUP); the workspace is deleted on the way out.

    Gradio's own upload folder is the workspace, so that every file the page receives or serves
    lives there and is served as Gradio serves uploads (never as a page of the server's).
    """
    keep_seconds = max(60, int(keep_minutes * 60))
    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    stopping = {number: signal.getsignal(number) for number in numbers}
    for number in stopping:  # before the workspace exists, so that no stop can leave it behind
        signal.signal(number, lambda *_: sys.exit(0))
    try:
        with Workspace(keep_seconds, temp_dir) as workspace:
            os.environ["GRADIO_TEMP_DIR"] = str(workspace.root)  # read when Gradio is first imported
            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
            service = ProtectionService(models, workspace, **service_options)
            page = build_app(service, keep_seconds)
            try:
                hard_limit = f"{2 * service.max_upload_mb:g}mb"  # larger ones are refused per file below it
                page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                            quiet=True, max_file_size=hard_limit)
                if on_ready is not None:
                    on_ready(page.local_url, workspace.root)
                while True:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            finally:
                page.close()
    finally:
        for number, handler in stopping.items():
            signal.signal(number, handler)
