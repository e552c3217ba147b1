"""The Store: opening a SQL database (SQLite or PostgreSQL), its schema and transactions; its parts live in collections.py, preferences.py and consistency.py."""

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from storage import _schema as S
from storage.accounts import AccountsMixin
from storage.collections import CollectionsMixin
from storage.consistency import ConsistencyMixin
from storage.errors import (
    SchemaVersionError,
    StoreError,
    disk_full_error,
)
from storage.home import create_private_file, data_home
from storage.preferences import PreferencesMixin
from storage.records import (
    Collection,
)

DB_FILENAME = "clipbt.db"  # the default SQLite file inside the data home
_PG_SCHEMA_LOCK = 0x636C697062740001  # pg_advisory_xact_lock key serialising schema setup


@dataclass(frozen=True)
class StoreConfig:
    """How a Store talks to its database."""

    busy_timeout_s: float = 30.0  # SQLite: how long a writer waits for another writer's lock
    sqlite_synchronous: str = "FULL"  # SQLite: FULL also survives power loss; NORMAL a process kill
    index_dir: Path | None = None  # FAISS files; None: <sqlite dir>/indexes, else <data_home>/indexes
    echo: bool = False  # log every SQL statement

    def __post_init__(self):
        if self.sqlite_synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise StoreError(f"sqlite_synchronous must be NORMAL, FULL or EXTRA, got {self.sqlite_synchronous!r}")
        if not self.busy_timeout_s > 0:
            raise StoreError(f"busy_timeout_s must be positive, got {self.busy_timeout_s!r}")


class Store(CollectionsMixin, PreferencesMixin, ConsistencyMixin, AccountsMixin):
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
        except sa.exc.ArgumentError:
            raise StoreError(
                f"not a database URL: {_without_password(str(url))!r}; expected sqlite:///PATH or "
                "postgresql://USER@HOST/DBNAME"
            ) from None
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        shown = url.render_as_string(hide_password=True)
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise StoreError(f"unsupported database {shown!r}: use a sqlite:/// or postgresql:// URL")
        in_file = backend == "sqlite" and url.database not in (None, "", ":memory:")
        if in_file:
            url = url.set(database=str(Path(url.database).expanduser()))
            Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private_file(Path(url.database))
        if config.index_dir is not None:
            index_root = Path(config.index_dir)
        elif in_file:
            index_root = Path(url.database).parent / "indexes"
        else:
            index_root = data_home(home) / "indexes"
        connect_args = {}
        if backend == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10  # an unreachable server fails in seconds, not minutes
        try:
            engine = sa.create_engine(
                url, echo=config.echo, pool_pre_ping=backend != "sqlite", connect_args=connect_args
            )
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
            where = (
                f"the server at {url.host or 'localhost'}:{url.port or 5432}" if backend == "postgresql" else "the file"
            )
            reason = " ".join(str(exc.orig).split())
            if url.password:
                reason = reason.replace(str(url.password), "***")
            raise StoreError(f"cannot open store {shown!r} ({where}): {reason}") from None
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
                conn.execute(S.meta.update().where(S.meta.c.key == "schema_version").values(value=str(version)))
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
        try:
            with self._engine.connect() as conn:
                conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except sa.exc.OperationalError as exc:
            full = disk_full_error(exc, self._disk())
            if full is None:
                raise
            raise full from exc

    def _disk(self) -> str:
        """Where the database writes: the SQLite file's folder, or the server's URL."""
        database = self._engine.url.database
        return str(Path(database).parent) if self._sqlite and database not in (None, "", ":memory:") else self.url

    # -- index files and checks ----------------------------------------------------------------

    def collection_index_dir(self, collection: int | str | Collection) -> Path:
        """The folder of a collection's saved vector index (`indexer.vectors.collection`)."""
        return self.index_dir / f"collection-{self.collection(collection).id}"


def _without_password(text: str) -> str:
    """`text` with the password of a URL-looking user:password@ part replaced by ***."""
    return re.sub(r"^((?:[^:/@]*://)?[^/:@]*:)[^@/]*@", r"\1***@", text)


def _configure_sqlite(engine: sa.Engine, config: StoreConfig) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # pysqlite must not emit BEGIN; `_on_begin` does
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {config.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA secure_delete = ON")  # deleted rows are overwritten, not left in free pages
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin", "DEFERRED"))
