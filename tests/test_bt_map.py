"""MAP adaptation in the pairs' span against Newton on the full d-dimensional query, and its posterior variance."""

import numpy as np
import pytest

from engine import bt
from engine.bt.map import map_objective


def unit_rows(rng, n, d):
    a = rng.normal(size=(n, d))
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def problem(seed, n, d):
    rng = np.random.default_rng(seed)
    return (
        unit_rows(rng, 1, d)[0].astype(np.float32),
        unit_rows(rng, n, d).astype(np.float32),
        unit_rows(rng, n, d).astype(np.float32),
        rng,
    )


@pytest.mark.parametrize(
    "n,d,lam,beta,weighted",
    [
        (1, 8, 3.0, 10.0, False),
        (5, 16, 0.1, 10.0, True),
        (50, 128, 3.0, 10.0, False),
        (20, 32, 0.01, 30.0, True),
        (40, 16, 1.0, 3.0, False),  # more pairs than dimensions: no Gram, solved in x
    ],
)
def test_span_newton_equals_full_space_newton(n, d, lam, beta, weighted):
    x0, p, r, rng = problem(n * d, n, d)
    w = rng.uniform(0, 2, size=n) if weighted else None
    pairs = bt.PairSet.of(p, r)
    diffs = pairs.diffs.astype(np.float64)  # the same float32 differences for both (at lambda 0.01 rounding matters)
    want = bt.map_adapt_reference(x0, diffs, np.zeros_like(diffs), w, lam, beta)
    got = bt.map_adapt_many(x0[None], [pairs], [w], lam, beta)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the reference is the minimum: its gradient vanishes
    s = 1 / (1 + np.exp(beta * diffs @ want))
    grad = -beta * diffs.T @ ((np.ones(n) if w is None else w) * s) + lam * (want - x0)
    assert np.abs(grad).max() < 1e-8
    f = lambda x: map_objective(x, x0, diffs, np.ones(n) if w is None else w, lam, beta)  # noqa: E731
    assert all(f(want) <= f(want + 1e-3 * rng.normal(size=d)) for _ in range(5))


def test_a_batch_of_users_equals_each_alone():
    d = 24
    sets, queries, weights = [], [], []
    for u, n in enumerate([3, 0, 17, 1, 9, 40]):
        x0, p, r, rng = problem(100 + u, n, d)
        queries.append(x0)
        sets.append(bt.PairSet.of(p, r) if n else None)
        weights.append(rng.uniform(0.5, 1.5, size=n) if n and u % 2 else None)
    batch = bt.map_adapt_many(np.stack(queries), sets, weights, 2.0, 10.0)
    for u in range(len(sets)):
        alone = bt.map_adapt_many(queries[u][None], [sets[u]], [weights[u]], 2.0, 10.0)[0]
        np.testing.assert_allclose(batch[u], alone, atol=1e-6)
    np.testing.assert_array_equal(batch[1], queries[1])  # no pairs: unchanged


def test_a_batch_spread_over_threads_equals_each_alone(monkeypatch):
    """map_fit cuts a large batch into one part per core and solves them in threads: forced here to 3 parts."""
    from engine.bt import map as map_module

    monkeypatch.setattr(map_module, "PARALLEL_FROM", 4)
    monkeypatch.setattr(map_module.os, "cpu_count", lambda: 3)
    d, sizes = 24, [3, 0, 17, 1, 9, 40, 5, 12, 2, 8, 30, 4]
    sets, queries, weights = [], [], []
    for u, n in enumerate(sizes):
        x0, p, r, rng = problem(300 + u, n, d)
        queries.append(x0)
        sets.append(bt.PairSet.of(p, r) if n else None)
        weights.append(rng.uniform(0.5, 1.5, size=n) if n and u % 2 else None)
    assert len(map_module._parts(list(range(len(sizes))))) == 3
    fit = bt.map_fit(np.stack(queries), sets, weights, 2.0, 10.0)
    for u in range(len(sets)):
        alone = bt.map_fit(queries[u][None], [sets[u]], [weights[u]], 2.0, 10.0)
        np.testing.assert_allclose(fit.queries[u], alone.queries[0], atol=1e-6)
        np.testing.assert_allclose(fit.coefficients[u], alone.coefficients[0], atol=1e-6)
        np.testing.assert_allclose(fit.curvature[u], alone.curvature[0], atol=1e-6)


def test_large_prior_precision_keeps_the_query_and_one_pair_moves_towards_the_winner():
    x0, p, r, _ = problem(7, 1, 16)
    near = bt.map_adapt_many(x0[None], [bt.PairSet.of(p, r)], [None], 1e6, 10.0)[0]
    assert np.abs(near - x0).max() < 1e-4
    moved = bt.map_adapt_many(x0[None], [bt.PairSet.of(p, r)], [None], 1.0, 10.0)[0]
    assert (p - r)[0] @ moved > (p - r)[0] @ x0


def test_score_variance_equals_the_inverse_hessian():
    n, d, lam, beta = 12, 20, 2.0, 10.0
    x0, p, r, rng = problem(3, n, d)
    pairs = bt.PairSet.of(p, r)
    fit = bt.map_fit(x0[None], [pairs], [None], lam, beta)
    x = fit.queries[0].astype(np.float64)
    diffs = (p - r).astype(np.float64)
    s = 1 / (1 + np.exp(beta * diffs @ x))
    np.testing.assert_allclose(fit.curvature[0], beta * beta * s * (1 - s), rtol=1e-5)
    cov = np.linalg.inv(lam * np.eye(d) + (diffs.T * fit.curvature[0]) @ diffs)
    v = rng.normal(size=(6, d))
    np.testing.assert_allclose(
        bt.score_variance(pairs, fit.curvature[0], v, lam), np.einsum("kd,de,ke->k", v, cov, v), rtol=1e-8
    )
    np.testing.assert_allclose(bt.score_variance(None, [], v, lam), (v * v).sum(1) / lam)


def test_bad_settings_name_the_value():
    x0, p, r, _ = problem(1, 2, 4)
    with pytest.raises(bt.AdaptationInputError, match="prior_precision must be .* got 0"):
        bt.map_adapt_many(x0[None], [bt.PairSet.of(p, r)], [None], 0.0, 1.0)
    with pytest.raises(bt.AdaptationInputError, match=r"weights\[0\]\[1\] is -1.0"):
        bt.map_adapt_many(x0[None], [bt.PairSet.of(p, r)], [np.array([1.0, -1.0])], 1.0, 1.0)
