"""Bradley-Terry query adaptation (Gallego 2023, eqs. 1-4), its baselines and Plackett-Luce.

Every function takes numpy arrays or torch tensors (CPU or CUDA) and returns the same kind it
was given, except the span form for serving (`PairSet`, `adapt_many`), which is numpy. Shapes:
a query `x` is (d,); image embeddings are (N, d); preference pairs are two aligned (N, d)
arrays, row i of `preferred` beating row i of `rejected`.

Inputs are checked once at the boundary: NaN/inf, zero image vectors, mismatched dimensions and
bad hyper-parameters raise `AdaptationInputError` naming the argument and row. An empty pair set
is a documented no-op (the query comes back unchanged), never a NaN.
"""

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from storage.errors import ClipbtError

GLOBAL_QUALITY_QUERY = "An amazing and high-quality image"  # the paper's section 3.1 query


class AdaptationInputError(ClipbtError, ValueError):
    """An input to the BT math has the wrong shape, a non-finite value or a zero vector."""


@dataclass(frozen=True)
class AdaptConfig:
    """Hyper-parameters of BT adaptation; defaults are the ones clipbt searches with."""

    # lr and steps: measured on the demo world (README, "Choosing the search defaults"): larger
    # steps buy taste at the price of the query's meaning.
    lr: float = 0.5  # gradient-descent step size epsilon
    steps: int = 3  # number of gradient steps T (the paper uses 1, and 5-7 for generation)
    beta: float = 1.0  # inverse temperature of the BT probability (1 = the paper's eq. 2)
    normalize: bool = False  # project x back onto the unit sphere after every step


# Thread counts are process-wide: each lock keeps one thread's limit-and-restore from
# interleaving with another's (which could leave the limit in place for good).
_torch_threads_lock = threading.RLock()
_blas_threads_lock = threading.RLock()


@contextmanager
def one_torch_thread():
    """Run a block with torch on one CPU thread: the BT steps are many small tensor operations,
    where more threads cost more than they save and compete with FAISS's own threads."""
    with _torch_threads_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@functools.cache
def _thread_pools() -> ThreadpoolController:
    return ThreadpoolController()  # scans the loaded BLAS and OpenMP libraries once (~ms)


@contextmanager
def one_blas_thread():
    """Run a block with numpy's BLAS on one thread. The span form's products are small, and a
    threaded OpenBLAS keeps its threads spinning for a while after each call, starving FAISS's
    threads: on 2 cores a plain 100k query took 39 ms instead of 17 right after one threaded
    (50, 512) Gram product (benchmarks/bench_query.py setup)."""
    with _blas_threads_lock, _thread_pools().limit(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------
# Conversion and validation


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f":
            a = a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a))
    raise AdaptationInputError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")


def _like(result: torch.Tensor, template):
    """Return `result` as the kind (numpy or torch) of `template`."""
    if isinstance(template, np.ndarray):
        return result.detach().cpu().numpy()
    return result


def _check_finite(t: torch.Tensor, name: str) -> None:
    # A NaN or inf anywhere makes the sum non-finite: one fast reduction in the common case
    # (torch.isfinite over the whole array is several times slower). Only a non-finite sum, from
    # a bad value or an overflow of finite ones, pays for locating the culprit.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    bad = torch.nonzero(~torch.isfinite(t))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        where = f"[{index[0]}]" if len(index) == 1 else f"[{', '.join(map(str, index))}]"
        raise AdaptationInputError(f"{name}{where} is {t[index].item()}: embeddings must be finite")


def _check_nonzero_rows(t: torch.Tensor, name: str) -> None:
    """Rows must be non-zero (call after _check_finite)."""
    zero = torch.linalg.vector_norm(t, dim=-1) == 0
    if t.numel() == 0 or not bool(zero.any()):
        return
    row = tuple(int(i) for i in torch.nonzero(zero)[0])
    raise AdaptationInputError(f"{name}[{', '.join(map(str, row))}] is a zero vector: image embeddings must be non-zero")


def _check_query(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 1:
        raise AdaptationInputError(f"{name} must be one vector of shape (d,), got shape {tuple(x.shape)}")
    _check_finite(x, name)


def _check_images(y: torch.Tensor, d: int, name: str) -> None:
    if y.ndim != 2 or y.shape[1] != d:
        raise AdaptationInputError(f"{name} must have shape (N, {d}) to match the query, got {tuple(y.shape)}")
    _check_finite(y, name)
    _check_nonzero_rows(y, name)


def _aligned_pairs(preferred, rejected, like: torch.Tensor):
    """Convert and validate the two sides of the pairs to the dtype and device of `like`."""
    d = like.shape[-1]
    p = _as_tensor(preferred, "preferred").to(like)
    r = _as_tensor(rejected, "rejected").to(like)
    _check_images(p, d, "preferred")
    _check_images(r, d, "rejected")
    if p.shape[0] != r.shape[0]:
        raise AdaptationInputError(
            f"preferred has {p.shape[0]} rows but rejected has {r.shape[0]}: pairs must be aligned"
        )
    return p, r


def _check_pairs(x, preferred, rejected):
    """Convert and validate a query and its pairs; returns tensors in x's dtype and device."""
    xt = _as_tensor(x, "x")
    _check_query(xt)
    return (xt, *_aligned_pairs(preferred, rejected, xt))


def _check_weights(weights, n: int, like: torch.Tensor) -> torch.Tensor | None:
    if weights is None:
        return None
    w = _as_tensor(weights, "weights").to(like)
    if w.shape != (n,):
        raise AdaptationInputError(f"weights must have shape ({n},), one per pair, got {tuple(w.shape)}")
    _check_finite(w, "weights")
    if bool((w < 0).any()):
        i = int(torch.nonzero(w < 0)[0, 0])
        raise AdaptationInputError(f"weights[{i}] is {w[i].item()}: pair weights must be >= 0")
    return w


def _check_hyper(lr: float, steps: int, beta: float) -> None:
    if not np.isfinite(lr) or lr < 0:
        raise AdaptationInputError(f"lr must be a finite number >= 0, got {lr}")
    if int(steps) != steps or steps < 0:
        raise AdaptationInputError(f"steps must be a whole number >= 0, got {steps}")
    if not np.isfinite(beta) or beta <= 0:
        raise AdaptationInputError(f"beta must be a finite number > 0, got {beta}")


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
    _check_hyper(0.0, 0, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    return _like(torch.sigmoid(_margins(xt, p - r, beta)), x)


def preference_loss(x, preferred, rejected, beta: float = 1.0, weights=None):
    """L = (1/N) sum_i w_i * -log P(y_i1 > y_i2 | x) (eq. 3 averaged over N pairs; w_i = 1 by default).

    Returns a 0-d array/tensor. An empty pair set has loss 0.
    """
    _check_hyper(0.0, 0, beta)
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
    _check_hyper(0.0, 0, beta)
    xt, p, r = _check_pairs(x, preferred, rejected)
    w = _check_weights(weights, p.shape[0], xt)
    if p.shape[0] == 0:
        return _like(torch.zeros_like(xt), x)
    return _like(_gradient(xt, p - r, beta, w), x)


def adapt(x, preferred, rejected, lr: float = 0.5, steps: int = 3, beta: float = 1.0,
          weights=None, normalize: bool = False):
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
    _check_hyper(lr, steps, beta)
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


def adapt_batched(queries, preferred, rejected, owner, lr: float = 0.5, steps: int = 3,
                  beta: float = 1.0, weights=None, normalize: bool = False):
    """`adapt` for B queries at once, each with its own ragged set of pairs, in one vectorised call.

    queries: (B, d); preferred, rejected: (P, d) with all users' pairs stacked; owner: (P,) ints in
    [0, B), the query each pair belongs to. Each query follows exactly the iteration of `adapt` on
    its own pairs (the gradient averaged over that query's pairs); a query that owns no pair comes
    back unchanged. Runs on the device of `queries` (CUDA tensors stay on CUDA). Returns (B, d).
    """
    _check_hyper(lr, steps, beta)
    q = _as_tensor(queries, "queries")
    if q.ndim != 2:
        raise AdaptationInputError(f"queries must have shape (B, d), got {tuple(q.shape)}")
    _check_finite(q, "queries")
    b = q.shape[0]
    p, r = _aligned_pairs(preferred, rejected, q)
    own = _as_tensor(owner, "owner").to(device=q.device, dtype=torch.int64)
    if own.shape != (p.shape[0],):
        raise AdaptationInputError(f"owner must have shape ({p.shape[0]},), one per pair, got {tuple(own.shape)}")
    if own.numel() and (int(own.min()) < 0 or int(own.max()) >= b):
        bad = own[(own < 0) | (own >= b)][0].item()
        raise AdaptationInputError(f"owner contains {bad}, outside the {b} queries [0, {b})")
    w = _check_weights(weights, p.shape[0], q)
    if p.shape[0] == 0:
        return _like(q.clone(), queries)
    return _like(_descend_stacked(q.clone(), p - r, own, w, lr, steps, beta, normalize), queries)


def _descend_stacked(out: torch.Tensor, diff: torch.Tensor, own: torch.Tensor, w: torch.Tensor | None,
                     lr: float, steps: int, beta: float, normalize: bool) -> torch.Tensor:
    """The steps of `adapt_batched` on checked tensors, updating the rows of `out` in place;
    `diff` (P, d) = y1 - y2 of the stacked pairs is scaled in place."""
    for block, scale, who in _pad_by_owner(diff, own, w, out.shape[0]):
        # With E_i = -beta * (y_i1 - y_i2), eq. 4's step x <- x - lr * mean_i w_i beta (p_i - 1) D_i
        # is x <- x - lr * sum_i sigmoid(E_i . x) * (w_i / n) * E_i: four batched ops per step.
        e = block.mul_(-beta)
        x = out[who].unsqueeze(1)  # (U, 1, d); only x is ever transposed, never the big block
        for _ in range(int(steps)):
            t = torch.bmm(e, x.transpose(1, 2)).sigmoid_().mul_(scale)  # (U, n_max, 1)
            x = torch.baddbmm(x, t.transpose(1, 2), e, alpha=-lr)
            if normalize:
                x = x / torch.linalg.vector_norm(x, dim=2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        out[who] = x.squeeze(1)
    return out


def _pad_by_owner(diff: torch.Tensor, own: torch.Tensor, w: torch.Tensor | None, b: int):
    """Regroup the stacked pair differences (P, d) by owner into padded blocks (U, n_max, d).

    Owners are sorted by pair count and cut into chunks whose padding at most doubles their size,
    so one user with many pairs never makes every other user's block that long. Returns, per
    chunk: the block (a fresh tensor or a view of `diff`), the per-slot scale w_i / n_owner as (U, n_max, 1), 0 on
    padding, and the owners.
    """
    counts = torch.bincount(own, minlength=b)
    per_user = counts.tolist()
    scale = (w if w is not None else torch.ones_like(own, dtype=diff.dtype)) / counts[own].to(diff.dtype)
    sizes = {n for n in per_user if n}
    if len(sizes) == 1 and bool((own[1:] >= own[:-1]).all()):
        # Owners already grouped and all with n pairs (one user, or a uniform batch): the block is
        # a view of `diff`, no padding and no copy.
        (n,) = sizes
        who = torch.nonzero(counts).squeeze(1)
        return [(diff.view(len(who), n, diff.shape[1]), scale.view(len(who), n, 1), who)]
    owners = [u for u in range(b) if per_user[u]]
    order = torch.argsort(own, stable=True)
    start = torch.cumsum(counts, 0) - counts  # first row of each owner in `order`
    chunks = []
    for chunk in _chunks_by_size(owners, [per_user[u] for u in owners]):
        longest = per_user[chunk[0]]
        who = torch.tensor(chunk, device=diff.device)
        slot = torch.arange(longest, device=diff.device)
        valid = slot.unsqueeze(0) < counts[who].unsqueeze(1)  # (U, longest)
        rows = order[(start[who].unsqueeze(1) + slot.unsqueeze(0))[valid]]  # source rows, slot order
        flat = (torch.arange(len(who), device=diff.device).unsqueeze(1) * longest + slot.unsqueeze(0))[valid]
        block = diff.new_zeros(len(who), longest, diff.shape[1])
        block.view(-1, diff.shape[1]).index_copy_(0, flat, diff.index_select(0, rows))
        block_scale = diff.new_zeros(len(who), longest, 1)
        block_scale.view(-1).index_copy_(0, flat, scale.index_select(0, rows))
        chunks.append((block, block_scale, who))
    return chunks


# ---------------------------------------------------------------------------------------------
# The span form: the same steps when one user's pairs serve many queries


def logistic(z: np.ndarray) -> np.ndarray:
    """sigmoid(z) = 1 / (1 + exp(-z)) in numpy, without overflow for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


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
        if np.ndim(preferred) != 2:
            raise AdaptationInputError(f"preferred must have shape (P, d), got {tuple(np.shape(preferred))}")
        with one_torch_thread(), one_blas_thread():  # small products: no thread pool woken to spin
            p, r = _aligned_pairs(preferred, rejected, torch.empty(np.shape(preferred)[1]))
            diffs = (p - r).numpy()
            if diffs.shape[0] > diffs.shape[1]:
                return cls(diffs, None)
            wide = diffs.astype(np.float64)
            return cls(diffs, wide @ wide.T)

    def __len__(self) -> int:
        return self.diffs.shape[0]


def adapt_many(queries: np.ndarray, pair_sets, weights, lr: float = 0.5, steps: int = 3,
               beta: float = 1.0, normalize: bool = False, device: str | None = None) -> np.ndarray:
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
    _check_hyper(lr, steps, beta)
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
                f"weights[{b}] must have shape ({len(pairs)},), one per pair, got {given[b].shape}")
    rows = [b for b, w in enumerate(given) if w is not None]
    if rows and not _valid_weights(np.concatenate([given[b] for b in rows])).all():  # one check for the batch
        b = next(b for b in rows if not _valid_weights(given[b]).all())
        i = int(np.flatnonzero(~_valid_weights(given[b]))[0])
        raise AdaptationInputError(f"weights[{b}][{i}] is {given[b][i]}: pair weights must be >= 0")
    out = q.copy()
    if not rows:
        return out
    if device is not None:
        return _adapt_on_device(out, rows, pair_sets, given, lr, int(steps), beta, normalize, device)
    span = [b for b in rows if pair_sets[b].gram is not None]
    with one_blas_thread():
        for chunk in _chunks_by_size(span, [len(pair_sets[b]) ** 2 for b in span]):
            out[chunk] = _descend_in_span(q[chunk], [pair_sets[b] for b in chunk], [given[b] for b in chunk],
                                          lr, int(steps), beta, normalize)
        for b in rows:
            if pair_sets[b].gram is None:
                out[b] = _descend_in_x(q[b], pair_sets[b].diffs, given[b], lr, int(steps), beta, normalize)
    return out


def _valid_weights(w: np.ndarray) -> np.ndarray:
    return np.isfinite(w) & (w >= 0)


def _adapt_on_device(out: np.ndarray, rows: list[int], pair_sets, weights, lr: float, steps: int,
                     beta: float, normalize: bool, device: str) -> np.ndarray:
    """`adapt_many` for the queries `rows` through `_descend_stacked` on a torch device."""
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


def _descend_in_span(q: np.ndarray, pair_sets: list[PairSet], weights: list[np.ndarray], lr: float,
                     steps: int, beta: float, normalize: bool) -> np.ndarray:
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
            norm_sq = u * u * x0_sq + 2 * u * (a * at_x0).sum(1, keepdims=True) + np.einsum(
                "un,unm,um->u", a, gram, a)[:, None]
            norm = np.sqrt(np.maximum(norm_sq, np.finfo(np.float64).tiny))
            u, a = u / norm, a / norm
    out = np.empty_like(q)
    for row, pairs in enumerate(pair_sets):
        out[row] = u[row, 0] * q[row] + a[row, : len(pairs)].astype(np.float32) @ pairs.diffs
    return out


def _descend_in_x(x: np.ndarray, diffs: np.ndarray, weights: np.ndarray, lr: float, steps: int,
                  beta: float, normalize: bool) -> np.ndarray:
    """`adapt`'s own steps in numpy, for one query whose pairs outnumber the dimensions."""
    scale = (weights * (lr * beta / len(diffs))).astype(np.float32)
    for _ in range(steps):
        x = x + (scale * logistic(-beta * (diffs @ x))) @ diffs
        if normalize:
            x = x / max(float(np.linalg.norm(x)), float(np.finfo(np.float32).tiny))
    return x


# ---------------------------------------------------------------------------------------------
# Baselines on the same inputs


def positive_only(x, preferred, lr: float = 1.0):
    """The paper's baseline: x' = x + lr * mean(preferred) (section 2, one step of similarity
    ascent towards the liked images). No preferred images: x unchanged."""
    _check_hyper(lr, 0, 1.0)
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
    _check_hyper(0.0, 0, beta)
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
    prob = torch.where(valid, torch.exp(scores.unsqueeze(1) - tail.unsqueeze(2)), torch.zeros((), dtype=scores.dtype, device=x.device))
    coef = beta * (prob.sum(dim=1) - stage.to(scores.dtype))  # (R, M): per item j
    if w is not None:
        coef = coef * w.unsqueeze(1)
    return torch.einsum("rm,rmd->d", coef, items) / items.shape[0]


def plackett_luce_gradient(x, rankings, lengths=None, beta: float = 1.0, weights=None):
    """Closed-form gradient of `plackett_luce_loss` with respect to x:
    (1/R) sum_r w_r beta sum_{k<m} [sum_{j>=k} softmax_k(j) y_j - y_k]. With m = 2 it reduces to
    eq. 4, beta (p_1 - 1)(y_1 - y_2). Returns (d,); zeros for R = 0."""
    _check_hyper(0.0, 0, beta)
    xt, items, mask = _check_rankings(x, rankings, lengths)
    w = _check_weights(weights, items.shape[0], xt)
    if items.shape[0] == 0:
        return _like(torch.zeros_like(xt), x)
    return _like(_plackett_luce_grad(xt, items, mask, beta, w), x)


def adapt_plackett_luce(x, rankings, lengths=None, lr: float = 0.5, steps: int = 3, beta: float = 1.0,
                        weights=None, normalize: bool = False):
    """`adapt` with the Plackett-Luce loss of full rankings instead of pairs (same norm behaviour).
    No rankings: x unchanged."""
    _check_hyper(lr, steps, beta)
    xt, items, mask = _check_rankings(x, rankings, lengths)
    w = _check_weights(weights, items.shape[0], xt)
    out = xt.clone()
    if items.shape[0] == 0:
        return _like(out, x)
    return _like(_descend(out, lambda at: _plackett_luce_grad(at, items, mask, beta, w), lr, steps, normalize), x)
