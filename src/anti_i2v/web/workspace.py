"""The web page's temporary folder: one sub-folder per job, old jobs swept away, all removed on close."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from anti_i2v.errors import AntiI2VError

JOBS = "jobs"


class WorkspaceClosed(AntiI2VError):
    """The server is stopping: the job in progress ends, and its files go with the workspace."""


class Workspace:
    """A private temporary folder (mode 700) for uploads and results.

    Jobs left alone for more than ``keep_seconds`` are deleted by `sweep` (every ``sweep_every``
    seconds once `start` runs); a job in use (`in_use`) is never swept, and its time counts from
    when it was last used. `close` tells running jobs to stop (`check_open`), waits for them
    (at most ``drain_seconds``) and deletes the whole folder. Use it as a context manager.
    """

    def __init__(self, keep_seconds: float, parent: str | Path | None = None, sweep_every: float = 60.0,
                 drain_seconds: float = 30.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="anti-i2v-serve-", dir=parent))
        self.keep_seconds = keep_seconds
        self.sweep_every = sweep_every
        self.drain_seconds = drain_seconds
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._busy: dict[Path, int] = {}
        self._lock = threading.Lock()

    def new_job(self) -> Path:
        """A fresh, empty folder for one job."""
        self.check_open()
        folder = self.root / JOBS / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    @contextlib.contextmanager
    def in_use(self, folder: Path) -> Iterator[Path]:
        """Keep ``folder`` from being swept while the block runs; its time restarts at the end."""
        with self._lock:
            self._busy[folder] = self._busy.get(folder, 0) + 1
        try:
            yield folder
        finally:
            with self._lock:
                self._busy[folder] -= 1
                if not self._busy[folder]:
                    del self._busy[folder]
            with contextlib.suppress(FileNotFoundError):
                os.utime(folder)

    def sweep(self, now: float | None = None) -> list[Path]:
        """Delete the job folders not in use and last used more than ``keep_seconds`` ago; returns them."""
        now = time.time() if now is None else now
        removed = []
        for folder in sorted((self.root / JOBS).glob("*")):
            with self._lock:
                if folder in self._busy:
                    continue
            try:
                age = now - folder.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > self.keep_seconds:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def start(self) -> None:
        """Sweep in a background thread until `close`."""
        def loop() -> None:
            while not self._stop.wait(self.sweep_every):
                self.sweep()

        self._sweeper = threading.Thread(target=loop, name="anti-i2v-sweeper", daemon=True)
        self._sweeper.start()

    def check_open(self) -> None:
        """Raise `WorkspaceClosed` once `close` has begun (jobs call it between steps)."""
        if self._stop.is_set():
            raise WorkspaceClosed("the server is stopping; nothing was kept")

    def close(self) -> None:
        """Stop sweeping, let running jobs end (at most ``drain_seconds``), delete everything."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        deadline = time.monotonic() + self.drain_seconds
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Workspace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
