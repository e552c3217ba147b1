"""The FAISS vector index: the conformance suite for every index type, plus plans, GPU placement and file safety.

Every check runs on the CPU, and again through `to_gpu` when FAISS sees a GPU: one code path.
"""

import sys

import faiss
import numpy as np
import pytest

from indexer.errors import FaissUnavailableError, IndexTypeError
from indexer.vectors.faiss import FaissIndex, plan_index, require_faiss
from tests.vectors.conformance import Conformance

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
PLACES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not HAS_GPU, reason="FAISS sees no GPU"))]
RECALL_FLOORS = {
    "ivf": 0.95,
    "hnsw": 0.95,
    "ivfpq": 0.7,
    "IVF32,SQ8": 0.9,
}  # recall@10 on the data below (measured 1.0, 1.0, 0.79, 0.98)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP threads spin on a shared 2-core machine: one thread trains PQ 15x faster here."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """3000 unit vectors in 40 clusters (d=32, like CLIP's clumpy space), 50 queries, ids not 0..n-1."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 32))
    base = unit(centers[rng.integers(0, 40, 3000)] + 0.6 * rng.standard_normal((3000, 32)))
    queries = unit(centers[rng.integers(0, 40, 50)] + 0.6 * rng.standard_normal((50, 32)))
    ids = np.arange(3000, dtype=np.int64) * 7 + 100
    return ids, base, queries


def brute_force(ids, base, queries, k, exclude=()):
    scores = queries @ base.T
    scores[:, np.isin(ids, list(exclude))] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def build(ids, base, index_type="flat", where="cpu"):
    return FaissIndex.build(ids, base, index_type, gpu=where == "gpu")


def search(index, queries, k, exclude=()):
    """Search `index` without the `exclude` ids, removing them as the collection layer does."""
    index.remove(np.array(sorted(exclude), dtype=np.int64))
    return index.search(queries, k)


class TestFaissFlat(Conformance):
    def new_index(self, dim):
        return FaissIndex.empty(dim, "flat", gpu=False)


class TestFaissHnsw(Conformance):
    exact, recall_floor = False, 0.95

    def new_index(self, dim):
        return FaissIndex.empty(dim, "hnsw", gpu=False)


class TestFaissIvf(Conformance):
    exact, recall_floor = False, 0.95

    def new_index(self, dim):
        return FaissIndex.empty(dim, "ivf", gpu=False)


@pytest.mark.skipif(not HAS_GPU, reason="FAISS sees no GPU")
class TestFaissFlatGpu(Conformance):
    def new_index(self, dim):
        return FaissIndex.empty(dim, "flat", gpu=True)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("exclude", [(), (100, 107, 114, 121)])
@pytest.mark.parametrize("index_type", ["flat", "flat16"])
def test_exact_types_equal_brute_force(data, where, exclude, index_type):
    ids, base, queries = data
    if index_type == "flat16":
        base = base.astype(np.float16).astype(np.float32)  # as the store keeps embeddings by default
    index = build(ids, base, index_type, where)
    exclude = set(exclude) | set(ids[np.argmax(queries @ base.T, axis=1)].tolist())  # drop every true top-1
    scores, got = search(index, queries, 10, exclude)
    want_scores, _ = brute_force(ids, base, queries, 10, exclude)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    truth = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    for q, row in enumerate(got):  # ties allowed: each returned id must carry its true score
        assert not set(row.tolist()) & exclude
        np.testing.assert_allclose(base[[truth[i] for i in row]] @ queries[q], scores[q], atol=1e-5)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("index_type", list(RECALL_FLOORS))
def test_approximate_recall_at_10(data, where, index_type):
    ids, base, queries = data
    index = build(ids, base, index_type, where)
    _, got = search(index, queries, 10)
    _, want = brute_force(ids, base, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= RECALL_FLOORS[index_type], f"{index_type} recall@10 {recall:.3f}"


def test_plans_follow_the_collection_size():
    assert plan_index("flat", 10**6, 768) == "Flat"
    assert plan_index("flat16", 10**6, 768) == "SQfp16"
    assert plan_index("ivf", 10**6, 768) == "IVF4000,Flat"
    assert plan_index("ivfpq", 10**6, 768) == "IVF4000,PQ64x8np"
    assert plan_index("ivfpq", 3000, 32) == "IVF76,PQ16x6np"  # 76 lists: 39+ points each; 6 bits: 2^6*39 <= 3000
    assert plan_index("hnsw", 5, 32) == "HNSW32,Flat"
    assert plan_index("ivf", 0, 32) == "Flat"


def test_short_results_are_padded_and_empty_index_searches(data):
    ids, base, queries = data
    scores, got = search(build(ids[:3], base[:3]), queries[:2], 5, exclude=[ids[0]])
    assert (got[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all() and (got[:, :2] >= 0).all()
    scores, got = search(build(ids[:0], base[:0], "ivf"), queries[:2], 3)
    assert (got == -1).all()


def test_bad_index_type_names_itself(data):
    ids, base, _ = data
    with pytest.raises(IndexTypeError, match=r"index type 'IVF-lots' is neither one of flat, flat16, ivf, ivfpq, hnsw"):
        build(ids, base, "IVF-lots")


def test_missing_faiss_names_the_wheels(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(FaissUnavailableError, match=r"pip install faiss-cpu, or faiss-gpu"):
        require_faiss()
