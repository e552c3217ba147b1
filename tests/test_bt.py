"""The BT core against torch autograd, per-user loops and hand-worked cases."""

import numpy as np
import pytest
import torch

from engine import bt
from engine.bt.span import _chunks_by_size


def unit_rows(rng, n, d):
    a = rng.normal(size=(n, d))
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def problem(seed, n, d):
    rng = np.random.default_rng(seed)
    return unit_rows(rng, 1, d)[0], unit_rows(rng, n, d), unit_rows(rng, n, d), rng


def autograd(loss_fn, x, *args, **kwargs):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(xt, *[torch.as_tensor(a, dtype=torch.float64) for a in args], **kwargs)
    loss.backward()
    return xt.grad.numpy()


@pytest.mark.parametrize(
    "n,d,beta,weighted",
    [
        (1, 4, 1.0, False),
        (7, 16, 1.0, True),
        (50, 512, 3.0, False),
        (13, 64, 0.25, True),
        (200, 32, 10.0, True),
    ],
)
def test_closed_form_gradient_equals_autograd(n, d, beta, weighted):
    x, p, r, rng = problem(n * d, n, d)
    w = rng.uniform(0, 2, size=n) if weighted else None
    want = autograd(bt.preference_loss, x, p, r, beta=beta, weights=None if w is None else torch.tensor(w))
    got = bt.preference_gradient(x, p, r, beta=beta, weights=w)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the closed form is eq. 4 literally: mean of w * beta * (p1 - 1) * (y1 - y2)
    p1 = 1 / (1 + np.exp(-beta * ((p - r) @ x)))
    literal = np.mean((np.ones(n) if w is None else w)[:, None] * beta * (p1 - 1)[:, None] * (p - r), axis=0)
    np.testing.assert_allclose(got, literal, atol=1e-10)


def test_probability_is_eq2_softmax_of_similarities():
    x, p, r, _ = problem(1, 5, 8)
    s1, s2 = p @ x, r @ x
    np.testing.assert_allclose(bt.preference_probability(x, p, r), np.exp(s1) / (np.exp(s1) + np.exp(s2)))
    np.testing.assert_allclose(bt.similarity(x, p), s1)
    np.testing.assert_allclose(bt.similarity(np.stack([x, -x]), p), np.stack([s1, -s1]))


def test_loss_is_mean_negative_log_probability():
    x, p, r, _ = problem(2, 9, 8)
    want = -np.log(bt.preference_probability(x, p, r, beta=2.0)).mean()
    np.testing.assert_allclose(bt.preference_loss(x, p, r, beta=2.0), want)


def test_one_step_raises_the_log_likelihood():
    for seed in range(20):
        x, p, r, _ = problem(seed, 10, 32)
        before = bt.preference_loss(x, p, r)
        after = bt.preference_loss(bt.adapt(x, p, r, lr=0.5, steps=1), p, r)
        assert after < before, seed


def test_adapt_is_repeated_gradient_steps():
    x, p, r, _ = problem(3, 6, 16)
    manual = x.copy()
    for _ in range(4):
        manual = manual - 0.3 * bt.preference_gradient(manual, p, r, beta=2.0)
    np.testing.assert_allclose(bt.adapt(x, p, r, lr=0.3, steps=4, beta=2.0), manual, atol=1e-12)
    normalized = bt.adapt(x, p, r, lr=0.3, steps=4, beta=2.0, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalized), 1.0)


def test_numpy_in_numpy_out_torch_in_torch_out():
    x, p, r, _ = problem(4, 3, 8)
    out = bt.adapt(x.astype(np.float32), p.astype(np.float32), r.astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    out_t = bt.adapt(torch.tensor(x), torch.tensor(p), torch.tensor(r))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), bt.adapt(x, p, r))


@pytest.mark.parametrize(
    "counts,shuffle",
    [
        ([0, 1, 3, 7, 0, 2, 50, 5, 1], False),  # ragged, including users with no pairs: padded blocks
        ([4, 4, 4, 4, 4, 4, 4, 4, 4], False),  # uniform and grouped: a view, no padding
        ([3, 3, 0, 3, 3, 0, 3, 3, 3], True),  # uniform but interleaved owners: padded path again
        ([0, 0, 0, 0, 6, 0, 0, 0, 0], False),  # one user
    ],
)
def test_batched_equals_per_user_loop(counts, shuffle):
    rng = np.random.default_rng(5)
    d, b = 24, 9
    queries = unit_rows(rng, b, d)
    owner = np.repeat(np.arange(b), counts)
    if shuffle:
        owner = rng.permutation(owner)
    p, r = unit_rows(rng, len(owner), d), unit_rows(rng, len(owner), d)
    w = rng.uniform(0.1, 2.0, size=len(owner))
    for normalize in (False, True):
        got = bt.adapt_batched(queries, p, r, owner, lr=0.7, steps=5, beta=2.0, weights=w, normalize=normalize)
        for i in range(b):
            sel = owner == i
            want = bt.adapt(queries[i], p[sel], r[sel], lr=0.7, steps=5, beta=2.0, weights=w[sel], normalize=normalize)
            np.testing.assert_allclose(got[i], want, atol=1e-10)
    for i in np.flatnonzero(np.array(counts) == 0):
        np.testing.assert_array_equal(got[i], queries[i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_batched_runs_on_cuda_and_matches_cpu():
    rng = np.random.default_rng(6)
    q, p, r = unit_rows(rng, 4, 16), unit_rows(rng, 10, 16), unit_rows(rng, 10, 16)
    owner = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    cpu = bt.adapt_batched(q, p, r, owner)
    gpu = bt.adapt_batched(*(torch.tensor(a).cuda() for a in (q, p, r, owner)))
    assert gpu.is_cuda
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_span_form_equals_adapt(normalize):
    """adapt_many (steps on Gram matrices, batched and padded) against `adapt` query by query."""
    rng = np.random.default_rng(7)
    d = 24
    counts = [3, 0, 1, 17, 40, 5, 5, 2]  # ragged; 0 = no pairs; 40 > d takes the steps in x
    raw = [(unit_rows(rng, n, d), unit_rows(rng, n, d)) for n in counts]
    raw[6] = raw[5]  # one user's pairs serving two queries
    sets = [bt.PairSet.of(p, r) if len(p) else None for p, r in raw]
    weights = [rng.uniform(0.1, 2.0, size=n) if n else None for n in counts]
    weights[2] = None  # all ones
    queries = unit_rows(rng, len(counts), d).astype(np.float32)
    queries[7] *= 0.0  # a zero query is valid input to `adapt`
    got = bt.adapt_many(queries, sets, weights, lr=0.7, steps=5, beta=2.0, normalize=normalize)
    assert sets[4].gram is None and sets[3].gram is not None
    for b, (p, r) in enumerate(raw):
        want = bt.adapt(
            queries[b].astype(np.float64), p, r, lr=0.7, steps=5, beta=2.0, weights=weights[b], normalize=normalize
        )
        np.testing.assert_allclose(got[b], want, atol=2e-5)
    # the device path (stacked differences, adapt_batched's padded steps) on the CPU, and on CUDA when there is one
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        stacked = bt.adapt_many(queries, sets, weights, lr=0.7, steps=5, beta=2.0, normalize=normalize, device=device)
        np.testing.assert_allclose(stacked, got, atol=2e-5)


def blas_threads():
    from threadpoolctl import threadpool_info

    return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def test_adapt_many_sets_numpy_blas_to_one_thread_and_leaves_faiss_and_torch_alone():
    import faiss  # noqa: F401  (its own BLAS must keep its threads)

    rng = np.random.default_rng(14)
    x, p, r = unit_rows(rng, 2, 16), unit_rows(rng, 5, 16), unit_rows(rng, 5, 16)
    others = {path: n for path, n in blas_threads().items() if "numpy" not in path}
    torch_threads = torch.get_num_threads()
    bt.adapt_many(x, [bt.PairSet.of(p, r)] * 2, [None] * 2)
    numpy_pools = {path: n for path, n in blas_threads().items() if "numpy" in path}
    if not numpy_pools:
        pytest.skip("numpy's BLAS is not one threadpoolctl can see on this machine")
    assert set(numpy_pools.values()) == {1}
    assert {path: n for path, n in blas_threads().items() if "numpy" not in path} == others
    assert torch.get_num_threads() == torch_threads


def test_threads_adapting_at_once_agree_and_leave_the_thread_counts_as_they_were():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(15)
    x, p, r = unit_rows(rng, 8, 16), unit_rows(rng, 5, 16), unit_rows(rng, 5, 16)
    want = bt.adapt_many(x, [bt.PairSet.of(p, r)] * 8, [None] * 8)
    before = (blas_threads(), torch.get_num_threads())

    def work(_):
        return [bt.adapt_many(x, [bt.PairSet.of(p, r)] * 8, [None] * 8) for _ in range(50)]

    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(work, range(8)):
            for got in results:
                np.testing.assert_array_equal(got, want)
    assert (blas_threads(), torch.get_num_threads()) == before


def test_span_form_keeps_the_gram_of_its_differences():
    rng = np.random.default_rng(8)
    p, r = unit_rows(rng, 6, 10), unit_rows(rng, 6, 10)
    pairs = bt.PairSet.of(p, r)
    np.testing.assert_allclose(pairs.diffs, p - r, atol=1e-6)
    np.testing.assert_allclose(pairs.gram, (p - r) @ (p - r).T, atol=1e-5)


def test_chunks_by_size_bounds_padding_and_covers_every_item():
    rng = np.random.default_rng(9)
    for _ in range(50):
        costs = rng.integers(1, 200, size=rng.integers(1, 40)).tolist()
        items = list(range(100, 100 + len(costs)))
        chunks = _chunks_by_size(items, costs)
        assert sorted(i for c in chunks for i in c) == items
        for chunk in chunks:
            cost = [costs[i - 100] for i in chunk]
            assert cost[0] == max(cost) and len(chunk) * cost[0] <= 2 * sum(cost)


def test_span_form_bad_inputs_raise_a_clear_error():
    x, p, r, _ = problem(14, 3, 8)
    pairs = bt.PairSet.of(p, r)
    with pytest.raises(bt.AdaptationInputError, match=r"rejected\[2, 5\] is nan"):
        bt.PairSet.of(p, np.where((np.arange(3)[:, None] == 2) & (np.arange(8) == 5), np.nan, r))
    with pytest.raises(bt.AdaptationInputError, match=r"preferred has 3 rows but rejected has 2"):
        bt.PairSet.of(p, r[:2])
    with pytest.raises(bt.AdaptationInputError, match=r"weights\[1\]\[2\] is -1.0: pair weights must be >= 0"):
        bt.adapt_many(np.stack([x, x]), [pairs, pairs], [None, np.array([1.0, 1.0, -1.0])])
    with pytest.raises(bt.AdaptationInputError, match=r"weights\[0\] must have shape \(3,\)"):
        bt.adapt_many(x[None], [pairs], [np.ones(2)])
    with pytest.raises(bt.AdaptationInputError, match=r"pair_sets\[0\] has dimension 8 but the queries have 4"):
        bt.adapt_many(x[None, :4], [pairs], [None])
    with pytest.raises(bt.AdaptationInputError, match=r"queries\[0, 1\] is inf"):
        bt.adapt_many(np.where(np.arange(8) == 1, np.inf, x)[None], [pairs], [None])
    with pytest.raises(bt.AdaptationInputError, match="2 queries, 1 pair sets, 1 weight vectors"):
        bt.adapt_many(np.stack([x, x]), [pairs], [None])


@pytest.mark.parametrize("r_,m,d,beta", [(1, 2, 4, 1.0), (5, 4, 16, 1.0), (3, 7, 32, 2.5)])
def test_plackett_luce_gradient_equals_autograd(r_, m, d, beta):
    rng = np.random.default_rng(r_ * m)
    x = unit_rows(rng, 1, d)[0]
    rankings = unit_rows(rng, r_ * m, d).reshape(r_, m, d)
    lengths = rng.integers(2, m + 1, size=r_)
    w = rng.uniform(0, 2, size=r_)
    want = autograd(
        bt.plackett_luce_loss, x, rankings, lengths=torch.tensor(lengths), beta=beta, weights=torch.tensor(w)
    )
    np.testing.assert_allclose(bt.plackett_luce_gradient(x, rankings, lengths, beta=beta, weights=w), want, atol=1e-5)


def test_plackett_luce_reduces_to_bt_for_two_items():
    x, p, r, _ = problem(7, 11, 16)
    rankings = np.stack([p, r], axis=1)
    np.testing.assert_allclose(bt.plackett_luce_loss(x, rankings, beta=1.7), bt.preference_loss(x, p, r, beta=1.7))
    np.testing.assert_allclose(
        bt.plackett_luce_gradient(x, rankings, beta=1.7), bt.preference_gradient(x, p, r, beta=1.7)
    )
    np.testing.assert_allclose(bt.adapt_plackett_luce(x, rankings, lr=0.5, steps=3), bt.adapt(x, p, r, lr=0.5, steps=3))


def test_plackett_luce_loss_is_sequential_choice_probability():
    rng = np.random.default_rng(8)
    x, items = unit_rows(rng, 1, 8)[0], unit_rows(rng, 4, 8)
    s = items @ x
    want = -sum(s[k] - np.log(np.exp(s[k:]).sum()) for k in range(3))
    np.testing.assert_allclose(bt.plackett_luce_loss(x, items[None]), want)
    padded, lengths = bt.pad_rankings([items, items[:2]])
    two = -(s[0] - np.log(np.exp(s[:2]).sum()))
    np.testing.assert_allclose(bt.plackett_luce_loss(x, padded, lengths), (want + two) / 2)


def test_baselines_match_their_formulas():
    x, p, r, _ = problem(9, 6, 8)
    np.testing.assert_allclose(bt.positive_only(x, p, lr=0.5), x + 0.5 * p.mean(0))
    np.testing.assert_allclose(bt.rocchio(x, p, r), x + 0.75 * p.mean(0) - 0.15 * r.mean(0))
    np.testing.assert_allclose(bt.rocchio(x, p, r, 0.5, 1.0, 0.0), 0.5 * x + p.mean(0))
    np.testing.assert_allclose(bt.average_vector(x, p, r), 2 * p.mean(0) - r.mean(0))


def test_empty_pair_sets_are_a_documented_no_op():
    x, _, _, _ = problem(10, 1, 8)
    empty = np.zeros((0, 8))
    for out in (
        bt.adapt(x, empty, empty),
        bt.positive_only(x, empty),
        bt.rocchio(x, empty, empty),
        bt.average_vector(x, empty, empty),
        bt.adapt_plackett_luce(x, np.zeros((0, 3, 8))),
    ):
        np.testing.assert_array_equal(out, x)
    assert bt.preference_loss(x, empty, empty) == 0
    np.testing.assert_array_equal(bt.preference_gradient(x, empty, empty), np.zeros(8))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda x, p, r: (np.where(np.arange(8) == 3, np.nan, x), p, r), r"x\[3\] is nan"),
        (lambda x, p, r: (x, p, np.vstack([r[:1], np.full((1, 8), np.inf)])), r"rejected\[1, 0\] is inf"),
        (lambda x, p, r: (x, np.vstack([p[:1], np.zeros((1, 8))]), r), r"preferred\[1\] is a zero vector"),
        (
            lambda x, p, r: (x, p[:, :7], r[:, :7]),
            r"preferred must have shape \(N, 8\) to match the query, got \(2, 7\)",
        ),
        (lambda x, p, r: (x, p, r[:1]), r"preferred has 2 rows but rejected has 1"),
        (lambda x, p, r: (x[None], p, r), r"x must be one vector of shape \(d,\), got shape \(1, 8\)"),
    ],
)
def test_bad_inputs_raise_a_clear_error(mutate, message):
    x, p, r, _ = problem(11, 2, 8)
    with pytest.raises(bt.AdaptationInputError, match=message):
        bt.adapt(*mutate(x, p, r))


def test_bad_hyper_parameters_and_owner_raise():
    x, p, r, _ = problem(12, 2, 8)
    with pytest.raises(bt.AdaptationInputError, match="beta must be a finite number > 0, got 0"):
        bt.adapt(x, p, r, beta=0)
    with pytest.raises(bt.AdaptationInputError, match="lr must be a finite number >= 0, got nan"):
        bt.adapt(x, p, r, lr=float("nan"))
    with pytest.raises(bt.AdaptationInputError, match=r"weights\[1\] is -1.0"):
        bt.adapt(x, p, r, weights=np.array([1.0, -1.0]))
    with pytest.raises(bt.AdaptationInputError, match=r"owner contains 5, outside the 2 queries"):
        bt.adapt_batched(np.stack([x, x]), p, r, np.array([0, 5]))


def test_zero_query_is_valid_and_moves_toward_preferred():
    _, p, r, _ = problem(13, 4, 8)
    out = bt.adapt(np.zeros(8), p, r, lr=1.0, steps=1)
    np.testing.assert_allclose(out, 0.5 * (p - r).mean(0))
    assert np.all(np.isfinite(out))
