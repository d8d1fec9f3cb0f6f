"""Protect a batch on a Ray cluster: one worker per GPU (or per CPU slot on a cluster without
GPUs) keeps its model loaded, and takes the next photo as soon as it is done with one.

Workers write each output and sidecar exactly as `anti_i2v.batch.protect_batch` does
(atomically, into ``out_dir``; on a cluster of several machines that must be a folder they
all see). A rerun skips finished photos. A photo that fails is recorded with its reason in
``out_dir/failed.json`` and does not stop the others; a photo whose worker dies is retried
once on a fresh worker, then recorded as failed. Model, configuration and out-of-memory
errors concern every photo and stop the batch, as without Ray.

    anti-i2v protect photos/ --ray local          # start a Ray instance on this machine
    anti-i2v protect photos/ --ray auto           # join the cluster this machine belongs to
    anti-i2v protect photos/ --ray ray://head:10001
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anti_i2v.api import dtype_name
from anti_i2v.atomic import write_json_atomic
from anti_i2v.batch import (
    BatchItem, RunSummary, check_output_dir, expand_inputs, output_stems, protect_photo, resume_settings, settled_item,
)
from anti_i2v.config import DEFAULT_MEMORY_MODE, DEFAULT_PRESET
from anti_i2v.errors import AntiI2VError, ConfigError, InputError
from anti_i2v.models.registry import model_identity, parse_dtype
from anti_i2v.photo import check_photo_file, output_path_for

logger = logging.getLogger(__name__)

FAILED_RECORD = "failed.json"
RETRIES_AFTER_WORKER_DEATH = 1


class PhotoWorker:
    """A Ray actor's body: loads the model once and protects the photos it is given."""

    def __init__(self, model: str, model_path: str | None, device: str | None, dtype: str | None, memory: str,
                 compile: bool = False, attention: str = "auto",
                 before_photo: Callable[[Path], None] | None = None) -> None:
        from anti_i2v.models.registry import load_model

        self.before_photo = before_photo
        self.model, self.load_error = None, None
        try:
            self.model = load_model(model, model_path, device, dtype, memory, compile, attention)
        except Exception as err:  # noqa: BLE001 - kept whole for `ready`, which Ray reports with its type
            self.load_error = err

    def ready(self) -> str:
        """The loaded model's name, or the error that loading it raised (the driver waits on this)."""
        if self.load_error is not None:
            raise self.load_error
        return self.model.name

    def protect(self, source: str, out_dir: str, fmt: str, stem: str, preset: str, options: dict[str, Any]) -> dict:
        """`protect_photo` on this worker's model; the outcome as ``status``, ``output`` and ``error``."""
        if self.before_photo is not None:
            self.before_photo(Path(source))
        item = protect_photo(Path(source), self.model, Path(out_dir), fmt, stem, preset=preset, **options)
        return {"status": item.status, "output": str(item.output) if item.output else None, "error": item.error}


def connect(address: str) -> None:
    """Start a local Ray instance (``local``) or join a cluster (``auto`` or an address)."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot reach a Ray cluster at '{address}' ({reason}); "
                          "use --ray local to start one on this machine") from err


def _worker_slots(workers: int | None) -> tuple[dict[str, float], int]:
    """Ray resources of one worker (a GPU, else a CPU slot) and how many workers the cluster holds."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    need, capacity = ({"num_gpus": 1}, gpus) if gpus else ({"num_cpus": 1}, max(1, cpus))
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1 (got {workers})")
    return need, min(workers or capacity, capacity)


@dataclass
class _Job:
    source: Path
    stem: str
    attempts: int = 0


def protect_batch_on_ray(
    inputs: Iterable[str | Path],
    model: str,
    out_dir: str | Path,
    *,
    address: str = "local",
    workers: int | None = None,
    model_path: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    memory: str = DEFAULT_MEMORY_MODE,
    compile: bool = False,
    attention: str = "auto",
    preset: str = DEFAULT_PRESET,
    fmt: str = "png",
    overwrite: bool = False,
    on_done: Callable[[BatchItem], None] | None = None,
    before_photo: Callable[[Path], None] | None = None,
    **options: Any,
) -> tuple[list[BatchItem], RunSummary]:
    """Protect every photo of ``inputs`` against ``model`` (a registry name) on Ray workers.

    ``options`` are `ProtectConfig` fields, as for `anti_i2v.protect`. ``before_photo`` runs in
    the worker before each photo (tests use it to kill a worker mid-batch). Returns each
    photo's outcome, in input order, and the run's summary.
    """
    import ray

    if "," in model:
        raise ConfigError("--ray serves one model; protect against an ensemble without --ray")
    # a bad setting fails before any worker starts; no model is loaded here to say whether its video is long
    settings = resume_settings({"preset": preset, **options}, long_video=None, families=None)
    # the dtype a worker loads in depends on its device, unless it is asked for
    asked = None if dtype is None else dtype_name(parse_dtype(dtype, torch.device("cpu")))
    made_against = [(*model_identity(model, model_path), asked)]
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    began = time.perf_counter()
    sources = expand_inputs(inputs)
    stems = output_stems(sources)
    outcomes: dict[Path, BatchItem] = {}
    pending: deque[_Job] = deque()
    failures: dict[str, str] = {}
    for source in sources:
        output = output_path_for(source, out_dir, fmt, stems[source])
        if settled := settled_item(source, output, settings, made_against, overwrite):
            outcomes[source] = _finish(settled, on_done)
        elif unreadable := _unreadable(source):  # no worker needs to start for a file that is not a photo
            failures[str(source)] = unreadable
            outcomes[source] = _finish(BatchItem(source, "failed", error=unreadable), on_done)
        else:
            pending.append(_Job(source, stems[source]))
    if pending:
        connect(address)
        need, count = _worker_slots(workers)
        remote = ray.remote(**need, max_restarts=0)(PhotoWorker)

        def start_worker():
            return remote.remote(model, str(model_path) if model_path else None, device, dtype, memory, compile,
                                 attention, before_photo)

        idle = [start_worker() for _ in range(min(count, len(pending)))]
        _wait_ready(idle)
        running: dict[Any, tuple[Any, _Job]] = {}
        try:
            while pending or running:
                while idle and pending:
                    worker, job = idle.pop(), pending.popleft()
                    future = worker.protect.remote(str(job.source), str(out_dir), fmt, job.stem, preset, options)
                    running[future] = (worker, job)
                (ready,), _ = ray.wait(list(running), num_returns=1)
                worker, job = running.pop(ready)
                item = _collect(ready, job, pending)
                if item is None:  # its worker died and the photo is queued again: a fresh worker takes over
                    idle.append(start_worker())
                    continue
                idle.append(worker)
                if item.status == "failed":
                    failures[str(job.source)] = item.error or "failed"
                    write_json_atomic(out_dir / FAILED_RECORD, failures)
                outcomes[job.source] = _finish(item, on_done)
        finally:
            for worker in idle + [w for w, _ in running.values()]:
                ray.kill(worker)
    record = out_dir / FAILED_RECORD
    if failures:
        write_json_atomic(record, failures)
    elif record.exists():
        record.unlink()  # nothing failed this time
    items = [outcomes[s] for s in sources]
    return items, RunSummary.of(items, time.perf_counter() - began)


def _unreadable(source: Path) -> str | None:
    """Why ``source`` cannot be a photo (as `load_photo` words it), None when it may be one."""
    try:
        check_photo_file(source)
    except InputError as err:
        return str(err)
    return None


def _wait_ready(workers: list) -> None:
    """Wait until every worker has loaded its model; a model that cannot load stops the batch."""
    import ray

    try:
        ray.get([w.ready.remote() for w in workers])
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
        for worker in workers:
            ray.kill(worker)
        cause = getattr(err, "cause", None)
        if isinstance(cause, AntiI2VError):
            raise cause from None
        reason = str(cause or err).splitlines()[0]
        raise AntiI2VError(f"a Ray worker could not load the model: {reason}") from None


def _collect(future: Any, job: _Job, pending: deque[_Job]) -> BatchItem | None:
    """The outcome of one photo, or None when its worker died (the photo is queued again once)."""
    import ray

    try:
        outcome = ray.get(future)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, AntiI2VError):
            raise cause from None  # model, configuration or memory: every photo would fail alike
        return BatchItem(job.source, "failed", error=f"{type(cause).__name__}: {cause}")
    except ray.exceptions.RayActorError:
        if job.attempts < RETRIES_AFTER_WORKER_DEATH:
            logger.warning("the worker protecting %s died; retrying it on a fresh worker", job.source)
            job.attempts += 1
            pending.appendleft(job)
            return None
        return BatchItem(job.source, "failed", error=f"its worker died {job.attempts + 1} times protecting it")
    if outcome["status"] == "done":
        return BatchItem(job.source, "done", output=Path(outcome["output"]))
    return BatchItem(job.source, "failed", error=outcome["error"])


def _finish(item: BatchItem, on_done: Callable[[BatchItem], None] | None) -> BatchItem:
    if on_done is not None:
        on_done(item)
    return item
