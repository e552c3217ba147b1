"""The span form of `adapt` for serving: steps on the coefficients of the pairs' differences, with per-user Gram matrices, in numpy: a fast path checked against `reference.adapt`."""

from dataclasses import dataclass

import numpy as np

from engine.bt.common import AdaptationInputError, check_hyper, logistic
from engine.bt.threads import numpy_blas_on_one_thread
from storage.numeric import check_vectors


@dataclass(frozen=True)
class PairSet:
    """One user's preference pairs, checked once and prepared for many `adapt_many` calls.

    diffs: (P, d) float32 rows D_i = y_i1 - y_i2; gram: (P, P) float64 D D^T, or None when
    P > d, where a step in the span would cost more than a step in x (P^2 > P d).
    """

    diffs: np.ndarray
    gram: np.ndarray | None

    @classmethod
    def of(cls, preferred, rejected) -> "PairSet":
        """Check the pairs as `adapt` does (finite, non-zero, aligned) and precompute D and D D^T."""
        p = check_vectors(preferred, "preferred", error=AdaptationInputError, what="image embeddings")
        r = check_vectors(rejected, "rejected", p.shape[1], AdaptationInputError, what="image embeddings")
        if len(p) != len(r):
            raise AdaptationInputError(f"preferred has {len(p)} rows but rejected has {len(r)}: pairs must be aligned")
        diffs = p - r
        if diffs.shape[0] > diffs.shape[1]:
            return cls(diffs, None)
        numpy_blas_on_one_thread()
        wide = diffs.astype(np.float64)
        return cls(diffs, wide @ wide.T)

    def __len__(self) -> int:
        return self.diffs.shape[0]


def adapt_many(
    queries: np.ndarray,
    pair_sets,
    weights,
    lr: float = 0.5,
    steps: int = 3,
    beta: float = 1.0,
    normalize: bool = False,
    device: str | None = None,
) -> np.ndarray:
    """`adapt` of B queries (numpy, CPU), query b on its own `PairSet` with its own weights.

    Every step of eq. 4 adds a combination of the differences D_i = y_i1 - y_i2 to x, so after t
    steps x_t = u_t x_0 + D^T a_t for a scalar u_t and P coefficients a_t (u stays 1 unless
    `normalize` rescales). The margins of eq. 2 are then D x_t = u_t D x_0 + G a_t with G = D D^T,
    so a step is a (P, P) product instead of two (P, d) ones, and the steps of all B queries run
    as one batched product on their stacked Gram matrices; x' is formed once at the end. With
    `normalize`, u and a are divided by ||x_t|| = sqrt(u^2 ||x_0||^2 + 2 u a . D x_0 + a^T G a).
    The iterates are those of `adapt` up to float rounding (tests/test_bt.py). A PairSet without
    a Gram (P > d) takes `adapt`'s steps in x instead.

    queries: (B, d); pair_sets: B PairSets, or None for a query without pairs (it comes back
    unchanged); weights: B arrays (P_b,) >= 0, or None for all ones. device: None for the span
    form in numpy; a torch device ("cuda") stacks the differences there and takes the padded
    batched steps of `adapt_batched` instead (a few large kernels rather than many small ones;
    not yet measured on a GPU).
    Returns (B, d) float32.
    """
    check_hyper(lr, steps, beta)
    q, given = check_batch(queries, pair_sets, weights)
    rows = [b for b, w in enumerate(given) if w is not None]
    out = q.copy()
    if not rows:
        return out
    if device is not None:
        return _adapt_on_device(out, rows, pair_sets, given, lr, int(steps), beta, normalize, device)
    span = [b for b in rows if pair_sets[b].gram is not None]
    numpy_blas_on_one_thread()
    for chunk in _chunks_by_size(span, [len(pair_sets[b]) ** 2 for b in span]):
        out[chunk] = _descend_in_span(
            q[chunk], [pair_sets[b] for b in chunk], [given[b] for b in chunk], lr, int(steps), beta, normalize
        )
    for b in rows:
        if pair_sets[b].gram is None:
            out[b] = _descend_in_x(q[b], pair_sets[b].diffs, given[b], lr, int(steps), beta, normalize)
    return out


def check_batch(queries, pair_sets, weights) -> tuple[np.ndarray, list]:
    """Check a batch for `adapt_many` or `map_adapt_many` once: queries (B, d) finite, one PairSet (or
    None) and one weight vector (or None: all ones) per query, of matching sizes, weights >= 0.
    Returns the queries as float32 and, per query, its pair weights (float64) or None when it has no pairs."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise AdaptationInputError(f"queries must have shape (B, d), got {q.shape}")
    if not np.isfinite(q.sum(dtype=np.float64)):  # one reduction in the common case, as `_check_finite`
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(q))[0])
        raise AdaptationInputError(f"queries[{index[0]}, {index[1]}] is {q[index]}: embeddings must be finite")
    if not len(pair_sets) == len(weights) == len(q):
        raise AdaptationInputError(
            f"need one pair set and one weight vector per query: {len(q)} queries, "
            f"{len(pair_sets)} pair sets, {len(weights)} weight vectors"
        )
    given: list[np.ndarray | None] = [None] * len(q)  # per query: its pair weights; None: no pairs
    for b, (pairs, w) in enumerate(zip(pair_sets, weights)):
        if pairs is None or not len(pairs):
            continue
        if pairs.diffs.shape[1] != q.shape[1]:
            raise AdaptationInputError(
                f"pair_sets[{b}] has dimension {pairs.diffs.shape[1]} but the queries have {q.shape[1]}"
            )
        given[b] = np.ones(len(pairs)) if w is None else np.asarray(w, dtype=np.float64)
        if given[b].shape != (len(pairs),):
            raise AdaptationInputError(
                f"weights[{b}] must have shape ({len(pairs)},), one per pair, got {given[b].shape}"
            )
    rows = [b for b, w in enumerate(given) if w is not None]
    if rows and not _valid_weights(np.concatenate([given[b] for b in rows])).all():  # one check for the batch
        b = next(b for b in rows if not _valid_weights(given[b]).all())
        i = int(np.flatnonzero(~_valid_weights(given[b]))[0])
        raise AdaptationInputError(f"weights[{b}][{i}] is {given[b][i]}: pair weights must be >= 0")
    return q, given


def _valid_weights(w: np.ndarray) -> np.ndarray:
    return np.isfinite(w) & (w >= 0)


def _adapt_on_device(
    out: np.ndarray,
    rows: list[int],
    pair_sets,
    weights,
    lr: float,
    steps: int,
    beta: float,
    normalize: bool,
    device: str,
) -> np.ndarray:
    """`adapt_many` for the queries `rows` through `_descend_stacked` on a torch device."""
    import torch

    from engine.bt.batched import _descend_stacked

    to = dict(device=device, dtype=torch.float32)
    diff = torch.as_tensor(np.concatenate([pair_sets[b].diffs for b in rows]), **to)
    own = torch.as_tensor(np.repeat(np.arange(len(rows)), [len(pair_sets[b]) for b in rows]), device=device)
    w = torch.as_tensor(np.concatenate([weights[b] for b in rows]), **to)
    x = _descend_stacked(torch.as_tensor(out[rows], **to), diff, own, w, lr, steps, beta, normalize)
    out[rows] = x.cpu().numpy()
    return out


def _chunks_by_size(items: list[int], costs: list[int]) -> list[list[int]]:
    """Cut `items` (sorted by decreasing cost) into runs whose padding to their largest member at
    most doubles their total cost, so one big member never inflates every other's."""
    ranked = sorted(range(len(items)), key=lambda j: -costs[j])
    chunks, i = [], 0
    while i < len(ranked):
        largest, j, total = costs[ranked[i]], i, 0
        while j < len(ranked) and (j - i + 1) * largest <= 2 * (total + costs[ranked[j]]):
            total += costs[ranked[j]]
            j += 1
        chunks.append([items[k] for k in ranked[i:j]])
        i = j
    return chunks


def _descend_in_span(
    q: np.ndarray,
    pair_sets: list[PairSet],
    weights: list[np.ndarray],
    lr: float,
    steps: int,
    beta: float,
    normalize: bool,
) -> np.ndarray:
    """The steps of `adapt_many` for U queries with Gram matrices, zero-padded to one (U, n, n) stack."""
    u_count, n = len(q), max(len(p) for p in pair_sets)
    gram = np.zeros((u_count, n, n))
    at_x0 = np.zeros((u_count, n))  # D x_0
    scale = np.zeros((u_count, n))  # lr * beta * w_i / P (eq. 4's mean); 0 on padding, whose coefficients stay 0
    for row, (pairs, w) in enumerate(zip(pair_sets, weights)):
        m = len(pairs)
        gram[row, :m, :m] = pairs.gram
        at_x0[row, :m] = pairs.diffs @ q[row]
        scale[row, :m] = w * (lr * beta / m)
    u = np.ones((u_count, 1))
    a = np.zeros((u_count, n))
    x0_sq = np.einsum("ud,ud->u", q, q, dtype=np.float64)[:, None] if normalize else None  # ||x_0||^2
    for _ in range(steps):
        margins = u * at_x0 + np.matmul(gram, a[:, :, None])[:, :, 0]  # D x_t
        a += scale * logistic(-beta * margins)  # x <- x - lr * grad (eq. 4): sigmoid(-m) = 1 - p
        if normalize:
            norm_sq = (
                u * u * x0_sq
                + 2 * u * (a * at_x0).sum(1, keepdims=True)
                + np.einsum("un,unm,um->u", a, gram, a)[:, None]
            )
            norm = np.sqrt(np.maximum(norm_sq, np.finfo(np.float64).tiny))
            u, a = u / norm, a / norm
    out = np.empty_like(q)
    for row, pairs in enumerate(pair_sets):
        out[row] = u[row, 0] * q[row] + a[row, : len(pairs)].astype(np.float32) @ pairs.diffs
    return out


def _descend_in_x(
    x: np.ndarray, diffs: np.ndarray, weights: np.ndarray, lr: float, steps: int, beta: float, normalize: bool
) -> np.ndarray:
    """`adapt`'s own steps in numpy, for one query whose pairs outnumber the dimensions."""
    scale = (weights * (lr * beta / len(diffs))).astype(np.float32)
    for _ in range(steps):
        x = x + (scale * logistic(-beta * (diffs @ x))) @ diffs
        if normalize:
            x = x / max(float(np.linalg.norm(x)), float(np.finfo(np.float32).tiny))
    return x
