"""Scaling-law fitters: a table of training runs (N parameters, D tokens, final loss L, C FLOPs) in, fitted laws
and the compute-optimal split of a budget out. numpy and torch float64 only (no scipy).

Approach 3 of Chinchilla (Hoffmann et al. 2022), fitted as Epoch AI's replication did (Besiroglu et al. 2024,
"Chinchilla Scaling: A replication attempt", arXiv:2404.10102):

    log L_hat(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
    minimise  sum over runs of Huber_delta(log L_hat - log L),  delta = 1e-3,

from Chinchilla's grid of 5 x 5 x 6 x 6 x 6 = 5400 starts, keeping the best. The tiny delta (nearly least absolute
deviations) and leaving out the highest losses (`drop_highest`) both move the optimum a lot; the sum has the
optimum of the mean, but P times its gradient, which is what a gradient tolerance sees. Where Epoch ran scipy's
L-BFGS start by start, this module runs every start at once as one batched damped Newton method (exact 5 x 5
Hessians in closed form, Levenberg-Marquardt damping decided per start). Newton is affine invariant, which
matters here: a and alpha are nearly collinear (log N spans a few units around 20), a valley first-order methods
crawl along.

Approach 2: per budget C, a parabola of L against log N through the isoFLOP runs; its vertex is N_opt(C), and
D_opt = C / (6 N_opt); then power laws N_opt = k C^a and D_opt = k' C^b across budgets.

Intervals come from the bootstrap (resampling runs with replacement, within budgets for Approach 2) as
percentiles: `level=0.9` gives the 5th and 95th. Here `a` and `b` always name Chinchilla's allocation exponents
(N_opt proportional to C^a, D_opt to C^b), never log A and log B.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmlab.errors import LLMLabError

HUBER_DELTA = 1e-3
_NEEDS = ("columns `params`, `tokens`, `loss` (and optionally `flops`), "
          "or Epoch AI's digitisation columns `Model Size`, `Training FLOP`, `loss`")


# ---------------------------------------------------------------------------------------------------------------
# the runs


@dataclass(frozen=True)
class Points:
    """Training runs, one entry per run: parameters N, tokens D, final loss L, FLOPs C (float64 arrays).

    C defaults to 6 N D. `source` names where the runs came from, for error messages."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray | None = None
    source: str = "runs"

    def __post_init__(self) -> None:
        arrays = {name: np.asarray(getattr(self, name), dtype=np.float64).reshape(-1) for name in ("N", "D", "L")}
        arrays["C"] = (6.0 * arrays["N"] * arrays["D"] if self.C is None
                       else np.asarray(self.C, dtype=np.float64).reshape(-1))
        sizes = {name: len(v) for name, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise LLMLabError(f"{self.source}: N, D, L and C must have one value per run; got lengths {sizes}")
        if sizes["N"] == 0:
            raise LLMLabError(f"{self.source}: no runs; a fit needs at least one row of N, D, L")
        for name, v in arrays.items():
            bad = ~(np.isfinite(v) & (v > 0))
            if bad.any():
                i = int(np.argmax(bad))
                raise LLMLabError(f"{self.source}: {name} of run {i} is {v[i]!r}; every value must be a positive "
                                  "finite number")
            object.__setattr__(self, name, v)

    def __len__(self) -> int:
        return len(self.N)

    def take(self, index: np.ndarray) -> Points:
        """The runs at `index` (an integer or boolean array), same source."""
        return Points(self.N[index], self.D[index], self.L[index], self.C[index], self.source)


def read_points(path: str | Path) -> Points:
    """Runs from a CSV with columns `params`, `tokens`, `loss` (optional `flops`, else C = 6ND), or Epoch AI's
    digitisation of Chinchilla's Fig. 4 with `Model Size`, `Training FLOP`, `loss` (there D = C / (6N)).

    Column names match case-insensitively; other columns are ignored. Raises LLMLabError naming the file and
    the problem: missing, empty, lacking columns, or a value that is not a positive number."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"{path}: no such file; give a CSV of training runs with {_NEEDS}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.reader(f)
        try:
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
        except (csv.Error, UnicodeDecodeError) as e:
            raise LLMLabError(f"{path}: not a readable CSV ({e}); it needs a header row with {_NEEDS}") from e
    if not rows:
        raise LLMLabError(f"{path}: the file is empty; it needs a header row with {_NEEDS}, then one row per run")
    header = [cell.strip() for cell in rows[0][1]]
    column = {name.lower(): i for i, name in enumerate(header)}
    if all(name in column for name in ("params", "tokens", "loss")):
        wanted = ["params", "tokens", "loss"] + (["flops"] if "flops" in column else [])
    elif all(name in column for name in ("model size", "training flop", "loss")):
        wanted = ["model size", "training flop", "loss"]
    else:
        found = ", ".join(f"`{name}`" for name in header if name) or "none"
        raise LLMLabError(f"{path}: needs {_NEEDS}; found {found}")
    if len(rows) == 1:
        raise LLMLabError(f"{path}: has a header but no runs; add one row per run under it")
    values: dict[str, list[float]] = {name: [] for name in wanted}
    for line, row in rows[1:]:
        for name in wanted:
            i = column[name]
            cell = row[i].strip() if i < len(row) else ""
            try:
                v = float(cell)
            except ValueError:
                raise LLMLabError(f"{path}, line {line}: `{header[i]}` is {cell!r}, not a number") from None
            if not (math.isfinite(v) and v > 0):
                raise LLMLabError(f"{path}, line {line}: `{header[i]}` is {cell}; every value must be a positive "
                                  "finite number")
            values[name].append(v)
    arrays = {name: np.array(v, dtype=np.float64) for name, v in values.items()}
    if "params" in arrays:
        return Points(arrays["params"], arrays["tokens"], arrays["loss"], arrays.get("flops"), str(path))
    N, C = arrays["model size"], arrays["training flop"]
    return Points(N, C / (6.0 * N), arrays["loss"], C, str(path))


def drop_highest(points: Points, k: int) -> Points:
    """The runs without the k of highest loss, order kept. Epoch AI dropped Chinchilla's 5 highest-loss points
    (the smallest models' early, off-trend runs); with delta = 1e-3 they would still pull on the fit."""
    if not 0 <= k < len(points):
        raise LLMLabError(f"{points.source}: cannot drop {k} of {len(points)} runs; k must be in [0, {len(points)})")
    keep = np.ones(len(points), dtype=bool)
    keep[np.argsort(-points.L, kind="stable")[:k]] = False
    return points.take(keep)


# ---------------------------------------------------------------------------------------------------------------
# power laws


@dataclass(frozen=True)
class PowerLaw:
    """y = k x^exponent."""

    k: float
    exponent: float

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.k * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least squares of log y = log k + exponent log x. Needs positive values at two distinct x or more."""
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise LLMLabError(f"fit_power_law: x and y differ in length ({len(x)} and {len(y)})")
    if not (np.all(np.isfinite(x) & (x > 0)) and np.all(np.isfinite(y) & (y > 0))):
        raise LLMLabError("fit_power_law: x and y must be positive finite numbers (the fit is in log-log space)")
    if len(np.unique(x)) < 2:
        raise LLMLabError(f"fit_power_law: needs at least 2 distinct x, got {len(np.unique(x))}")
    lx, ly = np.log(x), np.log(y)
    exponent = float(np.sum((lx - lx.mean()) * (ly - ly.mean())) / np.sum((lx - lx.mean()) ** 2))
    return PowerLaw(float(math.exp(ly.mean() - exponent * lx.mean())), exponent)


# ---------------------------------------------------------------------------------------------------------------
# Approach 3: the parametric loss


@dataclass(frozen=True)
class InitGrid:
    """Starting values of the parametric fit (every combination is one start); the defaults are Chinchilla's."""

    alpha: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    beta: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    e: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    a: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    b: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

    def starts(self) -> np.ndarray:
        """(S, 5) starts, columns (a, b, e, alpha, beta): the optimiser's parameter order."""
        return np.array(list(itertools.product(self.a, self.b, self.e, self.alpha, self.beta)), dtype=np.float64)


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, as fitted.

    `objective` is the summed Huber loss at the optimum, `grad_norm` its gradient's largest component there;
    `converged` says the gradient fell below tolerance (always true for what `fit_parametric` returns);
    `n_converged` of `n_starts` starts did."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    converged: bool
    grad_norm: float
    n_starts: int
    n_converged: int
    n_points: int

    @property
    def a(self) -> float:
        """N_opt is proportional to C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt is proportional to C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """The fitted loss at N parameters and D tokens (broadcast)."""
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the fitted loss subject to 6 N D = C: with G = (alpha A / (beta B))^(1 /
        (alpha + beta)), N_opt = G (C/6)^a and D_opt = (C/6)^b / G (Chinchilla's eq. 4)."""
        if not (self.alpha > 0 and self.beta > 0):
            raise LLMLabError(f"the fitted law (alpha = {self.alpha:.3g}, beta = {self.beta:.3g}) has no "
                              "compute-optimal split: loss must fall with both N and D (alpha, beta > 0); the runs "
                              "may not vary one of them enough")
        C6 = np.asarray(C, dtype=np.float64) / 6.0
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return G * C6 ** self.a, C6 ** self.b / G


class _LogRuns:
    """log N, log D, log L of the runs (P,) as float64 tensors, and the columns the Hessian's sums need."""

    def __init__(self, points: Points):
        self.logN, self.logD, self.logL = (torch.from_numpy(np.log(v)) for v in (points.N, points.D, points.L))
        x, y = self.logN, self.logD
        self.basis = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], dim=1)  # (P, 6)


def _huber_derivatives(theta: torch.Tensor, runs: _LogRuns, weight: torch.Tensor,
                       delta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective (S,), gradient (S, 5) and Hessian (S, 5, 5) of sum_p weight_p Huber(r_p) at each of S parameter
    vectors theta = (a, b, e, alpha, beta), where r = LSE(u) - log L, u = (a - alpha x, b - beta y, e), x = log N,
    y = log D; and (S,) the largest share of any prediction that the weakest of the three terms has.

    With p = softmax(u), f = LSE(u) has gradient g = (p1, p2, p3, -x p1, -y p2) and Hessian
    M^T (diag p - p p^T) M (u = M theta), so Hess = sum_p [(h'' - h') g g^T + h' M^T diag(p) M]: every entry is
    a sum over runs of one of six per-run weights times 1, x, y, x^2, y^2 or xy, i.e. one (S, P) @ (P, k) product
    each, and no (S, P, 5) tensor is formed."""
    x, y = runs.logN, runs.logD
    a, b, e, alpha, beta = (t[:, None] for t in theta.unbind(-1))  # each (S, 1)
    u1, u2 = a - alpha * x, b - beta * y  # (S, P)
    top = torch.maximum(torch.maximum(u1, u2), e)
    # exponents clamped at -300: below about -708 exp() returns subnormal numbers, which x86 computes with many
    # times slower (the whole fit ran 2x slower); e^-300 is still 1e-130 of the largest term
    e1, e2, e3 = ((v - top).clamp(min=-300.0).exp() for v in (u1, u2, e))
    total = e1 + e2 + e3
    r = top + total.log() - runs.logL
    inside = r.abs() <= delta
    objective = (weight * torch.where(inside, 0.5 * r * r, delta * (r.abs() - 0.5 * delta))).sum(-1)
    p1, p2, p3 = e1 / total, e2 / total, e3 / total
    h1 = weight * r.clamp(-delta, delta)  # h'(r), weighted
    c = weight * inside - h1  # h''(r) - h'(r), weighted
    basis = runs.basis
    g1, g2, g3 = (h1 * p1) @ basis[:, :2], (h1 * p2) @ basis[:, [0, 2]], (h1 * p3).sum(-1)
    grad = torch.stack([g1[:, 0], g2[:, 0], g3, -g1[:, 1], -g2[:, 1]], dim=-1)
    q11 = (p1 * (c * p1 + h1)) @ basis[:, [0, 1, 3]]  # 1, x, x^2
    q22 = (p2 * (c * p2 + h1)) @ basis[:, [0, 2, 4]]  # 1, y, y^2
    q33 = (p3 * (c * p3 + h1)).sum(-1)
    cp1 = c * p1
    q12 = (cp1 * p2) @ basis[:, [0, 1, 2, 5]]  # 1, x, y, xy
    q13 = (cp1 * p3) @ basis[:, :2]  # 1, x
    q23 = (c * p2 * p3) @ basis[:, [0, 2]]  # 1, y
    rows = [  # order (a, b, e, alpha, beta)
        [q11[:, 0], q12[:, 0], q13[:, 0], -q11[:, 1], -q12[:, 2]],
        [q12[:, 0], q22[:, 0], q23[:, 0], -q12[:, 1], -q22[:, 1]],
        [q13[:, 0], q23[:, 0], q33, -q13[:, 1], -q23[:, 1]],
        [-q11[:, 1], -q12[:, 1], -q13[:, 1], q11[:, 2], q12[:, 3]],
        [-q12[:, 2], -q22[:, 1], -q23[:, 1], q12[:, 3], q22[:, 2]],
    ]
    hess = torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)
    weakest = torch.stack([p1.amax(-1), p2.amax(-1), p3.amax(-1)], dim=-1).amin(-1)  # the least a term weighs
    return objective, grad, hess, weakest


@dataclass
class _Minimised:
    theta: torch.Tensor  # (S, 5)
    objective: torch.Tensor  # (S,)
    grad_norm: torch.Tensor  # (S,)
    converged: torch.Tensor  # (S,) bool
    degenerate: torch.Tensor  # (S,) bool: stopped with a dead term (DEAD_TERM)
    iterations: torch.Tensor  # (S,) Newton iterations each start ran


DEAD_TERM, DEAD_FOR = 1e-8, 10
"""a start whose A, B or E term has weighed less than DEAD_TERM in every prediction for DEAD_FOR iterations in a
row is stopped, not converged: it is fitting the two-term law without that term, which the three-term optimum
always matches or beats (two-term laws are its limits), and on Chinchilla's grid such starts took 2/3 of the
iterations"""

_BLOCK = 256
"""starts per block of _huber_derivatives: a (256, P) temporary stays in cache; (5400, P) ones ran ~3x slower"""


def _derivatives_blocked(theta: torch.Tensor, runs: _LogRuns, weight: torch.Tensor,
                         delta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_huber_derivatives in blocks of _BLOCK starts, concatenated."""
    parts = []
    for lo in range(0, len(theta), _BLOCK):
        w = weight if weight.shape[0] == 1 else weight[lo:lo + _BLOCK]
        parts.append(_huber_derivatives(theta[lo:lo + _BLOCK], runs, w, delta))
    return tuple(torch.cat(part) for part in zip(*parts))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside, restoring the count after. The fit's operations are on blocks of ~60k
    numbers, too small for a second thread to pay, and with another process busy on one of two cores OpenMP's
    barriers made two threads 30-40x slower than one (measured: 3.3 s against 144 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _minimise(theta0: torch.Tensor, runs: _LogRuns, weight: torch.Tensor, delta: float, max_iter: int,
              gtol: float) -> _Minimised:
    """_newton on one thread."""
    with _one_thread():
        return _newton(theta0, runs, weight, delta, max_iter, gtol)


def _newton(theta0: torch.Tensor, runs: _LogRuns, weight: torch.Tensor, delta: float, max_iter: int,
            gtol: float) -> _Minimised:
    """Batched damped Newton from every row of theta0 (S, 5); weight is (1, P) or (S, P).

    Each iteration every unfinished start proposes -(|H| + mu max|lambda(H)| I)^-1 grad, |H| the Hessian with
    its eigenvalues made positive (so a saddle is left downhill, not approached), and keeps the step only if the
    objective does not rise; mu shrinks 10x after a kept step and grows 10x after a refused one
    (Levenberg-Marquardt). A start finishes when its gradient's largest component is at most gtol (converged),
    or when mu reaches 1e12, the objective is not finite or a term has died (DEAD_TERM): not converged. The
    Huber loss is C1, so the gradient test is meaningful even though its second derivative jumps where a residual
    crosses +-delta."""
    theta = theta0.clone()
    objective, grad, hess, weakest = _derivatives_blocked(theta, runs, weight, delta)
    dead_for = torch.zeros(len(theta), dtype=torch.long)
    mu = torch.full((len(theta),), 1e-6, dtype=theta.dtype)
    iterations = torch.zeros(len(theta), dtype=torch.long)
    running = torch.ones(len(theta), dtype=torch.bool)
    per_start_weight = weight.shape[0] > 1
    for _ in range(max_iter):
        dead_for = torch.where(weakest < DEAD_TERM, dead_for + 1, 0)
        running &= (grad.abs().amax(-1) > gtol) & (mu < 1e12) & torch.isfinite(objective) & (dead_for < DEAD_FOR)
        idx = running.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        iterations[idx] += 1
        eigenvalues, vectors = torch.linalg.eigh(hess[idx])
        curvature = eigenvalues.abs()
        curvature = curvature + mu[idx, None] * curvature.amax(-1, keepdim=True).clamp(min=1e-300)
        step = -(vectors @ ((vectors.transpose(1, 2) @ grad[idx].unsqueeze(-1)) / curvature.unsqueeze(-1)))
        trial = theta[idx] + step.squeeze(-1)
        w = weight[idx] if per_start_weight else weight
        t_objective, t_grad, t_hess, t_weakest = _derivatives_blocked(trial, runs, w, delta)
        keep = torch.isfinite(t_objective) & torch.isfinite(t_grad).all(-1) & (t_objective <= objective[idx])
        kept = idx[keep]
        theta[kept], objective[kept], grad[kept] = trial[keep], t_objective[keep], t_grad[keep]
        hess[kept], weakest[kept] = t_hess[keep], t_weakest[keep]
        mu[idx] = torch.where(keep, (mu[idx] / 10).clamp(min=1e-12), mu[idx] * 10)
    grad_norm = grad.abs().amax(-1)
    degenerate = dead_for >= DEAD_FOR
    converged = torch.isfinite(objective) & (grad_norm <= gtol) & ~degenerate
    return _Minimised(theta, objective, grad_norm, converged, degenerate, iterations)


def _fit_from(index: int, run: _Minimised, n_points: int, n_starts: int, n_converged: int) -> ParametricFit:
    a, b, e, alpha, beta = run.theta[index].tolist()
    return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                         objective=float(run.objective[index]), converged=bool(run.converged[index]),
                         grad_norm=float(run.grad_norm[index]), n_starts=n_starts, n_converged=n_converged,
                         n_points=n_points)


def fit_parametric(points: Points, *, delta: float = HUBER_DELTA, grid: InitGrid | None = None,
                   max_iter: int = 200, gtol: float = 1e-9) -> ParametricFit:
    """Approach 3: L(N, D) = E + A/N^alpha + B/D^beta minimising the summed Huber loss of log residuals, the
    best of all starts of `grid` (Chinchilla's by default) whose gradient converged.

    gtol bounds the gradient's largest component; with delta = 1e-3 a run's pull on the gradient is at most
    delta |log D| ~ 0.03, so 1e-9 asks for a point where the runs' pulls cancel to within a millionth."""
    starts = torch.from_numpy((grid or InitGrid()).starts())
    run = _minimise(starts, _LogRuns(points), torch.ones(1, len(points), dtype=torch.float64), delta, max_iter, gtol)
    n_converged = int(run.converged.sum())
    if n_converged == 0:
        live = ~run.degenerate
        smallest = float(run.grad_norm[live].nan_to_num(math.inf).min()) if live.any() else math.inf
        raise LLMLabError(f"{points.source}: the parametric fit did not converge from any of {len(starts)} starts: "
                          f"{int(run.degenerate.sum())} drifted to a law without one of its three terms (do the runs "
                          f"vary both N and D?), the rest kept a gradient above gtol {gtol:g} (smallest "
                          f"{smallest:.2g}) after {max_iter} iterations; check the runs, or raise max_iter or gtol")
    best = int(torch.where(run.converged, run.objective, math.inf).argmin())
    return _fit_from(best, run, len(points), len(starts), n_converged)


@dataclass(frozen=True)
class Bootstrap:
    """Percentile intervals from bootstrap refits: `samples[name]` holds one estimate per successful resample,
    `intervals[name]` its (100 (1 - level)/2, 100 (1 + level)/2) percentiles; `n_failed` resamples gave no
    estimate (no start converged, or too few usable budgets) and are left out."""

    level: float
    n: int
    n_failed: int
    samples: dict[str, np.ndarray] = field(repr=False)
    intervals: dict[str, tuple[float, float]]


def _percentile_intervals(samples: dict[str, np.ndarray], level: float) -> dict[str, tuple[float, float]]:
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {name: tuple(float(v) for v in np.percentile(s, q)) for name, s in samples.items()}


def _check_bootstrap_args(n: int, level: float) -> None:
    if n < 2:
        raise LLMLabError(f"the bootstrap needs n >= 2 resamples, got {n}")
    if not 0 < level < 1:
        raise LLMLabError(f"the bootstrap's level is a fraction in (0, 1) (0.9: 5th to 95th percentile), got {level}")


def bootstrap_parametric(points: Points, *, n: int = 200, seed: int = 0, level: float = 0.9, grid_starts: int = 4,
                         fit: ParametricFit | None = None, delta: float = HUBER_DELTA, max_iter: int = 200,
                         gtol: float = 1e-9) -> Bootstrap:
    """Intervals of E, A, B, alpha, beta and the allocation exponents a, b: n resamples of the runs with
    replacement, each refitted from the full-data optimum (`fit`, fitted here when not given) and `grid_starts`
    random starts of Chinchilla's grid. All resamples' starts run as one batch (a resample is a weight vector
    of multiplicities)."""
    _check_bootstrap_args(n, level)
    fit = fit or fit_parametric(points, delta=delta, max_iter=max_iter, gtol=gtol)
    rng = np.random.default_rng(seed)
    P = len(points)
    counts = rng.multinomial(P, np.full(P, 1.0 / P), size=n).astype(np.float64)  # (n, P)
    optimum = [math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta]
    grid = InitGrid().starts()
    starts = np.concatenate([np.tile(optimum, (n, 1))[:, None], grid[rng.integers(0, len(grid), (n, grid_starts))]],
                            axis=1)  # (n, 1 + grid_starts, 5)
    per = starts.shape[1]
    run = _minimise(torch.from_numpy(starts.reshape(-1, 5)), _LogRuns(points),
                    torch.from_numpy(np.repeat(counts, per, axis=0)), delta, max_iter, gtol)
    objective = torch.where(run.converged, run.objective, math.inf).reshape(n, per)
    best = objective.argmin(-1) + torch.arange(n) * per
    ok = torch.isfinite(objective.amin(-1))
    if not ok.any():
        raise LLMLabError(f"{points.source}: no bootstrap resample converged; raise max_iter or gtol")
    a, b, e, alpha, beta = run.theta[best[ok]].numpy().T
    samples = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
               "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}
    return Bootstrap(level, n, int((~ok).sum()), samples, _percentile_intervals(samples, level))


# ---------------------------------------------------------------------------------------------------------------
# Approach 2: isoFLOP parabolas

OK, OPENS_DOWNWARD, OUTSIDE_RANGE, TOO_FEW_SIZES = "ok", "opens_downward", "outside_range", "too_few_sizes"


@dataclass(frozen=True)
class IsoFlopBudget:
    """One budget's parabola L = c0 + c1 log N + c2 log^2 N (natural log) and its vertex N_opt, with
    D_opt = C / (6 N_opt) and L_opt the parabola there; C is the geometric mean of the budget's runs' C.

    status: "ok"; "opens_downward" (c2 <= 0: no minimum, N_opt, D_opt and L_opt are NaN); "outside_range" (the
    vertex lies beyond the sampled sizes [N_min, N_max]: N_opt is an extrapolation, left out of the exponent fit
    unless asked for)."""

    C: float
    n_runs: int
    n_sizes: int
    N_min: float
    N_max: float
    coeffs: tuple[float, float, float]
    N_opt: float
    D_opt: float
    L_opt: float
    status: str


@dataclass(frozen=True)
class IsoFlopFit:
    """Per-budget parabolas and the power laws N_opt = k C^a and D_opt = k' C^b through the budgets whose C is in
    `used`."""

    budgets: tuple[IsoFlopBudget, ...]
    n_opt: PowerLaw
    d_opt: PowerLaw
    used: tuple[float, ...]

    @property
    def a(self) -> float:
        """N_opt is proportional to C^a."""
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        """D_opt is proportional to C^b (a + b = 1: D_opt is C / (6 N_opt) at every budget)."""
        return self.d_opt.exponent


def _budget_groups(C: np.ndarray, rtol: float) -> list[np.ndarray]:
    """Indices of runs per budget: sorted by C, a run joins the current budget while its C is within rtol of the
    budget's smallest (sweeps round tokens, so 6ND of one budget's runs differ slightly)."""
    order = np.argsort(C, kind="stable")
    groups, first = [[order[0]]], C[order[0]]
    for i in order[1:]:
        if C[i] <= first * (1 + rtol):
            groups[-1].append(i)
        else:
            groups.append([i])
            first = C[i]
    return [np.array(g) for g in groups]


def _parabola_vertices(logN: np.ndarray, L: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted least-squares parabolas of L against logN (R runs of one budget) for each row of weight (n, R)
    (multiplicities; a row of ones is the plain fit), all at once through the 3 x 3 normal equations."""
    centre, scale = logN.mean(), max(logN.std(), 1e-12)  # fit in standardised z: well conditioned
    z = (logN - centre) / scale
    powers = z[:, None] ** np.arange(5)  # (R, 5)
    moments = weight @ powers  # (n, 5)
    rhs = weight @ (L[:, None] * powers[:, :3])  # (n, 3)
    sizes, which = np.unique(logN, return_inverse=True)
    present = (weight @ (which[:, None] == np.arange(len(sizes)))) > 0  # (n, U)
    n_sizes = present.sum(-1)
    enough = n_sizes >= 3
    normal = moments[:, np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]])]
    normal[~enough] = np.eye(3)
    c = np.linalg.solve(normal, rhs[..., None])[..., 0]  # (n, 3), in z
    size_z = (sizes - centre) / scale
    z_min, z_max = np.where(present, size_z, np.inf).min(-1), np.where(present, size_z, -np.inf).max(-1)
    upward = c[:, 2] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        z_opt = np.where(upward, -c[:, 1] / (2 * c[:, 2]), np.nan)
    status = np.select([~enough, ~upward, (z_opt < z_min) | (z_opt > z_max)],
                       [TOO_FEW_SIZES, OPENS_DOWNWARD, OUTSIDE_RANGE], OK)
    raw = np.stack([c[:, 0] - c[:, 1] * centre / scale + c[:, 2] * centre ** 2 / scale ** 2,
                    c[:, 1] / scale - 2 * c[:, 2] * centre / scale ** 2,
                    c[:, 2] / scale ** 2], axis=-1)  # L = raw0 + raw1 logN + raw2 logN^2
    return {"logN_opt": centre + scale * z_opt, "L_opt": c[:, 0] + c[:, 1] * z_opt + c[:, 2] * z_opt ** 2,
            "status": status, "coeffs": raw, "n_sizes": n_sizes}


def fit_isoflop_budgets(points: Points, *, rtol: float = 0.05) -> tuple[IsoFlopBudget, ...]:
    """One parabola per compute budget (runs grouped by C within rtol), smallest budget first. Every budget needs
    runs at 3 distinct sizes or more."""
    budgets = []
    for idx in _budget_groups(points.C, rtol):
        C = float(np.exp(np.log(points.C[idx]).mean()))
        logN, n_sizes = np.log(points.N[idx]), len(np.unique(points.N[idx]))
        if n_sizes < 3:
            raise LLMLabError(f"{points.source}: the budget C = {C:.3g} FLOPs has runs at {n_sizes} distinct model "
                              f"size(s) ({', '.join(f'{v:.3g}' for v in np.unique(points.N[idx]))}); its parabola "
                              "needs at least 3: add runs or leave this budget out")
        v = _parabola_vertices(logN, points.L[idx], np.ones((1, len(idx))))
        status = str(v["status"][0])
        with np.errstate(over="ignore"):  # a flagged vertex far outside the sizes may overflow: inf, still flagged
            N_opt = float(np.exp(v["logN_opt"][0]))
        budgets.append(IsoFlopBudget(C=C, n_runs=len(idx), n_sizes=n_sizes, N_min=float(points.N[idx].min()),
                                     N_max=float(points.N[idx].max()), coeffs=tuple(map(float, v["coeffs"][0])),
                                     N_opt=N_opt, D_opt=C / (6 * N_opt), L_opt=float(v["L_opt"][0]), status=status))
    return tuple(budgets)


def fit_isoflop(points: Points, *, rtol: float = 0.05, include_extrapolated: bool = False) -> IsoFlopFit:
    """Approach 2: per-budget parabolas, then N_opt = k C^a and D_opt = k' C^b through the budgets whose vertex
    is a minimum inside the sampled sizes (also extrapolated vertices if include_extrapolated). Needs 2 such
    budgets or more."""
    budgets = fit_isoflop_budgets(points, rtol=rtol)
    usable = (OK, OUTSIDE_RANGE) if include_extrapolated else (OK,)
    used = [b for b in budgets if b.status in usable]
    if len(used) < 2:
        flagged = "; ".join(f"C = {b.C:.3g}: {b.status.replace('_', ' ')}" for b in budgets if b.status not in usable)
        raise LLMLabError(f"{points.source}: the isoFLOP exponents need a usable minimum at 2 budgets or more; "
                          f"{len(budgets)} budget(s), {len(used)} usable" + (f" ({flagged})" if flagged else "")
                          + "; add budgets, or runs around the flagged budgets' minima")
    C = np.array([b.C for b in used])
    return IsoFlopFit(budgets, fit_power_law(C, [b.N_opt for b in used]), fit_power_law(C, [b.D_opt for b in used]),
                      tuple(float(c) for c in C))


def _masked_slope(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least-squares slope of y (n, B) on x (B,) per row, over the entries where mask (n, B) holds."""
    m = mask.astype(np.float64)
    y = np.where(mask, y, 0.0)
    count = m.sum(-1)
    x_mean, y_mean = (m * x).sum(-1) / count, (m * y).sum(-1) / count
    dx = x - x_mean[:, None]
    return (m * dx * (y - y_mean[:, None])).sum(-1) / (m * dx * dx).sum(-1)


def bootstrap_isoflop(points: Points, *, n: int = 1000, seed: int = 0, level: float = 0.9, rtol: float = 0.05,
                      include_extrapolated: bool = False) -> Bootstrap:
    """Intervals of the isoFLOP exponents a and b: n resamples drawing each budget's runs with replacement
    (budgets stay fixed), each refitted by the same rule as `fit_isoflop`; in a resample, a budget whose draw
    has fewer than 3 distinct sizes, or whose vertex is flagged, is left out, and a resample with fewer than 2
    usable budgets counts as failed."""
    _check_bootstrap_args(n, level)
    fit_isoflop(points, rtol=rtol, include_extrapolated=include_extrapolated)  # the data's own errors first
    rng = np.random.default_rng(seed)
    usable = [OK, OUTSIDE_RANGE] if include_extrapolated else [OK]
    logC, logN_opt, ok = [], [], []
    for idx in _budget_groups(points.C, rtol):
        weight = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n).astype(np.float64)
        v = _parabola_vertices(np.log(points.N[idx]), points.L[idx], weight)
        logC.append(np.log(points.C[idx]).mean())
        logN_opt.append(v["logN_opt"])
        ok.append(np.isin(v["status"], usable))
    logC, logN_opt, ok = np.array(logC), np.stack(logN_opt, -1), np.stack(ok, -1)  # (B,), (n, B), (n, B)
    good = ok.sum(-1) >= 2
    if not good.any():
        raise LLMLabError(f"{points.source}: no bootstrap resample kept 2 usable budgets; add runs per budget")
    a = _masked_slope(logC, logN_opt[good], ok[good])
    b = _masked_slope(logC, (logC - math.log(6)) - logN_opt[good], ok[good])  # log D_opt = log(C/6) - log N_opt
    samples = {"a": a, "b": b}
    return Bootstrap(level, n, int((~good).sum()), samples, _percentile_intervals(samples, level))
