"""FAISS inner-product indexes over unit-norm embeddings: planned from the collection size, GPU when present, searched with exclusions.

Index types (sizes chosen from n vectors of dimension d by `plan_index`):

    flat   exact search (FAISS "Flat"): the default; brute force, right up to a few million vectors.
    flat16 exact search over float16 codes (FAISS "SQfp16"): lossless for a store that keeps
           float16 embeddings (the default), half the memory of flat; on a CPU about twice as fast
           for one query and several times slower for large batches, which flat answers with BLAS
           (benchmarks/bench_index_types.py). CPU only.
    ivf    "IVF{nlist},Flat": nlist = min(4*sqrt(n), n/39) lists (FAISS wants 39+ training points
           per list), nprobe = min(nlist, max(16, nlist/16)) lists visited per query.
    ivfpq  "IVF{nlist},PQ{m}x{nbits}np": the same lists, codes of m sub-quantizers: m the largest of
           64, 48, 32, 16, 8, 4, 2, 1 dividing d and at most d/2 (a size FAISS's GPU kernels
           take), nbits = 8 when n >= 39*256 training points, else floor(log2(n/39)), at least 1;
           no polysemous training ("np": it multiplied training time by 15 and IVF search skips it).
    hnsw   "HNSW32,Flat": 32 links per node, efConstruction 80, efSearch 128; CPU only.

Anything else is read as a FAISS factory string (e.g. "IVF256,SQ8", "OPQ16,IVF64,PQ16"). An
empty collection always gets a flat index. Every index is wrapped in IndexIDMap2, so the ids
it returns are the store's image ids.
"""

import math
import numpy as np

from indexer.errors import FaissUnavailableError, IndexTypeError

INDEX_TYPES = ("flat", "flat16", "ivf", "ivfpq", "hnsw")
_PQ_SIZES = (64, 48, 32, 16, 8, 4, 2, 1)  # bytes per code that FAISS's GPU IVF-PQ supports
_GPU_MAX_K = 2048  # FAISS GPU k-selection limit
_gpu_resources = None  # one StandardGpuResources per process, made on first use


def require_faiss():
    """The `faiss` module, or FaissUnavailableError saying which wheel to install."""
    try:
        import faiss
    except ImportError as exc:
        raise FaissUnavailableError(
            f"FAISS is not installed ({exc}): pip install faiss-cpu, or faiss-gpu on a CUDA machine"
        ) from None
    return faiss


def plan_index(index_type: str, n: int, d: int) -> str:
    """The FAISS factory string for `index_type` ("flat", "ivf", "ivfpq", "hnsw" or a factory string) over n vectors of dimension d."""
    kind = index_type.lower()
    if n == 0 or kind == "flat":
        return "Flat"
    if kind == "flat16":
        return "SQfp16"
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        m = next(size for size in _PQ_SIZES if d % size == 0 and size <= max(1, d // 2))
        nbits = min(8, max(1, int(math.log2(n / 39)))) if n >= 78 else 1
        return f"IVF{nlist},PQ{m}x{nbits}np"
    if kind == "hnsw":
        return "HNSW32,Flat"
    return index_type


def build_index(ids: np.ndarray, embeddings: np.ndarray, index_type: str = "flat"):
    """A trained CPU index holding `embeddings` float32 (n, d) under `ids` int64 (n,), inner-product metric.

    Search settings apply to factory strings too: any IVF gets nprobe = min(nlist, max(16, nlist/16)),
    any HNSW efConstruction 80 and efSearch 128.
    """
    faiss = require_faiss()
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if embeddings.ndim != 2 or ids.shape != (embeddings.shape[0],):
        raise ValueError(f"need embeddings (n, d) and ids (n,), got {embeddings.shape} and {ids.shape}")
    inner = _empty_index(index_type, *embeddings.shape)
    graph = getattr(faiss.downcast_index(inner), "hnsw", None)
    if graph is not None:
        graph.efConstruction, graph.efSearch = 80, 128
    if not inner.is_trained:
        inner.train(embeddings)
    try:
        ivf = faiss.extract_index_ivf(inner)
        ivf.nprobe = min(ivf.nlist, max(16, ivf.nlist // 16))
    except RuntimeError:  # not an IVF index
        pass
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(embeddings, ids)
    return index


def check_index_type(index_type: str, d: int) -> None:
    """Raise IndexTypeError now, before hours of encoding, if `index_type` cannot make an index of dimension d."""
    _empty_index(index_type, 10**6, d)


def _empty_index(index_type: str, n: int, d: int):
    faiss = require_faiss()
    try:
        return faiss.index_factory(d, plan_index(index_type, n, d), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].rsplit(": ", 1)[-1]
        raise IndexTypeError(
            f"index type {index_type!r} is neither one of {', '.join(INDEX_TYPES)} nor a FAISS factory "
            f"string for dimension {d} ({reason})"
        ) from None


def to_gpu(index, device: int = 0):
    """`index` copied to GPU `device` when FAISS sees a GPU, else `index` itself (same results either way).

    Flat and IVF-Flat keep float32 storage: FAISS's float16 flat path measured slower than float32
    on an H100. IVF-PQ uses float16 lookup tables, which its 64-byte codes need on the GPU.
    Types without a GPU version (HNSW) stay on the CPU.
    """
    global _gpu_resources
    faiss = require_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = isinstance(faiss.downcast_index(_inner(index)), faiss.IndexIVFPQ)
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources, device, index, options)
    except RuntimeError:  # no GPU implementation of this index type
        return index


def search(index, queries: np.ndarray, k: int, exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries float32 (B, d): (scores float32 (B, k), ids int64 (B, k)), best first.

    Ids in `exclude_ids` never appear: the index is searched deeper until k others are found or it
    runs out. Missing results are padded with score -inf and id -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be (B, {index.d}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    exclude = np.unique(np.asarray([] if exclude_ids is None else list(exclude_ids), dtype=np.int64))
    cap = min(index.ntotal, _GPU_MAX_K) if _on_gpu(index) else index.ntotal
    depth = min(k + exclude.size, cap)
    while True:
        scores, ids = index.search(queries, depth) if depth else _empty(len(queries), k)
        keep = (ids >= 0) & ~np.isin(ids, exclude)
        if depth >= cap or keep.sum(axis=1).min() >= k:
            break
        depth = min(2 * depth, cap)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept results first, in rank order
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    kept = np.take_along_axis(keep, order, axis=1)
    scores[~kept], ids[~kept] = -np.inf, -1
    if scores.shape[1] < k:
        pad_scores, pad_ids = _empty(len(queries), k - scores.shape[1])
        scores, ids = np.hstack([scores, pad_scores]), np.hstack([ids, pad_ids])
    return scores.astype(np.float32), ids.astype(np.int64)


def _empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf, dtype=np.float32), np.full((rows, k), -1, dtype=np.int64)


def _inner(index):
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    return index.index if isinstance(index, faiss.IndexIDMap) else index


def _on_gpu(index) -> bool:
    return "Gpu" in type(require_faiss().downcast_index(_inner(index))).__name__
