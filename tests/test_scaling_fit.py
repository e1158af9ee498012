"""Scaling-law fitters: reading runs, Approach 3 against known laws and Epoch AI's Chinchilla replication,
Approach 2 against known exponents, and the bootstrap intervals."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.scaling import fit
from llmlab.scaling.fit import (
    InitGrid, ParametricFit, Points, bootstrap_isoflop, bootstrap_parametric, drop_highest, fit_isoflop,
    fit_isoflop_budgets, fit_parametric, fit_power_law, read_points,
)

EPOCH_CSV = Path("/work/shared/reference/chinchilla_fig4_epoch.csv")
# Besiroglu et al. 2024, Table 1: their fit to the digitised Fig. 4 without the 5 highest losses
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
# Hoffmann et al. 2022's published law, the "truth" of the synthetic runs
TRUE = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, converged=True, grad_norm=0.0,
                     n_starts=1, n_converged=1, n_points=0)


def _grid_runs(noise: float, seed: int = 0) -> Points:
    """TRUE on an 8 x 8 grid of 30M-10B parameters and 1B-300B tokens, times exp(N(0, noise))."""
    N, D = (v.ravel() for v in np.meshgrid(np.logspace(7.5, 10, 8), np.logspace(9, 11.5, 8)))
    L = TRUE.predict(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, len(N)))
    return Points(N, D, L)


def _isoflop_runs(noise: float, budgets=(1e18, 3e18, 1e19, 3e19, 1e20), seed: int = 0) -> Points:
    """Per budget, 7 sizes spread 4x either side of TRUE's optimum, losses from TRUE times exp(N(0, noise))."""
    N = np.concatenate([TRUE.compute_optimal(C)[0] * np.logspace(-0.6, 0.6, 7) for C in budgets])
    C = np.repeat(budgets, 7)
    D = C / (6 * N)
    return Points(N, D, TRUE.predict(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, len(N))), C)


@pytest.fixture(scope="module")
def noisy_fit() -> tuple[Points, ParametricFit]:
    runs = _grid_runs(noise=0.002)
    return runs, fit_parametric(runs)


# --- reading runs


def test_reads_epochs_digitisation_with_tokens_from_flops():
    points = read_points(EPOCH_CSV)
    assert len(points) == 245
    assert points.N[0] == pytest.approx(6795600349.289497) and points.C[0] == pytest.approx(9.993852799709755e18)
    assert points.L[0] == pytest.approx(5.005581996196243)
    np.testing.assert_allclose(6 * points.N * points.D, points.C, rtol=1e-12)


def test_reads_runs_with_and_without_flops(tmp_path):
    plain = tmp_path / "runs.csv"
    plain.write_text("\ufeff Params ,tokens,loss,note\n1e8,2e9,3.1,a\n\n4e8,8e9,2.7,b\n")  # BOM, spaces, blank line
    points = read_points(plain)
    np.testing.assert_array_equal(points.N, [1e8, 4e8])
    np.testing.assert_array_equal(points.C, 6 * points.N * points.D)
    with_flops = tmp_path / "flops.csv"
    with_flops.write_text("params,tokens,loss,flops\n1e8,2e9,3.1,1.3e18\n")
    assert read_points(with_flops).C[0] == 1.3e18


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("params,tokens,loss\n", "no runs"),
    ("params,loss\n1e8,3.0\n", "found `params`, `loss`"),
    ("params,tokens,loss\n1e8,2e9,3.0\n1e8,-2e9,3.0\n", "line 3: `tokens` is -2e9"),
    ("Model Size,Training FLOP,loss\n1e8,0,3.0\n", "`Training FLOP` is 0"),
    ("params,tokens,loss\n1e8,2e9,abc\n", "line 2: `loss` is 'abc', not a number"),
    ("params,tokens,loss\n1e8,2e9\n", "`loss` is '', not a number"),
])
def test_bad_csvs_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LLMLabError) as error:
        read_points(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_missing_file_says_which_columns_it_needs(tmp_path):
    with pytest.raises(LLMLabError, match=r"no such file.*`params`, `tokens`, `loss`"):
        read_points(tmp_path / "nope.csv")


def test_points_refuse_mismatched_or_non_positive_values():
    with pytest.raises(LLMLabError, match="one value per run"):
        Points([1e8, 2e8], [1e9], [3.0, 2.9])
    with pytest.raises(LLMLabError, match="L of run 1"):
        Points([1e8, 2e8], [1e9, 1e9], [3.0, np.nan])


def test_drop_highest_leaves_out_exactly_the_k_highest_losses():
    points = Points([1, 2, 3, 4, 5], [1, 1, 1, 1, 1], [3.0, 5.0, 1.0, 4.0, 2.0])
    kept = drop_highest(points, 2)
    np.testing.assert_array_equal(kept.L, [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(kept.N, [1, 3, 5])  # the rows travel together, in order
    with pytest.raises(LLMLabError, match="cannot drop 5 of 5"):
        drop_highest(points, 5)


# --- power laws


def test_fit_power_law_recovers_a_law_and_refuses_what_it_cannot_fit():
    x = np.array([1e18, 1e19, 1e20])
    law = fit_power_law(x, 0.3 * x ** 0.5)
    assert law.exponent == pytest.approx(0.5, rel=1e-12) and law.k == pytest.approx(0.3, rel=1e-9)
    np.testing.assert_allclose(law.predict(4e19), 0.3 * 4e19 ** 0.5, rtol=1e-9)
    with pytest.raises(LLMLabError, match="positive"):
        fit_power_law(x, [1.0, -1.0, 2.0])
    with pytest.raises(LLMLabError, match="2 distinct x"):
        fit_power_law([1e18, 1e18], [1.0, 2.0])


# --- Approach 3


def test_closed_form_gradient_and_hessian_match_autograd():
    runs = fit._LogRuns(_grid_runs(noise=0.01))
    weight = torch.from_numpy(np.random.default_rng(1).integers(0, 3, (1, 64)).astype(np.float64))
    objective = lambda t: fit._huber_derivatives(t[None], runs, weight, 1e-2)[0][0]  # noqa: E731
    for theta in ([6.0, 6.0, 0.5, 0.34, 0.28], [5.0, 7.0, 0.6, 0.3, 0.3], [2.0, 9.0, -0.5, 0.1, 0.4]):
        theta = torch.tensor(theta, dtype=torch.float64)
        _, grad, hess, _ = fit._huber_derivatives(theta[None], runs, weight, 1e-2)
        jacobian, hessian = torch.autograd.functional.jacobian, torch.autograd.functional.hessian
        torch.testing.assert_close(grad[0], jacobian(objective, theta), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(hess[0], hessian(objective, theta), rtol=1e-10, atol=1e-12)


def test_parametric_fit_recovers_an_exact_law_from_a_small_grid():
    grid = InitGrid(alpha=(0.5,), beta=(0.5,), e=(0.0, 1.0), a=(5.0, 10.0), b=(5.0, 10.0))
    got = fit_parametric(_grid_runs(noise=0.0), grid=grid)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(got, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert got.objective < 1e-20 and got.n_starts == 8 and got.converged


def test_parametric_fit_recovers_a_law_through_noise(noisy_fit):
    runs, got = noisy_fit
    for name, tolerance in [("E", 0.03), ("alpha", 0.03), ("beta", 0.03), ("a", 0.03), ("A", 0.15), ("B", 0.15)]:
        assert getattr(got, name) == pytest.approx(getattr(TRUE, name), rel=tolerance), name
    np.testing.assert_allclose(got.predict(runs.N, runs.D), TRUE.predict(runs.N, runs.D), rtol=0.005)
    assert got.n_starts == 5400 and got.n_converged > 0 and got.grad_norm <= 1e-9


def test_compute_optimal_minimises_the_law_on_each_isoflop_line():
    for C in (1e19, 1e22):
        N_opt, D_opt = TRUE.compute_optimal(C)
        assert 6 * N_opt * D_opt == pytest.approx(C, rel=1e-12)
        N = N_opt * np.logspace(-1, 1, 2001)
        assert N[np.argmin(TRUE.predict(N, C / (6 * N)))] == pytest.approx(N_opt, rel=2e-3)
    N1, _ = TRUE.compute_optimal(1e20)
    assert TRUE.compute_optimal(1e21)[0] / N1 == pytest.approx(10 ** TRUE.a) and TRUE.a + TRUE.b == pytest.approx(1)
    with pytest.raises(LLMLabError, match="no compute-optimal split"):
        dataclasses.replace(TRUE, beta=-0.1).compute_optimal(1e20)


def test_chinchilla_fit_lands_within_5_percent_of_epoch():
    """The acceptance check: Epoch AI's replication of Approach 3 on the digitised Fig. 4, 5 highest losses out."""
    got = fit_parametric(drop_highest(read_points(EPOCH_CSV), 5))
    assert got.n_points == 240
    for name, value in EPOCH.items():
        assert getattr(got, name) == pytest.approx(value, rel=0.05), name
    # Epoch's published values are not quite an optimum of the objective: Newton from them descends to ours
    epoch = torch.tensor([[np.log(EPOCH["A"]), np.log(EPOCH["B"]), np.log(EPOCH["E"]), EPOCH["alpha"], EPOCH["beta"]]],
                         dtype=torch.float64)
    runs = fit._LogRuns(drop_highest(read_points(EPOCH_CSV), 5))
    assert got.objective < float(fit._huber_derivatives(epoch, runs, torch.ones(1, 240, dtype=torch.float64), 1e-3)[0])


def test_a_fit_that_converges_from_no_start_raises():
    with pytest.raises(LLMLabError, match="did not converge from any of 4 starts"):
        fit_parametric(_grid_runs(noise=0.01), grid=InitGrid(alpha=(0.5,), beta=(0.5, 1.0), e=(0.0,), a=(5.0, 10.0),
                                                             b=(5.0,)), max_iter=2)


def test_parametric_bootstrap_interval_contains_the_true_exponents(noisy_fit):
    runs, got = noisy_fit
    boot = bootstrap_parametric(runs, n=60, seed=0, fit=got)
    assert boot.n == 60 and len(boot.samples["a"]) == 60 - boot.n_failed and boot.n_failed <= 3
    for name in ("a", "b", "alpha", "beta", "E"):
        low, high = boot.intervals[name]
        assert low < getattr(TRUE, name) < high, name
        assert low < getattr(got, name) < high, name
    np.testing.assert_allclose(boot.samples["a"] + boot.samples["b"], 1.0)
    lo90, hi90 = boot.intervals["a"]
    lo50, hi50 = bootstrap_parametric(runs, n=60, seed=0, fit=got, level=0.5).intervals["a"]
    assert lo90 < lo50 < hi50 < hi90


def test_bootstrap_arguments_are_checked(noisy_fit):
    runs, got = noisy_fit
    with pytest.raises(LLMLabError, match="n >= 2"):
        bootstrap_parametric(runs, n=1, fit=got)
    with pytest.raises(LLMLabError, match="level"):
        bootstrap_isoflop(_isoflop_runs(0.0), level=95)


# --- Approach 2


def test_isoflop_recovers_the_exponents_of_an_exact_law():
    got = fit_isoflop(_isoflop_runs(noise=0.0))
    # along an isoFLOP line L - E is K(C) times one fixed function of N / N_opt, so every budget's parabola misses
    # the optimum by the same factor and the exponent comes out exact
    assert got.a == pytest.approx(TRUE.a, abs=1e-9) and got.b == pytest.approx(TRUE.b, abs=1e-9)
    assert [b.status for b in got.budgets] == ["ok"] * 5 and len(got.used) == 5
    for budget in got.budgets:
        assert budget.N_opt == pytest.approx(TRUE.compute_optimal(budget.C)[0], rel=0.02)
        assert 6 * budget.N_opt * budget.D_opt == pytest.approx(budget.C)
        c0, c1, c2 = budget.coeffs
        assert c2 > 0 and np.exp(-c1 / (2 * c2)) == pytest.approx(budget.N_opt)


def test_isoflop_with_noise_and_its_bootstrap_interval():
    runs = _isoflop_runs(noise=0.005)
    got = fit_isoflop(runs)
    assert got.a == pytest.approx(TRUE.a, abs=0.03)
    boot = bootstrap_isoflop(runs, n=1000, seed=0)
    low, high = boot.intervals["a"]
    assert low < TRUE.a < high and low < got.a < high and high - low < 0.15
    assert boot.intervals["b"] == pytest.approx((1 - high, 1 - low))


def test_isoflop_flags_a_minimum_outside_the_sizes_and_a_parabola_that_opens_downward():
    exact = _isoflop_runs(noise=0.0, budgets=(1e18, 1e19, 1e20))
    C = 1e21
    below = TRUE.compute_optimal(C)[0] * np.logspace(-1.5, -0.7, 5)  # every size well under the optimum
    concave = np.logspace(8, 9, 5)
    N = np.concatenate([exact.N, below, concave])
    budgets = np.concatenate([exact.C, np.full(5, C), np.full(5, 1e23)])
    L = np.concatenate([exact.L, TRUE.predict(below, C / (6 * below)), 3 - 0.1 * (np.log(concave) - 19.8) ** 2])
    runs = Points(N, budgets / (6 * N), L, budgets)
    statuses = {round(np.log10(b.C)): b.status for b in fit_isoflop_budgets(runs)}
    assert statuses == {18: "ok", 19: "ok", 20: "ok", 21: "outside_range", 23: "opens_downward"}
    flagged = [b for b in fit_isoflop_budgets(runs) if b.status == "opens_downward"][0]
    assert np.isnan(flagged.N_opt) and np.isnan(flagged.D_opt)
    got = fit_isoflop(runs)
    assert len(got.used) == 3 and got.a == pytest.approx(TRUE.a, abs=1e-9)  # the flagged budgets left out
    assert len(fit_isoflop(runs, include_extrapolated=True).used) == 4


def test_isoflop_refuses_a_budget_with_too_few_sizes_and_a_single_budget():
    runs = _isoflop_runs(noise=0.0, budgets=(1e18, 1e19))
    keep = np.ones(len(runs), dtype=bool)
    keep[9:] = False  # the 1e19 budget keeps 2 of its 7 sizes
    with pytest.raises(LLMLabError, match=r"C = 1e\+19 FLOPs has runs at 2 distinct model size"):
        fit_isoflop(runs.take(keep))
    with pytest.raises(LLMLabError, match="2 budgets or more; 1 budget"):
        fit_isoflop(_isoflop_runs(noise=0.0, budgets=(1e18,)))


def test_runs_of_one_budget_group_within_the_tolerance():
    runs = _isoflop_runs(noise=0.0, budgets=(1e18, 1e19))
    jittered = Points(runs.N, runs.D, runs.L, runs.C * np.tile([1.0, 1.01, 0.99, 1.02, 1.0, 1.0, 0.995], 2))
    assert len(fit_isoflop_budgets(jittered)) == 2
    with pytest.raises(LLMLabError, match="distinct model size"):
        fit_isoflop_budgets(jittered, rtol=1e-4)  # split apart, the budgets have too few sizes each
