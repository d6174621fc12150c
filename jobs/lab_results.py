"""A lab run's results, read from its ``metrics.jsonl``: what the report, the ranking and the laws use.

- the **held-out loss**: the mean over sources of ln(perplexity) on the held-out documents at the
  run's last evaluation (the trainer evaluates at its final step), the number runs are ranked and
  the laws are fitted by;
- the per-source perplexity there, and the per-category training loss at equal tokens (the mean of
  the last tenth of the run's steps: one step's loss of a category is a few rows');
- the loss curves (per step, and per category) against tokens;
- the few-shot points (the NLL of the correct choice, the accuracy, chance) of every evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from jobs.lab_plan import Run


@dataclass(frozen=True)
class FewShotPoint:
    set: str
    step: int
    tokens: int
    nll: float
    acc: float
    chance: float


@dataclass(frozen=True)
class RunResult:
    name: str
    group: str
    size: str | None
    parameters: int | None
    batch: int
    seq_len: int
    budget: int  # the tokens the plan gave the run
    steps: int
    tokens: int
    heldout_loss: float
    perplexity_by_source: dict[str, float]
    loss_by_category: dict[str, float]
    curve: list[tuple[int, float]]
    category_curves: dict[str, list[tuple[int, float]]]
    heldout_curve: list[tuple[int, float]]
    fewshot: list[FewShotPoint] = field(default_factory=list)

    @property
    def compute(self) -> float:
        """C = 6·N·D (N non-embedding parameters, D tokens trained)."""
        return 6.0 * (self.parameters or 0) * self.tokens

    @property
    def batch_tokens(self) -> int:
        return self.batch * self.seq_len


def read_metrics(path: Path) -> list[dict]:
    """A run's step records in step order, one per step: where a rollback trained steps again after a loss
    spike, the later record of a step (none before the first step)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def heldout_loss(perplexity_by_source: dict[str, float]) -> float:
    return sum(math.log(p) for p in perplexity_by_source.values()) / len(perplexity_by_source)


def run_result(run: Run, records: list[dict], seq_len: int) -> RunResult:
    """The run's results from its step records; ValueError (naming the run) when it was never evaluated."""
    evals = [r for r in records if r.get("perplexity_by_source")]
    if not evals:
        raise ValueError(f"lab run {run.name} has no held-out evaluation in its metrics.jsonl: the lake has no "
                         f"held-out documents (feed freezes them), or the run never reached an evaluation step")
    last = evals[-1]
    tail = records[-max(1, len(records) // 10):]
    categories = sorted({c for r in records for c in r.get("loss_by_category", {})})
    by_category = {c: _mean([r["loss_by_category"][c] for r in tail if c in r.get("loss_by_category", {})])
                   for c in categories}
    return RunResult(
        name=run.name, group=run.group, size=run.size, parameters=run.parameters, batch=run.batch, seq_len=seq_len,
        budget=run.tokens, steps=records[-1]["step"], tokens=records[-1]["tokens"], heldout_loss=heldout_loss(last["perplexity_by_source"]),
        perplexity_by_source=dict(sorted(last["perplexity_by_source"].items())),
        loss_by_category={c: v for c, v in by_category.items() if v is not None},
        curve=[(r["tokens"], r["loss"]) for r in records],
        category_curves={c: [(r["tokens"], r["loss_by_category"][c]) for r in records if c in r["loss_by_category"]]
                         for c in categories},
        heldout_curve=[(r["tokens"], heldout_loss(r["perplexity_by_source"])) for r in evals],
        fewshot=fewshot_points(records),
    )


def fewshot_points(records: list[dict]) -> list[FewShotPoint]:
    """One point per set per evaluation that measured few-shot accuracy (the NLL of the correct choice with it)."""
    out = []
    for r in records:
        shots = r.get("fewshot") or {}
        for name in sorted({k.rsplit("/", 1)[0] for k in shots}):
            if f"{name}/nll" in shots:
                out.append(FewShotPoint(name, r["step"], r["tokens"], shots[f"{name}/nll"], shots[f"{name}/acc"],
                                        shots.get(f"{name}/chance", 0.0)))
    return out


def ranking(results: list[RunResult]) -> list[RunResult]:
    """The variants, best (lowest held-out loss) first."""
    return sorted((r for r in results if r.group == "variant"), key=lambda r: r.heldout_loss)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
