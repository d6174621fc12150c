"""The lab's scaling laws and figures: each fit recovers a known law from noisy points, its 95%
interval holds the truth, its prediction extrapolates; the plots are real PNG files. No Spark."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.lab_laws import (LLAMA3_COMPUTE_OPTIMAL, MINICPM_BATCH_SIZE, Fit, chinchilla_optimal_n,
                           compare_with_reference, fit_accuracy, fit_batch_size, fit_chinchilla, fit_compute_optimal,
                           fit_loss_vs_compute, isoflop_optimum)
from jobs.lab_plots import plot_curves, plot_fit

BOOTSTRAP = 100
# Compute in units near the runs' own (here 1..1e5, e.g. units of 1e15 FLOPs): A is the law's value at one
# unit, so in raw FLOPs it would be an extrapolation over fifteen decades that no 0.5% noise pins to 5%.
CHINCHILLA = {"E": 1.69, "A": 4.0, "alpha": 0.34, "B": 1.0, "beta": 0.28}


def _noisy(values, seed: int, rel: float = 0.005) -> np.ndarray:
    """The values with seeded multiplicative noise of ``rel`` (0.5%) standard deviation."""
    return values * (1 + rel * np.random.default_rng(seed).standard_normal(np.shape(values)))


def _assert_recovers(fit: Fit, truth: dict[str, float]) -> None:
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=0.05), (name, fit.describe())
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, fit.describe())
        assert lo <= fit.params[name] <= hi, (name, fit.describe())


def _chinchilla_law(n, d):
    p = CHINCHILLA
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _chinchilla_points():
    n, d = np.meshgrid(np.geomspace(10, 1e4, 6), np.geomspace(1, 1e3, 6))
    n, d = n.ravel(), d.ravel()
    return n, d, _noisy(_chinchilla_law(n, d), seed=0)


def test_loss_vs_compute_recovers_the_law_and_extrapolates():
    truth = {"E": 1.7, "A": 2.0, "alpha": 0.3}
    compute = np.geomspace(1, 1e5, 24)
    law = lambda c: truth["E"] + truth["A"] * c ** -truth["alpha"]  # noqa: E731
    fit = fit_loss_vs_compute(compute, _noisy(law(compute), seed=0), bootstrap=BOOTSTRAP)
    _assert_recovers(fit, truth)
    assert fit.n_points == 24 and 0 < fit.residual < 0.05
    assert fit.predict(1e7) == pytest.approx(law(1e7), rel=0.05)  # 100x past the largest run
    assert fit.predict([1e5, 1e6]).shape == (2,)
    assert "alpha = " in fit.describe() and "L(C) = E + A·C^-alpha" in fit.describe()


def test_the_fit_is_deterministic_and_exact_on_noiseless_points():
    compute = np.geomspace(1, 1e4, 10)
    loss = 2.1 + 3.0 * compute ** -0.31
    first, second = fit_loss_vs_compute(compute, loss, bootstrap=20), fit_loss_vs_compute(compute, loss, bootstrap=20)
    assert first == second
    assert first.params["alpha"] == pytest.approx(0.31, rel=1e-4)
    assert first.params["E"] == pytest.approx(2.1, rel=1e-4) and first.residual < 1e-6


def test_chinchilla_recovers_the_law_and_extrapolates():
    n, d, loss = _chinchilla_points()
    fit = fit_chinchilla(n, d, loss, bootstrap=BOOTSTRAP)
    _assert_recovers(fit, CHINCHILLA)
    assert fit.predict(1e5, 1e4) == pytest.approx(_chinchilla_law(1e5, 1e4), rel=0.05)


def test_compute_optimal_recovers_llama3_and_compares_with_it():
    compute = np.geomspace(1e18, 1e22, 8)
    truth = LLAMA3_COMPUTE_OPTIMAL
    fit = fit_compute_optimal(compute, _noisy(truth["A"] * compute ** truth["alpha"], seed=1), bootstrap=BOOTSTRAP)
    _assert_recovers(fit, truth)
    assert fit.predict(1e24) == pytest.approx(truth["A"] * 1e24 ** truth["alpha"], rel=0.05)
    line = compare_with_reference(fit, truth, label="Llama 3", at=1e24)
    assert "Llama 3" in line and "\n" not in line
    assert f"ratio {fit.params['alpha'] / truth['alpha']:.3g}" in line
    assert f"ratio {fit.predict(1e24) / (truth['A'] * 1e24 ** truth['alpha']):.3g}" in line
    assert "inside our 95% interval" in line


def test_batch_size_recovers_minicpm_and_a_far_reference_is_outside():
    loss = np.linspace(2.2, 3.5, 10)
    truth = MINICPM_BATCH_SIZE
    fit = fit_batch_size(loss, _noisy(truth["a"] / loss ** truth["b"], seed=2), bootstrap=BOOTSTRAP)
    _assert_recovers(fit, truth)
    assert fit.predict(1.9) == pytest.approx(truth["a"] / 1.9 ** truth["b"], rel=0.05)
    line = compare_with_reference(fit, {"b": 2 * truth["b"]}, label="twice MiniCPM")
    assert "outside our 95% interval" in line and f"ratio {fit.params['b'] / (2 * truth['b']):.3g}" in line
    with pytest.raises(ValueError, match="share no parameter"):
        compare_with_reference(fit, LLAMA3_COMPUTE_OPTIMAL)


def test_fit_accuracy_recovers_a_sigmoid():
    truth = {"top": 0.85, "k": 4.0, "x0": 1.5}
    nll = np.linspace(0.5, 2.8, 14)
    acc = 0.25 + (truth["top"] - 0.25) / (1 + np.exp(truth["k"] * (nll - truth["x0"])))
    fit = fit_accuracy(nll, _noisy(acc, seed=3), chance=0.25, bootstrap=BOOTSTRAP)
    _assert_recovers(fit, truth)
    assert fit.fixed == {"chance": 0.25} and "chance = 0.25 (fixed)" in fit.describe()
    assert fit.predict(6.0) == pytest.approx(0.25, abs=0.01)  # far past x0: guessing
    assert fit.predict(-1.0) == pytest.approx(truth["top"], rel=0.05)


def test_isoflop_optimum_finds_the_parabola_minimum_and_clamps():
    sizes = np.geomspace(1e8, 1e9, 7)
    loss = 2.0 + 0.3 * (np.log(sizes) - np.log(3e8)) ** 2
    assert isoflop_optimum(sizes, loss) == pytest.approx(3e8, rel=1e-6)
    falling = 2.0 + 0.3 * (np.log(sizes) - np.log(5e9)) ** 2  # minimum past the largest size
    assert isoflop_optimum(sizes, falling) == pytest.approx(1e9)
    hill = 3.0 - 0.01 * (np.log(sizes) - np.log(2e8)) ** 2  # no minimum: the lower end, here the largest size
    assert isoflop_optimum(sizes, hill) == pytest.approx(1e9)
    with pytest.raises(ValueError, match="at least 3 distinct sizes.*got 2"):
        isoflop_optimum([1e8, 1e8, 2e8], [2.0, 2.1, 1.9])


def test_chinchilla_optimal_n_is_the_minimum_along_the_budget():
    fit = Fit("chinchilla", "", dict(CHINCHILLA), {k: (v, v) for k, v in CHINCHILLA.items()}, 0, 0.0)
    for compute in (1e3, 1e6, 1e9):
        sizes = np.geomspace(1e-3, 1e9, 200_001)
        numeric = sizes[np.argmin(fit.predict(sizes, compute / (6 * sizes)))]
        assert chinchilla_optimal_n(fit, compute) == pytest.approx(numeric, rel=1e-3)
    assert chinchilla_optimal_n(fit, [1e3, 1e6]).shape == (2,)
    with pytest.raises(ValueError, match="needs a chinchilla fit"):
        chinchilla_optimal_n(fit_compute_optimal([1, 10, 100], [1, 3, 10], bootstrap=0), 1e3)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs at least 3 points with distinct inputs, got 2"):
        fit_loss_vs_compute([1, 10], [3.0, 2.5])
    with pytest.raises(ValueError, match="needs at least 3 points with distinct inputs, got 2 \\(of 5"):
        fit_loss_vs_compute([1, 10, 10, 1, 10], [3.0, 2.5, 2.5, 3.0, 2.5])
    with pytest.raises(ValueError, match="needs at least 5 points with distinct inputs, got 4"):
        fit_chinchilla([1, 2, 3, 4, 4], [1, 2, 3, 4, 4], [3, 2.9, 2.8, 2.7, 2.7])
    with pytest.raises(ValueError, match="needs at least 2 points with distinct inputs, got 1"):
        fit_compute_optimal([1e20, 1e20], [1e9, 2e9])
    with pytest.raises(ValueError, match=r"loss\[2\] = 0\.0: every value must be finite and > 0"):
        fit_loss_vs_compute([1, 10, 100, 1000], [3.0, 2.5, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"compute\[1\] = -5\.0"):
        fit_loss_vs_compute([1, -5, 100, 1000], [3.0, 2.5, 2.2, 2.0])
    with pytest.raises(ValueError, match=r"n_opt\[0\] = nan"):
        fit_compute_optimal([1, 10], [float("nan"), 3])
    with pytest.raises(ValueError, match="one length"):
        fit_batch_size([2.0, 2.5, 3.0], [1e6, 2e6])
    with pytest.raises(ValueError, match=r"accuracy\[1\] = 1\.5: every value must be finite and in \[0, 1\]"):
        fit_accuracy([1, 2, 3, 4], [0.8, 1.5, 0.4, 0.3], chance=0.25)
    with pytest.raises(ValueError, match="chance = 1.2"):
        fit_accuracy([1, 2, 3, 4], [0.8, 0.6, 0.4, 0.3], chance=1.2)


def _png(path: str) -> bytes:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))
    return data


def test_plots_are_png_files(tmp_path):
    curves = {name: [(t, 2 + shift + 3 / (1 + t / 1e6)) for t in np.linspace(0, 1e7, 30)]
              for name, shift in (("4:4:2", 0.0), ("5:3:2", 0.05), ("3:5:2", -0.03))}
    _png(plot_curves(curves, str(tmp_path / "curves.png"), "loss by variant"))
    with pytest.raises(ValueError, match="every curve"):
        plot_curves({"a": []}, str(tmp_path / "empty.png"), "nothing")

    compute = np.geomspace(1, 1e4, 12)
    loss = 1.7 + 2.0 * compute ** -0.15
    fit = fit_loss_vs_compute(compute, loss, bootstrap=20)
    out = plot_fit(fit, compute, loss, str(tmp_path / "laws" / "loss_vs_compute.png"), "loss against compute",
                   predicted=(1e6, fit.predict(1e6)), observed=(1e6, 1.7 + 2.0 * 1e6 ** -0.15 * 1.02))
    _png(out)
    n, d, loss = _chinchilla_points()
    chin = fit_chinchilla(n, d, loss, bootstrap=0)
    assert "alpha = " in chin.describe() and "(no interval)" in chin.describe()
    _png(plot_fit(chin, list(zip(n, d)), loss, str(tmp_path / "chinchilla.png"), "Chinchilla",
                  predicted=(6e9, float(chin.predict(1e5, 1e4)))))
