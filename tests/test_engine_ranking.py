"""Candidate ranking: the subset Newton fit against a dense slow reference, and its limits."""

import math

import numpy as np
import pytest

from engine.ranking import RankConfig, RankingInputError, fit_strengths, rank_candidates


def _reference_fit(mu, winners, losers, weights, precision, steps):
    """Dense Newton on all n strengths with the Hessian built entry by entry."""
    n = len(mu)
    theta = [float(v) for v in mu]
    for _ in range(steps):
        grad = [-precision * (theta[i] - mu[i]) for i in range(n)]
        hess = [[-precision if i == j else 0.0 for j in range(n)] for i in range(n)]
        for a, b, w in zip(winners, losers, weights):
            p = 1.0 / (1.0 + math.exp(-(theta[a] - theta[b])))
            grad[a] += w * (1 - p)
            grad[b] -= w * (1 - p)
            c = w * p * (1 - p)
            hess[a][a] -= c
            hess[b][b] -= c
            hess[a][b] += c
            hess[b][a] += c
        theta = list(np.array(theta) - np.linalg.solve(np.array(hess), np.array(grad)))
    return np.array(theta)


def _objective(theta, mu, winners, losers, weights, precision):
    loglik = sum(w * math.log(1 / (1 + math.exp(-(theta[a] - theta[b])))) for a, b, w in zip(winners, losers, weights))
    return loglik - precision / 2 * float(np.sum((theta - mu) ** 2))


@pytest.fixture
def comparisons():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=12)
    winners = np.array([0, 3, 3, 7, 11, 2])
    losers = np.array([5, 0, 9, 3, 2, 7])
    weights = rng.uniform(0.2, 2.0, size=6)
    return mu, winners, losers, weights


def test_fit_equals_dense_newton(comparisons):
    mu, winners, losers, weights = comparisons
    for steps in (1, 3, 6):
        fast = fit_strengths(mu, winners, losers, weights, prior_precision=0.7, steps=steps)
        slow = _reference_fit(mu, winners, losers, weights, 0.7, steps)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_fit_reaches_the_map_optimum(comparisons):
    mu, winners, losers, weights = comparisons
    theta = fit_strengths(mu, winners, losers, weights, prior_precision=0.7, steps=8)
    best = _objective(theta, mu, winners, losers, weights, 0.7)
    rng = np.random.default_rng(1)
    for _ in range(50):
        assert _objective(theta + 1e-3 * rng.normal(size=len(mu)), mu, winners, losers, weights, 0.7) < best


def test_no_comparisons_orders_by_similarity():
    s = np.array([0.1, 0.5, 0.3, 0.5, -0.2])
    r = rank_candidates(s, beta=2.0)
    assert r.order.tolist() == [1, 3, 2, 0, 4]  # the tie keeps input order
    np.testing.assert_allclose(r.strength, 2.0 * s[r.order])
    t = RankConfig().temperature
    np.testing.assert_allclose(r.p_next[:-1], 1 / (1 + np.exp(-t * (r.strength[:-1] - r.strength[1:]))))
    assert np.isnan(r.p_next[-1])


def test_direct_comparison_lifts_the_winner():
    s = np.array([0.30, 0.29, 0.28, 0.27])  # near-equals: one comparison reorders them (default prior)
    r = rank_candidates(s, beta=1.0, winners=[3], losers=[0])
    assert r.order[0] == 3 and r.order[-1] == 0
    assert r.order[1:3].tolist() == [1, 2]  # items without comparisons keep their prior strengths


def test_stronger_prior_moves_less():
    s = np.array([0.3, 0.1])
    loose = fit_strengths(s, [1], [0], prior_precision=0.1)
    tight = fit_strengths(s, [1], [0], prior_precision=10.0)
    assert loose[1] - loose[0] > tight[1] - tight[0] > s[1] - s[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(similarity=np.array([0.1, np.nan])), "similarity[1] is nan"),
        (dict(similarity=np.zeros((2, 2))), "similarity must have shape (n,), got (2, 2)"),
        (dict(similarity=np.zeros(3), beta=0.0), "beta must be a finite number > 0, got 0.0"),
        (dict(similarity=np.zeros(3), winners=[0], losers=[3]), "losers contains 3, outside the 3 candidates"),
        (dict(similarity=np.zeros(3), winners=[0], losers=[1], weights=[-1.0]), "weights[0] is -1.0"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, message):
    with pytest.raises(RankingInputError) as err:
        rank_candidates(**kwargs)
    assert message in str(err.value)


def test_config_checks_its_fields():
    with pytest.raises(RankingInputError, match="prior_precision must be a finite number > 0, got -1"):
        RankConfig(prior_precision=-1)
    with pytest.raises(RankingInputError, match="temperature must be a finite number > 0, got 0"):
        RankConfig(temperature=0)


def test_temperature_scales_the_probabilities_and_never_the_order():
    rng = np.random.default_rng(4)
    s = rng.uniform(0, 1, 12)
    winners, losers = [3, 7, 0], [5, 1, 9]
    plain = rank_candidates(s, 10.0, winners, losers, config=RankConfig(temperature=1.0))
    cooled = rank_candidates(s, 10.0, winners, losers, config=RankConfig(temperature=0.3))
    np.testing.assert_array_equal(cooled.order, plain.order)
    np.testing.assert_allclose(cooled.strength, plain.strength)
    gaps = plain.strength[:-1] - plain.strength[1:]
    np.testing.assert_allclose(cooled.p_next[:-1], 1 / (1 + np.exp(-0.3 * gaps)), rtol=1e-12)
    assert np.all(np.abs(cooled.p_next[:-1] - 0.5) <= np.abs(plain.p_next[:-1] - 0.5))
