"""The vector index of a stored collection: built from the store's embeddings, saved beside it, checked against SQL on load, kept current as images come and go.

The SQL store is the source of truth for which images exist. A collection's folder
(`Store.collection_index_dir`) holds the backend's own files and `collection.json`, written after
them, naming the backend and what the index was built for (collection, model, checkpoint, dim,
index type). `load` returns None with a `reason` when either is missing or damaged, the model
differs, a live image is missing or an unknown id is present; `open_index` then rebuilds from
SQL and logs why. Deleted images the saved index still holds are removed from it on load.
"""

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np

from indexer.vectors.base import VectorIndex
from indexer.vectors.faiss import plan_index
from storage import Collection, Store
from storage.errors import DiskFullError, InvalidIndexError, disk_full_error

log = logging.getLogger(__name__)

IDENTITY = "collection.json"
_IDENTITY_KEYS = ("collection_id", "model", "pretrained", "dim")
EXACT = "exact"  # the index type of clipbt's exact kernel (`indexer.vectors.exact.ExactIndex`)
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
    raise InvalidIndexError(f"unknown vector backend {name!r}")


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


def check_index_type(index_type: str, dim: int) -> None:
    """IndexTypeError now, before any encoding, if `index_type` cannot make an index of dimension `dim`."""
    if index_type != EXACT:
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


def refresh(store: Store, coll: Collection, index_type: str, added: np.ndarray) -> None:
    """Bring the saved index up to date after `added` images: extend the saved one when little
    changed (always, for exact types, which need no training), else rebuild from SQL."""
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
    the collection does not know, or, for a trained type, more new images than `refresh` adds)."""
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
    """A collection's saved index, or one rebuilt (and saved) from SQL when missing or stale, logging why."""
    coll = store.collection(collection)
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
