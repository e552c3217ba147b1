"""Which two images to ask a user about next ("which of these do you prefer?"): duel strategies on the MAP posterior."""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.bt.common import AdaptationInputError, logistic
from engine.bt.map import MapConfig, map_fit
from engine.bt.span import PairSet
from storage.errors import ClipbtError

STRATEGIES = ("random_top", "least_sure", "max_variance", "information", "thompson")
# Chosen by benchmarks/bench_duels.py (benchmarks/results/duels.json): see the README's preference section.
DEFAULT_STRATEGY = "least_sure"


class DuelInputError(ClipbtError, ValueError):
    """The inputs of `choose_duel` are inconsistent: fewer than two candidates, shapes that differ, an unknown strategy."""


@dataclass(frozen=True)
class DuelConfig:
    """How a duel is chosen."""

    top: int = 10  # random_top, least_sure, max_variance and information choose among the m best candidates
    samples: int = 20  # thompson: posterior draws tried for a second, different image before settling on the runner-up
    posterior: MapConfig = (
        MapConfig()
    )  # the MAP posterior (prior centred on the query) that scores and variances come from

    def __post_init__(self):
        if self.top < 2 or self.samples < 1:
            raise DuelInputError(f"top must be >= 2 and samples >= 1, got {self.top} and {self.samples}")


@dataclass(frozen=True)
class Posterior:
    """Laplace posterior of the candidates' BT strengths beta * s(x, y): mean (n,) and covariance (n, n)."""

    mean: np.ndarray
    cov: np.ndarray


def posterior(embeddings, query, preferred=None, rejected=None, config: MapConfig = MapConfig()) -> Posterior:
    """The MAP posterior of x given the user's pairs (`engine.bt.map`, prior centred on `query`), pushed to the
    candidates' strengths beta * Y x: mean beta * Y x_map, covariance beta^2 Y H^{-1} Y^T with the Laplace
    precision H = lambda I + D^T W D. embeddings: (n, d) Y; query: (d,); preferred, rejected: (P, d) or None."""
    y = np.asarray(embeddings, np.float64)
    x0 = np.asarray(query, np.float32)
    if y.ndim != 2 or x0.shape != (y.shape[1],):
        raise DuelInputError(f"embeddings must be (n, d) and the query (d,), got {y.shape} and {x0.shape}")
    pairs = None
    if preferred is not None and len(preferred):
        try:
            pairs = PairSet.of(preferred, rejected)
        except AdaptationInputError as e:
            raise DuelInputError(str(e)) from None
    fit = map_fit(x0[None], [pairs], [None], config.prior_precision, config.beta, config.steps, config.tol)
    hessian = config.prior_precision * np.eye(y.shape[1])
    if pairs is not None:
        d64 = pairs.diffs.astype(np.float64)
        hessian += (d64.T * fit.curvature[0]) @ d64
    cov = config.beta**2 * y @ np.linalg.solve(hessian, y.T)
    return Posterior(config.beta * (y @ fit.queries[0].astype(np.float64)), cov)


def choose_duel(
    ids,
    embeddings,
    query,
    preferred=None,
    rejected=None,
    asked: Iterable[tuple] = (),
    strategy: str = DEFAULT_STRATEGY,
    rng: np.random.Generator | None = None,
    config: DuelConfig = DuelConfig(),
) -> tuple:
    """The pair (id_a, id_b) of candidates to ask the user about next.

    ids: (n,) candidate image ids (e.g. the plain search's top 40); embeddings: (n, d) their unit image
    embeddings; query: (d,) the query's text embedding x0, the centre of the prior (the adapted query is the
    posterior mode this computes from it); preferred, rejected: (P, d) embeddings of the user's pairs so far
    (None: no pairs); asked: pairs of ids already asked, in either order, never asked again; rng: the
    random source of random_top and thompson (default: seeded 0, so a call is reproducible).

    Strategies: random_top (a random pair among the `top` best by posterior mean), least_sure (the adjacent
    pair of that ranking whose BT probability is closest to 1/2), max_variance (the pair among the `top`
    with the largest posterior variance of its strength difference), information (largest
    var * p (1 - p): the expected information of the answer, to first order), thompson (two draws from the
    posterior each name their best candidate: the duel of two plausible winners).
    """
    if strategy not in STRATEGIES:
        raise DuelInputError(f"unknown duel strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    ids = list(ids)
    y = np.asarray(embeddings)
    if len(ids) < 2 or y.shape[0] != len(ids):
        raise DuelInputError(
            f"need at least two candidates with one embedding each, got {len(ids)} ids and "
            f"{y.shape[0] if y.ndim else 0} embeddings"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    done = {frozenset((a, b)) for a, b in asked}
    post = posterior(y, query, preferred, rejected, config.posterior)
    n = len(ids)
    order = np.argsort(-post.mean, kind="stable")
    pairs = _open_pairs(order[: min(config.top, n)], ids, done) or _open_pairs(order, ids, done)
    if not pairs:
        raise DuelInputError(f"every pair of the {n} candidates has been asked already")
    i, j = _pick(strategy, pairs, order, post, ids, done, rng, config)
    return ids[i], ids[j]


def _open_pairs(members: np.ndarray, ids: list, done: set) -> list[tuple[int, int]]:
    return [
        (int(a), int(b))
        for k, a in enumerate(members)
        for b in members[k + 1 :]
        if frozenset((ids[a], ids[b])) not in done
    ]


def _pick(strategy, pairs, order, post: Posterior, ids, done, rng, config: DuelConfig) -> tuple[int, int]:
    """Positions (i, j) into the candidates of the chosen duel; `pairs` are the open pairs to choose among."""
    a, b = np.array(pairs).T
    var = post.cov[a, a] + post.cov[b, b] - 2 * post.cov[a, b]
    if strategy == "random_top":
        return pairs[int(rng.integers(len(pairs)))]
    if strategy == "least_sure":
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        gap = np.abs(post.mean[a] - post.mean[b]) + 1e9 * (np.abs(rank[a] - rank[b]) != 1)  # adjacent ones first
        return pairs[int(np.argmin(gap))]
    if strategy == "max_variance":
        return pairs[int(np.argmax(var))]
    if strategy == "information":
        p = logistic(post.mean[a] - post.mean[b])
        return pairs[int(np.argmax(var * p * (1 - p)))]
    # thompson: two posterior draws of the strengths; each names its best, resampling the second until it differs
    chol = _sqrt_psd(post.cov)
    draw = lambda: post.mean + chol @ rng.standard_normal(len(post.mean))  # noqa: E731
    first = int(np.argmax(draw()))
    for _ in range(config.samples):
        second = int(np.argmax(draw()))
        if second != first and frozenset((ids[first], ids[second])) not in done:
            return first, second
    open_with_first = [(i, j) for i, j in pairs if first in (i, j)]
    if open_with_first:  # the runner-up to the first draw's winner by posterior mean
        return max(open_with_first, key=lambda ij: post.mean[ij[0] + ij[1] - first])
    return pairs[0]


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """A matrix square root L with L L^T = cov for a positive semi-definite cov (eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0, None))
