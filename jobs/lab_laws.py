"""Scaling laws fitted to the lab's own runs, and the Llama 3 step from loss to task accuracy.

Small proxy runs at several sizes and budgets predict a larger run before it is booked (issue #15).
Every law here is fitted the same way, so a fit is deterministic and never needs a starting guess:

- **Variable projection.** For fixed exponents a law is linear in its other parameters (E, A, B, or
  the sigmoid's height), which least squares solves exactly under the physical constraints
  (non-negative coefficients). Only the exponents are searched: a coarse grid over (0, 3), then finer
  grids around the best point so far. The two log-log laws are ordinary least squares in log space.
- **Bootstrap intervals.** The points are resampled with replacement (seeded) and refitted; the 2.5
  and 97.5 percentiles of each parameter are its 95% interval. A resample with fewer distinct inputs
  than the law needs is skipped; where every resample is skipped the interval is (nan, nan).

A law needs at least as many points with distinct inputs as it has parameters. With exactly that many
it passes through every point and its interval has no width: each further run is what tests it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, NamedTuple

import numpy as np

# N*(C) = A·C^alpha from the Llama 3 paper. There N* is the compute-optimal number of training *tokens*;
# under C = 6·N·D a parameter-count exponent a corresponds to a token exponent 1 - a.
LLAMA3_COMPUTE_OPTIMAL = {"A": 0.299, "alpha": 0.537}
MINICPM_BATCH_SIZE = {"a": 1.2110e9, "b": 6.2393}  # BS = a / L^b, in tokens (MiniCPM)

_EXPONENT = (0.005, 2.995)  # the open interval (0, 3) every searched exponent lies in


def _loss_vs_compute(p, c):
    return p["E"] + p["A"] * c ** -p["alpha"]


def _chinchilla(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _compute_optimal(p, c):
    return p["A"] * c ** p["alpha"]


def _batch_size(p, loss):
    return p["a"] / loss ** p["b"]


def _falling_sigmoid(z):
    """1 / (1 + exp(z)) written with tanh, which never overflows."""
    return 0.5 * (1.0 - np.tanh(0.5 * z))


def _accuracy(p, nll):
    return p["chance"] + (p["top"] - p["chance"]) * _falling_sigmoid(p["k"] * (nll - p["x0"]))


class _Form(NamedTuple):
    law: Callable
    formula: str
    inputs: int


_FORMS = {
    "loss_vs_compute": _Form(_loss_vs_compute, "L(C) = E + A·C^-alpha", 1),
    "chinchilla": _Form(_chinchilla, "L(N, D) = E + A/N^alpha + B/D^beta", 2),
    "compute_optimal": _Form(_compute_optimal, "N*(C) = A·C^alpha", 1),
    "batch_size": _Form(_batch_size, "BS(L) = a / L^b", 1),
    "accuracy": _Form(_accuracy, "acc(nll) = chance + (top - chance) / (1 + exp(k·(nll - x0)))", 1),
}


@dataclass(frozen=True)
class Fit:
    """One fitted law: point estimates, 95% bootstrap intervals and how closely it follows its points.

    ``residual`` is the RMS of the residuals in the space the fit minimises: the loss or accuracy itself
    for the non-linear laws, its natural log for the log-log ones (compute_optimal, batch_size).
    ``fixed`` holds the constants that were given, not fitted (the accuracy law's chance level).
    """

    name: str
    formula: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_points: int
    residual: float
    fixed: dict[str, float] = field(default_factory=dict)

    def predict(self, *x) -> float | np.ndarray:
        form = _FORMS[self.name]
        if len(x) != form.inputs:
            raise ValueError(f"the {self.name} law {self.formula} takes {form.inputs} input(s), got {len(x)}")
        out = form.law({**self.fixed, **self.params}, *(np.asarray(v, dtype=float) for v in x))
        return float(out) if np.ndim(out) == 0 else out

    def describe(self) -> str:
        parts = [f"{k} = {v:.4g} " + (f"[{lo:.4g}, {hi:.4g}]" if np.isfinite([lo, hi]).all() else "(no interval)")
                 for k, v in self.params.items() for lo, hi in [self.ci[k]]]
        parts += [f"{k} = {v:.4g} (fixed)" for k, v in self.fixed.items()]
        return (f"{self.name}: {self.formula}; {', '.join(parts)}; {self.n_points} points, "
                f"rms residual {self.residual:.3g}")


# -- input checks ----------------------------------------------------------------------------------


def _check(name: str, values, ok: Callable[[np.ndarray], np.ndarray], need: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers ({need}): {e}") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got an array of shape {arr.shape}")
    bad = ~(np.isfinite(arr) & ok(arr))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] = {float(arr[i])!r}: every value must be finite and {need}; "
                         "fix or drop that point")
    return arr


def _positive(**named) -> list[np.ndarray]:
    """The named sequences as float arrays, each value positive and finite, all of one length."""
    arrays = [_check(name, values, lambda a: a > 0, "> 0") for name, values in named.items()]
    lengths = {name: len(a) for name, a in zip(named, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the inputs must have one length (one value per run), got {lengths}")
    return arrays


def _distinct(inputs: list[np.ndarray], idx: np.ndarray) -> int:
    return len(np.unique(np.stack([x[idx] for x in inputs], axis=1), axis=0))


# -- solvers ---------------------------------------------------------------------------------------


def _lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain least squares for a stack of designs X (G, n, k): coefficients (G, k), squared residuals (G,)."""
    q, r = np.linalg.qr(X)
    try:
        coef = np.linalg.solve(r, (np.swapaxes(q, 1, 2) @ y)[..., None])[..., 0]
    except np.linalg.LinAlgError:  # an exactly singular design somewhere in the stack: the slower, safe way
        coef = np.linalg.pinv(X) @ y
    return coef, np.sum((np.einsum("gnk,gk->gn", X, coef) - y) ** 2, axis=1)


def _nonneg_lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares with non-negative coefficients for a stack of small designs X (G, n, k), k <= 3.

    Exact: the constrained optimum is the plain least-squares fit on some subset of the columns whose
    coefficients are all >= 0. Where the fit on every column is feasible it is the answer; elsewhere
    each smaller subset is tried. Returns the coefficients (G, k) and the sums of squared residuals (G,).
    """
    scale = np.linalg.norm(X, axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    Xs = X / scale  # unit columns keep the solves well conditioned whatever the exponents
    coef, sse = _lstsq(Xs, y)
    feasible = np.all(coef >= 0, axis=1)
    best, best_sse = np.where(feasible[:, None], coef, 0.0), np.where(feasible, sse, float(y @ y))
    rows = np.flatnonzero(~feasible)
    for size in range(1, X.shape[2]):
        for cols in map(list, combinations(range(X.shape[2]), size)):
            coef, sse = _lstsq(Xs[np.ix_(rows, np.arange(X.shape[1]), cols)], y)
            take = np.all(coef >= 0, axis=1) & (sse < best_sse[rows])
            best[np.ix_(rows[take], cols)] = coef[take]
            best[np.ix_(rows[take], [c for c in range(X.shape[2]) if c not in cols])] = 0.0
            best_sse[rows[take]] = sse[take]
    return best / scale[:, 0, :], best_sse


def _grid_minimise(objective: Callable[[np.ndarray], np.ndarray], bounds: list[tuple[float, float]],
                   coarse: int, rounds: int = 20, fine: int = 5) -> np.ndarray:
    """Minimise ``objective`` (points (G, d) -> values (G,)) over a box, deterministically.

    A coarse grid first; then, ``rounds`` times, a grid of ``fine`` points per axis spanning one step
    either side of the best point so far, each step half the previous one.
    """
    lows, highs = np.array(bounds, dtype=float).T
    step = (highs - lows) / (coarse - 1)
    axes = [np.linspace(lo, hi, coarse) for lo, hi in zip(lows, highs)]
    best_x, best_f = lows, np.inf
    for _ in range(rounds + 1):
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        values = np.where(np.isfinite(f := objective(pts)), f, np.inf)
        if values.min() < best_f:
            best_x, best_f = pts[np.argmin(values)], values.min()
        axes = [np.clip(np.linspace(c - s, c + s, fine), lo, hi)
                for c, s, lo, hi in zip(best_x, step, lows, highs)]
        step = step / 2
    return best_x


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def _solve_loss_vs_compute(c, loss) -> dict[str, float]:
    c0 = _geomean(c)
    x = c / c0  # near 1: the solves see no 1e20s

    def design(exps):
        return np.stack([np.ones((len(exps), len(x))), x ** -exps[:, :1]], axis=-1)

    alpha = _grid_minimise(lambda e: _nonneg_lstsq(design(e), loss)[1], [_EXPONENT], coarse=300)[0]
    (e, a), = _nonneg_lstsq(design(np.array([[alpha]])), loss)[0]
    return {"E": float(e), "A": float(a * c0 ** alpha), "alpha": float(alpha)}


def _solve_chinchilla(n, d, loss) -> dict[str, float]:
    n0, d0 = _geomean(n), _geomean(d)
    xn, xd = n / n0, d / d0

    def design(exps):
        return np.stack([np.ones((len(exps), len(xn))), xn ** -exps[:, :1], xd ** -exps[:, 1:]], axis=-1)

    alpha, beta = _grid_minimise(lambda e: _nonneg_lstsq(design(e), loss)[1], [_EXPONENT, _EXPONENT], coarse=30)
    (e, a, b), = _nonneg_lstsq(design(np.array([[alpha, beta]])), loss)[0]
    return {"E": float(e), "A": float(a * n0 ** alpha), "alpha": float(alpha),
            "B": float(b * d0 ** beta), "beta": float(beta)}


def _solve_log_log(x, y) -> tuple[float, float]:
    """(intercept, slope) of log y against log x."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(intercept), float(slope)


def _solve_compute_optimal(c, n_opt) -> dict[str, float]:
    intercept, slope = _solve_log_log(c, n_opt)
    return {"A": float(np.exp(intercept)), "alpha": slope}


def _solve_batch_size(loss, batch_tokens) -> dict[str, float]:
    intercept, slope = _solve_log_log(loss, batch_tokens)
    return {"a": float(np.exp(intercept)), "b": -slope}


def _solve_accuracy(nll, accuracy, chance: float) -> dict[str, float]:
    """Grid over (log k, x0) scaled to the points' spread; for each, the best height in [0, 1 - chance]."""
    span = max(float(np.ptp(nll)), 1e-9)
    target = accuracy - chance

    def heights(pts):
        s = _falling_sigmoid(np.exp(pts[:, :1]) * (nll - pts[:, 1:]))
        h = np.clip(s @ target / np.maximum(np.sum(s * s, axis=1), 1e-300), 0.0, 1.0 - chance)
        return h, s

    def sse(pts):
        h, s = heights(pts)
        return np.sum((h[:, None] * s - target) ** 2, axis=1)

    bounds = [(np.log(0.1 / span), np.log(200.0 / span)), (nll.min() - span, nll.max() + span)]
    best = _grid_minimise(sse, bounds, coarse=60)
    h, _ = heights(best[None, :])
    return {"top": float(chance + h[0]), "k": float(np.exp(best[0])), "x0": float(best[1])}


# -- the fits --------------------------------------------------------------------------------------


def _fit(name: str, solve: Callable[..., dict[str, float]], inputs: list[np.ndarray], output: np.ndarray,
         min_points: int, bootstrap: int, seed: int, log_space: bool = False,
         fixed: dict[str, float] | None = None) -> Fit:
    """Validate the count, solve on every point, bootstrap the intervals, measure the residual."""
    n = len(output)
    if (distinct := _distinct(inputs, np.arange(n))) < min_points:
        raise ValueError(f"the {name} fit needs at least {min_points} points with distinct inputs, "
                         f"got {distinct} (of {n} points); add runs at other sizes or budgets")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    params = solve(*inputs, output)
    form = _FORMS[name]
    fitted = form.law({**(fixed or {}), **params}, *inputs)
    residual = np.log(output) - np.log(fitted) if log_space else output - fitted
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, n, n)
        if _distinct(inputs, idx) >= min_points:
            samples.append(solve(*(x[idx] for x in inputs), output[idx]))
    ci = {k: tuple(float(q) for q in np.percentile([s[k] for s in samples], [2.5, 97.5])) if samples
          else (float("nan"), float("nan")) for k in params}
    return Fit(name, form.formula, params, ci, n, float(np.sqrt(np.mean(residual ** 2))), dict(fixed or {}))


def fit_loss_vs_compute(compute, loss, bootstrap: int = 500, seed: int = 0) -> Fit:
    """L(C) = E + A·C^-alpha over the runs' compute and final loss; needs 3 distinct computes.

    Compute in a unit near the runs' own (say 1e15 FLOPs) keeps A readable: A is the law at one unit.
    """
    c, y = _positive(compute=compute, loss=loss)
    return _fit("loss_vs_compute", _solve_loss_vs_compute, [c], y, 3, bootstrap, seed)


def fit_chinchilla(params_n, tokens_d, loss, bootstrap: int = 500, seed: int = 0) -> Fit:
    """L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla's approach 3); needs 5 distinct (N, D) runs."""
    n, d, y = _positive(params_n=params_n, tokens_d=tokens_d, loss=loss)
    return _fit("chinchilla", _solve_chinchilla, [n, d], y, 5, bootstrap, seed)


def fit_compute_optimal(compute, n_opt, bootstrap: int = 500, seed: int = 0) -> Fit:
    """N*(C) = A·C^alpha, a line in log-log space through each budget's optimum (``isoflop_optimum``).

    Two budgets determine it exactly; each further budget tests it.
    """
    c, n = _positive(compute=compute, n_opt=n_opt)
    return _fit("compute_optimal", _solve_compute_optimal, [c], n, 2, bootstrap, seed, log_space=True)


def fit_batch_size(loss, batch_tokens, bootstrap: int = 500, seed: int = 0) -> Fit:
    """BS(L) = a / L^b (MiniCPM's law: the best batch size in tokens grows as the loss falls), log-log."""
    y, bs = _positive(loss=loss, batch_tokens=batch_tokens)
    return _fit("batch_size", _solve_batch_size, [y], bs, 2, bootstrap, seed, log_space=True)


def fit_accuracy(nll, accuracy, chance: float, bootstrap: int = 500, seed: int = 0) -> Fit:
    """Llama 3's second step: a sigmoid from the held-out negative log-likelihood to task accuracy.

    acc = chance + (top - chance) / (1 + exp(k·(nll - x0))); ``chance`` (1 / number of choices) is fixed,
    top is kept in [chance, 1]; needs 3 distinct nll values.
    """
    x, = _positive(nll=nll)
    acc = _check("accuracy", accuracy, lambda a: (a >= 0) & (a <= 1), "in [0, 1]")
    if len(acc) != len(x):
        raise ValueError(f"nll and accuracy must have one length (one value per run), got {len(x)} and {len(acc)}")
    if not (np.isfinite(chance) and 0 <= chance < 1):
        raise ValueError(f"chance = {chance!r}: it must be the accuracy of guessing, in [0, 1) (1 / choices)")
    return _fit("accuracy", lambda a, b: _solve_accuracy(a, b, chance), [x], acc, 3, bootstrap, seed,
                fixed={"chance": float(chance)})


def isoflop_optimum(params_n, loss) -> float:
    """The loss-minimising size at one compute budget: a parabola of loss over log N, at its vertex.

    The vertex is clamped to the sampled sizes: outside them the parabola is an extrapolation. Where the
    parabola opens downwards (no minimum), the better of the two ends is returned; either way a
    clamped answer says the budget's sizes should be widened.
    """
    n, y = _positive(params_n=params_n, loss=loss)
    log_n = np.log(n)
    if (distinct := len(np.unique(log_n))) < 3:
        raise ValueError(f"an isoflop parabola needs at least 3 distinct sizes at the budget, got {distinct}")
    a, b, c = np.polyfit(log_n, y, 2)
    lo, hi = float(log_n.min()), float(log_n.max())
    if a > 0:
        vertex = float(np.clip(-b / (2 * a), lo, hi))
    else:
        vertex = lo if np.polyval([a, b, c], lo) <= np.polyval([a, b, c], hi) else hi
    return float(np.exp(vertex))


def chinchilla_optimal_n(fit: Fit, compute) -> float | np.ndarray:
    """N_opt(C) minimising the Chinchilla law along C = 6·N·D, in closed form:
    N_opt = G·(C/6)^(beta/(alpha+beta)) with G = (alpha·A / (beta·B))^(1/(alpha+beta))."""
    if fit.name != "chinchilla":
        raise ValueError(f"chinchilla_optimal_n needs a chinchilla fit, got a {fit.name} fit ({fit.formula})")
    p = fit.params
    if min(p["A"], p["B"], p["alpha"], p["beta"]) <= 0:
        raise ValueError(f"the Chinchilla fit has a zero term ({fit.describe()}): N_opt is undefined; "
                         "its runs do not vary enough in size and tokens")
    c, = _positive(compute=np.atleast_1d(compute))
    s = p["alpha"] + p["beta"]
    n_opt = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s) * (c / 6) ** (p["beta"] / s)
    return float(n_opt[0]) if np.ndim(compute) == 0 else n_opt


def compare_with_reference(fit: Fit, reference: dict, label: str = "reference", at: float | None = None) -> str:
    """One line: each parameter the two laws share, ours (with its interval) against the reference, and
    their ratio; with ``at`` also both laws evaluated at that input (a compute, or a loss) and the ratio."""
    shared = [k for k in reference if k in fit.params]
    if not shared:
        raise ValueError(f"the {label} values {sorted(reference)} share no parameter with the {fit.name} fit "
                         f"({', '.join(fit.params)})")
    parts = []
    for k in shared:
        lo, hi = fit.ci[k]
        where = "inside" if lo <= reference[k] <= hi else "outside"
        ratio = f"ratio {fit.params[k] / reference[k]:.3g}, " if reference[k] else ""
        parts.append(f"{k}: ours {fit.params[k]:.4g} [{lo:.4g}, {hi:.4g}], {label} {reference[k]:.4g} "
                     f"({ratio}{where} our 95% interval)")
    if at is not None:
        missing = sorted(set(fit.params) - set(reference))
        if missing:
            raise ValueError(f"to evaluate the {label} law at {at:g} it needs {', '.join(missing)} too")
        ours, theirs = fit.predict(at), Fit(fit.name, fit.formula, dict(reference), {}, 0, 0.0, fit.fixed).predict(at)
        parts.append(f"at {at:.4g}: ours {ours:.4g}, {label} {theirs:.4g} (ratio {ours / theirs:.3g})")
    return f"{fit.name} ({fit.formula}) vs {label}: " + "; ".join(parts)
