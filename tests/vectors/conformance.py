"""The conformance suite of the vector-index interface: every implementation subclasses `Conformance` and passes it.

A subclass sets `exact` (or a `recall_floor` for approximate types) and implements `new_index(dim)`;
the tests below are then collected for it. Exact types must equal the float64 brute-force top-k
of `indexer.vectors.base.brute_force_topk`, ties allowed: each returned id must carry the
reference's score at its rank (to `atol`), and no id may repeat or be a removed one.
"""

import numpy as np
import pytest

from indexer.vectors.base import VectorIndex, brute_force_topk


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, queries: int, seed: int = 0, clusters: int = 40):
    """n unit vectors in clusters (CLIP's space is clumpy), ids not 0..n-1, and queries drawn the same way."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    base = unit(centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)))
    q = unit(centers[rng.integers(0, clusters, queries)] + 0.6 * rng.standard_normal((queries, d)))
    return np.arange(n, dtype=np.int64) * 7 + 100, base, q


def adversarial(d: int = 64, seed: int = 1):
    """Data built to break low-precision ranking: near-equal scores, duplicated vectors, vectors
    differing only in their last float32 bits, and queries aimed at them."""
    rng = np.random.default_rng(seed)
    anchor = unit(rng.standard_normal((8, d)))
    near = unit(np.repeat(anchor, 60, axis=0) + 1e-4 * rng.standard_normal((480, d)))
    lastbit = np.repeat(anchor, 20, axis=0)
    lastbit = lastbit + np.abs(lastbit) * np.float32(2**-23) * rng.integers(-3, 4, lastbit.shape)
    dupes = np.repeat(unit(rng.standard_normal((10, d))), 10, axis=0)
    noise = unit(rng.standard_normal((500, d)))
    base = np.vstack([near, lastbit.astype(np.float32), dupes, noise]).astype(np.float32)
    queries = unit(np.vstack([anchor, anchor + 1e-3 * rng.standard_normal((8, d)), dupes[::10]]))
    ids = rng.permutation(len(base)).astype(np.int64) * 3 + 5
    return ids, base, queries


def assert_topk_equal(ids, base, queries, k, got_scores, got_ids, atol=1e-5):
    """`got` equals the brute-force top-k of (ids, base) up to ties: same scores rank by rank,
    each returned id carrying its own true score, no repeats, padding only past the live count."""
    want_scores, _ = brute_force_topk(ids, base, queries, k)
    assert got_scores.shape == got_ids.shape == (len(queries), k)
    assert got_ids.dtype == np.int64
    row_of = {int(i): r for r, i in enumerate(ids)}
    for q in range(len(queries)):
        live = got_ids[q] >= 0
        assert live.sum() == min(k, len(ids)), f"query {q}: {live.sum()} results, want {min(k, len(ids))}"
        assert len(set(got_ids[q][live].tolist())) == live.sum(), f"query {q}: an id repeats"
        true = np.array([np.float64(base[row_of[int(i)]]) @ np.float64(queries[q]) for i in got_ids[q][live]])
        np.testing.assert_allclose(true, want_scores[q][live], atol=atol, err_msg=f"query {q}: wrong ids")
        np.testing.assert_allclose(
            got_scores[q][live], want_scores[q][live], atol=atol, err_msg=f"query {q}: wrong scores"
        )
        assert np.all(got_scores[q][~live] == -np.inf)


def recall_at(k, ids, base, queries, got_ids) -> float:
    _, want = brute_force_topk(ids, base, queries, k)
    return float(np.mean([len(set(w) & set(g)) / k for w, g in zip(want.tolist(), got_ids[:, :k].tolist())]))


class Conformance:
    """What every VectorIndex must do. Subclasses: `new_index(dim)`, and `exact` or `recall_floor`."""

    exact = True
    recall_floor = 1.0  # recall@10 an approximate type must reach on `clustered` data
    dim = 32

    def new_index(self, dim: int) -> VectorIndex:
        raise NotImplementedError

    def filled(self, ids, base) -> VectorIndex:
        index = self.new_index(base.shape[1])
        index.add(ids, base)
        return index

    def check(self, index, ids, base, queries, k):
        scores, got = index.search(queries, k)
        if self.exact:
            assert_topk_equal(ids, base, queries, k, scores, got)
        else:
            assert recall_at(min(k, 10), ids, base, queries, got) >= self.recall_floor

    def test_declares_itself(self):
        index = self.new_index(self.dim)
        assert isinstance(index, VectorIndex)
        assert index.dim == self.dim and index.exact == self.exact
        assert len(index) == 0
        description = index.describe()
        assert description["kind"] == index.kind and description["dim"] == self.dim and description["count"] == 0

    @pytest.mark.parametrize("k", [1, 10, 26])
    def test_search_equals_brute_force(self, k):
        ids, base, queries = clustered(3000, self.dim, 50)
        index = self.filled(ids, base)
        assert np.array_equal(index.ids(), np.sort(ids))
        self.check(index, ids, base, queries, k)

    def test_adversarial_data(self):
        if not self.exact:
            pytest.skip("approximate types are held to recall on clustered data")
        ids, base, queries = adversarial()
        index = self.filled(ids, base)
        for k in (1, 10, 26, 100):
            self.check(index, ids, base, queries, k)

    def test_added_in_batches(self):
        ids, base, queries = clustered(2000, self.dim, 20, seed=3)
        index = self.new_index(self.dim)
        for part in np.array_split(np.arange(len(ids)), 4):
            index.add(ids[part], base[part])
        self.check(index, ids, base, queries, 10)

    def test_removed_ids_never_come_back(self):
        ids, base, queries = clustered(2000, self.dim, 30, seed=4)
        index = self.filled(ids, base)
        top1 = brute_force_topk(ids, base, queries, 1)[1][:, 0]
        gone = np.unique(np.concatenate([top1, ids[:300]]))
        assert index.remove(gone) == gone.size
        assert index.remove(gone[:5]) == 0
        keep = ~np.isin(ids, gone)
        _, got = index.search(queries, 10)
        assert not np.isin(got, gone).any()
        self.check(index, ids[keep], base[keep], queries, 10)
        assert np.array_equal(index.ids(), np.sort(ids[keep]))

    def test_fewer_vectors_than_k_pads(self):
        ids, base, queries = clustered(5, self.dim, 3, seed=5, clusters=2)
        index = self.filled(ids, base)
        scores, got = index.search(queries, 8)
        assert (got[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
        assert_topk_equal(ids, base, queries, 8, scores, got)

    def test_empty_index_returns_padding(self):
        index = self.new_index(self.dim)
        scores, got = index.search(unit(np.ones((2, self.dim))), 3)
        assert (got == -1).all() and np.isneginf(scores).all()

    def test_wrong_dimension_is_refused(self):
        index = self.new_index(self.dim)
        with pytest.raises(ValueError, match=str(self.dim)):
            index.add(np.arange(2, dtype=np.int64), np.ones((2, self.dim + 1), np.float32))
        with pytest.raises(ValueError, match=str(self.dim)):
            index.search(np.ones((1, self.dim - 1), np.float32), 3)

    def test_save_load_round_trip(self, tmp_path):
        ids, base, queries = clustered(1500, self.dim, 20, seed=6)
        index = self.filled(ids, base)
        index.remove(ids[:50])
        index.save(tmp_path / "saved")
        loaded = type(index).load(tmp_path / "saved")
        assert loaded.describe()["count"] == len(ids) - 50
        assert np.array_equal(loaded.ids(), np.sort(ids[50:]))
        self.check(loaded, ids[50:], base[50:], queries, 10)
