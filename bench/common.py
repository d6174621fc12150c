"""What the benchmarks share: ~1 KB pieces of real text, and peak-memory sampling of the Spark JVM and
its Python workers. (A throwaway demo recipe and corpus: ``jobs.demo_corpus.demo_recipe_in``.)"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def demo_texts(folder: Path) -> list[str]:
    """The demo corpus's texts, built under ``folder``: every source but ``messy`` (broken on purpose)."""
    from jobs.demo_corpus import build_demo_corpus

    return [t for built in build_demo_corpus(folder) if built.name != "messy" for t in built.texts()]


def kilobyte_pieces(texts: list[str], size: int = 1000, minimum: int = 300) -> list[str]:
    """Texts cut at line ends into pieces of about ``size`` UTF-8 bytes (tails under ``minimum`` dropped)."""
    pieces: list[str] = []
    for text in texts:
        piece: list[str] = []
        length = 0
        for line in text.split("\n"):
            piece.append(line)
            length += len(line.encode()) + 1
            if length >= size:
                pieces.append("\n".join(piece))
                piece, length = [], 0
        if length >= minimum:
            pieces.append("\n".join(piece))
    return pieces


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


class PeakMemory:
    """Samples resident memory every ``interval`` s: a root process and, separately, its descendants.

    For Spark in local mode the root is the JVM (driver and executor in one process) and the
    descendants are the Python workers (the executors' Python side); for datatrove the root is this
    process and the descendants are its worker processes.
    """

    def __init__(self, root_pid: int, interval: float = 0.1, exclude: set[int] | None = None):
        self.root_pid, self.interval, self.exclude = root_pid, interval, exclude or set()
        self.root_peak = self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [p for p in _tree(self.root_pid) if p != self.root_pid]
            skip = {q for p in self.exclude for q in _tree(p)}
            self.root_peak = max(self.root_peak, _rss_kib(self.root_pid))
            self.children_peak = max(self.children_peak, sum(_rss_kib(p) for p in pids if p not in skip))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def jvm_pid(spark) -> int:
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
