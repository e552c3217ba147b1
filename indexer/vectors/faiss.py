"""The FAISS implementation of the vector-index interface: index types planned from the collection size, GPU placement, atomic index files.

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

Removed ids: flat, flat16, IVF and PQ indexes drop them (`remove_ids`); HNSW cannot, so it keeps
them and excludes them in the search itself (an `IDSelector` in the search parameters). A GPU
index, which takes neither, is searched deeper until k other ids are found.

Files: `save` writes the index to a temporary file, fsyncs it, renames it to
`index-<sha256 prefix>.faiss`, then atomically replaces `manifest.json` (count, id range, sha256
of the id set, file checksum): the manifest is the commit point, so a killed save leaves the
previous index loadable. Temporary files of a killed save are removed by the next save.
"""

import functools
import hashlib
import json
import math
import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from indexer.errors import FaissUnavailableError, IndexTypeError
from indexer.vectors.base import VectorIndex, check_added
from storage.errors import InvalidIndexError, disk_full_error

INDEX_TYPES = ("flat", "flat16", "ivf", "ivfpq", "hnsw")
_PQ_SIZES = (64, 48, 32, 16, 8, 4, 2, 1)  # bytes per code that FAISS's GPU IVF-PQ supports
_GPU_MAX_K = 2048  # FAISS GPU k-selection limit
_gpu_resources = None  # one StandardGpuResources per process, made on first use
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2


# Query batches at least this large are scored by one BLAS product per block of the collection; smaller
# ones by a scan per query. faiss-cpu 1.15 ships a default so high that a batch of 64 is 64 scans
# (benchmarks/bench_serve.py), so the service's micro-batches cost as much as their queries one by one.
BLAS_FROM_QUERIES = 20


def require_faiss():
    """The `faiss` module, or FaissUnavailableError saying which wheel to install."""
    try:
        import faiss
    except ImportError as exc:
        raise FaissUnavailableError(
            f"FAISS is not installed ({exc}): pip install faiss-cpu, or faiss-gpu on a CUDA machine"
        ) from None
    _configure(faiss)
    return faiss


@functools.cache
def _configure(faiss) -> None:
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES


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


class FaissIndex(VectorIndex):
    """A FAISS index whose ids are image ids (IndexIDMap2), on the GPU when FAISS sees one.

    Searches may run from many threads at once; add and remove take a lock.
    """

    def __init__(self, index, index_type: str = "flat", excluded=(), gpu: bool = True):
        if index_ids(index) is None:
            raise InvalidIndexError(
                f"a {type(index).__name__} does not carry image ids; wrap it in faiss.IndexIDMap2 "
                "and add_with_ids(vectors, image_ids)"
            )
        self.cpu = index  # the CPU index: what is saved, and what add/remove change
        self.index_type = index_type
        self.dim = int(index.d)
        self.kind = f"faiss:{index_type}"
        self.exact = plan_index(index_type, 1, self.dim) == "Flat"
        self._gpu = gpu
        self._excluded = np.unique(np.asarray(list(excluded), dtype=np.int64))
        self._lock = threading.Lock()
        self._place()

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, index_type: str = "flat", gpu: bool = True) -> "FaissIndex":
        """An index of `index_type` trained on and holding vectors (n, d) under ids (n,)."""
        return cls(build_index(ids, vectors, index_type), index_type, gpu=gpu)

    @classmethod
    def empty(cls, dim: int, index_type: str = "flat", gpu: bool = True) -> "FaissIndex":
        """An empty index; a type that needs training is trained on the first vectors added."""
        faiss = require_faiss()
        return cls(faiss.IndexIDMap2(_empty_index(index_type, 0, dim)), index_type, gpu=gpu)

    def _place(self) -> None:
        self.index = to_gpu(self.cpu) if self._gpu else self.cpu
        self.on_gpu = self.index is not self.cpu

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = check_added(ids, vectors, self.dim)
        with self._lock:
            clash = np.intersect1d(ids, self.ids())
            if clash.size:
                raise ValueError(f"ids already in the index: {clash[:5].tolist()}")
            if self.cpu.ntotal == 0 and self.index_type != "flat":
                self.cpu = build_index(ids, vectors, self.index_type)  # planned and trained for this size
            else:
                self.cpu.add_with_ids(vectors, ids)
            self._excluded = np.setdiff1d(self._excluded, ids)
            self._place()

    def remove(self, ids: np.ndarray) -> int:
        faiss = require_faiss()
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock:
            present = np.setdiff1d(np.intersect1d(ids, index_ids(self.cpu)), self._excluded)
            if not present.size:
                return 0
            if isinstance(faiss.downcast_index(_inner(self.cpu)), faiss.IndexFlatCodes):
                self.cpu.remove_ids(faiss.IDSelectorBatch(present))
            else:  # IVF renumbers on removal under IndexIDMap2, HNSW cannot remove: excluded at search time
                self._excluded = np.union1d(self._excluded, present)
            self._place()
            return int(present.size)

    def ids(self) -> np.ndarray:
        return np.setdiff1d(index_ids(self.cpu), self._excluded)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        require_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        index, excluded = self.index, self._excluded
        if index.ntotal == 0:
            return _padding(len(queries), k)
        if excluded.size and not self.on_gpu:
            scores, ids = index.search(queries, min(k, index.ntotal), params=self._excluding(excluded))
        else:
            scores, ids = _search_deeper(index, queries, min(k, index.ntotal), excluded)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if scores.shape[1] < k:
            pad_scores, pad_ids = _padding(len(queries), k - scores.shape[1])
            scores, ids = np.hstack([scores, pad_scores]), np.hstack([ids, pad_ids])
        return scores, ids.astype(np.int64)

    def _excluding(self, excluded: np.ndarray):
        """Search parameters of this index's type that skip the `excluded` ids."""
        faiss = require_faiss()
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
        inner = faiss.downcast_index(_inner(self.cpu))
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
        elif hasattr(inner, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=selector)
        params.keep_alive = selector  # the parameters only point at it
        return params

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": int(self.ids().size),
            "device": "gpu" if self.on_gpu else "cpu",
            "factory": plan_index(self.index_type, max(1, self.cpu.ntotal), self.dim),
        }

    def save(self, directory: Path) -> dict:
        faiss = require_faiss()
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, FileLock(str(directory / ".lock")):
            for stale in directory.glob(".tmp-*"):  # left by a killed save
                stale.unlink(missing_ok=True)
            ids = np.sort(index_ids(self.cpu))
            manifest = {
                "format": MANIFEST_FORMAT,
                "backend": "faiss",
                "index_type": self.index_type,
                "dim": self.dim,
                "count": int(ids.size),
                "min_id": int(ids[0]) if ids.size else None,
                "max_id": int(ids[-1]) if ids.size else None,
                "ids_sha256": ids_digest(ids),
                "excluded": self._excluded.tolist(),
                "saved_at": datetime.now(UTC).isoformat(),
            }
            tmp = directory / f".tmp-{uuid.uuid4().hex}.faiss"
            try:
                faiss.write_index(self.cpu, str(tmp))
                digest, size = _fsync_and_hash(tmp)
                name = f"index-{digest[:16]}.faiss"
                os.replace(tmp, directory / name)
                manifest.update(file=name, file_sha256=digest, file_size=size)
                write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
            except (OSError, RuntimeError) as exc:  # FAISS reports a failed write as RuntimeError
                full = disk_full_error(exc, directory)
                if full is None:
                    raise
                raise full from None
            finally:
                tmp.unlink(missing_ok=True)
            for old in directory.glob("index-*.faiss"):
                if old.name != manifest["file"]:
                    old.unlink(missing_ok=True)
        return manifest

    def copy(self) -> "FaissIndex":
        """An independent copy (on the CPU, placed like this one): changed while this one is searched."""
        faiss = require_faiss()
        with self._lock:
            return FaissIndex(faiss.clone_index(self.cpu), self.index_type, self._excluded, gpu=self._gpu)

    @classmethod
    def load(cls, directory: Path, gpu: bool = True) -> "FaissIndex":
        faiss = require_faiss()
        directory = Path(directory)
        _remove_stale_temporaries(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InvalidIndexError(f"index manifest {path} is missing or unreadable") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise InvalidIndexError(f"index manifest {path} is unreadable or of another format")
        file = manifest.get("file")
        if not isinstance(file, str) or Path(file).name != file:
            raise InvalidIndexError(f"index manifest {path} names no index file")
        path = directory / file
        try:
            digest, size = _fsync_and_hash(path, sync=False)
        except OSError as exc:
            raise InvalidIndexError(f"index file {path} is unreadable: {exc}") from None
        if (digest, size) != (manifest.get("file_sha256"), manifest.get("file_size")):
            raise InvalidIndexError(f"index file {path} is corrupt: its checksum differs from the manifest")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise InvalidIndexError(f"index file {path} cannot be read by FAISS: {exc}") from None
        ids = index_ids(index)
        if ids is None or ids.size != manifest.get("count") or ids_digest(np.sort(ids)) != manifest.get("ids_sha256"):
            raise InvalidIndexError(f"index file {path} holds other ids than its manifest lists")
        return cls(index, manifest.get("index_type", "flat"), manifest.get("excluded", ()), gpu=gpu)


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove `.tmp-*` files a killed save left in `directory`, unless a save is running now (it
    holds the folder's lock and its own temporary file)."""
    if not any(directory.glob(".tmp-*")):
        return
    try:
        with FileLock(str(directory / ".lock"), timeout=0):
            for stale in directory.glob(".tmp-*"):
                stale.unlink(missing_ok=True)
    except (Timeout, OSError):  # a save in progress, or a read-only folder: leave them for later
        pass


def _search_deeper(index, queries: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k without the `exclude` ids from an index that cannot filter (GPU): searched deeper until
    k others are found or it runs out; missing results are -inf / -1."""
    cap = min(index.ntotal, _GPU_MAX_K) if _on_gpu(index) else index.ntotal
    depth = min(k + exclude.size, cap)
    while True:
        scores, ids = index.search(queries, depth)
        keep = (ids >= 0) & ~np.isin(ids, exclude)
        if depth >= cap or keep.sum(axis=1).min() >= k:
            break
        depth = min(2 * depth, cap)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept results first, in rank order
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    kept = np.take_along_axis(keep, order, axis=1)
    scores[~kept], ids[~kept] = -np.inf, -1
    return scores, ids


def _padding(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf, dtype=np.float32), np.full((rows, k), -1, dtype=np.int64)


def _inner(index):
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    return index.index if isinstance(index, faiss.IndexIDMap) else index


def _on_gpu(index) -> bool:
    return "Gpu" in type(require_faiss().downcast_index(_inner(index))).__name__


def index_ids(index) -> np.ndarray | None:
    """The ids (int64, storage order) an index returns for its vectors, or None when it only
    has positions (a bare IndexFlat, HNSW, ...)."""
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        parts = []
        for list_no in range(lists.nlist):
            n = lists.list_size(list_no)
            if n:
                ptr = lists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, n).copy())
                lists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
    return None


def ids_digest(sorted_ids: np.ndarray) -> str:
    """sha256 of ascending int64 ids, little-endian: the manifest's checksum of the id set."""
    return hashlib.sha256(np.ascontiguousarray(sorted_ids, dtype="<i8").tobytes()).hexdigest()


def _fsync_and_hash(path: Path, sync: bool = True) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably: temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
