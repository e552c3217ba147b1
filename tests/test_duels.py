"""Duel strategies: valid, fresh, reproducible pairs; each strategy's choice against a brute-force search."""

import itertools

import numpy as np
import pytest

from engine import bt
from engine.duels import STRATEGIES, DuelConfig, DuelInputError, choose_duel, posterior


def unit_rows(rng, n, d):
    a = rng.normal(size=(n, d))
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    y = unit_rows(rng, 30, 12)
    x0 = unit_rows(rng, 1, 12)[0]
    ids = list(range(500, 530))
    return ids, y, x0, y[[0, 3, 5]], y[[1, 2, 7]]


def test_posterior_is_the_laplace_posterior_of_the_map_fit(scene):
    ids, y, x0, p, r = scene
    config = bt.MapConfig(prior_precision=2.0, beta=5.0)
    post = posterior(y, x0, p, r, config)
    x = bt.map_adapt_reference(x0, p.astype(np.float64), r.astype(np.float64), None, 2.0, 5.0)
    np.testing.assert_allclose(post.mean, 5.0 * y.astype(np.float64) @ x, atol=1e-5)
    d = (p - r).astype(np.float64)
    s = 1 / (1 + np.exp(5.0 * d @ x))
    hessian = 2.0 * np.eye(12) + (d.T * (25.0 * s * (1 - s))) @ d
    np.testing.assert_allclose(post.cov, 25.0 * y @ np.linalg.inv(hessian) @ y.T, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pairs_are_two_candidates_never_asked_before_and_reproducible(scene, strategy):
    ids, y, x0, p, r = scene
    asked = []
    for _ in range(12):
        a, b = choose_duel(ids, y, x0, p, r, asked, strategy, np.random.default_rng(len(asked)))
        assert a != b and a in ids and b in ids
        assert {a, b} not in [set(z) for z in asked]
        again = choose_duel(ids, y, x0, p, r, asked, strategy, np.random.default_rng(len(asked)))
        assert again == (a, b)
        asked.append((b, a) if len(asked) % 2 else (a, b))


def test_each_strategy_picks_what_it_says(scene):
    ids, y, x0, p, r = scene
    config = DuelConfig(top=6)
    post = posterior(y, x0, p, r, config.posterior)
    top = np.argsort(-post.mean, kind="stable")[:6]
    var = lambda i, j: post.cov[i, i] + post.cov[j, j] - 2 * post.cov[i, j]  # noqa: E731
    pairs = list(itertools.combinations(top, 2))
    best = max(pairs, key=lambda ij: var(*ij))
    assert set(choose_duel(ids, y, x0, p, r, (), "max_variance", config=config)) == {ids[best[0]], ids[best[1]]}
    p_of = lambda i, j: 1 / (1 + np.exp(-(post.mean[i] - post.mean[j])))  # noqa: E731
    best = max(pairs, key=lambda ij: var(*ij) * p_of(*ij) * (1 - p_of(*ij)))
    assert set(choose_duel(ids, y, x0, p, r, (), "information", config=config)) == {ids[best[0]], ids[best[1]]}
    adjacent = min(zip(top[:-1], top[1:]), key=lambda ij: abs(post.mean[ij[0]] - post.mean[ij[1]]))
    assert set(choose_duel(ids, y, x0, p, r, (), "least_sure", config=config)) == {ids[adjacent[0]], ids[adjacent[1]]}
    a, b = choose_duel(ids, y, x0, p, r, (), "random_top", config=config)
    assert {ids.index(a), ids.index(b)} <= set(top.tolist())


def test_without_pairs_thompson_favours_the_likely_best(scene):
    ids, y, x0, _, _ = scene
    post = posterior(y, x0)
    rank = np.argsort(np.argsort(-post.mean))
    firsts = [
        rank[ids.index(choose_duel(ids, y, x0, rng=np.random.default_rng(s), strategy="thompson")[0])]
        for s in range(200)
    ]
    assert np.mean(firsts) < 0.8 * (len(ids) - 1) / 2  # a uniform pick averages rank 14.5


def test_errors_name_the_problem(scene):
    ids, y, x0, p, r = scene
    with pytest.raises(DuelInputError, match="unknown duel strategy 'best'"):
        choose_duel(ids, y, x0, strategy="best")
    with pytest.raises(DuelInputError, match="at least two candidates"):
        choose_duel(ids[:1], y[:1], x0)
    with pytest.raises(DuelInputError, match="every pair of the 2 candidates has been asked"):
        choose_duel(ids[:2], y[:2], x0, asked=[(ids[1], ids[0])])
