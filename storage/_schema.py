"""The SQL schema (SQLAlchemy Core tables), its recorded version and the ordered migrations."""

from collections.abc import Callable

import sqlalchemy as sa

SCHEMA_VERSION = 4  # bump together with a new entry in MIGRATIONS

metadata = sa.MetaData()

# Key/value facts about the store itself: "schema_version", "store_id".
meta = sa.Table(
    "clipbt_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

collections = sa.Table(
    "collections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("model", sa.String(256), nullable=False),  # open_clip architecture, e.g. ViT-B-32
    sa.Column("pretrained", sa.String(256), nullable=False),  # tag, or "sha256:<hex>" of a checkpoint
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("embedding_dtype", sa.String(16), nullable=False),  # "float16" or "float32"
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("checkpoint_path", sa.Text, nullable=True),  # where a "sha256:" checkpoint was last read (v2)
    sa.Column("content_version", sa.Integer, nullable=False, server_default="0"),  # +1 when images come or go (v2)
    # Where the vectors live (v4): NULL = index files in the data home (FAISS or exact, as their
    # collection.json says); "milvus" = a Milvus collection at vector_uri (never a credential),
    # indexed as vector_index_type (flat, hnsw, ivf or a Milvus GPU type).
    sa.Column("vector_backend", sa.String(16), nullable=True),
    sa.Column("vector_uri", sa.Text, nullable=True),
    sa.Column("vector_index_type", sa.String(64), nullable=True),
    sqlite_autoincrement=True,
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # also the FAISS id
    sa.Column("collection_id", sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("caption", sa.Text),
    sa.Column("meta", sa.JSON),
    sa.Column("added", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sqlite_autoincrement=True,  # ids never reused: a stale FAISS id cannot name a new image
)
# One live image per uri and collection; a deleted uri may be added again.
sa.Index(
    "ix_images_live_uri",
    images.c.collection_id,
    images.c.uri,
    unique=True,
    sqlite_where=images.c.deleted == sa.false(),
    postgresql_where=images.c.deleted == sa.false(),
)

embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column("image_id", sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),  # little-endian, collection's dtype, dim values
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(256), nullable=False, unique=True),
    sa.Column("pref_version", sa.Integer, nullable=False, default=0),  # +1 on every change
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,  # never reused: preference_version mixes in the user id
)

pairs = sa.Table(
    "pairs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("collection_id", sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("preferred_id", sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("rejected_id", sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("preferred_id <> rejected_id", name="ck_pairs_distinct"),
    sa.CheckConstraint("weight > 0", name="ck_pairs_weight"),
    sa.Index("ix_pairs_user", "user_id", "id"),
    sqlite_autoincrement=True,
)

# A ranking (kind "ranking": tier = position, best first) or thumbs feedback (kind "feedback":
# tier 0 = good, tier 1 = bad). The implied pairs are every item over every item of a later tier.
rankings = sa.Table(
    "rankings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("collection_id", sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('ranking', 'feedback')", name="ck_rankings_kind"),
    sa.Index("ix_rankings_user", "user_id", "id"),
    sqlite_autoincrement=True,
)

ranking_items = sa.Table(
    "ranking_items",
    metadata,
    sa.Column("ranking_id", sa.ForeignKey("rankings.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("image_id", sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("tier", sa.Integer, nullable=False),
    sa.UniqueConstraint("ranking_id", "image_id", name="uq_ranking_items_image"),
)

# Accounts of `clipbt serve` (v3): one per preference user, removed with it. Passwords are kept
# as Argon2 hashes, API tokens and web sessions as SHA-256 hashes of their random secrets.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=True),  # None: API tokens only, no web login
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the token
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_hash", sa.String(64), nullable=False, unique=True),  # sha256 hex of the cookie
    sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)

ACCOUNT_TABLES = (accounts, api_tokens, web_sessions)


# MIGRATIONS[v] upgrades a store at schema version v to v + 1, inside the opening transaction.
# Released entries are never edited; a fresh store is created at SCHEMA_VERSION directly.
def _to_v2(conn: sa.Connection) -> None:
    """v2: where a collection's checkpoint file is (so the CLI can load it again), and a counter
    of image changes (so a long-running searcher knows when to reload its index)."""
    conn.execute(sa.text("ALTER TABLE collections ADD COLUMN checkpoint_path TEXT"))
    conn.execute(sa.text("ALTER TABLE collections ADD COLUMN content_version INTEGER NOT NULL DEFAULT 0"))


def _to_v3_accounts(conn: sa.Connection) -> None:
    """v3: the accounts, API tokens and web sessions of `clipbt serve`."""
    metadata.create_all(conn, tables=list(ACCOUNT_TABLES))


def _to_v4_vector_backend(conn: sa.Connection) -> None:
    """v4: where a collection's vectors live (a Milvus collection rather than local index files),
    so every process on every machine finds them from the database alone."""
    conn.execute(sa.text("ALTER TABLE collections ADD COLUMN vector_backend VARCHAR(16)"))
    conn.execute(sa.text("ALTER TABLE collections ADD COLUMN vector_uri TEXT"))
    conn.execute(sa.text("ALTER TABLE collections ADD COLUMN vector_index_type VARCHAR(64)"))


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {1: _to_v2, 2: _to_v3_accounts, 3: _to_v4_vector_backend}
