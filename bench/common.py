"""What the benchmarks share: ~1 KB pieces of real text, a tiny Llama and the timing of repeated rounds
with their table, and peak-memory sampling of the Spark JVM and its Python workers. (A throwaway demo recipe and corpus: ``jobs.demo_corpus.demo_recipe_in``.)"""

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


def tiny_llama(vocab_size: int, hidden: int, layers: int, max_positions: int | None = None):
    """A randomly initialised LlamaForCausalLM of ``layers`` × ``hidden`` (heads of 64), for model benches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    extra = {"max_position_embeddings": max_positions} if max_positions else {}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, **extra))


def timed_rounds(rounds: int, runs: dict) -> tuple[dict[str, list[float]], dict]:
    """Each of ``runs`` (name → function without arguments) once per round, in turn: (seconds per name per
    round, each one's last result)."""
    import time

    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict = {}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - started)
    return times, results


def print_rounds(times: dict[str, list[float]], labels: dict[str, str], units: int, unit: str, width: int = 44) -> None:
    """Median, min-max, ``units``/s and speed against the first of ``times`` (the reference), a row each."""
    import statistics

    print(f"{'':{width}} {'s median':>9} {'min-max':>13} {unit + '/s':>8} {'vs ref':>7}")
    ref = statistics.median(next(iter(times.values())))
    for key, label in labels.items():
        med = statistics.median(times[key])
        print(f"{label:{width}} {med:9.2f} {min(times[key]):6.2f}-{max(times[key]):<6.2f} {units / med:8.1f} "
              f"{ref / med:7.2f}")


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
