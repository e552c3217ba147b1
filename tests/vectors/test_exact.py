"""ExactIndex: the conformance suite on every candidate pass, the error bound, fallbacks, chunking, deletions, threads and crash-safe saves."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.vectors.base import brute_force_topk
from indexer.vectors.exact import (
    ExactConfig,
    ExactIndex,
    _int8_pack,
    _int8_product,
    _queries_for,
    choose_flat_backend,
    float16_error_bound,
    int8_available,
    int8_error_bound,
    sketch_rows,
)
from storage.errors import InvalidIndexError
from tests.vectors.conformance import Conformance, assert_topk_equal, clustered, unit

needs_int8 = pytest.mark.skipif(
    not int8_available(), reason="torch's fbgemm int8 kernels are not available on this CPU"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ROOT = Path(__file__).resolve().parents[2]


@needs_int8
class TestExact(Conformance):
    """The CPU default: int8 candidate pass, float32 rescoring; the pass forced on for small test data."""

    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(sketch_from_rows=0))


class TestExactFloat16(Conformance):
    """The float16 pass CUDA runs, here on the CPU: same code, same bound."""

    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(precision="float16", sketch_from_rows=0))


class TestExactFloat32(Conformance):
    """No candidate pass: the plain float32 product, what fallbacks and small collections take."""

    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(precision="float32"))


@needs_int8
class TestExactSmallChunks(Conformance):
    """Chunks smaller than k and than the data, so every merge across chunks is exercised."""

    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(chunk_rows=7, sketch_from_rows=0))


@needs_int8
class TestExactQueryBlocks(Conformance):
    """Batches searched three queries at a time (a CPU searches 64 at a time): blocks joined in order."""

    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(sketch_from_rows=0, query_block=3))


@needs_cuda
class TestExactCuda(Conformance):
    def new_index(self, dim):
        return ExactIndex(dim, ExactConfig(device="cuda", sketch_from_rows=0))


def bound_cases(d: int, seed: int = 0):
    """Unit rows and queries, random and adversarial for rounding: one spike (coarse int8 steps on the
    rest), equal components, values at rounding midpoints, sparse, queries equal to rows, float16 ties."""
    rng = np.random.default_rng(seed)
    rows = [unit(rng.standard_normal((200, d)))]
    spike = rng.standard_normal((50, d)) * 0.02
    spike[:, 0] = 1.0
    rows.append(unit(spike))
    rows.append(unit(np.ones((2, d)) * np.array([[1.0], [-1.0]])))
    mid = (rng.integers(-127, 128, (50, d)) + 0.5) / 127 * 0.1
    mid[:, 0] = 0.1
    rows.append(unit(mid))
    sparse = np.zeros((20, d))
    sparse[np.arange(20), rng.integers(0, d, 20)] = 1
    sparse[np.arange(20), rng.integers(0, d, 20)] += 0.5
    rows.append(unit(sparse))
    rows.append(unit(rng.standard_normal((20, d))).astype(np.float16).astype(np.float32))
    rows = np.vstack(rows)
    queries = np.vstack([unit(rng.standard_normal((30, d))), rows[::7], -rows[::11], unit(mid[:5] * -1 + 1e-3)])
    return rows, queries


@pytest.mark.parametrize("precision", ["int8", "float16"])
@pytest.mark.parametrize("d", [32, 77, 512])
def test_sketch_error_never_exceeds_the_bound(precision, d):
    if precision == "int8" and not int8_available():
        pytest.skip("no fbgemm int8 kernels")
    rows, queries = bound_cases(d, seed=d)
    x = torch.from_numpy(rows)
    sketch, resid, norm = sketch_rows(x, precision)
    q_low, q_norm, q_resid, q_hat_norm = _queries_for(precision, torch.from_numpy(queries))
    if precision == "int8":
        got = _int8_product(q_low, sketch).double()
        bound = int8_error_bound(q_norm, q_resid, q_hat_norm, resid, norm)
        # the pass sees each query scaled by a positive constant; the reference scales it the same way
        amax = torch.from_numpy(queries).abs().amax(1, keepdim=True).double()
        truth = (torch.from_numpy(queries).double() * (63 / 64) / amax) @ x.double().T
    else:
        got = (q_low @ sketch.T).double()
        bound = float16_error_bound(q_norm, q_resid, q_hat_norm, resid, norm, d)
        truth = torch.from_numpy(queries).double() @ x.double().T
    error = (got - truth).abs()
    assert torch.all(error <= bound[:, None]), f"worst error / bound = {float((error / bound[:, None]).max()):.3f}"
    assert float((error / bound[:, None]).max()) > 1e-3  # the bound is not vacuous either
    assert float(bound.max() / q_norm.max()) < 0.1


@needs_int8
def test_int8_kernel_is_exact_on_integer_grids():
    """fbgemm's product of grid queries and codes equals the integer product exactly (no int16 saturation)."""
    rng = np.random.default_rng(3)
    codes = torch.from_numpy(rng.integers(-127, 128, (300, 512)).astype(np.int8))
    codes[0], codes[1] = 127, -127
    m = torch.from_numpy(rng.integers(-63, 64, (9, 512)).astype(np.float32))
    m[0], m[1] = 63, -63
    got = _int8_product(m / 64, _int8_pack(codes, torch.ones(300)))
    assert torch.equal(got.double(), (m.double() @ codes.double().T) / 64)


def search_data(n=4000, d=48, seed=7):
    ids, base, queries = clustered(n, d, 40, seed=seed)
    return ids, base.astype(np.float16).astype(np.float32), queries


@needs_int8
def test_fallback_counted_when_the_candidate_limit_is_tiny():
    ids, base, queries = search_data()
    index = ExactIndex(base.shape[1], ExactConfig(candidate_limit=1, sketch_from_rows=0))
    index.add(ids, base)
    assert index.describe()["fallbacks"] == 0
    scores, got = index.search(queries, 10)
    assert index.describe()["fallbacks"] == len(queries)
    assert_topk_equal(ids, base, queries, 10, scores, got)
    roomy = ExactIndex(base.shape[1], ExactConfig(sketch_from_rows=0))
    roomy.add(ids, base)
    roomy.search(queries, 26)  # what `search -k 10` asks for; the limit is max(4k, rows / 256 + rows / (9 B)) = 104
    assert roomy.describe()["fallbacks"] == 0


@needs_int8
@pytest.mark.parametrize("precision", ["int8", "float16", "float32"])
def test_chunked_equals_unchunked(precision):
    ids, base, queries = search_data()
    results = []
    for chunk_rows in (97, 1000, 10**6):
        index = ExactIndex(base.shape[1], ExactConfig(precision=precision, chunk_rows=chunk_rows, sketch_from_rows=0))
        for part in np.array_split(np.arange(len(ids)), 3):  # adds that fill a chunk partly, then spill over
            index.add(ids[part], base[part])
        assert index.describe()["chunks"] == -(-len(ids) // min(chunk_rows, len(ids)))
        scores, got = index.search(queries, 26)
        assert_topk_equal(ids, base, queries, 26, scores, got)
        results.append(scores)
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)
    np.testing.assert_allclose(results[1], results[2], atol=1e-6)


@needs_int8
def test_a_crowd_of_near_ties_is_rescanned_not_cut_off():
    """200 near-copies of one vector in one chunk: more candidates than a chunk's top-k keeps (128), fewer than the limit (60,000 / 256 + 60,000 / 36)."""
    rng = np.random.default_rng(11)
    d = 32
    anchor = unit(rng.standard_normal((1, d)))
    crowd = unit(np.repeat(anchor, 200, axis=0) + 2e-3 * rng.standard_normal((200, d)))
    base = np.vstack([unit(rng.standard_normal((30000, d))), crowd, unit(rng.standard_normal((29800, d)))])
    ids = rng.permutation(len(base)).astype(np.int64)
    index = ExactIndex(d, ExactConfig(chunk_rows=30000, sketch_from_rows=0))
    index.add(ids, base)
    queries = np.vstack([anchor, unit(anchor + 1e-3 * rng.standard_normal((3, d)))])
    for k in (5, 26):
        scores, got = index.search(queries, k)
        assert_topk_equal(ids, base, queries, k, scores, got)
    assert index.describe()["fallbacks"] == 0
    tight = ExactIndex(d, ExactConfig(chunk_rows=30000, sketch_from_rows=0, candidate_limit=150))
    tight.add(ids, base)
    scores, got = tight.search(queries, 5)  # the rescan finds 200 candidates: over the limit, so the float32 product
    assert_topk_equal(ids, base, queries, 5, scores, got)
    assert tight.describe()["fallbacks"] == len(queries)


@needs_int8
def test_deleted_rows_are_masked_not_searched_past():
    ids, base, queries = search_data()
    index = ExactIndex(base.shape[1], ExactConfig(chunk_rows=1000, sketch_from_rows=0))
    index.add(ids, base)
    _, top = brute_force_topk(ids, base, queries, 3)
    gone = np.unique(top[:, :2])  # few per chunk: masked, chunks not rebuilt
    assert index.remove(gone) == gone.size
    assert index.describe()["rows"] == len(ids)  # still stored, masked
    keep = ~np.isin(ids, gone)
    scores, got = index.search(queries, 26)
    assert not np.isin(got, gone).any()
    assert_topk_equal(ids[keep], base[keep], queries, 26, scores, got)
    first_chunk = ids[:1000]
    index.remove(first_chunk[:700])  # most of a chunk: rebuilt from its live rows
    assert index.describe()["rows"] < len(ids)
    keep &= ~np.isin(ids, first_chunk[:700])
    scores, got = index.search(queries, 26)
    assert_topk_equal(ids[keep], base[keep], queries, 26, scores, got)
    index.add(first_chunk[:5], base[:5])  # removed ids may come back
    assert np.isin(first_chunk[:5], index.ids()).all()


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_float32_product_in_slices_equals_brute_force_with_deletions(monkeypatch, precision):
    """The float32 product reads a chunk FLOAT32_ROWS rows at a time (here 97, so slices straddle deleted rows and
    chunk ends) and `query_block` queries at a time; with the int8 pass, a candidate limit of 1 sends every query there."""
    if precision == "int8" and not int8_available():
        pytest.skip("torch's fbgemm int8 kernels are not available on this CPU")
    from indexer.vectors import exact

    monkeypatch.setattr(exact, "FLOAT32_ROWS", 97)
    ids, base, queries = clustered(3000, 24, 30, seed=5)
    base = base.astype(np.float16).astype(np.float32)
    config = ExactConfig(precision=precision, chunk_rows=1000, sketch_from_rows=0, candidate_limit=1, query_block=7)
    index = ExactIndex(24, config)
    index.add(ids, base)
    gone = ids[::5]
    index.remove(gone)
    keep = ~np.isin(ids, gone)
    scores, got = index.search(queries, 26)
    assert_topk_equal(ids[keep], base[keep], queries, 26, scores, got)
    assert index.describe()["fallbacks"] == (len(queries) if precision == "int8" else 0)


@needs_int8
def test_removing_everything_leaves_padding():
    ids, base, queries = search_data(n=300)
    index = ExactIndex(base.shape[1], ExactConfig(chunk_rows=100, sketch_from_rows=0))
    index.add(ids, base)
    index.remove(ids[1:])
    scores, got = index.search(queries, 3)
    assert (got[:, 0] == ids[0]).all() and (got[:, 1:] == -1).all() and np.isneginf(scores[:, 1:]).all()


@needs_int8
def test_eight_threads_searching_at_once_equal_serial_results():
    ids, base, queries = search_data(n=6000)
    index = ExactIndex(base.shape[1], ExactConfig(chunk_rows=1500, sketch_from_rows=0))
    index.add(ids, base)
    batches = [queries[i::5] for i in range(5)] + [queries[i : i + 1] for i in range(3)]
    serial = [index.search(b, 10) for b in batches]
    results, errors = {}, []

    def worker(t):
        try:
            for r in range(4):
                j = (t + r) % len(batches)
                results[(t, r)] = (j, index.search(batches[j], 10))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 32
    for j, (scores, got) in results.values():
        assert np.array_equal(scores, serial[j][0]) and np.array_equal(got, serial[j][1])


@needs_int8
def test_search_during_adds_sees_a_whole_state():
    ids, base, queries = search_data(n=3000)
    index = ExactIndex(base.shape[1], ExactConfig(chunk_rows=500, sketch_from_rows=0))
    index.add(ids[:1000], base[:1000])
    stop = threading.Event()
    seen = []

    def searcher():
        while not stop.is_set():
            seen.append(index.search(queries[:4], 5)[1])

    thread = threading.Thread(target=searcher)
    thread.start()
    for part in np.array_split(np.arange(1000, 3000), 8):
        index.add(ids[part], base[part])
    stop.set()
    thread.join()
    assert seen and all((s >= 0).all() for s in seen)
    scores, got = index.search(queries, 5)
    assert_topk_equal(ids, base, queries, 5, scores, got)


SAVER = """
import sys, numpy as np
from indexer.vectors.exact import ExactIndex, ExactConfig
from tests.vectors.conformance import clustered
ids, base, _ = clustered(20000, 64, 1, seed=9)
states = []
for count in (19000, 20000):
    index = ExactIndex(64, ExactConfig(sketch_from_rows=0))
    index.add(ids[:count], base[:count])
    states.append(index)
states[0].save(sys.argv[1])
print("ready", flush=True)
while True:
    for index in states:
        index.save(sys.argv[1])
"""


@pytest.mark.slow
def test_a_killed_save_leaves_a_loadable_index(tmp_path):
    target = tmp_path / "index"
    ids, base, queries = clustered(20000, 64, 5, seed=9)
    for delay in (0.05, 0.2, 0.5, 0.9, 1.3):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        loaded = ExactIndex.load(target)
        count = len(loaded)
        assert count in (19000, 20000)
        scores, got = loaded.search(queries, 10)
        assert_topk_equal(ids[:count], base[:count], queries, 10, scores, got)
    leftovers = sorted(p.name for p in target.iterdir() if p.name.startswith(("ids-", "rows-")))
    assert len(leftovers) <= 6  # old files are dropped by the next save (at most one killed save's worth stays)


def test_corrupt_or_missing_files_are_named(tmp_path):
    ids, base, _ = clustered(500, 16, 1, seed=2)
    index = ExactIndex(16, ExactConfig(precision="float32"))
    index.add(ids, base)
    manifest = index.save(tmp_path)
    rows = tmp_path / manifest["files"]["rows"]["name"]
    data = bytearray(rows.read_bytes())
    data[-3] ^= 0xFF
    rows.write_bytes(bytes(data))
    with pytest.raises(InvalidIndexError, match=rows.name):
        ExactIndex.load(tmp_path)
    rows.unlink()
    with pytest.raises(InvalidIndexError, match=rows.name):
        ExactIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidIndexError, match="manifest.json"):
        ExactIndex.load(tmp_path)


def test_float16_rows_are_stored_as_float16_only_when_lossless():
    ids, base, queries = clustered(400, 16, 3, seed=4)
    index = ExactIndex(16, ExactConfig(precision="float16", chunk_rows=200, sketch_from_rows=0))
    index.add(ids[:200], base[:200].astype(np.float16).astype(np.float32))
    index.add(ids[200:], base[200:])
    assert index.describe()["stored"] == ["float16", "float32"]
    small = ExactIndex(16, ExactConfig(precision="float16", sketch_from_rows=1000))  # searched in float32: kept so
    small.add(ids, base.astype(np.float16).astype(np.float32))
    assert small.describe()["stored"] == ["float32"]
    scores, got = index.search(queries, 5)
    want = np.vstack([base[:200].astype(np.float16).astype(np.float32), base[200:]])
    assert_topk_equal(ids, want, queries, 5, scores, got)


def test_choice_between_faiss_and_exact_is_reported():
    backend, reason = choose_flat_backend(100_000, 512, "cpu")
    assert backend == "faiss" and ("--index-type exact" if int8_available() else "no int8 kernel") in reason
    assert choose_flat_backend(10, 512, "cuda")[0] == "exact"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bogus"):
        ExactIndex(8, ExactConfig(precision="bogus"))
    with pytest.raises(ValueError, match="chunk_rows"):
        ExactIndex(8, ExactConfig(chunk_rows=0))
    with pytest.raises(ValueError, match="query_block"):
        ExactIndex(8, ExactConfig(query_block=0))
    index = ExactIndex(8, ExactConfig(precision="float32"))
    index.add(np.arange(3), unit(np.ones((3, 8))))
    with pytest.raises(ValueError, match="already"):
        index.add(np.arange(2, 4), unit(np.ones((2, 8))))
    with pytest.raises(ValueError, match="k = 0"):
        index.search(unit(np.ones((1, 8))), 0)
