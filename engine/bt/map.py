"""MAP adaptation: the posterior mode of BT (eqs. 2-3) under a Gaussian prior centred on the query, by Newton steps in the pairs' span (numpy only)."""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.bt.common import AdaptationInputError, logistic
from engine.bt.span import PairSet, check_batch
from engine.bt.threads import numpy_blas_on_one_thread

PARALLEL_FROM = 64  # queries per thread at least when map_fit spreads a batch over the cores
_FULL_STEP_DECREMENT = 1e-8  # below this squared Newton decrement a Newton step is taken whole
PRIOR_PRECISION = 120.0  # search's lambda, chosen by duel taste and relevance (benchmarks/bench_duels.py, README)


@dataclass(frozen=True)
class MapConfig:
    """Hyper-parameters of MAP adaptation; the benchmark tunes its own (`clipbt bench preference`), search uses these."""

    prior_precision: float = PRIOR_PRECISION  # lambda: 1 / variance of the Gaussian prior on x around the query x0
    beta: float = 10.0  # inverse temperature of the BT probability sigmoid(beta * (s(x, y1) - s(x, y2)))
    steps: int = 25  # at most this many Newton steps (each halved until the objective falls)
    tol: float = 1e-10  # stop a query once its squared Newton decrement is below this: x within about
    # sqrt(2 tol / prior_precision) of the exact mode, far below what reorders two images

    def __post_init__(self):
        check_map(self.prior_precision, self.beta, self.steps)


def check_map(prior_precision: float, beta: float, steps: int) -> None:
    if not np.isfinite(prior_precision) or prior_precision <= 0:
        raise AdaptationInputError(f"prior_precision must be a finite number > 0, got {prior_precision}")
    if not np.isfinite(beta) or beta <= 0:
        raise AdaptationInputError(f"beta must be a finite number > 0, got {beta}")
    if int(steps) != steps or steps < 0:
        raise AdaptationInputError(f"steps must be a whole number >= 0, got {steps}")


def map_objective(x, x0, diffs, weights, prior_precision: float, beta: float) -> float:
    """The negative log posterior, up to a constant:

        f(x) = sum_i w_i softplus(-beta D_i . x) + (lambda / 2) ||x - x0||^2,

    D_i = y_i1 - y_i2: eq. 3 summed over the pairs (each w_i-weighted) plus a Gaussian prior of precision lambda."""
    m = np.asarray(diffs, np.float64) @ np.asarray(x, np.float64)
    delta = np.asarray(x, np.float64) - np.asarray(x0, np.float64)
    return float(np.sum(weights * np.logaddexp(0.0, -beta * m)) + 0.5 * prior_precision * delta @ delta)


def map_adapt_reference(
    x0,
    preferred,
    rejected,
    weights=None,
    prior_precision: float = PRIOR_PRECISION,
    beta: float = 10.0,
    steps: int = 100,
    tol: float = 1e-14,
) -> np.ndarray:
    """argmin_x `map_objective` by damped Newton steps on the full d-dimensional x (a (d, d) solve per step):
    the slow obvious form that `map_adapt_many` is checked against. Returns (d,) float64."""
    check_map(prior_precision, beta, steps)
    x0 = np.asarray(x0, np.float64)
    diffs = np.asarray(preferred, np.float64) - np.asarray(rejected, np.float64)
    w = np.ones(len(diffs)) if weights is None else np.asarray(weights, np.float64)
    x = x0.copy()
    for _ in range(int(steps)):
        m = diffs @ x
        s = logistic(-beta * m)  # 1 - P(y1 > y2)
        grad = -beta * diffs.T @ (w * s) + prior_precision * (x - x0)
        hess = (diffs.T * (beta * beta * w * s * (1 - s))) @ diffs + prior_precision * np.eye(len(x))
        step = -np.linalg.solve(hess, grad)
        decrement = -grad @ step
        if decrement < tol:
            break
        x = _backtrack(lambda z: map_objective(z, x0, diffs, w, prior_precision, beta), x, step, grad)
    return x


def _backtrack(f, x, step, grad, halvings: int = 30):
    """x + t step with the largest t in 1, 1/2, 1/4, ... that satisfies Armijo's condition."""
    fx, slope, t = f(x), grad @ step, 1.0
    for _ in range(halvings):
        if f(x + t * step) <= fx + 1e-4 * t * slope:
            return x + t * step
        t /= 2
    return x


@dataclass(frozen=True)
class MapFit:
    """The posterior mode of B queries in span form: x_b = x0_b + D_b^T a_b.

    coefficients: B arrays (P_b,) a_b (empty for a query without pairs); curvature: B arrays (P_b,)
    beta^2 w_i p_i (1 - p_i) at the mode, the diagonal of the likelihood's Hessian in margin space."""

    queries: np.ndarray  # (B, d) float32 posterior modes
    coefficients: list
    curvature: list


def map_adapt_many(
    queries,
    pair_sets,
    weights,
    prior_precision: float = PRIOR_PRECISION,
    beta: float = 10.0,
    steps: int = 25,
    tol: float = 1e-14,
) -> np.ndarray:
    """MAP adaptation of B queries, query b on its own `PairSet` (the posterior modes of `map_fit`). Returns (B, d) float32."""
    return map_fit(queries, pair_sets, weights, prior_precision, beta, steps, tol).queries


def map_fit(
    queries,
    pair_sets,
    weights,
    prior_precision: float = PRIOR_PRECISION,
    beta: float = 10.0,
    steps: int = 25,
    tol: float = 1e-14,
) -> MapFit:
    """argmin_x `map_objective` for B queries, query b with its own `PairSet` and weights (None: all ones).

    At the mode the gradient vanishes, so x - x0 = (beta / lambda) D^T (w * sigmoid(-beta m)) lies in the
    span of the differences: x = x0 + D^T a. With G = D D^T the margins are m = D x0 + G a, and the
    full-space Newton step restricted to that span is (push-through identity, exact even for singular G)

        delta_a = -(W G + lambda I)^{-1} (lambda a - beta w * sigmoid(-beta m)),  W = diag(beta^2 w p (1 - p)),

    a (P, P) solve; the steps of all B queries run as one batched solve on their zero-padded Gram
    matrices (padding keeps a = 0), each halved until the objective falls; a batch of at least
    2 PARALLEL_FROM queries is cut into one part per core, solved in threads. Equal to
    `map_adapt_reference` (tests/test_bt_map.py). A PairSet without a Gram (P > d) is solved by the
    reference in x. queries: (B, d); pair_sets: B PairSets or None; weights: B arrays (P_b,) >= 0 or None.
    """
    check_map(prior_precision, beta, steps)
    q, given = check_batch(queries, pair_sets, weights)
    out = q.copy()
    coefficients = [np.zeros(0) if g is None else np.zeros(len(g)) for g in given]
    curvature = [np.zeros(0) if g is None else np.zeros(len(g)) for g in given]
    span = [b for b, g in enumerate(given) if g is not None and pair_sets[b].gram is not None]
    numpy_blas_on_one_thread()

    def solve_part(part: list[int]) -> None:  # each query's Newton steps depend on its own rows only
        a, curv = _newton_in_span(
            q[part].astype(np.float64),
            [pair_sets[b] for b in part],
            [given[b] for b in part],
            prior_precision,
            beta,
            int(steps),
            tol,
        )
        for row, b in enumerate(part):
            p = len(pair_sets[b])
            coefficients[b], curvature[b] = a[row, :p], curv[row, :p]
            out[b] = (q[b].astype(np.float64) + a[row, :p] @ pair_sets[b].diffs.astype(np.float64)).astype(np.float32)

    parts = _parts(span)
    if len(parts) > 1:  # numpy's batched solves and array arithmetic release the GIL
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(solve_part, parts))
    elif span:
        solve_part(span)
    for b, g in enumerate(given):
        if g is not None and pair_sets[b].gram is None:
            diffs = pair_sets[b].diffs.astype(np.float64)
            x = map_adapt_reference(q[b], diffs, np.zeros_like(diffs), g, prior_precision, beta, max(int(steps), 1))
            out[b] = x.astype(np.float32)
            # x - x0 is in the row space of D: its coefficients by least squares
            coefficients[b] = np.linalg.lstsq(diffs.T, x - q[b], rcond=None)[0]
            s = logistic(-beta * (diffs @ x))
            curvature[b] = beta * beta * g * s * (1 - s)
    return MapFit(out, coefficients, curvature)


def _parts(queries: list[int]) -> list[list[int]]:
    """`queries` cut into one part per core, each at least PARALLEL_FROM long (fewer, shorter parts cost more to start than they save)."""
    count = max(1, min(os.cpu_count() or 1, len(queries) // PARALLEL_FROM))
    size = -(-len(queries) // count) if queries else 1
    return [queries[at : at + size] for at in range(0, len(queries), size)]


def _newton_in_span(
    q: np.ndarray, pair_sets: list[PairSet], weights: list[np.ndarray], lam: float, beta: float, steps: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Damped Newton steps on the coefficients a of U queries at once (see `map_fit`); returns a and W, (U, n)."""
    u_count, n = len(q), max(len(p) for p in pair_sets)
    at_x0 = np.zeros((u_count, n))
    for row, pairs in enumerate(pair_sets):
        at_x0[row, : len(pairs)] = pairs.diffs.astype(np.float64) @ q[row]
    if all(len(p) == n for p in pair_sets):  # the common case: one stack, no padding
        gram, w = np.stack([p.gram for p in pair_sets]), np.stack(weights).astype(np.float64)
    else:
        gram = np.zeros((u_count, n, n))
        w = np.zeros((u_count, n))  # 0 on padding
        for row, (pairs, wb) in enumerate(zip(pair_sets, weights)):
            gram[row, : len(pairs), : len(pairs)] = pairs.gram
            w[row, : len(pairs)] = wb

    def objective(a, ga):  # ga = G a, per query
        return (w * np.logaddexp(0.0, -beta * (at_x0 + ga))).sum(1) + 0.5 * lam * (a * ga).sum(1)

    a = np.zeros((u_count, n))
    ga = np.zeros((u_count, n))
    active = np.ones(u_count, dtype=bool)
    diagonal = np.arange(n)
    buffer = np.empty_like(gram)
    for _ in range(steps):
        s = logistic(-beta * (at_x0 + ga))
        curv = beta * beta * w * s * (1 - s)
        r = lam * a - beta * w * s  # the gradient in x is D^T r
        delta = np.zeros_like(a)
        rows = np.flatnonzero(active)  # converged queries are solved no more
        if len(rows) == u_count:  # W G + lambda I, in one buffer while every query is active
            system = np.multiply(gram, curv[:, :, None], out=buffer)
        else:
            system = gram[rows] * curv[rows, :, None]
        system[:, diagonal, diagonal] += lam
        delta[rows] = -np.linalg.solve(system, r[rows, :, None])[:, :, 0]
        gdelta = np.matmul(gram, delta[:, :, None])[:, :, 0]
        decrement = -(r * gdelta).sum(1)  # Newton decrement squared: -grad_x . step_x = -r^T G delta
        active &= decrement > tol
        if not active.any():
            break
        t = active.astype(np.float64)
        # Backtracking (Armijo) only where the step is still large: near the optimum the full Newton step
        # is right, and comparing objectives that differ in the last bits would halve it for nothing.
        damped = active & (decrement > _FULL_STEP_DECREMENT)
        if damped.any():
            f0 = objective(a, ga)
            for _ in range(30):
                bad = damped & (objective(a + t[:, None] * delta, ga + t[:, None] * gdelta) > f0 - 1e-4 * t * decrement)
                if not bad.any():
                    break
                t[bad] /= 2
        a += t[:, None] * delta
        ga += t[:, None] * gdelta
    s = logistic(-beta * (at_x0 + ga))
    return a, beta * beta * w * s * (1 - s)


def score_variance(pairs: PairSet | None, curvature, vectors, prior_precision: float) -> np.ndarray:
    """Laplace posterior variance of v . x for each row v of vectors (K, d), e.g. v = y_a - y_b for the
    variance of a score difference: v^T (lambda I + D^T W D)^{-1} v, by Woodbury in the span:

        (1 / lambda) (||v||^2 - u^T (lambda I + S G S)^{-1} u),  u = S D v,  S = W^{1/2}.

    curvature: the (P,) W of `MapFit.curvature`. Returns (K,) float64."""
    v = np.asarray(vectors, np.float64)
    base = np.einsum("kd,kd->k", v, v) / prior_precision
    if pairs is None or not len(pairs):
        return base
    sq = np.sqrt(np.asarray(curvature, np.float64))
    d64 = pairs.diffs.astype(np.float64)
    gram = pairs.gram if pairs.gram is not None else d64 @ d64.T
    u = sq[:, None] * (d64 @ v.T)  # (P, K)
    inner = prior_precision * np.eye(len(sq)) + sq[:, None] * gram * sq[None, :]
    return base - np.einsum("pk,pk->k", u, np.linalg.solve(inner, u)) / prior_precision
