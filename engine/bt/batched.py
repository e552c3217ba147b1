"""The padded batch form of `adapt` for many queries with ragged pair sets, in torch on any device: a fast path checked against `reference.adapt`."""

import torch

from engine.bt.common import AdaptationInputError, check_hyper
from engine.bt.span import _chunks_by_size
from engine.bt.tensors import _aligned_pairs, _as_tensor, _check_finite, _check_weights, _like


def adapt_batched(
    queries,
    preferred,
    rejected,
    owner,
    lr: float = 0.5,
    steps: int = 3,
    beta: float = 1.0,
    weights=None,
    normalize: bool = False,
):
    """`adapt` for B queries at once, each with its own ragged set of pairs, in one vectorised call.

    queries: (B, d); preferred, rejected: (P, d) with all users' pairs stacked; owner: (P,) ints in
    [0, B), the query each pair belongs to. Each query follows exactly the iteration of `adapt` on
    its own pairs (the gradient averaged over that query's pairs); a query that owns no pair comes
    back unchanged. Runs on the device of `queries` (CUDA tensors stay on CUDA). Returns (B, d).
    """
    check_hyper(lr, steps, beta)
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


def _descend_stacked(
    out: torch.Tensor,
    diff: torch.Tensor,
    own: torch.Tensor,
    w: torch.Tensor | None,
    lr: float,
    steps: int,
    beta: float,
    normalize: bool,
) -> torch.Tensor:
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
