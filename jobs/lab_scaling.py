"""The laws fitted to a lab's runs (``jobs/lab_laws.py`` fits them), and the prediction of the larger run.

From the law runs (sizes × budgets): L(C) = E + A·C^−α over compute C = 6·N·D; the Chinchilla form
L(N, D) where the runs allow it (six distinct (N, D)); the compute-optimal size N*(C), from each
compute budget's isoflop optimum (budgets given as compute) or else from the Chinchilla fit, against
Llama 3's; from the batch runs, the batch size against loss, against MiniCPM's. From every few-shot
evaluation, Llama 3's two steps: compute → the NLL of the correct choice, then a sigmoid NLL →
accuracy. A law the runs cannot support is reported with the reason, not fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from jobs.lab_laws import (LLAMA3_COMPUTE_OPTIMAL, MINICPM_BATCH_SIZE, Fit, chinchilla_optimal_n, compare_with_reference,
                           fit_accuracy, fit_batch_size, fit_chinchilla, fit_compute_optimal, fit_loss_vs_compute,
                           isoflop_optimum, token_law)
from jobs.lab_plan import Laws, Run
from jobs.lab_results import RunResult


@dataclass(frozen=True)
class Law:
    """One law: its fit (None where the runs could not support it, ``note`` says why), the points it was
    fitted to (x, y; x is the pair (N, D) for L(N, D)) and, for the plots, the axis names."""

    title: str
    fit: Fit | None
    points: list[tuple]
    xlabel: str
    ylabel: str
    note: str = ""

    def line(self) -> str:
        return f"{self.title}: {self.fit.describe()}" + (f"; {self.note}" if self.note else "") if self.fit \
            else f"{self.title}: not fitted ({self.note})"


@dataclass(frozen=True)
class Outcome:
    laws: list[Law]
    predict: Run | None = None
    predicted_loss: float | None = None  # by the law named in ``predicted_by``
    predicted_by: str = ""
    predicted_accuracy: float | None = None
    observed_loss: float | None = None
    observed_accuracy: float | None = None
    accuracy_of: dict[str, float] = field(default_factory=dict)  # variant → accuracy its final NLL maps to

    def lines(self) -> list[str]:
        out = [law.line() for law in self.laws]
        if self.predict is not None and self.predicted_loss is not None:
            out.append(f"prediction for {self.predict.name} (N = {self.predict.parameters:,}, D = {self.predict.tokens:,}): "
                       f"held-out loss {self.predicted_loss:.4f} ({self.predicted_by})"
                       + (f", accuracy {self.predicted_accuracy:.3f}" if self.predicted_accuracy is not None else ""))
        return out

    @property
    def error(self) -> float | None:
        """The prediction's relative error: (predicted − observed) / observed."""
        if self.predicted_loss is None or self.observed_loss is None:
            return None
        return (self.predicted_loss - self.observed_loss) / self.observed_loss

    def with_observed(self, result: RunResult) -> "Outcome":
        final = [p for p in result.fewshot if p.step == result.steps]
        return replace(self, observed_loss=result.heldout_loss,
                       observed_accuracy=sum(p.acc for p in final) / len(final) if final else None)

    def prediction_line(self) -> str:
        if self.error is None:
            return "no prediction: the laws could not be fitted (see above)"
        return (f"predicted held-out loss {self.predicted_loss:.4f}, observed {self.observed_loss:.4f}: error "
                f"{self.error:+.2%}" + (f"; predicted accuracy {self.predicted_accuracy:.3f}, observed "
                                        f"{self.observed_accuracy:.3f}" if self.predicted_accuracy is not None
                                        and self.observed_accuracy is not None else ""))


def fit_laws(results: list[RunResult], laws: Laws, predict: Run | None) -> Outcome:
    """Every law the runs support, and the predicted run's loss (Chinchilla where fitted, else L(C))."""
    grid = [r for r in results if r.group == "law"]
    boot = laws.bootstrap
    loss_c = _try("L(C)", lambda: fit_loss_vs_compute([r.compute for r in grid], [r.heldout_loss for r in grid], boot),
                  [(r.compute, r.heldout_loss) for r in grid], "compute (FLOPs)", "held-out loss")
    chinchilla = _try("L(N, D)", lambda: fit_chinchilla([r.parameters for r in grid], [r.tokens for r in grid],
                                                        [r.heldout_loss for r in grid], boot),
                      [((r.parameters, r.tokens), r.heldout_loss) for r in grid], "(N, D)", "held-out loss")
    out = [loss_c, chinchilla, optimal_size(grid, chinchilla.fit, boot), batch_law(results, laws, boot)]
    accuracy, nll_c = accuracy_laws(results, boot)
    out += [nll_c, accuracy]
    outcome = Outcome(out, predict, accuracy_of={r.name: accuracy.fit.predict(_final_nll(r)) for r in results
                                                 if r.group == "variant" and accuracy.fit and _final_nll(r)})
    if predict is None:
        return outcome
    compute = 6.0 * predict.parameters * predict.tokens
    if chinchilla.fit is not None:
        loss, by = chinchilla.fit.predict(predict.parameters, predict.tokens), "L(N, D)"
    elif loss_c.fit is not None:
        loss, by = loss_c.fit.predict(compute), "L(C)"
    else:
        return outcome
    acc = accuracy.fit.predict(nll_c.fit.predict(compute)) if accuracy.fit and nll_c.fit else None
    return replace(outcome, predicted_loss=float(loss), predicted_by=by, predicted_accuracy=acc)


def optimal_size(grid: list[RunResult], chinchilla: Fit | None, boot: int) -> Law:
    """N*(C): each budget's isoflop optimum where three or more sizes share one compute budget, else the
    Chinchilla fit's optimum over the grid's compute range; against Llama 3's law."""
    budgets: dict[float, list[RunResult]] = {}
    for r in grid:
        budgets.setdefault(round(math.log10(r.compute), 2), []).append(r)
    iso = {c: rs for c, rs in budgets.items() if len({r.parameters for r in rs}) >= 3}
    if len(iso) >= 2:
        points = [(sum(r.compute for r in rs) / len(rs), isoflop_optimum([r.parameters for r in rs],
                                                                          [r.heldout_loss for r in rs]))
                  for rs in iso.values()]
        source = "isoflop optima"
    elif chinchilla is not None and grid:
        lo, hi = min(r.compute for r in grid), max(r.compute for r in grid)
        points = [(c, float(chinchilla_optimal_n(chinchilla, c))) for c in (lo * (hi / lo) ** (i / 4) for i in range(5))]
        source = "the L(N, D) fit's optima"
    else:
        return Law("N*(C)", None, [], "compute (FLOPs)", "N*", "needs compute budgets with three sizes each, "
                   "or an L(N, D) fit")
    law = _try("N*(C)", lambda: fit_compute_optimal([c for c, _ in points], [n for _, n in points], boot), points,
               "compute (FLOPs)", "compute-optimal N")
    if law.fit is None:
        return law
    # Llama 3 reports the compute-optimal *tokens*: compare our size law in that form (D* = C / 6N*)
    return replace(law, note=f"from {source}; " + compare_with_reference(token_law(law.fit), LLAMA3_COMPUTE_OPTIMAL,
                                                                         "Llama 3"))


def batch_points(curves: dict[int, list[tuple[int, float]]], levels: int = 6) -> list[tuple[float, float]]:
    """MiniCPM's method on the batch runs' loss curves (batch tokens → [(tokens, loss)]): for each loss
    level every run reached, the batch that reached it in the fewest tokens; (level, that batch's tokens).
    The levels span what the worst run's curve reached (its running minimum), above its final loss."""
    def tokens_to(curve, level):
        return next((t for t, loss in curve if loss <= level), None)

    floor = max(min(loss for _, loss in c) for c in curves.values())
    ceiling = min(c[0][1] for c in curves.values())
    if not floor < ceiling:
        return []
    out = []
    for i in range(levels):
        level = ceiling - (ceiling - floor) * (i + 1) / levels
        reached = {b: tokens_to(c, level) for b, c in curves.items()}
        reached = {b: t for b, t in reached.items() if t is not None}
        if reached:
            out.append((level, float(min(reached, key=lambda b: (reached[b], b)))))
    return out


def batch_law(results: list[RunResult], laws: Laws, boot: int) -> Law:
    """The batch runs with the grid's run at their size and budget (the plan's batch), MiniCPM's method."""
    size = laws.batch_size_name
    most = max((r.budget for r in results if r.group == "batch"), default=None)
    runs = [r for r in results if r.group == "batch" or (r.group == "law" and r.size == size and most is not None
                                                          and r.budget == most)]
    if len(runs) < 3:
        return Law("BS(L)", None, [], "held-out loss", "batch (tokens)", "needs laws.batch_sizes: three or more")
    points = batch_points({r.batch_tokens: _smoothed(r.curve) for r in runs})
    law = _try("BS(L)", lambda: fit_batch_size([x for x, _ in points], [y for _, y in points], boot), points,
               "training loss", "best batch (tokens)")
    return replace(law, note=compare_with_reference(law.fit, MINICPM_BATCH_SIZE, "MiniCPM")) if law.fit else law


def accuracy_laws(results: list[RunResult], boot: int) -> tuple[Law, Law]:
    """Llama 3's two steps: the NLL of the correct choice at the law runs' final step against compute,
    and accuracy against that NLL over every few-shot evaluation of every run."""
    points = [p for r in results for p in r.fewshot]
    if not points:
        none = "no few-shot evaluations (laws.accuracy: true and trainer.fewshot sets)"
        return Law("acc(NLL)", None, [], "NLL", "accuracy", none), Law("NLL(C)", None, [], "compute", "NLL", none)
    chance = sum(p.chance for p in points) / len(points)
    accuracy = _try("acc(NLL)", lambda: fit_accuracy([p.nll for p in points], [p.acc for p in points], chance, boot),
                    [(p.nll, p.acc) for p in points], "NLL of the correct choice", "accuracy")
    grid = [(r.compute, _final_nll(r)) for r in results if r.group == "law" and _final_nll(r)]
    nll_c = _try("NLL(C)", lambda: fit_loss_vs_compute([c for c, _ in grid], [n for _, n in grid], boot), grid,
                 "compute (FLOPs)", "NLL of the correct choice")
    return accuracy, nll_c


def _final_nll(r: RunResult) -> float | None:
    final = [p.nll for p in r.fewshot if p.step == r.steps]
    return sum(final) / len(final) if final else None


def _smoothed(curve: list[tuple[int, float]], window: int = 5) -> list[tuple[int, float]]:
    """The mean of each step's loss with the ``window`` − 1 before it (one step's loss is noisy)."""
    return [(t, sum(v for _, v in curve[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)))
            for i, (t, _) in enumerate(curve)]


def _try(title: str, fit, points: list[tuple[float, float]], xlabel: str, ylabel: str) -> Law:
    try:
        return Law(title, fit(), points, xlabel, ylabel)
    except ValueError as err:
        return Law(title, None, points, xlabel, ylabel, str(err))
