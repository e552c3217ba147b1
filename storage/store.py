"""The Store: collections, images, embeddings, users and preferences in one SQL database."""

import dataclasses
import functools
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from storage import _schema as S
from storage.errors import (
    CollectionExistsError,
    CollectionMismatchError,
    DuplicateImageError,
    ForeignImageError,
    InvalidPreferenceError,
    InvalidRecordError,
    InvalidUserError,
    SchemaVersionError,
    StoreCorruptError,
    StoreError,
    UnknownCollectionError,
    UnknownImageError,
    UnknownUserError,
)
from storage.home import data_home
from storage.records import (
    Collection,
    ConsistencyReport,
    Feedback,
    Image,
    ImageRecord,
    PreferencePair,
    Ranking,
)

DB_FILENAME = "clipbt.db"  # the default SQLite file inside the data home
EMBEDDING_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # ids per `IN (...)` clause, well under SQLite's bound-parameter limit
_PG_SCHEMA_LOCK = 0x636C697062740001  # pg_advisory_xact_lock key serialising schema setup




@dataclass(frozen=True)
class StoreConfig:
    """How a Store talks to its database."""

    busy_timeout_s: float = 30.0  # SQLite: how long a writer waits for another writer's lock
    sqlite_synchronous: str = "FULL"  # SQLite: FULL also survives power loss; NORMAL a process kill
    index_dir: Path | None = (
        None  # FAISS files; None: <sqlite dir>/indexes, else <data_home>/indexes
    )
    echo: bool = False  # log every SQL statement

    def __post_init__(self):
        if self.sqlite_synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise StoreError(
                f"sqlite_synchronous must be NORMAL, FULL or EXTRA, got {self.sqlite_synchronous!r}"
            )
        if not self.busy_timeout_s > 0:
            raise StoreError(f"busy_timeout_s must be positive, got {self.busy_timeout_s!r}")


class Store:
    """Everything clipbt keeps across restarts, behind one SQLAlchemy engine.

    Open with `Store.open(url=None, home=None)`; use as a context manager or call `close()`.
    Every public method is one transaction: it either fully happened or not at all.
    """

    def __init__(self, engine: sa.Engine, index_root: Path):
        self._engine = engine
        self._index_root = index_root
        self._sqlite = engine.dialect.name == "sqlite"
        self.store_id = ""  # random id fixed at creation; names this store's index folder
        self.schema_version = 0

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str | sa.URL | None = None,
        home: str | Path | None = None,
        config: StoreConfig | None = None,
    ) -> "Store":
        """Open (creating or upgrading as needed) the store at `url`.

        url: an SQLAlchemy URL; None means the SQLite file <data_home(home)>/clipbt.db.
        "postgresql://..." is read as "postgresql+psycopg://..." (psycopg 3).
        """
        config = config or StoreConfig()
        if url is None:
            url = sa.URL.create("sqlite", database=str(data_home(home) / DB_FILENAME))
        try:
            url = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r}") from exc
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        shown = url.render_as_string(hide_password=True)
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise StoreError(
                f"unsupported database {shown!r}: use a sqlite:/// or postgresql:// URL"
            )
        in_file = backend == "sqlite" and url.database not in (None, "", ":memory:")
        if in_file:
            url = url.set(database=str(Path(url.database).expanduser()))
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        if config.index_dir is not None:
            index_root = Path(config.index_dir)
        elif in_file:
            index_root = Path(url.database).parent / "indexes"
        else:
            index_root = data_home(home) / "indexes"
        try:
            engine = sa.create_engine(url, echo=config.echo, pool_pre_ping=backend != "sqlite")
        except ImportError as exc:
            raise StoreError(
                f"cannot open {shown!r}: {exc}; install the driver: pip install 'psycopg[binary]'"
            ) from exc
        if backend == "sqlite":
            _configure_sqlite(engine, config)
        store = cls(engine, index_root)
        try:
            store._init_schema()
        except sa.exc.OperationalError as exc:
            engine.dispose()
            raise StoreError(f"cannot open store {shown!r}: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Release every database connection."""
        self._engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def index_dir(self) -> Path:
        """The folder holding this store's vector indexes, one subfolder per collection."""
        return self._index_root / self.store_id[:12]

    def _init_schema(self) -> None:
        with self._write() as conn:
            if not self._sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            if not sa.inspect(conn).has_table(S.meta.name):
                S.metadata.create_all(conn)
                conn.execute(
                    S.meta.insert(),
                    [
                        {"key": "schema_version", "value": str(S.SCHEMA_VERSION)},
                        {"key": "store_id", "value": uuid.uuid4().hex},
                    ],
                )
            facts = dict(conn.execute(sa.select(S.meta.c.key, S.meta.c.value)).all())
            version = int(facts["schema_version"])
            if version > S.SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"store {self.url!r} has schema version {version}, newer than this clipbt "
                    f"understands ({S.SCHEMA_VERSION}); upgrade clipbt"
                )
            while version < S.SCHEMA_VERSION:
                S.MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    S.meta.update()
                    .where(S.meta.c.key == "schema_version")
                    .values(value=str(version))
                )
        self.store_id = facts["store_id"]
        self.schema_version = version

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        # SQLite: BEGIN IMMEDIATE takes the write lock up front, so a transaction never has to
        # upgrade a read snapshot (which fails with SQLITE_BUSY instead of waiting).
        with self._engine.connect() as conn:
            conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    # -- collections ---------------------------------------------------------------------------

    def create_collection(
        self, name: str, model: str, pretrained: str, dim: int, embedding_dtype: str = "float16",
        checkpoint_path: str | None = None,
    ) -> Collection:
        """Create a collection; CollectionExistsError if the name is taken. `checkpoint_path`:
        where the checkpoint file of a "sha256:" `pretrained` is (so it can be loaded again)."""
        _check_collection_args(name, model, pretrained, dim, embedding_dtype, checkpoint_path)
        with self._write() as conn:
            row = conn.execute(sa.select(S.collections).where(S.collections.c.name == name)).first()
            if row is not None:
                raise CollectionExistsError(
                    f"collection {name!r} already exists: {_collection(row)}"
                )
            return self._insert_collection(conn, name, model, pretrained, dim, embedding_dtype, checkpoint_path)

    def get_or_create_collection(
        self, name: str, model: str, pretrained: str, dim: int, embedding_dtype: str = "float16",
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
            if (found.model, found.pretrained, found.dim) != (model, pretrained, dim):
                raise CollectionMismatchError(
                    f"collection {name!r} holds embeddings of {found.model}/{found.pretrained} "
                    f"(dim {found.dim}), not {model}/{pretrained} (dim {dim}); "
                    "use another collection name"
                )
            if checkpoint_path is not None and checkpoint_path != found.checkpoint_path:
                conn.execute(S.collections.update().where(S.collections.c.id == found.id)
                             .values(checkpoint_path=checkpoint_path))
                found = dataclasses.replace(found, checkpoint_path=checkpoint_path)
        return found

    def collection(self, ref: str | int | Collection) -> Collection:
        """A collection by name or id; UnknownCollectionError if none."""
        with self._read() as conn:
            return self._collection(conn, ref)

    def collections(self) -> list[Collection]:
        """Every collection, in creation order."""
        with self._read() as conn:
            rows = conn.execute(sa.select(S.collections).order_by(S.collections.c.id)).all()
        return [_collection(r) for r in rows]

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
            names = (
                conn.execute(sa.select(S.collections.c.name).order_by(S.collections.c.id))
                .scalars()
                .all()
            )
            raise UnknownCollectionError(
                f"unknown collection {ref!r}; existing: {', '.join(names) or 'none'}"
            )
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
                    f"uri {record.uri!r} appears twice in the batch "
                    f"(records {seen[record.uri]} and {i})"
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

    def images(
        self, collection_id: int | str | Collection, include_deleted: bool = False
    ) -> list[Image]:
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

    def find_image(self, collection_id: int | str | Collection, ref: int | str) -> Image:
        """A live image of the collection by id, or by uri / path (a path is also tried resolved).

        UnknownImageError naming `ref` if none; ForeignImageError if it is in another collection.
        """
        with self._read() as conn:
            coll = self._collection(conn, collection_id)
            row = None
            if isinstance(ref, int | np.integer) and not isinstance(ref, bool):
                row = conn.execute(sa.select(S.images).where(S.images.c.id == int(ref))).first()
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
                if row is None and ref.isdigit():
                    row = conn.execute(sa.select(S.images).where(S.images.c.id == int(ref))).first()
            if row is None:
                raise UnknownImageError(f"no image {ref!r} in collection {coll.name!r}")
            image = _image(row)
            if image.collection_id != coll.id:
                other = self._collection(conn, image.collection_id)
                raise ForeignImageError(
                    f"image {ref!r} ({image.uri}) is in collection {other.name!r}, "
                    f"not {coll.name!r}"
                )
        if image.deleted:
            raise UnknownImageError(f"image {ref!r} ({image.uri}) was deleted")
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
                    raise UnknownImageError(
                        f"image ids {missing[:10]} are not {state} of collection {coll.name!r}"
                    )
        dtype = EMBEDDING_DTYPES[coll.embedding_dtype]
        ids = np.fromiter((r.id for r in rows), dtype=np.int64, count=len(rows))
        width = coll.dim * dtype.itemsize
        bad = [r.id for r in rows if len(r.data) != width]
        if bad:
            raise StoreCorruptError(
                f"embeddings of images {bad[:10]} are not {coll.dim} {coll.embedding_dtype} values"
            )
        vectors = np.frombuffer(b"".join(r.data for r in rows), dtype=dtype)
        return ids, vectors.reshape(len(rows), coll.dim).astype(np.float32)

    # -- users ---------------------------------------------------------------------------------

    def ensure_user(self, name: str) -> int:
        """The id of user `name`, created if missing."""
        with self._write() as conn:
            return self._user_id(conn, name, create=True)

    def users(self) -> list[str]:
        """Every user name, sorted."""
        with self._read() as conn:
            return list(conn.execute(sa.select(S.users.c.name).order_by(S.users.c.name)).scalars())

    def delete_user(self, name: str) -> dict[str, int]:
        """Remove a user and every trace of them; returns the rows removed per kind."""
        with self._write() as conn:
            uid = self._user_id(conn, name, create=False)
            kinds = dict(
                conn.execute(
                    sa.select(S.rankings.c.kind, sa.func.count())
                    .where(S.rankings.c.user_id == uid)
                    .group_by(S.rankings.c.kind)
                ).all()
            )
            conn.execute(
                S.ranking_items.delete().where(
                    S.ranking_items.c.ranking_id.in_(
                        sa.select(S.rankings.c.id).where(S.rankings.c.user_id == uid)
                    )
                )
            )
            conn.execute(S.rankings.delete().where(S.rankings.c.user_id == uid))
            n_pairs = conn.execute(S.pairs.delete().where(S.pairs.c.user_id == uid)).rowcount
            conn.execute(S.users.delete().where(S.users.c.id == uid))
        return {
            "pairs": n_pairs,
            "rankings": kinds.get("ranking", 0),
            "feedback": kinds.get("feedback", 0),
            "users": 1,
        }

    def _user_id(self, conn: sa.Connection, name: str, create: bool) -> int:
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise InvalidUserError(f"a user name is 1 to 256 characters, got {name!r}")
        if create:
            dialect = sqlite if self._sqlite else postgresql
            conn.execute(
                dialect.insert(S.users)
                .values(name=name, pref_version=0, created=_now())
                .on_conflict_do_nothing(index_elements=["name"])
            )
        # FOR UPDATE (PostgreSQL) serialises one user's preference writes, so the
        # "same as the last one" duplicate check cannot race; SQLite writers are serial already.
        query = sa.select(S.users.c.id).where(S.users.c.name == name)
        uid = conn.execute(query.with_for_update() if create else query).scalar()
        if uid is None:
            raise UnknownUserError(f"unknown user {name!r}")
        return uid

    # -- preferences ---------------------------------------------------------------------------

    def add_pair(
        self,
        user: str,
        query: str,
        preferred_id: int,
        rejected_id: int,
        weight: float = 1.0,
        source: str = "pair",
    ) -> int:
        """Record that `user`, searching `query`, preferred one image over another; returns its id.

        The user is created if new. A pair identical (query, images, weight, source) to that user's
        most recent pair is a duplicate (a resubmit): its id is returned and nothing is stored.
        """
        query, weight, source = _check_query(query), _check_weight(weight), _check_source(source)
        preferred_id, rejected_id = _image_id(preferred_id), _image_id(rejected_id)
        if preferred_id == rejected_id:
            raise InvalidPreferenceError(
                f"preferred and rejected are the same image {preferred_id}"
            )
        with self._write() as conn:
            uid = self._user_id(conn, user, create=True)
            cid = _one_collection(conn, [preferred_id, rejected_id])
            last = conn.execute(
                sa.select(S.pairs)
                .where(S.pairs.c.user_id == uid)
                .order_by(S.pairs.c.id.desc())
                .limit(1)
            ).first()
            fields = (cid, query, preferred_id, rejected_id, weight, source)
            if last is not None and fields == (
                last.collection_id,
                last.query,
                last.preferred_id,
                last.rejected_id,
                last.weight,
                last.source,
            ):
                return last.id
            pair_id = conn.execute(
                S.pairs.insert()
                .values(
                    user_id=uid,
                    collection_id=cid,
                    query=query,
                    preferred_id=preferred_id,
                    rejected_id=rejected_id,
                    weight=weight,
                    source=source,
                    created=_now(),
                )
                .returning(S.pairs.c.id)
            ).scalar_one()
            _bump(conn, S.users.c.pref_version, [uid])
        return pair_id

    def add_ranking(
        self, user: str, query: str, image_ids: Sequence[int], source: str = "ranking"
    ) -> int:
        """Record a ranking of two or more images, best first; returns its id.

        Stored as a ranking (for Plackett-Luce); `pairs()` also reports it broken into every
        earlier-over-later pair. Duplicates as for `add_pair`, against the user's last ranking.
        """
        ids = [_image_id(i) for i in image_ids]
        if len(ids) < 2:
            raise InvalidPreferenceError(f"a ranking needs at least 2 images, got {ids}")
        return self._add_tiers(
            user, query, "ranking", [(i, pos) for pos, i in enumerate(ids)], source
        )

    def add_feedback(
        self,
        user: str,
        query: str,
        good_ids: Sequence[int],
        bad_ids: Sequence[int],
        source: str = "feedback",
    ) -> int:
        """Record thumbs up (`good_ids`) and down (`bad_ids`) for one query; returns its id.

        Stored as such (see `feedback()`); `pairs()` also reports every good over every bad.
        """
        good = [_image_id(i) for i in good_ids]
        bad = [_image_id(i) for i in bad_ids]
        if not good and not bad:
            raise InvalidPreferenceError("feedback needs at least one good or bad image, got none")
        both = sorted(set(good) & set(bad))
        if both:
            raise InvalidPreferenceError(f"images {both} are marked both good and bad")
        return self._add_tiers(
            user, query, "feedback", [(i, 0) for i in good] + [(i, 1) for i in bad], source
        )

    def _add_tiers(
        self, user: str, query: str, kind: str, items: list[tuple[int, int]], source: str
    ) -> int:
        query, source = _check_query(query), _check_source(source)
        ids = [i for i, _ in items]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise InvalidPreferenceError(f"images {repeated} appear more than once in the {kind}")
        with self._write() as conn:
            uid = self._user_id(conn, user, create=True)
            cid = _one_collection(conn, ids)
            last = conn.execute(
                sa.select(S.rankings)
                .where(S.rankings.c.user_id == uid, S.rankings.c.kind == kind)
                .order_by(S.rankings.c.id.desc())
                .limit(1)
            ).first()
            if last is not None and (last.collection_id, last.query, last.source) == (
                cid,
                query,
                source,
            ):
                last_items = conn.execute(
                    sa.select(S.ranking_items.c.image_id, S.ranking_items.c.tier)
                    .where(S.ranking_items.c.ranking_id == last.id)
                    .order_by(S.ranking_items.c.position)
                ).all()
                if [tuple(r) for r in last_items] == items:
                    return last.id
            rid = conn.execute(
                S.rankings.insert()
                .values(
                    user_id=uid,
                    collection_id=cid,
                    kind=kind,
                    query=query,
                    source=source,
                    created=_now(),
                )
                .returning(S.rankings.c.id)
            ).scalar_one()
            conn.execute(
                S.ranking_items.insert(),
                [
                    {"ranking_id": rid, "position": pos, "image_id": i, "tier": tier}
                    for pos, (i, tier) in enumerate(items)
                ],
            )
            _bump(conn, S.users.c.pref_version, [uid])
        return rid

    def pairs(
        self,
        user: str,
        collection_id: int | str | Collection | None = None,
        query: str | None = None,
    ) -> list[PreferencePair]:
        """Every preference pair of `user`, oldest first: stored pairs (with their id) and the
        pairs implied by rankings and feedback (id None, ranking_id set, weight 1 each)."""
        with self._read() as conn:
            params = {"uid": self._user_id(conn, user, create=False)}
            if collection_id is not None:
                params["cid"] = self._collection(conn, collection_id).id
            if query is not None:
                params["query"] = query.strip()
            stored, implied = _pair_selects("cid" in params, "query" in params)
            out = [
                PreferencePair(
                    p.id,
                    user,
                    p.query,
                    p.preferred_id,
                    p.rejected_id,
                    p.weight,
                    p.source,
                    _utc(p.created),
                    p.collection_id,
                )
                for p in conn.execute(stored, params)
            ]
            out += [
                PreferencePair(
                    None,
                    user,
                    p.query,
                    p.preferred_id,
                    p.rejected_id,
                    1.0,
                    p.source,
                    _utc(p.created),
                    p.collection_id,
                    ranking_id=p.id,
                )
                for p in conn.execute(implied, params)
            ]
        return sorted(out, key=lambda p: p.created)

    def rankings(
        self, user: str, collection_id: int | str | Collection | None = None
    ) -> list[Ranking]:
        """The rankings of `user`, oldest first, each best image first."""
        return [
            Ranking(
                r.id,
                r.query,
                [i for i, _ in items],
                user,
                r.collection_id,
                r.source,
                _utc(r.created),
            )
            for r, items in self._tiers(user, collection_id, "ranking")
        ]

    def feedback(
        self, user: str, collection_id: int | str | Collection | None = None
    ) -> list[Feedback]:
        """The thumbs up/down feedback of `user`, oldest first."""
        return [
            Feedback(
                r.id,
                r.query,
                [i for i, tier in items if tier == 0],
                [i for i, tier in items if tier == 1],
                user,
                r.collection_id,
                r.source,
                _utc(r.created),
            )
            for r, items in self._tiers(user, collection_id, "feedback")
        ]

    def _tiers(self, user, collection_id, kind) -> list[tuple[sa.Row, list[tuple[int, int]]]]:
        with self._read() as conn:
            uid = self._user_id(conn, user, create=False)
            query = sa.select(S.rankings).where(
                S.rankings.c.user_id == uid, S.rankings.c.kind == kind
            )
            if collection_id is not None:
                query = query.where(
                    S.rankings.c.collection_id == self._collection(conn, collection_id).id
                )
            heads = conn.execute(query.order_by(S.rankings.c.id)).all()
            items: dict[int, list[tuple[int, int]]] = {h.id: [] for h in heads}
            rows = conn.execute(
                sa.select(
                    S.ranking_items.c.ranking_id, S.ranking_items.c.image_id, S.ranking_items.c.tier
                )
                .join(S.rankings, S.rankings.c.id == S.ranking_items.c.ranking_id)
                .where(S.rankings.c.user_id == uid, S.rankings.c.kind == kind)
                .order_by(S.ranking_items.c.ranking_id, S.ranking_items.c.position)
            )
            for rid, image_id, tier in rows:
                if rid in items:
                    items[rid].append((image_id, tier))
        return [(h, items[h.id]) for h in heads]

    def preference_version(self, user: str) -> int:
        """An opaque number that changes whenever `user`'s preferences change (a cache key).

        It mixes in the user id, which is never reused, so a deleted and re-created user
        never repeats an old version."""
        with self._read() as conn:
            uid = self._user_id(conn, user, create=False)
            count = conn.execute(
                sa.select(S.users.c.pref_version).where(S.users.c.id == uid)
            ).scalar_one()
        return (uid << 32) | count

    def preference_versions(self, users: Iterable[str]) -> dict[str, int | None]:
        """`preference_version` of many users in one query; None for a user who does not exist."""
        names = sorted(set(users))
        if not names:
            return {}
        found = {}
        for chunk in _chunks(names):
            rows = self._fetch_direct(
                f"SELECT name, id, pref_version FROM users WHERE name IN ({', '.join('?' * len(chunk))})", chunk)
            found.update((name, (uid << 32) | count) for name, uid, count in rows)
        return {name: found.get(name) for name in names}

    def content_version(self, collection_id: int) -> int:
        """An opaque number that changes whenever images are added to or deleted from the
        collection, by any process (the cache key of a loaded index)."""
        rows = self._fetch_direct("SELECT content_version FROM collections WHERE id = ?", [int(collection_id)])
        if not rows:
            raise UnknownCollectionError(f"unknown collection id {collection_id}")
        return rows[0][0]

    def _fetch_direct(self, sql: str, params: Sequence) -> list[tuple]:
        """The rows of one SELECT ("?" placeholders) sent straight to the driver. For the checks
        made on every search: a pooled SQLAlchemy connection costs ~150 us more per call. One
        SELECT is atomic on its own."""
        conn = self._engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute(sql if self._sqlite else sql.replace("?", "%s"), tuple(params))
            rows = cursor.fetchall()
            cursor.close()
            return rows
        finally:
            conn.close()

    # -- index files and checks ----------------------------------------------------------------

    def collection_index_dir(self, collection: int | str | Collection) -> Path:
        """The folder of a collection's saved vector index (`indexer.vectors.collection`)."""
        return self.index_dir / f"collection-{self.collection(collection).id}"

    def check_consistency(self) -> ConsistencyReport:
        """Look for anything a crash or a bug could have left behind: SQLite page damage,
        orphan rows, images without (or with malformed) embeddings, preferences that mix
        collections, rankings with too few images."""
        report = ConsistencyReport()
        problems = report.problems
        img, emb, col = S.images, S.embeddings, S.collections
        with self._read() as conn:
            if self._sqlite:
                damage = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                if damage != ["ok"]:
                    problems.append(f"SQLite integrity_check: {'; '.join(damage[:5])}")
                orphans = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if orphans:
                    problems.append(
                        f"{len(orphans)} rows reference missing rows, e.g. {tuple(orphans[0])}"
                    )
            for table in (col, img, emb, S.users, S.pairs, S.rankings, S.ranking_items):
                report.counts[table.name] = conn.execute(
                    sa.select(sa.func.count()).select_from(table)
                ).scalar_one()

            def ids_where(query, what):
                found = conn.execute(query.limit(10)).scalars().all()
                if found:
                    problems.append(f"{what}, e.g. {found}")

            ids_where(
                sa.select(img.c.id)
                .outerjoin(emb, emb.c.image_id == img.c.id)
                .where(emb.c.image_id.is_(None)),
                "images without an embedding",
            )
            itemsize = sa.case((col.c.embedding_dtype == "float16", 2), else_=4)
            ids_where(
                sa.select(img.c.id)
                .join(emb, emb.c.image_id == img.c.id)
                .join(col, col.c.id == img.c.collection_id)
                .where(sa.func.length(emb.c.data) != col.c.dim * itemsize),
                "embeddings of the wrong size",
            )
            pref, rej = img.alias("pref"), img.alias("rej")
            ids_where(
                sa.select(S.pairs.c.id)
                .join(pref, pref.c.id == S.pairs.c.preferred_id)
                .join(rej, rej.c.id == S.pairs.c.rejected_id)
                .where(
                    sa.or_(
                        pref.c.collection_id != S.pairs.c.collection_id,
                        rej.c.collection_id != S.pairs.c.collection_id,
                    )
                ),
                "pairs comparing images of another collection",
            )
            ids_where(
                sa.select(S.rankings.c.id)
                .join(S.ranking_items, S.ranking_items.c.ranking_id == S.rankings.c.id)
                .join(img, img.c.id == S.ranking_items.c.image_id)
                .where(img.c.collection_id != S.rankings.c.collection_id)
                .distinct(),
                "rankings holding images of another collection",
            )
            n_items = (
                sa.select(sa.func.count())
                .where(S.ranking_items.c.ranking_id == S.rankings.c.id)
                .scalar_subquery()
            )
            ids_where(
                sa.select(S.rankings.c.id).where(
                    n_items < sa.case((S.rankings.c.kind == "ranking", 2), else_=1)
                ),
                "rankings or feedback with too few images",
            )
        return report


def _configure_sqlite(engine: sa.Engine, config: StoreConfig) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # pysqlite must not emit BEGIN; `_on_begin` does
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {config.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(
            "BEGIN " + conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        )


def _one_collection(conn: sa.Connection, image_ids: list[int]) -> int:
    """The collection all `image_ids` (live images) belong to; typed errors otherwise."""
    rows = {
        r.id: r
        for chunk in _chunks(sorted(set(image_ids)))
        for r in conn.execute(
            sa.select(S.images.c.id, S.images.c.collection_id, S.images.c.deleted).where(
                S.images.c.id.in_(chunk)
            )
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
                f"collection {first.collection_id}: a preference compares images of one collection"
            )
    return first.collection_id


@functools.cache
def _pair_selects(by_collection: bool, by_query: bool) -> tuple[sa.Select, sa.Select]:
    """`Store.pairs`' two SELECTs (stored pairs; pairs implied by rankings) with bound :uid, :cid
    and :query, built once per filter combination: building them anew took most of its time."""
    stored = sa.select(S.pairs).where(S.pairs.c.user_id == sa.bindparam("uid")).order_by(S.pairs.c.id)
    a, b = S.ranking_items.alias("a"), S.ranking_items.alias("b")
    r = S.rankings
    implied = (
        sa.select(
            r.c.id,
            r.c.collection_id,
            r.c.query,
            r.c.source,
            r.c.created,
            a.c.image_id.label("preferred_id"),
            b.c.image_id.label("rejected_id"),
        )
        .join(a, a.c.ranking_id == r.c.id)
        .join(b, sa.and_(b.c.ranking_id == r.c.id, a.c.tier < b.c.tier))
        .where(r.c.user_id == sa.bindparam("uid"))
        .order_by(r.c.id, a.c.position, b.c.position)
    )
    if by_collection:
        stored = stored.where(S.pairs.c.collection_id == sa.bindparam("cid"))
        implied = implied.where(r.c.collection_id == sa.bindparam("cid"))
    if by_query:
        stored = stored.where(S.pairs.c.query == sa.bindparam("query"))
        implied = implied.where(r.c.query == sa.bindparam("query"))
    return stored, implied


def _bump(conn: sa.Connection, counter: sa.Column, row_ids: list[int]) -> None:
    """Add 1 to a version counter (users.pref_version, collections.content_version) of these rows."""
    table = counter.table
    conn.execute(table.update().where(table.c.id.in_(row_ids)).values({counter.name: counter + 1}))


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
        raise InvalidRecordError(
            f"embedding row {row} ({records[row].uri!r}) is not finite as {coll.embedding_dtype}"
        )
    return [row.tobytes() for row in stored]


def _check_record(i: int, r: ImageRecord) -> None:
    if not isinstance(r, ImageRecord):
        raise InvalidRecordError(f"record {i} is not an ImageRecord: {r!r}")
    if not isinstance(r.uri, str) or not r.uri:
        raise InvalidRecordError(f"record {i} has an empty uri: {r.uri!r}")
    if not isinstance(r.sha256, str) or not _SHA256.fullmatch(r.sha256):
        raise InvalidRecordError(
            f"record {i} ({r.uri}): sha256 must be 64 lowercase hex digits, got {r.sha256!r}"
        )
    for name in ("width", "height"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise InvalidRecordError(
                f"record {i} ({r.uri}): {name} must be a positive int, got {value!r}"
            )
    if r.metadata is not None and not isinstance(r.metadata, dict):
        raise InvalidRecordError(
            f"record {i} ({r.uri}): metadata must be a dict, got {r.metadata!r}"
        )
    try:
        json.dumps(r.metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"record {i} ({r.uri}): metadata is not JSON: {exc}") from exc


def _check_collection_args(name, model, pretrained, dim, embedding_dtype, checkpoint_path=None) -> None:
    for label, value in (("name", name), ("model", model), ("pretrained", pretrained)):
        if not isinstance(value, str) or not value.strip() or len(value) > 256:
            raise InvalidRecordError(
                f"collection {label} must be 1 to 256 characters, got {value!r}"
            )
    if pretrained.startswith("sha256:") and not _SHA256.fullmatch(pretrained[len("sha256:") :]):
        raise InvalidRecordError(
            f"pretrained {pretrained!r} must be sha256: and 64 lowercase hex digits"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise InvalidRecordError(f"dim must be a positive int, got {dim!r}")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise InvalidRecordError(
            f"embedding_dtype must be float16 or float32, got {embedding_dtype!r}"
        )
    if checkpoint_path is not None and not (pretrained.startswith("sha256:") and isinstance(checkpoint_path, str)
                                            and os.path.isabs(checkpoint_path)):
        raise InvalidRecordError(
            f"checkpoint_path must be an absolute path, for a pretrained 'sha256:...' checkpoint; "
            f"got {checkpoint_path!r} for pretrained {pretrained!r}"
        )


def _check_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidPreferenceError(f"a preference needs a non-empty query text, got {query!r}")
    return query.strip()


def _check_weight(weight) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidPreferenceError(f"weight must be a positive finite number, got {weight!r}")
    return value


def _check_source(source) -> str:
    if not isinstance(source, str) or not source or len(source) > 64:
        raise InvalidPreferenceError(f"source must be 1 to 64 characters, got {source!r}")
    return source


def _image_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UnknownImageError(f"an image id is an int, got {value!r}")
    return int(value)


def _chunks(items: list) -> Iterator[list]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _collection(row) -> Collection:
    return Collection(row.id, row.name, row.model, row.pretrained, row.dim, row.embedding_dtype, row.checkpoint_path)


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
