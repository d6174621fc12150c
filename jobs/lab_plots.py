"""PNG figures for the lab's report: loss curves per variant, and each fitted law with its points.

Drawn on matplotlib's Agg canvas through the object API (no pyplot, no display, no global backend
switch), so the lab can draw from any thread. Each function writes one local file and returns its path.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.lab_laws import Fit, chinchilla_optimal_n

_LOG_LOG = {"compute_optimal", "batch_size"}  # laws that are straight lines on log-log axes
_AXES = {"loss_vs_compute": ("compute", "loss"), "chinchilla": ("compute 6·N·D", "loss"),
         "compute_optimal": ("compute", "compute-optimal N"), "batch_size": ("loss", "batch size (tokens)"),
         "accuracy": ("held-out negative log-likelihood", "accuracy")}


def _save(fig: Figure, path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return str(path)


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str, title: str,
                xlabel: str = "tokens", ylabel: str = "loss") -> str:
    """One line per name (a variant, or a category) through its (x, y) points."""
    if not any(curves.values()):
        raise ValueError(f"no points to draw for {path!r}: every curve in {sorted(curves)} is empty")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, points in curves.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, label=name, linewidth=1.4)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _law_curve(fit: Fit, lo: float, hi: float, log_x: bool) -> tuple[np.ndarray, np.ndarray]:
    """The law over [lo, hi]; for Chinchilla over compute, its compute-optimal frontier."""
    grid = np.geomspace(lo, hi, 200) if log_x else np.linspace(lo, hi, 200)
    if fit.name == "chinchilla":
        n_opt = chinchilla_optimal_n(fit, grid)
        return grid, fit.predict(n_opt, grid / (6 * n_opt))
    return grid, fit.predict(grid)


def plot_fit(fit: Fit, x, y, path: str, title: str, predicted: tuple[float, float] | None = None,
             observed: tuple[float, float] | None = None, log_x: bool = True) -> str:
    """The points, the fitted law over their range extended to the prediction, the prediction, and what
    the larger run observed (with the prediction's error) when given.

    ``x`` is the law's input per point; for a Chinchilla fit it is the (N, D) pair per point, drawn at
    its compute 6·N·D against the law's compute-optimal frontier, and ``predicted`` / ``observed`` are
    (compute, loss). The log-log laws get a log y axis too.
    """
    if fit.name == "chinchilla":
        pairs = np.asarray(x, dtype=float).reshape(-1, 2)
        xs = 6 * pairs[:, 0] * pairs[:, 1]
    else:
        xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if len(xs) != len(ys) or not len(xs):
        raise ValueError(f"plot_fit for {path!r} needs one y per x and at least one point, got {len(xs)} and {len(ys)}")
    ends = [xs.min(), xs.max()] + [p[0] for p in (predicted, observed) if p is not None]
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.scatter(xs, ys, s=22, color="#4c78a8", label="runs", zorder=3)
    label = f"compute-optimal frontier of {fit.formula}" if fit.name == "chinchilla" else fit.formula
    ax.plot(*_law_curve(fit, min(ends), max(ends), log_x), color="#e45756", label=label)
    if predicted is not None:
        ax.scatter(*predicted, marker="*", s=160, color="#f58518", zorder=4, label=f"predicted {predicted[1]:.4g}")
    if observed is not None:
        note = f" (prediction off by {100 * (predicted[1] - observed[1]) / observed[1]:+.1f}%)" if predicted else ""
        ax.scatter(*observed, marker="X", s=90, color="#54a24b", zorder=4, label=f"observed {observed[1]:.4g}{note}")
    if log_x:
        ax.set_xscale("log")
    if fit.name in _LOG_LOG:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=_AXES[fit.name][0], ylabel=_AXES[fit.name][1])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.supxlabel(textwrap.fill(fit.describe(), 110), fontsize=7)
    return _save(fig, path)
