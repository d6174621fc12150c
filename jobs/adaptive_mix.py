"""Adaptive mixing: each chunk's shares move towards the categories whose loss still falls fastest.

Online data mixing in the style of ODM (multiplicative weights, EXP3) and ADO (sample where the loss
still falls): the trainer publishes each category's recent loss and its slope per token
(``training_signals``, ``trainer.callbacks.TrainingSignals``); for the next chunk of a stage marked
``adaptive`` feed computes

    speed_c = max(0, -slope_c) / loss_c                      (the share of its loss it still loses per token)
    z_c     = (speed_c - mean speed) / max speed              (in [-1, 1]; 0 for a category without a signal)
    w_c     = base_c · exp(strength · z_c)

and projects ``w`` onto the shares that sum to 1 and keep each category within its [min, max]
(``project_to_bounds``). A category whose loss has flattened (or rises) loses share to one whose loss
is still falling: data the model still learns from gets more tokens, learned or unlearnable data
fewer. ``favour: lagging`` turns the rule round (z_c → -z_c): the category whose loss falls slowest
gains share, so that no category is left behind (a balancing choice, for mixes where each category must
reach its own quality). The rule has no memory: the same signal gives the same mix, and the bounds hold whatever it
says. Without a signal (the run has not trained ``min_tokens`` yet) the mix is the base mix.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from lake.feed_sections import FeedStage
from lake.signals import latest_signals
from lake.tables import Lake


@dataclass(frozen=True)
class CategorySignal:
    """What the trainer last published of one category."""

    loss: float  # the category's mean loss over the trainer's window
    slope: float  # loss change per token of the run (negative while falling)
    tokens: int  # the run's tokens when it was published
    step: int

    @classmethod
    def from_row(cls, row: dict) -> "CategorySignal":
        return cls(float(row["loss"]), float(row["slope"]), int(row["tokens"]), int(row["step"]))


def learning_speed(signal: CategorySignal) -> float:
    """The share of its loss the category still loses per token: 0 when the loss is flat or rising."""
    return max(0.0, -signal.slope) / signal.loss if signal.loss > 0 else 0.0


def adaptive_mix(base: dict[str, float], bounds: dict[str, tuple[float, float]], signal: dict[str, CategorySignal],
                 strength: float, min_tokens: int = 0, favour: str = "falling") -> dict[str, float]:
    """The shares of the next chunk (summing to 1, each within its bounds; a category without bounds
    within [0, 1]): the base mix re-weighted by each category's learning speed against the others'
    (the module's rule; ``favour`` "falling" or "lagging"). A category without a signal (or with one from before ``min_tokens``) keeps
    its base weight; with none at all, the normalised base mix (moved into the bounds, should they
    exclude it)."""
    weights = normalised(base)
    speeds = {c: learning_speed(s) for c, s in signal.items() if c in base and s.tokens >= min_tokens}
    if speeds:
        mean, top = sum(speeds.values()) / len(speeds), max(speeds.values())
        sign = {"falling": 1.0, "lagging": -1.0}[favour]
        z = {c: sign * (v - mean) / top if top > 0 else 0.0 for c, v in speeds.items()}
        weights = {c: w * math.exp(strength * z.get(c, 0.0)) for c, w in weights.items()}
    return project_to_bounds(weights, bounds)


def normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()}


def project_to_bounds(weights: dict[str, float], bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The shares closest to ``weights`` (in KL divergence) that sum to 1 with each within its [min, max]
    (a category ``bounds`` does not name: [0, 1]):
    ``clip(λ · w_c, min_c, max_c)`` with the one λ that makes them sum to 1. Clipping a category at a
    bound redistributes what it gives or takes to the others in proportion to their weights.

    The sum is piecewise linear and rising in λ, bent where a category meets a bound (λ = min/w or
    max/w): the segment where it crosses 1 is found among those points, and λ solved on it."""
    for c, w in weights.items():
        if not w > 0:
            raise ValueError(f"category {c!r} has weight {w}: every weight must be positive")
    lo = {c: bounds.get(c, (0.0, 1.0))[0] for c in weights}
    hi = {c: bounds.get(c, (0.0, 1.0))[1] for c in weights}
    if sum(lo.values()) > 1 + 1e-12 or sum(hi.values()) < 1 - 1e-12:
        raise ValueError(f"bounds {bounds} cannot hold shares that sum to 1: the mins sum to {sum(lo.values()):g} "
                         f"and the maxes to {sum(hi.values()):g}; loosen them")

    def total(lam: float) -> float:
        return sum(min(max(lam * w, lo[c]), hi[c]) for c, w in weights.items())

    low = 0.0
    for point in sorted({b / weights[c] for c in weights for b in (lo[c], hi[c])}):
        if total(point) >= 1:
            break
        low = point
    else:
        return dict(hi)  # the maxes sum to 1 (within rounding): nothing to choose
    mid = (low + point) / 2  # inside the segment every category is below, on or above its bounds alike
    free = [c for c, w in weights.items() if lo[c] < mid * w < hi[c]]
    fixed = sum(min(max(mid * w, lo[c]), hi[c]) for c, w in weights.items() if c not in free)
    lam = (1 - fixed) / sum(weights[c] for c in free) if free else point
    return {c: min(max(lam * w, lo[c]), hi[c]) for c, w in weights.items()}


@dataclass(frozen=True)
class ChunkMix:
    """The shares a chunk is planned with, and the signal behind them (None for a fixed mix)."""

    shares: dict[str, float]
    signal: dict | None

    def signal_json(self) -> str | None:
        return json.dumps(self.signal, sort_keys=True) if self.signal is not None else None


def chunk_mix(lake: Lake, stage: FeedStage, default_run: str) -> ChunkMix:
    """The mix of the stage's next chunk: its own (normalised), or, where it is adaptive, the adaptive
    mix of the latest signal per category of the run (``adaptive.run``, else ``default_run``)."""
    base = {c: s for c, s in stage.mix.items() if s > 0}
    if stage.adaptive is None:
        return ChunkMix(normalised(base), None)
    a = stage.adaptive
    run = a.run or default_run
    signal = {c: CategorySignal.from_row(r) for c, r in latest_signals(lake, run).items() if c in base}
    shares = adaptive_mix(base, stage.adaptive_bounds(), signal, a.strength, a.min_tokens, a.favour)
    used = {c: asdict(s) for c, s in signal.items() if s.tokens >= a.min_tokens}
    return ChunkMix(shares, {"run": run, "strength": a.strength, "min_tokens": a.min_tokens, "favour": a.favour,
                             "signals": used})
