"""A collection's FAISS index on disk: atomic save with a manifest, and staleness checks on load."""

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from filelock import FileLock

from storage.errors import InvalidIndexError
from storage.records import Collection

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Manifest keys save_index computes; a caller's manifest may repeat them only with equal values.
_COMPUTED = (
    "collection_id",
    "model",
    "pretrained",
    "dim",
    "count",
    "min_id",
    "max_id",
    "ids_sha256",
)


@dataclass(frozen=True)
class IndexExpectation:
    """What a collection's index must hold, computed from SQL by `VectorStore.expected()`."""

    collection_id: int
    model: str
    pretrained: str
    dim: int
    live_ids: np.ndarray  # int64 ascending: every one must be in the index
    deleted_ids: np.ndarray  # int64 ascending: may still be in the index, dropped at query time


class VectorStore:
    """The saved FAISS index of one collection: `<index_dir>/collection-<id>/`, holding
    `manifest.json` and the `index-<sha256 prefix>.faiss` file it names.

    The manifest is the commit point: it is replaced (atomically) only after the new index file
    is fully on disk, so a crash at any moment leaves the old index or the new one, never half.
    """

    def __init__(self, store, collection: Collection, directory: Path):
        self.store = store
        self.collection = collection
        self.directory = Path(directory)
        self.reason = ""  # why the last load_index returned None
        self.deleted_in_index = 0  # deleted images the last loaded index still holds

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def expected(self) -> IndexExpectation:
        """What the index must hold now, read from SQL."""
        c = self.collection
        return IndexExpectation(
            c.id,
            c.model,
            c.pretrained,
            c.dim,
            self.store.image_ids(c.id),
            self.store.deleted_ids(c.id),
        )

    def manifest(self) -> dict | None:
        """The saved manifest, or None when missing or unreadable."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def save_index(self, index: faiss.Index, manifest: dict | None = None) -> dict:
        """Save a CPU index whose ids are image ids (IndexIDMap2, IndexIDMap or IVF with ids).

        `manifest` adds entries (e.g. "index_type": "IVF256,Flat"); count, id range, id checksum,
        model and dim are computed. Returns the manifest written.
        """
        coll = self.collection
        if index.d != coll.dim:
            raise InvalidIndexError(
                f"index has dimension {index.d}, collection {coll.name!r} has {coll.dim}"
            )
        ids = index_ids(index)
        if ids is None:
            raise InvalidIndexError(
                f"a {type(index).__name__} does not carry image ids; wrap it in faiss.IndexIDMap2 "
                "and add_with_ids(vectors, image_ids) (copy GPU indexes to CPU first)"
            )
        ids = np.sort(ids)
        if ids.size and (np.diff(ids) == 0).any():
            dup = int(ids[1:][np.diff(ids) == 0][0])
            raise InvalidIndexError(f"index holds image id {dup} more than once")
        computed = {
            "format": MANIFEST_FORMAT,
            "collection": coll.name,
            "collection_id": coll.id,
            "model": coll.model,
            "pretrained": coll.pretrained,
            "dim": coll.dim,
            "count": int(ids.size),
            "min_id": int(ids[0]) if ids.size else None,
            "max_id": int(ids[-1]) if ids.size else None,
            "ids_sha256": ids_digest(ids),
            "saved_at": datetime.now(UTC).isoformat(),
        }
        extra = dict(manifest or {})
        for key in _COMPUTED:
            if key in extra and extra[key] != computed[key]:
                raise InvalidIndexError(
                    f"manifest says {key} = {extra[key]!r} but the index and collection "
                    f"give {computed[key]!r}"
                )
        full = {"index_type": type(index).__name__, **extra, **computed}
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.directory / ".lock")):
            tmp = self.directory / f".tmp-{uuid.uuid4().hex}.faiss"
            try:
                try:
                    faiss.write_index(index, str(tmp))
                except RuntimeError as exc:
                    raise InvalidIndexError(
                        f"cannot write a {type(index).__name__} "
                        f"(copy GPU indexes to CPU first): {exc}"
                    ) from exc
                digest, size = _fsync_and_hash(tmp)
                name = f"index-{digest[:16]}.faiss"
                os.replace(tmp, self.directory / name)
                full.update(file=name, file_sha256=digest, file_size=size)
                _write_atomic(self.manifest_path, json.dumps(full, indent=2).encode())
            finally:
                tmp.unlink(missing_ok=True)
            for old in self.directory.glob("index-*.faiss"):
                if old.name != full["file"]:
                    old.unlink(missing_ok=True)
        return full

    def load_index(self, expected: IndexExpectation | None = None) -> faiss.Index | None:
        """The saved index if it is intact and matches `expected` (default: `self.expected()`);
        else None, with `self.reason` saying why, so the caller rebuilds and says so.

        Intact: file checksum and the ids inside match the manifest. Matches: same model,
        checkpoint and dim; every live image is in it; any other id in it is a deleted image.
        """
        self.reason, self.deleted_in_index = "", 0
        expected = expected or self.expected()
        name = self.collection.name
        if not self.manifest_path.exists():
            return self._refuse(f"no saved index for collection {name!r}")
        manifest = self.manifest()
        if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
            return self._refuse(
                f"index manifest {self.manifest_path} is unreadable or of another format"
            )
        for key in ("collection_id", "model", "pretrained", "dim"):
            if manifest.get(key) != getattr(expected, key):
                return self._refuse(
                    f"index of collection {name!r} was built for {key} {manifest.get(key)!r}, "
                    f"the collection has {getattr(expected, key)!r}"
                )
        file = manifest.get("file")
        if not isinstance(file, str) or Path(file).name != file:
            return self._refuse(f"index manifest {self.manifest_path} names no index file")
        path = self.directory / file
        try:
            digest, size = _fsync_and_hash(path, sync=False)
        except OSError as exc:
            return self._refuse(f"index file {path} is unreadable: {exc}")
        if (digest, size) != (manifest.get("file_sha256"), manifest.get("file_size")):
            return self._refuse(
                f"index file {path} is corrupt: its checksum differs from the manifest"
            )
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            return self._refuse(f"index file {path} cannot be read by FAISS: {exc}")
        ids = index_ids(index)
        if (
            ids is None
            or ids.size != manifest.get("count")
            or ids_digest(np.sort(ids)) != manifest.get("ids_sha256")
        ):
            return self._refuse(f"index file {path} holds other ids than its manifest lists")
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
        return index

    def _refuse(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s; rebuild it", reason)
        return None


def index_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids (int64, storage order) an index returns for its vectors, or None when it only
    has positions (a bare IndexFlat, HNSW, ...)."""
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


def _write_atomic(path: Path, data: bytes) -> None:
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
