"""One process trains a run: rank 0 holds an exclusive lock on ``<run>/LOCK`` for as long as it runs.

Two daemons started with the same ``trainer.run_name`` would otherwise claim and consume chunks side
by side and interleave their checkpoints and metrics. The lock is the kernel's (``flock``): it ends
with the process however the process ends, so a killed daemon never blocks its restart."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from lake.errors import LakeError


class RunBusyError(LakeError):
    """Another process is training this run."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "LOCK"
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunBusyError(
                f"run {self.path.parent.name!r} is being trained by {holder} (lock {self.path}); stop that "
                f"daemon first, or give this one another trainer.run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
