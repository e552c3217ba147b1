"""Pairwise preference ranking of retrieved candidates: BT strengths from similarity plus the user's direct comparisons."""

from dataclasses import dataclass

import numpy as np

from engine.bt import logistic
from storage.errors import ClipbtError


class RankingInputError(ClipbtError, ValueError):
    """An input to the candidate ranking has the wrong shape, a non-finite value or a bad setting."""


@dataclass(frozen=True)
class RankConfig:
    """How direct comparisons among the candidates adjust their similarity-based strengths."""

    # 1 / variance of the Gaussian prior centred on beta * s(x', y). Chosen by the held-out
    # log-likelihood of compare's probabilities on the world's simulated users after 20 duels
    # (benchmarks/bench_duels.py, "compare_calibration" in results/duels.json), with MAP's beta 10.
    prior_precision: float = 1.0
    newton_steps: int = 3  # Newton steps of the MAP fit (the objective is strictly concave)
    # t in the probabilities reported, P(i over j) = sigmoid(t (theta_i - theta_j)) (p_next, compare):
    # a calibration of the strengths only, the order never depends on it. Chosen the same way, with the
    # prior kept at 1 (a prior of 0.3 scored within 0.002 nats of it but also reorders results).
    temperature: float = 0.3

    def __post_init__(self):
        if not np.isfinite(self.prior_precision) or self.prior_precision <= 0:
            raise RankingInputError(f"prior_precision must be a finite number > 0, got {self.prior_precision}")
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise RankingInputError(f"temperature must be a finite number > 0, got {self.temperature}")
        if int(self.newton_steps) != self.newton_steps or self.newton_steps < 0:
            raise RankingInputError(f"newton_steps must be a whole number >= 0, got {self.newton_steps}")


@dataclass(frozen=True)
class CandidateRanking:
    """Candidates in ranked order, best first; all arrays have shape (n,)."""

    order: np.ndarray  # int64 indices into the candidate list, best first
    strength: np.ndarray  # float64 BT strength of order[r]
    p_next: np.ndarray  # float64 P(order[r] beats order[r + 1]) (eq. 2, at the config's temperature); NaN for the last


def fit_strengths(
    prior_mean, winners, losers, weights=None, prior_precision: float = 1.0, steps: int = 3
) -> np.ndarray:
    """MAP Bradley-Terry strengths under a Gaussian prior, by Newton's method:

        theta = argmax sum_k w_k log sigmoid(theta[winners_k] - theta[losers_k])
                       - (prior_precision / 2) ||theta - prior_mean||^2

    i.e. eq. 2, P(i > j) = exp(theta_i) / (exp(theta_i) + exp(theta_j)), fitted to the comparisons
    with theta pulled towards the prior. prior_mean: (n,); winners, losers: (m,) ints in [0, n);
    weights: (m,) >= 0 (default 1). Only items that appear in a comparison move, so each Newton
    step solves a system the size of the compared set, not of n. Starts at prior_mean; with no
    comparisons or steps = 0 returns prior_mean. Returns (n,) float64.
    """
    mu = np.asarray(prior_mean, dtype=np.float64)
    win = np.asarray(winners, dtype=np.int64)
    lose = np.asarray(losers, dtype=np.int64)
    w = np.ones(len(win)) if weights is None else np.asarray(weights, dtype=np.float64)
    theta = mu.copy()
    if len(win) == 0 or steps == 0:
        return theta
    items, local = np.unique(np.concatenate([win, lose]), return_inverse=True)
    lw, ll = local[: len(win)], local[len(win) :]
    m = len(items)
    sub = theta[items]
    rows = np.arange(len(win))
    design = np.zeros((len(win), m))  # row k: e_winner - e_loser
    np.add.at(design, (rows, lw), 1.0)
    np.add.at(design, (rows, ll), -1.0)
    for _ in range(int(steps)):
        p = logistic(sub[lw] - sub[ll])
        grad = design.T @ (w * (1.0 - p)) - prior_precision * (sub - mu[items])
        neg_hessian = (design.T * (w * p * (1.0 - p))) @ design + prior_precision * np.eye(m)
        sub = sub + np.linalg.solve(neg_hessian, grad)
    theta[items] = sub
    return theta


def rank_candidates(
    similarity, beta: float = 1.0, winners=(), losers=(), weights=None, config: RankConfig = RankConfig()
) -> CandidateRanking:
    """Rank n candidates by BT strength: beta * s(x', y) (eqs. 1-2) adjusted by the user's direct
    comparisons among them (`fit_strengths` with the prior centred on beta * s).

    similarity: (n,) s(x', y) of each candidate; winners, losers: (m,) candidate indices, the
    winner of comparison k beating its loser; weights: (m,) >= 0. With no comparisons the order is
    that of the similarity (ties keep their input order).
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 1:
        raise RankingInputError(f"similarity must have shape (n,), got {s.shape}")
    if not np.all(np.isfinite(s)):
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise RankingInputError(f"similarity[{i}] is {s[i]}: similarities must be finite")
    if not np.isfinite(beta) or beta <= 0:
        raise RankingInputError(f"beta must be a finite number > 0, got {beta}")
    win, lose = np.asarray(winners, dtype=np.int64), np.asarray(losers, dtype=np.int64)
    if win.shape != lose.shape or win.ndim != 1:
        raise RankingInputError(f"winners and losers must have the same shape (m,), got {win.shape} and {lose.shape}")
    for name, idx in (("winners", win), ("losers", lose)):
        if idx.size and (idx.min() < 0 or idx.max() >= len(s)):
            bad = int(idx[(idx < 0) | (idx >= len(s))][0])
            raise RankingInputError(f"{name} contains {bad}, outside the {len(s)} candidates [0, {len(s)})")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != win.shape:
            raise RankingInputError(f"weights must have shape {win.shape}, one per comparison, got {weights.shape}")
        bad = ~np.isfinite(weights) | (weights < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RankingInputError(f"weights[{i}] is {weights[i]}: comparison weights must be finite and >= 0")
    theta = fit_strengths(beta * s, win, lose, weights, config.prior_precision, config.newton_steps)
    order = np.argsort(-theta, kind="stable")
    strength = theta[order]
    p_next = np.full(len(s), np.nan)
    p_next[:-1] = logistic(config.temperature * (strength[:-1] - strength[1:]))
    return CandidateRanking(order=order, strength=strength, p_next=p_next)
