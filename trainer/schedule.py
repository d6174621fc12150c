"""Learning-rate schedules, the batch-size ramp and the loss-spike guard: plain functions and
small classes, with no torch or DeepSpeed in sight (unit-tested in tests/test_trainer.py)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field


def lr_factor(progress: float, schedule: str, warmup: float, decay: float, shape: str, final: float) -> float:
    """The learning rate as a fraction of the peak at ``progress`` (consumed / planned tokens, 0..1+).

    - warmup: linear from 0 over the first ``warmup`` of the run;
    - ``wsd``: stable at the peak, then over the last ``decay`` of the run down to ``final`` of the
      peak with a cosine, linear or 1-sqrt shape; ``cosine``: one cosine from the peak to ``final``.
    Past the planned end it stays at ``final``.
    """
    p = max(0.0, progress)
    if warmup > 0 and p < warmup:
        return p / warmup
    if schedule == "cosine":
        t = min(1.0, (p - warmup) / max(1e-12, 1.0 - warmup))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    start = 1.0 - decay
    if decay == 0 or p < start:
        return 1.0
    return 1.0 - (1.0 - final) * decay_drop(min(1.0, (p - start) / decay), shape)


def decay_drop(t: float, shape: str) -> float:
    """How far a decay has gone (0 → 1) at ``t`` (0 → 1) of its length, for its shape."""
    if shape == "linear":
        return t
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    return 1.0 - math.sqrt(max(0.0, 1.0 - t))  # 1-sqrt (Hägele et al. 2024)


def batch_at(tokens: int, ramp: list[tuple[int, int]]) -> int:
    """The global batch (sequences) once ``tokens`` have been consumed: the last ramp mark reached."""
    batch = ramp[0][1]
    for mark, size in ramp:
        if tokens >= mark:
            batch = size
    return batch


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimizer step on each process (at least one)."""
    return max(1, math.ceil(global_batch / (micro_batch * world)))


@dataclass
class SpikeGuard:
    """Rolling statistics of accepted losses; a loss far above them, or a non-finite one, is a spike.

    ``observe`` answers ``ok``, ``spike`` (not yet persistent) or ``rollback`` (``patience`` spikes
    in a row, or any non-finite value)."""

    window: int = 50
    z: float = 4.0
    min_delta: float = 0.5
    patience: int = 3
    warmup_steps: int = 20
    history: deque = field(default_factory=deque)
    streak: int = 0
    seen: int = 0
    rows: deque = field(default_factory=deque)  # per accepted step of the window: its rows' losses

    def observe(self, loss: float, grad_norm: float | None = None, row_losses: list[float] = ()) -> str:
        """The step's verdict; ``row_losses`` (each row's worst document loss) of the accepted steps in
        the window are the reference ``outlier_rows`` judges rows against."""
        self.seen += 1
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.streak = self.patience
            return "rollback"
        if len(self.history) >= max(5, min(self.window, self.warmup_steps)) and self.seen > self.warmup_steps:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.z * std and loss - mean > self.min_delta:
                self.streak += 1
                return "rollback" if self.streak >= self.patience else "spike"
        self.streak = 0
        self.history.append(loss)
        self.rows.append(list(row_losses))
        while len(self.history) > self.window:
            self.history.popleft()
        while len(self.rows) > self.window:
            self.rows.popleft()
        return "ok"

    def state(self) -> dict:
        return {"history": list(self.history), "streak": self.streak, "seen": self.seen, "rows": list(self.rows)}

    def load(self, state: dict) -> None:
        self.history = deque(state["history"])
        self.streak, self.seen = state["streak"], state["seen"]
        self.rows = deque(state.get("rows", []))

    def reference_rows(self) -> list[float]:
        """The row losses of the accepted steps in the window (what ``outlier_rows`` compares with)."""
        return [x for rows in self.rows for x in rows]


@dataclass
class SkipStep:
    """Skip-step (as OLMo-core's optimizer does): a step whose loss or gradient norm is more than ``z``
    standard deviations above those of the recent accepted steps (``window``) gets no update; the first
    line of defence, before the spike guard's rollback. Calling it judges a step and, when the step is
    accepted, remembers it. No verdict before ``warmup_steps`` steps and 5 remembered ones."""

    z: float
    window: int = 50
    warmup_steps: int = 20
    losses: deque = field(default_factory=deque)
    norms: deque = field(default_factory=deque)
    seen: int = 0

    def __call__(self, loss: float, grad_norm: float | None) -> bool:
        self.seen += 1
        if self.seen > self.warmup_steps and len(self.losses) >= 5:
            if _above(loss, self.losses, self.z) or (grad_norm is not None and _above(grad_norm, self.norms, self.z)):
                return True
        self.losses.append(loss)
        if grad_norm is not None:
            self.norms.append(grad_norm)
        for values in (self.losses, self.norms):
            while len(values) > self.window:
                values.popleft()
        return False

    def state(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "seen": self.seen}

    def load(self, state: dict) -> None:
        self.losses, self.norms, self.seen = deque(state["losses"]), deque(state["norms"]), state["seen"]


def _above(value: float, history: deque, z: float) -> bool:
    if len(history) < 5:
        return False
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    return value > mean + z * std


def outlier_rows(losses: dict[int, float], reference: list[float], z: float, min_delta: float) -> list[int]:
    """The rows (of ``losses``: row → its worst document's loss) that stand out from ``reference``, the
    row losses of recent accepted steps: above their median by more than ``z`` robust standard
    deviations (1.4826 · median absolute deviation) and by at least ``min_delta``. A non-finite loss
    always stands out. With fewer than 8 reference rows nothing can be judged: no row is returned."""
    if len(reference) < 8:
        return []
    median = statistics.median(reference)
    mad = statistics.median(abs(x - median) for x in reference)
    limit = median + max(z * 1.4826 * mad, min_delta)
    return sorted(r for r, loss in losses.items() if not math.isfinite(loss) or loss > limit)


def model_flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N plus attention's 12·L·H·T (PaLM's MFU accounting)."""
    return 6.0 * params + 12.0 * layers * hidden * seq_len
