"""The reference BT math (Gallego 2023): eqs. 1-4 and `adapt`, the baselines, and Plackett-Luce; the serving forms (`span`, `batched`) are tested against these.

Every function takes numpy arrays or torch tensors (CPU or CUDA) and returns the same kind it
was given. Shapes: a query `x` is (d,); image embeddings are (N, d); preference pairs are two
aligned (N, d) arrays, row i of `preferred` beating row i of `rejected`.

Inputs are checked once at the boundary: NaN/inf, zero image vectors, mismatched dimensions and
bad hyper-parameters raise `AdaptationInputError` naming the argument and row. An empty pair set
is a documented no-op (the query comes back unchanged), never a NaN.
"""

import numpy as np
import torch

from engine.bt.common import AdaptationInputError, check_hyper
from engine.bt.tensors import (
    _as_tensor,
    _check_finite,
    _check_images,
    _check_nonzero_rows,
    _check_pairs,
    _check_query,
    _check_weights,
    _like,
)

# ---------------------------------------------------------------------------------------------
# Equations 1-4 on raw tensors (no validation: callers validated once)


def _margins(x: torch.Tensor, diff: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (s(x, y1) - s(x, y2)) for every pair, with diff = y1 - y2 (eqs. 1-2)."""
    return beta * (diff @ x)


def _gradient(x: torch.Tensor, diff: torch.Tensor, beta: float, w: torch.Tensor | None) -> torch.Tensor:
    """(1/N) sum_i w_i * beta * (p_i - 1) * (y_i1 - y_i2) (eq. 4, averaged over the pairs)."""
    coef = beta * (torch.sigmoid(_margins(x, diff, beta)) - 1.0)
    if w is not None:
        coef = coef * w
    return (coef @ diff) / diff.shape[0]


# ---------------------------------------------------------------------------------------------
# Public math


def similarity(x, y):
    """s(x, y) = x^T y on l2-normalised vectors (eq. 1).

    x: (d,) or (B, d); y: (N, d). Returns (N,) for one query, (B, N) for a batch.
    """
    xt, yt = _as_tensor(x, "x"), _as_tensor(y, "y")
    if xt.shape[-1] != yt.shape[-1]:
        raise AdaptationInputError(f"x has dimension {xt.shape[-1]} but y has {yt.shape[-1]}")
    return _like(xt @ yt.to(xt).T if xt.ndim == 2 else yt.to(xt) @ xt, x)


def preference_probability(x, preferred, rejected, beta: float = 1.0):
    """P(y1 > y2 | x) = sigmoid(beta * (s(x, y1) - s(x, y2))) for each pair (eq. 2; beta = 1 is the
    paper's exp(s1) / (exp(s1) + exp(s2))). Returns (N,)."""
    check_hyper(0.0, 0, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    return _like(torch.sigmoid(_margins(xt, p - r, beta)), x)


def preference_loss(x, preferred, rejected, beta: float = 1.0, weights=None):
    """L = (1/N) sum_i w_i * -log P(y_i1 > y_i2 | x) (eq. 3 averaged over N pairs; w_i = 1 by default).

    Returns a 0-d array/tensor. An empty pair set has loss 0.
    """
    check_hyper(0.0, 0, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    w = _check_weights(weights, p.shape[0], xt)
    if p.shape[0] == 0:
        return _like(xt.new_zeros(()), x)
    nll = torch.nn.functional.softplus(-_margins(xt, p - r, beta))  # -log sigmoid(m), stable
    if w is not None:
        nll = nll * w
    return _like(nll.mean(), x)


def preference_gradient(x, preferred, rejected, beta: float = 1.0, weights=None):
    """Closed-form gradient of `preference_loss` with respect to x:
    (1/N) sum_i w_i * beta * (p_i - 1) * (y_i1 - y_i2) (eq. 4; beta = 1 is the paper's).

    Returns (d,); zeros for an empty pair set.
    """
    check_hyper(0.0, 0, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    w = _check_weights(weights, p.shape[0], xt)
    if p.shape[0] == 0:
        return _like(torch.zeros_like(xt), x)
    return _like(_gradient(xt, p - r, beta, w), x)


def adapt(
    x, preferred, rejected, lr: float = 0.5, steps: int = 3, beta: float = 1.0, weights=None, normalize: bool = False
):
    """x' after `steps` gradient-descent steps x <- x - lr * grad L(x) on the BT loss (eqs. 3-4).

    The norm of x: each step adds lr * (1/N) sum_i c_i (y_i1 - y_i2) with c_i = beta (1 - p_i) > 0,
    so x' leaves the unit sphere (its norm usually grows as it gains a component along the
    preferred-minus-rejected directions). That is deliberate and harmless for search: ranking
    images by x'^T y does not depend on ||x'||, and keeping the raw iterate makes every step the
    exact gradient step of eq. 3, so P(y1 > y2 | x') is the model's own probability. With
    `normalize=True` x is projected back onto the unit sphere after every step (projected
    gradient descent), which keeps cosine-similarity semantics at the price of a different
    optimum.

    An empty pair set, steps = 0 or lr = 0 return x unchanged (a copy).
    """
    check_hyper(lr, steps, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    w = _check_weights(weights, p.shape[0], xt)
    out = xt.clone()
    if p.shape[0] == 0:
        return _like(out, x)
    diff = p - r
    return _like(_descend(out, lambda at: _gradient(at, diff, beta, w), lr, steps, normalize), x)


def _descend(x: torch.Tensor, gradient, lr: float, steps: int, normalize: bool) -> torch.Tensor:
    """`steps` steps x <- x - lr * gradient(x), each optionally projected onto the unit sphere."""
    for _ in range(int(steps)):
        x = x - lr * gradient(x)
        if normalize:
            x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    return x


# ---------------------------------------------------------------------------------------------
# Baselines on the same inputs


def positive_only(x, preferred, lr: float = 1.0):
    """The paper's baseline: x' = x + lr * mean(preferred) (section 2, one step of similarity
    ascent towards the liked images). No preferred images: x unchanged."""
    check_hyper(lr, 0, 1.0)
    xt = _as_tensor(x, "x")
    _check_query(xt)
    p = _as_tensor(preferred, "preferred").to(xt)
    _check_images(p, xt.shape[0], "preferred")
    if p.shape[0] == 0:
        return _like(xt.clone(), x)
    return _like(xt + lr * p.mean(dim=0), x)


def rocchio(x, preferred, rejected, alpha: float = 1.0, beta: float = 0.75, gamma: float = 0.15):
    """Rocchio relevance feedback: x' = alpha * x + beta * mean(preferred) - gamma * mean(rejected).

    A side with no vectors contributes nothing; both empty gives x unchanged.
    """
    xt = _as_tensor(x, "x")
    _check_query(xt)
    p = _as_tensor(preferred, "preferred").to(xt)
    r = _as_tensor(rejected, "rejected").to(xt)
    _check_images(p, xt.shape[0], "preferred")
    _check_images(r, xt.shape[0], "rejected")
    if p.shape[0] == 0 and r.shape[0] == 0:
        return _like(xt.clone(), x)
    out = alpha * xt
    if p.shape[0]:
        out = out + beta * p.mean(dim=0)
    if r.shape[0]:
        out = out - gamma * r.mean(dim=0)
    return _like(out, x)


def average_vector(x, preferred, rejected):
    """Qdrant's recommendation strategy `average_vector`: 2 * mean(preferred) - mean(rejected)
    (avg_positive + (avg_positive - avg_negative)). The query text plays no part once there are
    examples; with no preferred images x comes back unchanged, and with no rejected ones the
    result is mean(preferred)."""
    xt = _as_tensor(x, "x")
    _check_query(xt)
    p = _as_tensor(preferred, "preferred").to(xt)
    r = _as_tensor(rejected, "rejected").to(xt)
    _check_images(p, xt.shape[0], "preferred")
    _check_images(r, xt.shape[0], "rejected")
    if p.shape[0] == 0:
        return _like(xt.clone(), x)
    if r.shape[0] == 0:
        return _like(p.mean(dim=0), x)
    return _like(2.0 * p.mean(dim=0) - r.mean(dim=0), x)


# ---------------------------------------------------------------------------------------------
# Plackett-Luce: full rankings y_1 > y_2 > ... > y_m


def pad_rankings(rankings: list) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged rankings (a list of (m_i, d) arrays, best first) into (R, M, d) zero-padded
    plus lengths (R,), the input form of the Plackett-Luce functions."""
    if not rankings:
        raise AdaptationInputError("pad_rankings needs at least one ranking")
    d = np.asarray(rankings[0]).shape[-1]
    m = max(len(r) for r in rankings)
    out = np.zeros((len(rankings), m, d), dtype=np.asarray(rankings[0]).dtype)
    lengths = np.zeros(len(rankings), dtype=np.int64)
    for i, ranking in enumerate(rankings):
        ranking = np.asarray(ranking)
        if ranking.ndim != 2 or ranking.shape[1] != d:
            raise AdaptationInputError(f"rankings[{i}] must have shape (m, {d}), got {ranking.shape}")
        out[i, : len(ranking)] = ranking
        lengths[i] = len(ranking)
    return out, lengths


def _check_rankings(x, rankings, lengths):
    xt = _as_tensor(x, "x")
    _check_query(xt)
    items = _as_tensor(rankings, "rankings").to(xt)
    if items.ndim != 3 or items.shape[2] != xt.shape[0]:
        raise AdaptationInputError(
            f"rankings must have shape (R, M, {xt.shape[0]}) to match the query, got {tuple(items.shape)}"
        )
    n, m = items.shape[:2]
    if lengths is None:
        lens = torch.full((n,), m, dtype=torch.int64, device=xt.device)
    else:
        lens = _as_tensor(lengths, "lengths").to(device=xt.device, dtype=torch.int64)
        if lens.shape != (n,):
            raise AdaptationInputError(f"lengths must have shape ({n},), got {tuple(lens.shape)}")
        if n and (int(lens.min()) < 2 or int(lens.max()) > m):
            i = int(torch.nonzero((lens < 2) | (lens > m))[0, 0])
            raise AdaptationInputError(f"lengths[{i}] is {int(lens[i])}: a ranking needs 2 to {m} items")
    mask = torch.arange(m, device=xt.device).unsqueeze(0) < lens.unsqueeze(1)  # (R, M)
    _check_finite(items, "rankings")
    _check_nonzero_rows(items[mask], "rankings (flattened valid items)")
    return xt, items, mask


def _plackett_luce_terms(x, items, mask, beta):
    """Per-ranking -log P and the softmax weights of every stage (eq. PL below)."""
    scores = beta * (items @ x)  # (R, M)
    scores = scores.masked_fill(~mask, float("-inf"))
    # logsumexp over the items still unplaced at each stage k: reverse cumulative logsumexp
    tail = torch.logcumsumexp(scores.flip(1), dim=1).flip(1)  # (R, M)
    stage = mask.clone()
    stage[torch.arange(mask.shape[0]), mask.sum(1) - 1] = False  # the last item is no choice
    nll = torch.where(stage, tail - scores, torch.zeros_like(scores)).sum(1)
    return scores, tail, stage, nll


def plackett_luce_loss(x, rankings, lengths=None, beta: float = 1.0, weights=None):
    """Plackett-Luce negative log-likelihood of full rankings, averaged over R rankings:
    -log P(y_1 > ... > y_m | x) = sum_{k<m} [log sum_{j>=k} exp(beta s(x, y_j)) - beta s(x, y_k)].

    rankings: (R, M, d) best first, zero-padded past `lengths` (R,) (see `pad_rankings`). With
    m = 2 it is exactly the BT loss of eq. 3. Returns a 0-d array/tensor; 0 for R = 0.
    """
    check_hyper(0.0, 0, beta)
    xt, items, mask = _check_rankings(x, rankings, lengths)
    w = _check_weights(weights, items.shape[0], xt)
    if items.shape[0] == 0:
        return _like(xt.new_zeros(()), x)
    nll = _plackett_luce_terms(xt, items, mask, beta)[3]
    if w is not None:
        nll = nll * w
    return _like(nll.mean(), x)


def _plackett_luce_grad(x, items, mask, beta, w):
    scores, tail, stage, _ = _plackett_luce_terms(x, items, mask, beta)
    # Stage k picks item j >= k with probability softmax_k(j) = exp(s_j - logsumexp_{i>=k} s_i);
    # d(-log P)/dx = beta * sum_k [sum_{j>=k} softmax_k(j) y_j - y_k]. Rankings are short, so the
    # (R, M, M) table of stage-by-item probabilities is small and exact (no overflow-prone shifts).
    m = scores.shape[1]
    later = torch.ones(m, m, dtype=torch.bool, device=x.device).triu()  # [k, j]: j >= k
    valid = stage.unsqueeze(2) & mask.unsqueeze(1) & later
    prob = torch.where(
        valid, torch.exp(scores.unsqueeze(1) - tail.unsqueeze(2)), torch.zeros((), dtype=scores.dtype, device=x.device)
    )
    coef = beta * (prob.sum(dim=1) - stage.to(scores.dtype))  # (R, M): per item j
    if w is not None:
        coef = coef * w.unsqueeze(1)
    return torch.einsum("rm,rmd->d", coef, items) / items.shape[0]


def plackett_luce_gradient(x, rankings, lengths=None, beta: float = 1.0, weights=None):
    """Closed-form gradient of `plackett_luce_loss` with respect to x:
    (1/R) sum_r w_r beta sum_{k<m} [sum_{j>=k} softmax_k(j) y_j - y_k]. With m = 2 it reduces to
    eq. 4, beta (p_1 - 1)(y_1 - y_2). Returns (d,); zeros for R = 0."""
    check_hyper(0.0, 0, beta)
    xt, items, mask = _check_rankings(x, rankings, lengths)
    w = _check_weights(weights, items.shape[0], xt)
    if items.shape[0] == 0:
        return _like(torch.zeros_like(xt), x)
    return _like(_plackett_luce_grad(xt, items, mask, beta, w), x)


def adapt_plackett_luce(
    x, rankings, lengths=None, lr: float = 0.5, steps: int = 3, beta: float = 1.0, weights=None, normalize: bool = False
):
    """`adapt` with the Plackett-Luce loss of full rankings instead of pairs (same norm behaviour).
    No rankings: x unchanged."""
    check_hyper(lr, steps, beta)
    xt, items, mask = _check_rankings(x, rankings, lengths)
    w = _check_weights(weights, items.shape[0], xt)
    out = xt.clone()
    if items.shape[0] == 0:
        return _like(out, x)
    return _like(_descend(out, lambda at: _plackett_luce_grad(at, items, mask, beta, w), lr, steps, normalize), x)
