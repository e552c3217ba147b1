"""Durable state of clipbt: collections, images, embeddings, FAISS index files, users, preferences.

Where things live
    One SQLAlchemy URL picks the database. By default it is the SQLite file
    `<data home>/clipbt.db`, the data home being `$CLIPBT_HOME`, else `$XDG_DATA_HOME/clipbt`,
    i.e. `~/.local/share/clipbt`. `Store.open("postgresql://user@host/db")` uses PostgreSQL
    through psycopg 3 instead. FAISS index files sit in `indexes/<store id>/collection-<id>/`
    beside the SQLite file, or under the data home for PostgreSQL.

SQLite settings
    WAL journal, foreign keys on, a 30 s busy timeout, and every write transaction opened with
    BEGIN IMMEDIATE so concurrent writers queue instead of failing. `synchronous=FULL`: with WAL,
    NORMAL already keeps every committed transaction when the *process* is killed (the WAL is in
    the OS page cache), FULL also keeps it through power loss, for one fsync per commit (well
    under a millisecond here); preferences are written one click at a time, so FULL is the default.

Embeddings
    Stored in SQL, in an `embeddings` table (image id, raw little-endian bytes), float16 unless
    the collection was created with `embedding_dtype="float32"`. An image row and its embedding
    are written in the same transaction, so they can never disagree, and every FAISS index can
    be rebuilt from SQL alone. float16 keeps each component to 5e-4 relative error at half
    the space.

Vector indexes
    Not kept here: `indexer.vectors` saves each collection's index under `Store.collection_index_dir`
    (beside the SQLite file, or under the data home for PostgreSQL) and checks it against the ids
    this store lists. Deleted images are only flagged here; `Store.deleted_ids()` lists them.
    This package imports neither faiss nor torch.

Preferences
    `add_pair` stores one pair. `add_ranking` stores a ranking (best first) as such, for
    Plackett-Luce; `add_feedback` stores thumbs up/down as such. `pairs()` returns the stored
    pairs plus the pairs these imply, computed when read, never stored twice: every image over
    every later one of a ranking ("full breaking", consistent for Plackett-Luce), every good over
    every bad of a feedback, weight 1 each, id None and `ranking_id` set.
    Duplicates: a pair (or ranking, or feedback) identical to the same user's most recent one of
    its kind (same query, images in the same order, weight, source) is a resubmission: nothing is
    stored and the earlier id is returned. A repeat after something else is new evidence and kept.
    Query text is stripped; empty text is refused.

Accounts (for `clipbt serve`)
    One account per preference user, removed with it (foreign keys cascade to its API tokens and
    web sessions). Passwords are kept as Argon2 hashes (argon2-cffi, imported only when a password
    is set or checked); tokens and session secrets only as SHA-256 hashes (`storage/accounts.py`).

Schema versions
    `clipbt_meta` records `schema_version`. Opening a store applies, in one transaction, the
    ordered migrations from its version to the current one (`storage._schema.MIGRATIONS`); a store
    newer than the code is refused. Plain functions, not alembic: the schema is a handful of
    tables, migrations must run unattended inside `Store.open` on both SQLite and PostgreSQL, and
    this adds no runtime dependency or configuration files.
"""

import lazy_loader

# The public names, each imported from its module on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "records": [
            "Collection",
            "ConsistencyReport",
            "Feedback",
            "Image",
            "ImageRecord",
            "PreferencePair",
            "PreferenceRecord",
            "Ranking",
        ],
        "store": ["Store", "StoreConfig"],
    },
)
