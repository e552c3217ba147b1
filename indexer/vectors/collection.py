"""The vector index of a stored collection: built from the store's embeddings, saved beside it, checked against SQL on load, kept current as images come and go.

The SQL store is the source of truth for which images exist. A collection's folder
(`Store.collection_index_dir`) holds the backend's own files and `collection.json`, written after
them, naming the backend and what the index was built for (collection, model, checkpoint, dim,
index type). `load` returns None with a `reason` when either is missing or damaged, the model
differs, a live image is missing or an unknown id is present; `open_index` then rebuilds from
SQL and logs why. Deleted images the saved index still holds are removed from it on load.

A collection whose vectors live in Milvus (`Collection.vector_backend` "milvus", recorded in SQL
with its URI and index type by `use_backend`) has no local files: every process on every machine
opens the Milvus collection named by `milvus_config`, and reconciles it with SQL on open
(`open_index`) and after each indexing run (`refresh`): ids live in SQL but missing from Milvus
are upserted in batches and flushed, ids Milvus holds that are not live in SQL are deleted. So a
process killed between its SQL commit and its Milvus write is repaired by the next one that opens
the collection. The credential comes from the caller or $CLIPBT_MILVUS_TOKEN, never from SQL.
"""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from indexer.errors import MilvusError
from indexer.vectors.base import VectorIndex
from indexer.vectors.faiss import plan_index
from storage import Collection, Store
from storage.errors import DiskFullError, InvalidIndexError, disk_full_error

log = logging.getLogger(__name__)

IDENTITY = "collection.json"
_IDENTITY_KEYS = ("collection_id", "model", "pretrained", "dim")
EXACT = "exact"  # the index type of clipbt's exact kernel (`indexer.vectors.exact.ExactIndex`)
MILVUS = "milvus"  # the vector backend of a collection kept in Milvus (`indexer.vectors.milvus`)
BACKENDS = ("faiss", MILVUS)  # what `clipbt index --backend` takes; "faiss" covers --index-type exact too
_REUSE_LIMIT = 0.1  # a saved index is extended (not rebuilt) while added or deleted ids stay under this share


@dataclass(frozen=True)
class IndexExpectation:
    """What a collection's index must hold, computed from SQL by `IndexFiles.expected()`."""

    collection_id: int
    model: str
    pretrained: str
    dim: int
    live_ids: np.ndarray  # int64 ascending: every one must be in the index
    deleted_ids: np.ndarray  # int64 ascending: may still be in the saved index, removed on load


def backend_class(name: str) -> type[VectorIndex]:
    """The VectorIndex implementation saved under a backend name."""
    if name == "faiss":
        from indexer.vectors.faiss import FaissIndex

        return FaissIndex
    if name == "exact":
        from indexer.vectors.exact import ExactIndex

        return ExactIndex
    if name == MILVUS:
        from indexer.vectors.milvus import MilvusIndex

        return MilvusIndex
    raise InvalidIndexError(f"unknown vector backend {name!r}")


@dataclass(frozen=True)
class VectorBackend:
    """Where `clipbt index` and `import-embeddings` put a collection's vectors."""

    name: str = "faiss"  # "faiss": index files in the data home (FAISS, or --index-type exact); "milvus"
    uri: str | None = None  # milvus: a milvus-lite path ending in .db, or http(s)://host:port
    token: str | None = field(default=None, repr=False)  # Milvus credential ("user:password" or a token); never stored

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise MilvusError(f"unknown vector backend {self.name!r}: use one of {', '.join(BACKENDS)}")
        if self.name == MILVUS and not self.uri:
            raise MilvusError(
                "--backend milvus needs --milvus-uri URI: a milvus-lite file (e.g. ./vectors.db) or "
                "http(s)://host:port of a Milvus server"
            )
        if self.name != MILVUS and self.uri:
            raise MilvusError(f"--milvus-uri {self.uri} is for --backend milvus, not {self.name!r}")
        if self.name == MILVUS:
            from indexer.vectors.milvus import require_pymilvus

            require_pymilvus()  # the install hint now, before any work


def backend_name(backend: VectorBackend | None, coll: Collection | None) -> str:
    """Where a collection's vectors go: `backend` when given, else where `coll` keeps them (None: not
    created yet), else "faiss"."""
    if backend is not None:
        return backend.name
    return (coll.vector_backend if coll is not None else None) or "faiss"


def milvus_name(store: Store, coll: Collection) -> str:
    """The Milvus collection holding `coll`'s vectors: unique per store, collection and index type
    (a new index type fills a new one, and the old one is dropped once it is full)."""
    return f"clipbt_{store.store_id[:12]}_{coll.id}_{coll.vector_index_type.lower()}"


def milvus_config(store: Store, coll: Collection, expected_count: int = 1):
    """The `MilvusConfig` of a Milvus-backed collection, from what SQL records."""
    from indexer.vectors.milvus import MilvusConfig

    return MilvusConfig(
        coll.vector_uri, milvus_name(store, coll), coll.dim, coll.vector_index_type, expected_count=expected_count
    )


def use_backend(store: Store, coll: Collection, backend: VectorBackend | None, index_type: str) -> Collection:
    """Record in SQL where `coll`'s vectors live from now on: `backend` (None: where they are
    now), with `index_type` for Milvus; returns the collection as recorded. A Milvus URI is checked
    and connected to before anything is recorded, so an unreachable one fails before any
    encoding; the credential is not recorded."""
    from indexer.vectors.milvus import MilvusIndex

    if backend_name(backend, coll) != MILVUS:
        return coll if coll.vector_backend is None else store.set_vector_backend(coll, None, None, None)
    uri = backend.uri if backend is not None else coll.vector_uri
    probe = dataclasses.replace(coll, vector_backend=MILVUS, vector_uri=uri, vector_index_type=index_type)
    config = milvus_config(store, probe)
    try:  # reachable? The Milvus collection itself is made by `open_milvus` once the images are in SQL,
        MilvusIndex(config, _milvus_token(backend.token if backend is not None else None), create=False)
    except InvalidIndexError:  # so that ivf plans its lists for their number
        pass
    uri = config.uri  # absolute, for milvus-lite
    if (coll.vector_backend, coll.vector_uri, coll.vector_index_type) == (MILVUS, uri, index_type):
        return coll
    return store.set_vector_backend(coll, MILVUS, uri, index_type)


def _milvus_token(token: str | None) -> str | None:
    from indexer.vectors.milvus import TOKEN_ENV

    return token or os.environ.get(TOKEN_ENV)


def open_milvus(store: Store, coll: Collection, token: str | None = None, writing: bool = False):
    """The `MilvusIndex` of a Milvus-backed collection, created if missing and reconciled with SQL
    (`indexer.vectors.milvus.repair`). `writing`: called to write what a run committed to SQL
    (no warning about it), and to drop this collection's Milvus collections of other index types
    (left by a change of index type)."""
    from indexer.vectors.milvus import MilvusIndex, repair

    live = store.image_ids(coll.id)
    index = MilvusIndex(milvus_config(store, coll, max(1, live.size)), _milvus_token(token))
    report = repair(index, live, lambda ids: store.embeddings(coll.id, ids)[1])
    if report.added or report.removed:
        (log.info if writing else log.warning)(
            "Milvus collection %s of %r brought in step with the store: inserted %d, deleted %d",
            index.config.collection,
            coll.name,
            report.added,
            report.removed,
        )
    if writing:
        index.drop_others(milvus_name(store, dataclasses.replace(coll, vector_index_type="")))
    return index


def drop_milvus(store: Store, coll: Collection, token: str | None = None) -> None:
    """Drop the Milvus collection of a Milvus-backed collection (when the collection is deleted)."""
    from indexer.vectors.milvus import MilvusIndex

    try:
        MilvusIndex(milvus_config(store, coll), _milvus_token(token), create=False).drop()
    except InvalidIndexError:  # never created: nothing to drop
        pass


class IndexFiles:
    """The saved index of one collection, checked against the store."""

    def __init__(self, store: Store, collection: Collection):
        self.store = store
        self.collection = collection
        self.directory = store.collection_index_dir(collection)
        self.reason = ""  # why the last load returned None
        self.deleted_in_index = 0  # deleted images the last loaded index still held

    @property
    def identity_path(self):
        return self.directory / IDENTITY

    def expected(self) -> IndexExpectation:
        """What the index must hold now, read from SQL."""
        c = self.collection
        return IndexExpectation(
            c.id, c.model, c.pretrained, c.dim, self.store.image_ids(c.id), self.store.deleted_ids(c.id)
        )

    def identity(self) -> dict | None:
        """The saved `collection.json`, or None when missing or unreadable."""
        try:
            identity = json.loads(self.identity_path.read_text())
        except (OSError, ValueError):
            return None
        return identity if isinstance(identity, dict) else None

    def save(self, index: VectorIndex, index_type: str, extra: dict | None = None) -> dict:
        """Save `index` as this collection's; returns what `collection.json` now says.

        `extra` adds entries; it may repeat the computed ones (collection, model, dim...) only with
        equal values.
        """
        from indexer.vectors.faiss import write_atomic

        coll = self.collection
        if index.dim != coll.dim:
            raise InvalidIndexError(f"index has dimension {index.dim}, collection {coll.name!r} has {coll.dim}")
        computed = {
            "collection": coll.name,
            "collection_id": coll.id,
            "model": coll.model,
            "pretrained": coll.pretrained,
            "dim": coll.dim,
            "backend": index.describe()["kind"].split(":", 1)[0],
            "index_type": index_type,
        }
        for key, value in (extra or {}).items():
            if key in computed and computed[key] != value:
                raise InvalidIndexError(
                    f"manifest says {key} = {value!r} but the index and collection give {computed[key]!r}"
                )
        identity = {**(extra or {}), **computed}
        text = json.dumps(identity, indent=2).encode()
        try:
            previous = self.identity_path.read_bytes()
        except OSError:
            previous = None
        if previous != text:  # a new identity: no index file may be trusted under the old one meanwhile
            self.identity_path.unlink(missing_ok=True)
        try:
            manifest = index.save(self.directory)  # replaces the index files atomically
            if previous != text:
                write_atomic(self.identity_path, text)
        except (OSError, DiskFullError) as exc:
            # A failed save leaves the previous index files and manifest as they were (they are
            # replaced atomically), so the previous identity is true again: restore it.
            if previous is not None:
                try:
                    write_atomic(self.identity_path, previous)
                except OSError:
                    pass
            full = exc if isinstance(exc, DiskFullError) else disk_full_error(exc, self.directory)
            if full is None:
                raise
            raise full from None
        return {**manifest, **identity}

    def load(self, expected: IndexExpectation | None = None) -> VectorIndex | None:
        """The saved index if it is intact and matches `expected` (default: `self.expected()`),
        with deleted images removed; else None, with `self.reason` saying why."""
        self.reason, self.deleted_in_index = "", 0
        expected = expected or self.expected()
        name = self.collection.name
        identity = self.identity()
        if identity is None:
            return self._refuse(f"no saved index for collection {name!r}")
        for key in _IDENTITY_KEYS:
            if identity.get(key) != getattr(expected, key):
                return self._refuse(
                    f"index of collection {name!r} was built for {key} {identity.get(key)!r}, "
                    f"the collection has {getattr(expected, key)!r}"
                )
        try:
            index = backend_class(identity.get("backend", "faiss")).load(self.directory)
        except InvalidIndexError as exc:
            return self._refuse(str(exc))
        ids = index.ids()
        missing = np.setdiff1d(expected.live_ids, ids)
        if missing.size:
            return self._refuse(
                f"index of collection {name!r} is stale: {missing.size} of "
                f"{expected.live_ids.size} images are not in it (e.g. ids {missing[:5].tolist()})"
            )
        extra = np.setdiff1d(ids, expected.live_ids)
        unknown = np.setdiff1d(extra, expected.deleted_ids)
        if unknown.size:
            return self._refuse(
                f"index of collection {name!r} is stale: it holds {unknown.size} ids that are not "
                f"images of the collection (e.g. {unknown[:5].tolist()})"
            )
        self.deleted_in_index = int(extra.size)
        if extra.size:
            index.remove(extra)
        return index

    def _refuse(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s; rebuild it", reason)
        return None


def build(store: Store, coll: Collection, index_type: str) -> VectorIndex:
    """A new index of the collection's live images, from the embeddings in SQL: clipbt's exact
    kernel for "exact" (`indexer.vectors.exact`), else FAISS."""
    from indexer.vectors.faiss import FaissIndex

    ids, embeddings = store.embeddings(coll.id)
    if index_type == EXACT:
        from indexer.vectors.exact import ExactIndex

        index = ExactIndex(coll.dim)
        index.add(ids, embeddings)
        return index
    return FaissIndex.build(ids, embeddings, index_type)


def check_index_type(index_type: str, dim: int, backend: str = "faiss") -> None:
    """IndexTypeError now, before any encoding, if `index_type` cannot make an index of dimension
    `dim` on `backend` ("faiss" or "milvus")."""
    if backend == MILVUS:
        from indexer.vectors.milvus import plan_index as plan_milvus

        plan_milvus(index_type, dim, 1)
    elif index_type != EXACT:
        from indexer.vectors.faiss import check_index_type as check_faiss_type

        check_faiss_type(index_type, dim)


def _untrained(index_type: str, n: int, dim: int) -> bool:
    """Whether an index of this type needs no training, so extending it equals rebuilding it."""
    return index_type == EXACT or plan_index(index_type, n, dim) in ("Flat", "SQfp16")


def rebuild(store: Store, coll: Collection, index_type: str) -> VectorIndex:
    """Build the collection's index from SQL and save it."""
    index = build(store, coll, index_type)
    IndexFiles(store, coll).save(index, index_type)
    return index


def refresh(store: Store, coll: Collection, index_type: str, added: np.ndarray, token: str | None = None) -> None:
    """Bring the saved index up to date after `added` images: extend the saved one when little
    changed (always, for exact types, which need no training), else rebuild from SQL. A Milvus
    collection is reconciled with SQL instead (`open_milvus`, with the credential `token`)."""
    if coll.vector_backend == MILVUS:
        open_milvus(store, coll, token, writing=True)
        return
    files = IndexFiles(store, coll)
    identity = files.identity()
    if identity is not None and identity.get("index_type") == index_type:
        expected = files.expected()
        before = dataclasses.replace(expected, live_ids=np.setdiff1d(expected.live_ids, added))
        index = files.load(before)
        if index is not None:
            small = max(1.0, _REUSE_LIMIT * len(index))
            untrained = _untrained(index_type, len(index), coll.dim)
            if files.deleted_in_index <= small and (untrained or added.size <= small):
                if added.size:
                    index.add(*store.embeddings(coll.id, added))
                if added.size or files.deleted_in_index:
                    files.save(index, index_type)
                return
    rebuild(store, coll, index_type)


def catch_up(store: Store, coll: Collection, index: VectorIndex) -> VectorIndex | None:
    """A copy of a loaded `index` with the images added and deleted since applied (reading the
    embeddings of the added ones only), for a process that keeps an index loaded while others
    index: the loaded one stays searchable meanwhile. None when a rebuild is due instead (an id
    the collection does not know, or, for a trained type, more new images than `refresh` adds).
    A Milvus index is shared and kept current by the processes that change the collection: it is
    returned as it is, unless the collection has moved (another backend, URI or index type)."""
    from indexer.vectors.milvus import MilvusIndex

    current = store.collection(coll.id)
    if isinstance(index, MilvusIndex) or current.vector_backend == MILVUS:
        same = (
            isinstance(index, MilvusIndex)
            and current.vector_backend == MILVUS
            and (index.config.uri, index.config.collection) == (current.vector_uri, milvus_name(store, current))
        )
        return index if same else None
    expected = IndexFiles(store, coll).expected()
    held = index.ids()
    added = np.setdiff1d(expected.live_ids, held)
    gone = np.setdiff1d(held, expected.live_ids)
    index_type = getattr(index, "index_type", None)
    if index_type is None or not hasattr(index, "copy") or np.setdiff1d(gone, expected.deleted_ids).size:
        return None
    small = max(1.0, _REUSE_LIMIT * len(index))
    if not (_untrained(index_type, len(index), coll.dim) or added.size <= small):
        return None
    updated = index.copy()
    if added.size:
        updated.add(*store.embeddings(coll.id, added))
    if gone.size:
        updated.remove(gone)
    return updated


def open_index(store: Store, collection: str | int | Collection) -> VectorIndex:
    """A collection's saved index, or one rebuilt (and saved) from SQL when missing or stale, logging
    why; for a Milvus collection, its Milvus index reconciled with SQL (`open_milvus`)."""
    coll = store.collection(collection)
    if coll.vector_backend == MILVUS:
        return open_milvus(store, coll)
    files = IndexFiles(store, coll)
    index = files.load()
    if index is None:
        log.warning("rebuilding the vector index of collection %r: %s", coll.name, files.reason)
        index_type = (files.identity() or {}).get("index_type", "flat")
        index = build(store, coll, index_type)
        try:
            files.save(index, index_type)
        except DiskFullError as exc:  # searching works from the rebuilt index in memory all the same
            log.warning("the rebuilt index of collection %r was not saved: %s", coll.name, exc)
    return index
