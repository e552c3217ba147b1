"""The Milvus implementation of the vector-index interface: one Milvus collection per clipbt collection, in a milvus-lite file or on a Milvus server or cluster.

Where the vectors live (`MilvusConfig.uri`):

    /path/vectors.db         milvus-lite: an embedded Milvus in this process (a folder, whatever the
                             suffix). Only ONE process may open it (it holds a lock); to share it
                             between processes (several `clipbt serve`), run its server and give
                             that URI instead:
                                 milvus-lite server --data-dir /path/vectors.db --host 127.0.0.1 --port 19530
                             (also `python -m milvus_lite server ...`; without --host it binds 0.0.0.0).
    http(s)://host:port      a Milvus standalone server or cluster. Credentials: a token (for
                             user/password, "user:password") from the caller or CLIPBT_MILVUS_TOKEN,
                             never in the URI (refused), never written to disk, logs or describe().

Schema: `id` INT64 primary key = the clipbt image id, `embedding` FLOAT_VECTOR(dim); inner-product
metric on unit vectors; strong consistency, so a search sees every insert and delete before it.

Index types (by name; parameters planned by `plan_index` from dim and the expected collection size n):

    flat             FLAT: exact brute force (float32 scores).
    hnsw             HNSW: M = 32 links per node, efConstruction = 80, ef = max(128, k) at search:
                     the settings of FAISS's "hnsw" in indexer.vectors.faiss.
    ivf              IVF_FLAT: nlist = min(4*sqrt(n), n/39) lists, at least 1; nprobe =
                     min(nlist, max(16, nlist/16)) lists visited per query (FAISS's "ivf" plan).
                     Milvus builds the index per segment (milvus-lite: per flushed file, at most
                     100,000 rows), and milvus-lite lowers nlist to a segment's row count.
    GPU_CAGRA        passed through, for clusters with GPU query nodes: intermediate_graph_degree 64,
                     graph_degree 32, itopk_size = max(128, k); at most 1,024 results per query.
    GPU_IVF_FLAT     nlist and nprobe as ivf.
    GPU_IVF_PQ       nlist and nprobe as ivf, m = the largest of 64, 48, ..., 1 dividing dim and at
                     most dim/2, nbits 8; at most 1,024 results per query.
    GPU_BRUTE_FORCE  exact, on the GPU.

milvus-lite has no GPU types (and accepts them silently), so they are refused for a .db URI. GPU
indexes hold the whole collection in GPU memory and take inner product on normalised vectors only.

Inserts are sent in batches of `MilvusConfig.batch` rows, then flushed once: without the flush
milvus-lite answers every search by scanning unindexed rows. Even after it, Milvus (and milvus-lite,
in a background thread) builds the index of new segments asynchronously, scanning them meanwhile;
`wait_for_index` blocks until it is built. A crash can leave the collection
out of step with the SQL store (the source of truth for which images exist): `repair` upserts the
missing ids and deletes the extra ones on the next open (`indexer.vectors.collection.open_milvus`).
"""

import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from indexer.errors import IndexTypeError, MilvusError
from indexer.vectors.base import VectorIndex, check_added
from indexer.vectors.faiss import write_atomic
from storage.errors import InvalidIndexError

TOKEN_ENV = "CLIPBT_MILVUS_TOKEN"
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
GPU_INDEX_TYPES = ("GPU_CAGRA", "GPU_IVF_FLAT", "GPU_IVF_PQ", "GPU_BRUTE_FORCE")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PK, VECTOR = "id", "embedding"  # the collection's two fields
MAX_K = 16384  # Milvus's limit on results per query (topk)
_GPU_MAX_K = {"GPU_CAGRA": 1024, "GPU_IVF_PQ": 1024}
_PQ_SIZES = (64, 48, 32, 16, 8, 4, 2, 1)
_FILTER_IDS = 5000  # ids per `id in [...]` expression
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


@dataclass(frozen=True)
class IndexPlan:
    """A Milvus index type with its build and search parameters."""

    milvus_type: str  # FLAT, HNSW, IVF_FLAT, GPU_CAGRA, ...
    build: dict  # index parameters, fixed when the collection is created
    search: dict  # search parameters; "ef" and "itopk_size" are raised to k at search time
    exact: bool  # results equal a float32 brute-force top-k, ties allowed


def plan_index(index_type: str, dim: int, expected_count: int) -> IndexPlan:
    """The Milvus index for `index_type` ("flat", "hnsw", "ivf" or a GPU type) over about `expected_count` vectors of dimension `dim`."""
    name = INDEX_TYPES.get(index_type.lower(), index_type.upper())
    n = max(1, expected_count)
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    nprobe = nprobe_for(nlist)
    if name == "FLAT":
        return IndexPlan(name, {}, {}, True)
    if name == "HNSW":
        return IndexPlan(name, {"M": 32, "efConstruction": 80}, {"ef": 128}, False)
    if name in ("IVF_FLAT", "GPU_IVF_FLAT"):
        return IndexPlan(name, {"nlist": nlist}, {"nprobe": nprobe}, False)
    if name == "GPU_IVF_PQ":
        m = next(size for size in _PQ_SIZES if dim % size == 0 and size <= max(1, dim // 2))
        return IndexPlan(name, {"nlist": nlist, "m": m, "nbits": 8}, {"nprobe": nprobe}, False)
    if name == "GPU_CAGRA":
        return IndexPlan(name, {"intermediate_graph_degree": 64, "graph_degree": 32}, {"itopk_size": 128}, False)
    if name == "GPU_BRUTE_FORCE":
        return IndexPlan(name, {}, {}, True)
    raise IndexTypeError(
        f"unknown Milvus index type {index_type!r}: use one of {', '.join(INDEX_TYPES)} or {', '.join(GPU_INDEX_TYPES)}"
    )


def nprobe_for(nlist: int) -> int:
    """IVF lists visited per query for an index of `nlist` lists (FAISS's "ivf" plan)."""
    return min(nlist, max(16, nlist // 16))


def without_credentials(uri: str) -> str:
    """`uri` without a user:password@ part: what may be shown."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_lite(uri: str) -> bool:
    """Whether `uri` names a milvus-lite file rather than a server."""
    return urlsplit(uri).scheme not in ("http", "https")


@dataclass(frozen=True)
class MilvusConfig:
    """Where a collection's vectors live in Milvus and how they are indexed; never holds credentials."""

    uri: str  # a milvus-lite path ending in .db (stored absolute), or http(s)://host:port of a server, without credentials
    collection: str  # the Milvus collection: letters, digits and underscores, not starting with a digit
    dim: int  # embedding dimension
    index_type: str = "flat"  # flat, hnsw, ivf, or a Milvus GPU type (see the module docstring)
    expected_count: int = 1_000_000  # the collection size IVF lists are planned for
    batch: int = 5000  # rows per insert call (5000 x 512 float32 = 10 MB, under gRPC's 64 MB limit)
    timeout: float = 10.0  # seconds to wait for the connection
    plan: IndexPlan = field(init=False, repr=False)

    def __post_init__(self):
        uri = without_credentials(self.uri)
        if uri != self.uri:
            raise MilvusError(
                f"Milvus URI {uri} carries credentials: give them as the token (--milvus-token or {TOKEN_ENV}) "
                "so that they are never stored"
            )
        if is_lite(uri):
            if not uri.endswith(".db"):
                raise MilvusError(
                    f"Milvus URI {uri!r} is neither http(s)://host:port nor a milvus-lite path ending in .db "
                    f"(e.g. {uri.rstrip('/')}.db)"
                )
            uri = str(Path(uri).expanduser().resolve())
        object.__setattr__(self, "uri", uri)
        if not _NAME.fullmatch(self.collection):
            raise MilvusError(
                f"Milvus collection name {self.collection!r} is invalid: use letters, digits and underscores, "
                "not starting with a digit, at most 255 characters"
            )
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        plan = plan_index(self.index_type, self.dim, self.expected_count)
        if plan.milvus_type in GPU_INDEX_TYPES and is_lite(uri):
            raise IndexTypeError(
                f"index type {plan.milvus_type} needs a Milvus cluster with GPU query nodes, not the milvus-lite "
                f"file {uri}: use {', '.join(INDEX_TYPES)}, or an http(s):// URI"
            )
        object.__setattr__(self, "plan", plan)

    def manifest(self) -> dict:
        """What `save` records: enough to reconnect, no credentials."""
        return {
            "uri": self.uri,
            "collection": self.collection,
            "dim": self.dim,
            "index_type": self.index_type,
            "expected_count": self.expected_count,
        }


def require_pymilvus():
    """The `pymilvus` module, or MilvusError with the pip command."""
    try:
        import pymilvus
    except ImportError as exc:
        raise MilvusError(f"the Milvus client is not installed ({exc}): pip install 'clipbt[milvus]'") from None
    # pymilvus logs every failed call with its traceback before raising, and milvus-lite logs a
    # failed start the same way; clipbt raises MilvusError with the reason instead.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("milvus_lite.server_manager").setLevel(logging.CRITICAL)
    return pymilvus


class MilvusIndex(VectorIndex):
    """One Milvus collection as a VectorIndex; ids are image ids.

    `create=True` makes the collection when it does not exist; an existing one must have the
    configured dimension and index type. Searches may run from many threads; add and remove take a lock.
    """

    def __init__(self, config: MilvusConfig, token: str | None = None, create: bool = True):
        self.config = config
        self.dim = config.dim
        self.kind = f"milvus:{config.plan.milvus_type}"
        self.exact = config.plan.exact
        self.search_params = dict(config.plan.search)  # an existing IVF collection's: from its own nlist
        self._lock = threading.Lock()
        self._client = _connect(config, token)
        name = config.collection
        with self._errors():
            exists = self._client.has_collection(name)
            if exists:
                self._check_existing()
            elif create:
                self._create()
            else:
                raise InvalidIndexError(
                    f"Milvus collection {name!r} does not exist at {config.uri}: it was dropped or the URI "
                    "points elsewhere; rebuild the index"
                )
            self._client.load_collection(name)

    def _create(self) -> None:
        pymilvus = require_pymilvus()
        client, cfg = self._client, self.config
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(PK, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=cfg.dim)
        params = client.prepare_index_params()
        build = cfg.plan.build
        if is_lite(cfg.uri):  # milvus-lite 3.2 reads index parameters only as one JSON "params" entry,
            build = {"params": build}  # while pymilvus 3 sends each as its own entry, as servers read them
        params.add_index(field_name=VECTOR, index_type=cfg.plan.milvus_type, metric_type="IP", params=build)
        client.create_collection(cfg.collection, schema=schema, index_params=params, consistency_level="Strong")

    def _check_existing(self) -> None:
        cfg = self.config
        fields = {f["name"]: f for f in self._client.describe_collection(cfg.collection)["fields"]}
        dim = fields.get(VECTOR, {}).get("params", {}).get("dim")
        index = self._client.describe_index(cfg.collection, VECTOR) if VECTOR in fields else {}
        found = (PK in fields, dim, index.get("index_type"), index.get("metric_type"))
        if found != (True, cfg.dim, cfg.plan.milvus_type, "IP"):
            raise MilvusError(
                f"Milvus collection {cfg.collection!r} at {cfg.uri} exists with another layout "
                f"(id field {found[0]}, dim {found[1]}, index {found[2]}, metric {found[3]}); asked for dim {cfg.dim}, "
                f"index {cfg.plan.milvus_type}, metric IP: choose another collection name or drop it"
            )
        nlist = (index.get("params") or index).get("nlist")  # milvus-lite nests the parameters, servers do not
        if "nprobe" in self.search_params and nlist is not None:  # planned for the size when it was created
            self.search_params["nprobe"] = nprobe_for(int(nlist))

    @contextmanager
    def _errors(self):
        """Turn the client's exceptions into MilvusError naming the URI (never a credential)."""
        pymilvus = require_pymilvus()
        try:
            yield
        except pymilvus.exceptions.MilvusException as exc:
            raise MilvusError(
                f"Milvus at {self.config.uri}, collection {self.config.collection!r}: {exc.message or exc}"
            ) from None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = check_added(ids, vectors, self.dim)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"ids repeat within the batch: {unique[counts > 1][:5].tolist()}")
        name, batch = self.config.collection, self.config.batch
        with self._lock, self._errors():
            clash = self._present(ids)
            if clash.size:
                raise ValueError(f"ids already in the index: {clash[:5].tolist()}")
            for start in range(0, len(ids), batch):
                rows = [
                    {PK: int(i), VECTOR: v} for i, v in zip(ids[start : start + batch], vectors[start : start + batch])
                ]
                self._client.insert(name, rows)
            if len(ids):
                self._client.flush(name)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, flush: bool = True) -> None:
        """Insert or replace rows by id, in batches, then flush (unless `flush` is False: the caller
        flushes once after its last call): what `repair` writes, so that two processes repairing at
        once (an indexer and a starting replica) leave one row per id."""
        ids, vectors = check_added(ids, vectors, self.dim)
        if np.unique(ids).size != ids.size:
            raise ValueError("ids repeat within the batch")
        name, batch = self.config.collection, self.config.batch
        with self._lock, self._errors():
            for start in range(0, len(ids), batch):
                rows = [
                    {PK: int(i), VECTOR: v} for i, v in zip(ids[start : start + batch], vectors[start : start + batch])
                ]
                self._client.upsert(name, rows)
            if len(ids) and flush:
                self._client.flush(name)

    def flush(self) -> None:
        """Seal what was written, so that searches use the index instead of scanning it."""
        with self._lock, self._errors():
            self._client.flush(self.config.collection)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock, self._errors():
            present = self._present(ids)
            for start in range(0, present.size, _FILTER_IDS):
                self._client.delete(self.config.collection, ids=present[start : start + _FILTER_IDS].tolist())
            return int(present.size)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the collection holds, int64 ascending."""
        found = []
        for start in range(0, ids.size, _FILTER_IDS):
            chunk = ids[start : start + _FILTER_IDS].tolist()
            rows = self._client.query(
                self.config.collection, filter=f"{PK} in {chunk}", output_fields=[PK], consistency_level="Strong"
            )
            found.extend(row[PK] for row in rows)
        return np.unique(np.asarray(found, dtype=np.int64))

    def ids(self) -> np.ndarray:
        found = []
        with self._errors():
            pages = self._client.query_iterator(
                self.config.collection, batch_size=MAX_K, filter="", output_fields=[PK], consistency_level="Strong"
            )
            try:
                while page := pages.next():
                    found.extend(row[PK] for row in page)
            finally:
                pages.close()
        return np.unique(np.asarray(found, dtype=np.int64))

    def __len__(self) -> int:
        with self._errors():
            rows = self._client.query(
                self.config.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
            )
        return int(rows[0]["count(*)"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {queries.shape}")
        plan = self.config.plan
        cap = _GPU_MAX_K.get(plan.milvus_type, MAX_K)
        if not 1 <= k <= cap:
            raise ValueError(f"k must be between 1 and {cap} for Milvus {plan.milvus_type}, got {k}")
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        if not len(queries):
            return scores, found
        params = {
            key: max(value, k) if key in ("ef", "itopk_size") else value for key, value in self.search_params.items()
        }
        with self._errors():
            result = self._client.search(
                self.config.collection,
                data=queries,
                limit=k,
                anns_field=VECTOR,
                output_fields=[PK],  # an empty list would return the vectors too
                search_params={"metric_type": "IP", "params": params},
                consistency_level="Strong",
            )
        for row, hits in enumerate(result):
            n = len(hits.ids)
            found[row, :n] = hits.ids
            scores[row, :n] = hits.distances
        return scores, found

    def describe(self) -> dict:
        cfg = self.config
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "device": "milvus-lite" if is_lite(cfg.uri) else "milvus server",
            "uri": cfg.uri,
            "collection": cfg.collection,
            "index_type": cfg.index_type,
            "index_params": cfg.plan.build,
            "search_params": self.search_params,
            "exact": self.exact,
        }

    def wait_for_index(self, timeout: float = 3600.0) -> None:
        """Block until every flushed row is indexed, so that searches use the index instead of scanning
        (after a bulk load; benchmarks). Searches are correct either way."""
        name = self.config.collection
        with self._errors():
            if is_lite(self.config.uri):
                # milvus-lite indexes new segments in a background thread after a flush and always
                # reports its indexes finished; loading a collection builds the missing ones now.
                self._client.release_collection(name)
                self._client.load_collection(name)
                return
            deadline = time.monotonic() + timeout
            while self._client.describe_index(name, VECTOR).get("pending_index_rows", 0) > 0:
                if time.monotonic() > deadline:
                    raise MilvusError(
                        f"Milvus at {self.config.uri} did not index collection {name!r} in {timeout:.0f} s"
                    )
                time.sleep(1.0)

    def drop(self) -> None:
        """Delete the Milvus collection and its vectors (before a rebuild); this object is unusable after."""
        with self._lock, self._errors():
            self._client.drop_collection(self.config.collection)

    def drop_others(self, prefix: str) -> None:
        """Delete the Milvus collections whose names start with `prefix`, except this one (what a
        change of index type left behind)."""
        with self._lock, self._errors():
            for other in self._client.list_collections():
                if other.startswith(prefix) and other != self.config.collection:
                    self._client.drop_collection(other)

    def save(self, directory: Path) -> dict:
        """Flush, then record where the collection lives in `directory`/manifest.json (no credentials)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.flush()
        manifest = {
            "format": MANIFEST_FORMAT,
            "backend": "milvus",
            **self.config.manifest(),
            "count": len(self),
            "saved_at": datetime.now(UTC).isoformat(),
        }
        write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
        return manifest

    @classmethod
    def load(cls, directory: Path, token: str | None = None) -> "MilvusIndex":
        """Reconnect to the collection `save` recorded; the token from `token` or CLIPBT_MILVUS_TOKEN."""
        path = Path(directory) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InvalidIndexError(f"index manifest {path} is missing or unreadable") from None
        keys = ("uri", "collection", "dim", "index_type", "expected_count")
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("backend") != "milvus"
        ):
            raise InvalidIndexError(f"index manifest {path} is not a Milvus manifest of format {MANIFEST_FORMAT}")
        if any(key not in manifest for key in keys):
            raise InvalidIndexError(f"index manifest {path} lacks one of {', '.join(keys)}")
        config = MilvusConfig(**{key: manifest[key] for key in keys})
        return cls(config, token or os.environ.get(TOKEN_ENV), create=False)


@dataclass(frozen=True)
class RepairReport:
    """What `repair` changed."""

    added: int  # live ids the index lacked, now inserted
    removed: int  # ids the index held that are not live, now deleted


def repair(
    index: MilvusIndex, live_ids: np.ndarray, embeddings_for: Callable[[np.ndarray], np.ndarray], batch: int = 50_000
) -> RepairReport:
    """Make `index` hold exactly `live_ids` (the SQL store's, the source of truth): delete the extra
    ids, upsert the missing ones with `embeddings_for(ids)` -> float32 (len(ids), d), `batch` ids at a
    time, ascending (the order of `Store.embeddings(collection, ids)`), flushed once at the end.
    Upserts, not inserts: a concurrent repair of the same ids leaves one row each."""
    live_ids = np.unique(np.asarray(live_ids, dtype=np.int64))
    present = index.ids()
    removed = index.remove(np.setdiff1d(present, live_ids))
    missing = np.setdiff1d(live_ids, present)
    for start in range(0, missing.size, batch):
        chunk = missing[start : start + batch]
        index.upsert(chunk, embeddings_for(chunk), flush=False)
    if missing.size:
        index.flush()
    return RepairReport(added=int(missing.size), removed=removed)


def _connect(config: MilvusConfig, token: str | None):
    """A MilvusClient for `config.uri`, or MilvusError saying why not and what to do."""
    pymilvus = require_pymilvus()
    uri = config.uri
    if is_lite(uri):
        if not Path(uri).parent.is_dir():
            raise MilvusError(f"cannot create the milvus-lite file {uri}: folder {Path(uri).parent} does not exist")
        # milvus-lite's in-process server lacks AllocTimestamp, which query_iterator (ids()) asks for
        # first before falling back to a client-side timestamp; grpc would log each call as an error.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        return pymilvus.MilvusClient(uri=uri, token=token or "", timeout=config.timeout)
    except pymilvus.exceptions.MilvusException as exc:
        if is_lite(uri) and _locked_elsewhere(uri):
            raise MilvusError(
                f"the milvus-lite file {uri} is open in another process, and only one may open it. "
                f"To share it, run `milvus-lite server --data-dir {uri} --host 127.0.0.1 --port 19530` "
                "and use http://127.0.0.1:19530 as the Milvus URI"
            ) from None
        if is_lite(uri):
            raise MilvusError(f"cannot open the milvus-lite file {uri}: {exc.message or exc}") from None
        raise MilvusError(
            f"cannot reach Milvus at {uri} ({exc.message or type(exc).__name__}): is the server running, "
            f"and the URI and token ({TOKEN_ENV}) right?"
        ) from None


def _locked_elsewhere(path: str) -> bool:
    """Whether another process holds milvus-lite's lock on the data folder `path` (its LOCK file, flock)."""
    lock = Path(path) / "LOCK"
    if not lock.is_file():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
