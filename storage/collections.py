"""The collections, images and embeddings part of the Store."""

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from storage import _schema as S
from storage._sql import _SHA256, EMBEDDING_DTYPES, _bump, _chunks, _now, _utc
from storage.errors import (
    CollectionExistsError,
    DuplicateImageError,
    ForeignImageError,
    InvalidRecordError,
    StoreCorruptError,
    UnknownCollectionError,
    UnknownImageError,
)
from storage.limits import MAX_STORED_ID, LimitError, check_text, is_image_id, parse_image_id
from storage.records import (
    Collection,
    Image,
    ImageRecord,
)


class CollectionsMixin:
    """Collections, their images and embeddings, and the change counter of a collection."""

    # -- collections ---------------------------------------------------------------------------

    def create_collection(
        self,
        name: str,
        model: str,
        pretrained: str,
        dim: int,
        embedding_dtype: str = "float16",
        checkpoint_path: str | None = None,
    ) -> Collection:
        """Create a collection; CollectionExistsError if the name is taken. `checkpoint_path`:
        where the checkpoint file of a "sha256:" `pretrained` is (so it can be loaded again)."""
        _check_collection_args(name, model, pretrained, dim, embedding_dtype, checkpoint_path)
        with self._write() as conn:
            row = conn.execute(sa.select(S.collections).where(S.collections.c.name == name)).first()
            if row is not None:
                raise CollectionExistsError(f"collection {name!r} already exists: {_collection(row)}")
            return self._insert_collection(conn, name, model, pretrained, dim, embedding_dtype, checkpoint_path)

    def get_or_create_collection(
        self,
        name: str,
        model: str,
        pretrained: str,
        dim: int,
        embedding_dtype: str = "float16",
        checkpoint_path: str | None = None,
    ) -> Collection:
        """The collection `name`, created if missing. CollectionMismatchError if it exists with
        another model, pretrained or dim. `embedding_dtype` only applies on creation; a new
        `checkpoint_path` (the same checkpoint, moved) replaces the recorded one."""
        _check_collection_args(name, model, pretrained, dim, embedding_dtype, checkpoint_path)
        with self._write() as conn:
            row = conn.execute(sa.select(S.collections).where(S.collections.c.name == name)).first()
            if row is None:
                return self._insert_collection(conn, name, model, pretrained, dim, embedding_dtype, checkpoint_path)
            found = _collection(row)
            found.check_model(model, pretrained, dim, "use another collection name")
            if checkpoint_path is not None and checkpoint_path != found.checkpoint_path:
                conn.execute(
                    S.collections.update().where(S.collections.c.id == found.id).values(checkpoint_path=checkpoint_path)
                )
                found = dataclasses.replace(found, checkpoint_path=checkpoint_path)
        return found

    def collection(self, ref: str | int | Collection) -> Collection:
        """A collection by name or id; UnknownCollectionError if none."""
        with self._read() as conn:
            return self._collection(conn, ref)

    def find_collection(self, name: str) -> Collection | None:
        """The collection called `name`, or None if there is none."""
        with self._read() as conn:
            row = conn.execute(sa.select(S.collections).where(S.collections.c.name == name)).first()
        return None if row is None else _collection(row)

    def collections(self) -> list[Collection]:
        """Every collection, in creation order."""
        with self._read() as conn:
            rows = conn.execute(sa.select(S.collections).order_by(S.collections.c.id)).all()
        return [_collection(r) for r in rows]

    def collection_summaries(self) -> list[dict]:
        """Every collection in creation order: name, model, pretrained, dim, live images, and users
        with at least one preference recorded in it."""
        with self._read() as conn:
            images = dict(
                conn.execute(
                    sa.select(S.images.c.collection_id, sa.func.count())
                    .where(S.images.c.deleted == sa.false())
                    .group_by(S.images.c.collection_id)
                ).all()
            )
            users: dict[int, set[int]] = {}
            for table in (S.pairs, S.rankings):
                for cid, uid in conn.execute(sa.select(table.c.collection_id, table.c.user_id).distinct()):
                    users.setdefault(cid, set()).add(uid)
            rows = conn.execute(sa.select(S.collections).order_by(S.collections.c.id)).all()
        return [
            {
                "name": r.name,
                "model": r.model,
                "pretrained": r.pretrained,
                "dim": r.dim,
                "images": images.get(r.id, 0),
                "users": len(users.get(r.id, ())),
            }
            for r in rows
        ]

    def set_vector_backend(
        self, ref: str | int | Collection, backend: str | None, uri: str | None, index_type: str | None
    ) -> Collection:
        """Record where the collection's vectors live: backend None (index files in the data home,
        uri and index_type None) or "milvus" with its URI (no credential) and index type. Bumps
        the collection's content version, so that long-running searchers open them anew."""
        if backend not in (None, "milvus"):
            raise InvalidRecordError(f"vector backend must be None or 'milvus', got {backend!r}")
        if (backend is None) != (uri is None) or (backend is None) != (index_type is None):
            raise InvalidRecordError(
                f"a Milvus collection needs a URI and an index type, local index files neither; got "
                f"backend {backend!r}, uri {uri!r}, index type {index_type!r}"
            )
        with self._write() as conn:
            coll = self._collection(conn, ref)
            conn.execute(
                S.collections.update()
                .where(S.collections.c.id == coll.id)
                .values(vector_backend=backend, vector_uri=uri, vector_index_type=index_type)
            )
            _bump(conn, S.collections.c.content_version, [coll.id])  # searchers open the vectors anew
        return dataclasses.replace(coll, vector_backend=backend, vector_uri=uri, vector_index_type=index_type)

    def rename_collection(self, old: str, new: str) -> Collection:
        """Give collection `old` the name `new`; CollectionExistsError if `new` is taken. Its images,
        preferences and index files stay as they are (they refer to it by id)."""
        _check_collection_args(new, "model", "pretrained", 1, "float16")
        with self._write() as conn:
            coll = self._collection(conn, old)
            if conn.execute(sa.select(S.collections.c.id).where(S.collections.c.name == new)).first() is not None:
                raise CollectionExistsError(f"cannot rename {old!r} to {new!r}: a collection {new!r} exists")
            conn.execute(S.collections.update().where(S.collections.c.id == coll.id).values(name=new))
        return dataclasses.replace(coll, name=new)

    def delete_collection(self, name: str) -> dict[str, int]:
        """Remove collection `name` with its images, embeddings, the preferences recorded in it and
        its index files (users stay); returns the rows removed per kind."""
        import shutil

        index_dir = self.collection_index_dir(name)
        with self._write() as conn:
            coll = self._collection(conn, name)
            image_ids = sa.select(S.images.c.id).where(S.images.c.collection_id == coll.id)
            ranking_ids = sa.select(S.rankings.c.id).where(S.rankings.c.collection_id == coll.id)
            users = set(conn.execute(sa.select(S.pairs.c.user_id).where(S.pairs.c.collection_id == coll.id)).scalars())
            users |= set(
                conn.execute(sa.select(S.rankings.c.user_id).where(S.rankings.c.collection_id == coll.id)).scalars()
            )
            kinds = dict(
                conn.execute(
                    sa.select(S.rankings.c.kind, sa.func.count())
                    .where(S.rankings.c.collection_id == coll.id)
                    .group_by(S.rankings.c.kind)
                ).all()
            )
            conn.execute(S.ranking_items.delete().where(S.ranking_items.c.ranking_id.in_(ranking_ids)))
            conn.execute(S.rankings.delete().where(S.rankings.c.collection_id == coll.id))
            removed = {
                "pairs": conn.execute(S.pairs.delete().where(S.pairs.c.collection_id == coll.id)).rowcount,
                "rankings": kinds.get("ranking", 0),
                "feedback": kinds.get("feedback", 0),
            }
            conn.execute(S.embeddings.delete().where(S.embeddings.c.image_id.in_(image_ids)))
            removed["images"] = conn.execute(S.images.delete().where(S.images.c.collection_id == coll.id)).rowcount
            conn.execute(S.collections.delete().where(S.collections.c.id == coll.id))
            if users:
                _bump(conn, S.users.c.pref_version, sorted(users))  # engines drop the users' cached pairs
        shutil.rmtree(index_dir, ignore_errors=True)
        return removed

    def _insert_collection(self, conn, name, model, pretrained, dim, embedding_dtype, checkpoint_path) -> Collection:
        cid = conn.execute(
            S.collections.insert()
            .values(
                name=name,
                model=model,
                pretrained=pretrained,
                dim=dim,
                embedding_dtype=embedding_dtype,
                created=_now(),
                checkpoint_path=checkpoint_path,
            )
            .returning(S.collections.c.id)
        ).scalar_one()
        return Collection(cid, name, model, pretrained, dim, embedding_dtype, checkpoint_path)

    def _collection(self, conn: sa.Connection, ref: str | int | Collection) -> Collection:
        if isinstance(ref, Collection):
            ref = ref.id
        if isinstance(ref, str):
            where = S.collections.c.name == ref
        elif isinstance(ref, int | np.integer):
            where = S.collections.c.id == int(ref)
        else:
            raise UnknownCollectionError(f"not a collection name or id: {ref!r}")
        row = conn.execute(sa.select(S.collections).where(where)).first()
        if row is None:
            names = conn.execute(sa.select(S.collections.c.name).order_by(S.collections.c.id)).scalars().all()
            raise UnknownCollectionError(f"unknown collection {ref!r}; existing: {', '.join(names) or 'none'}")
        return _collection(row)

    # -- images and embeddings -----------------------------------------------------------------

    def add_images(
        self,
        collection_id: int | str | Collection,
        records: Sequence[ImageRecord],
        embeddings: np.ndarray,
    ) -> list[int]:
        """Add images and their embeddings (n, dim) in ONE transaction; returns their ids in order.

        Embeddings are stored in the collection's dtype (float16 by default), unnormalised as given.
        DuplicateImageError if a uri is already live in the collection (the batch is refused).
        """
        records = list(records)
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
        blobs = _embedding_blobs(coll, records, embeddings)
        for i, record in enumerate(records):
            _check_record(i, record)
        seen: dict[str, int] = {}
        for i, record in enumerate(records):
            if record.uri in seen:
                raise DuplicateImageError(
                    f"uri {record.uri!r} appears twice in the batch (records {seen[record.uri]} and {i})"
                )
            seen[record.uri] = i
        if not records:
            return []
        now = _now()
        with self._write() as conn:
            uris = list(seen)
            for chunk in _chunks(uris):
                clash = conn.execute(
                    sa.select(S.images.c.id, S.images.c.uri).where(
                        S.images.c.collection_id == coll.id,
                        S.images.c.deleted == sa.false(),
                        S.images.c.uri.in_(chunk),
                    )
                ).first()
                if clash is not None:
                    raise DuplicateImageError(
                        f"uri {clash.uri!r} is already image {clash.id} of collection {coll.name!r}"
                    )
            ids = list(
                conn.execute(
                    S.images.insert().returning(S.images.c.id, sort_by_parameter_order=True),
                    [
                        {
                            "collection_id": coll.id,
                            "uri": r.uri,
                            "sha256": r.sha256,
                            "width": int(r.width),
                            "height": int(r.height),
                            "caption": r.caption,
                            "meta": r.metadata,
                            "added": now,
                            "deleted": False,
                        }
                        for r in records
                    ],
                ).scalars()
            )
            conn.execute(
                S.embeddings.insert(),
                [{"image_id": i, "data": blob} for i, blob in zip(ids, blobs, strict=True)],
            )
            _bump(conn, S.collections.c.content_version, [coll.id])
        return ids

    def images(self, collection_id: int | str | Collection, include_deleted: bool = False) -> list[Image]:
        """The images of a collection in id order; live ones only unless include_deleted."""
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
            query = sa.select(S.images).where(S.images.c.collection_id == coll.id)
            if not include_deleted:
                query = query.where(S.images.c.deleted == sa.false())
            rows = conn.execute(query.order_by(S.images.c.id)).all()
        return [_image(r) for r in rows]

    def image(self, image_id: int) -> Image:
        """One image by id, deleted or not; UnknownImageError if no such id."""
        image_id = _image_id(image_id)
        with self._read() as conn:
            row = conn.execute(sa.select(S.images).where(S.images.c.id == image_id)).first()
        if row is None:
            raise UnknownImageError(f"unknown image id {image_id}")
        return _image(row)

    def uris(self, image_ids: Iterable[int]) -> dict[int, str]:
        """The uri of each image id (deleted or not) in one query per 500 ids; unknown ids are absent."""
        ids = sorted({_image_id(i) for i in image_ids})
        with self._read() as conn:
            return {
                row.id: row.uri
                for chunk in _chunks(ids)
                for row in conn.execute(sa.select(S.images.c.id, S.images.c.uri).where(S.images.c.id.in_(chunk)))
            }

    def find_image(self, collection_id: int | str | Collection, ref: int | str) -> Image:
        """A live image of the collection by id, or by uri / path (a path is also tried resolved).

        UnknownImageError naming `ref` if none; ForeignImageError if it is in another collection.
        """
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
            row = None
            if isinstance(ref, int | np.integer) and not isinstance(ref, bool):
                row = _image_row(conn, ref)
            elif isinstance(ref, str) and ref:
                candidates = [ref]
                if "://" not in ref:
                    candidates.append(str(Path(ref).expanduser().resolve()))
                for uri in candidates:
                    row = conn.execute(
                        sa.select(S.images).where(
                            S.images.c.collection_id == coll.id,
                            S.images.c.uri == uri,
                            S.images.c.deleted == sa.false(),
                        )
                    ).first()
                    if row is not None:
                        break
                if row is None and is_image_id(ref):
                    row = _image_row(conn, ref)
            if row is None:
                raise UnknownImageError(f"no image {ref!r} in collection {coll.name!r}")
            image = _image(row)
            if image.collection_id != coll.id:
                other = self._collection(conn, image.collection_id)
                raise ForeignImageError(
                    f"image {ref!r} ({image.uri}) is in collection {other.name!r}, not {coll.name!r}",
                    public=f"no image {ref!r} in collection {coll.name!r}",
                )
        if image.deleted:
            raise UnknownImageError(f"image {ref!r} ({image.uri}) was deleted", public=f"image {ref!r} was deleted")
        return image

    def mark_deleted(self, image_ids: Iterable[int]) -> int:
        """Mark images deleted (kept for history, hidden from search); returns how many were live.

        UnknownImageError if any id does not exist (then nothing is marked).
        """
        ids = sorted({_image_id(i) for i in image_ids})
        marked = 0
        touched: set[int] = set()
        with self._write() as conn:
            for chunk in _chunks(ids):
                rows = conn.execute(
                    sa.select(S.images.c.id, S.images.c.collection_id, S.images.c.deleted).where(
                        S.images.c.id.in_(chunk)
                    )
                ).all()
                missing = sorted(set(chunk) - {r.id for r in rows})
                if missing:
                    raise UnknownImageError(f"unknown image ids {missing[:10]}")
                live = [r for r in rows if not r.deleted]
                if live:
                    marked += conn.execute(
                        S.images.update().where(S.images.c.id.in_([r.id for r in live])).values(deleted=True)
                    ).rowcount
                    touched.update(r.collection_id for r in live)
            if touched:
                _bump(conn, S.collections.c.content_version, sorted(touched))
        return marked

    def image_ids(self, collection_id: int | str | Collection) -> np.ndarray:
        """Ids (int64, ascending) of the live images of a collection."""
        return self._ids(collection_id, deleted=False)

    def deleted_ids(self, collection_id: int | str | Collection) -> np.ndarray:
        """Ids (int64, ascending) of deleted images: a searcher drops these from FAISS results,
        since an index (a GPU one in particular) may still hold them."""
        return self._ids(collection_id, deleted=True)

    def _ids(self, collection_id, deleted: bool) -> np.ndarray:
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
            ids = conn.execute(
                sa.select(S.images.c.id)
                .where(S.images.c.collection_id == coll.id, S.images.c.deleted == deleted)
                .order_by(S.images.c.id)
            ).scalars()
            return np.fromiter(ids, dtype=np.int64)

    def embeddings(
        self,
        collection_id: int | str | Collection,
        image_ids: Iterable[int] | None = None,
        include_deleted: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), vectors float32 (n, dim)) in id order: all live images of the
        collection, or exactly `image_ids` (UnknownImageError if one is not a live image of it;
        deleted ones are allowed with include_deleted)."""
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
            query = (
                sa.select(S.images.c.id, S.embeddings.c.data)
                .join(S.embeddings, S.embeddings.c.image_id == S.images.c.id)
                .where(S.images.c.collection_id == coll.id)
                .order_by(S.images.c.id)
            )
            if not include_deleted:
                query = query.where(S.images.c.deleted == sa.false())
            if image_ids is None:
                rows = conn.execute(query).all()
            else:
                wanted = sorted({_image_id(i) for i in image_ids})
                rows = []
                for chunk in _chunks(wanted):
                    rows += conn.execute(query.where(S.images.c.id.in_(chunk))).all()
                missing = sorted(set(wanted) - {r.id for r in rows})
                if missing:
                    state = "images" if include_deleted else "live images"
                    raise UnknownImageError(f"image ids {missing[:10]} are not {state} of collection {coll.name!r}")
        dtype = EMBEDDING_DTYPES[coll.embedding_dtype]
        ids = np.fromiter((r.id for r in rows), dtype=np.int64, count=len(rows))
        width = coll.dim * dtype.itemsize
        bad = [r.id for r in rows if len(r.data) != width]
        if bad:
            raise StoreCorruptError(f"embeddings of images {bad[:10]} are not {coll.dim} {coll.embedding_dtype} values")
        vectors = np.frombuffer(b"".join(r.data for r in rows), dtype=dtype)
        return ids, vectors.reshape(len(rows), coll.dim).astype(np.float32)

    def content_version(self, collection_id: int) -> int:
        """An opaque number that changes whenever images are added to or deleted from the
        collection, by any process (the cache key of a loaded index)."""
        rows = self._fetch_direct("SELECT content_version FROM collections WHERE id = ?", [int(collection_id)])
        if not rows:
            raise UnknownCollectionError(f"unknown collection id {collection_id}")
        return rows[0][0]


def _one_collection(conn: sa.Connection, image_ids: list[int]) -> int:
    """The collection all `image_ids` (live images) belong to; typed errors otherwise."""
    rows = {
        r.id: r
        for chunk in _chunks(sorted(set(image_ids)))
        for r in conn.execute(
            sa.select(S.images.c.id, S.images.c.collection_id, S.images.c.deleted).where(S.images.c.id.in_(chunk))
        )
    }
    for i in image_ids:
        if i not in rows:
            raise UnknownImageError(f"unknown image id {i}")
        if rows[i].deleted:
            raise UnknownImageError(f"image {i} was deleted")
    first = rows[image_ids[0]]
    for i in image_ids[1:]:
        if rows[i].collection_id != first.collection_id:
            raise ForeignImageError(
                f"image {i} is in collection {rows[i].collection_id} but image {first.id} is in "
                f"collection {first.collection_id}: a preference compares images of one collection",
                public=f"images {first.id} and {i} are not in one collection: a preference compares images of one collection",
            )
    return first.collection_id


def _embedding_blobs(coll: Collection, records: list[ImageRecord], embeddings) -> list[bytes]:
    array = np.asarray(embeddings)
    if array.shape != (len(records), coll.dim):
        raise InvalidRecordError(
            f"embeddings have shape {array.shape}; collection {coll.name!r} needs "
            f"({len(records)}, {coll.dim}): one row of {coll.dim} values per record"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidRecordError(f"embeddings must be floating point, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # overflow to inf is reported below, naming the row
        stored = array.astype(EMBEDDING_DTYPES[coll.embedding_dtype])
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise InvalidRecordError(f"embedding row {row} ({records[row].uri!r}) is not finite as {coll.embedding_dtype}")
    return [row.tobytes() for row in stored]


def _check_record(i: int, r: ImageRecord) -> None:
    if not isinstance(r, ImageRecord):
        raise InvalidRecordError(f"record {i} is not an ImageRecord: {r!r}")
    if not isinstance(r.uri, str) or not r.uri:
        raise InvalidRecordError(f"record {i} has an empty uri: {r.uri!r}")
    for name in ("uri", "caption"):
        if isinstance(getattr(r, name), str):
            try:
                check_text(getattr(r, name), f"record {i} {name}")
            except LimitError as exc:
                raise InvalidRecordError(str(exc)) from None
    if not isinstance(r.sha256, str) or not _SHA256.fullmatch(r.sha256):
        raise InvalidRecordError(f"record {i} ({r.uri}): sha256 must be 64 lowercase hex digits, got {r.sha256!r}")
    for name in ("width", "height"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise InvalidRecordError(f"record {i} ({r.uri}): {name} must be a positive int, got {value!r}")
    if r.metadata is not None and not isinstance(r.metadata, dict):
        raise InvalidRecordError(f"record {i} ({r.uri}): metadata must be a dict, got {r.metadata!r}")
    try:
        json.dumps(r.metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"record {i} ({r.uri}): metadata is not JSON: {exc}") from exc


def _check_collection_args(name, model, pretrained, dim, embedding_dtype, checkpoint_path=None) -> None:
    for label, value in (("name", name), ("model", model), ("pretrained", pretrained)):
        if not isinstance(value, str) or not value.strip() or len(value) > 256:
            raise InvalidRecordError(f"collection {label} must be 1 to 256 characters, got {value!r}")
    if pretrained.startswith("sha256:") and not _SHA256.fullmatch(pretrained[len("sha256:") :]):
        raise InvalidRecordError(f"pretrained {pretrained!r} must be sha256: and 64 lowercase hex digits")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise InvalidRecordError(f"dim must be a positive int, got {dim!r}")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise InvalidRecordError(f"embedding_dtype must be float16 or float32, got {embedding_dtype!r}")
    if checkpoint_path is not None and not (
        pretrained.startswith("sha256:") and isinstance(checkpoint_path, str) and os.path.isabs(checkpoint_path)
    ):
        raise InvalidRecordError(
            f"checkpoint_path must be an absolute path, for a pretrained 'sha256:...' checkpoint; "
            f"got {checkpoint_path!r} for pretrained {pretrained!r}"
        )


def _image_id(value) -> int:
    """An image id that can exist: `parse_image_id` (an int in int64), and UnknownImageError
    beyond the largest id the database column holds (identical on SQLite and PostgreSQL)."""
    if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UnknownImageError(f"an image id is an int, got {value!r}")
    value = parse_image_id(value)
    if value > MAX_STORED_ID:
        raise UnknownImageError(f"unknown image id {value}")
    return value


def _image_row(conn: sa.Connection, ref: int | str):
    """The images row of id `ref` (an int or plain decimal text), or None."""
    value = parse_image_id(ref)
    if value > MAX_STORED_ID:
        return None
    return conn.execute(sa.select(S.images).where(S.images.c.id == value)).first()


def _collection(row) -> Collection:
    return Collection(
        row.id,
        row.name,
        row.model,
        row.pretrained,
        row.dim,
        row.embedding_dtype,
        row.checkpoint_path,
        row.vector_backend,
        row.vector_uri,
        row.vector_index_type,
    )


def _image(row) -> Image:
    return Image(
        row.id,
        row.collection_id,
        row.uri,
        row.sha256,
        row.width,
        row.height,
        row.caption,
        row.meta,
        _utc(row.added),
        bool(row.deleted),
    )
