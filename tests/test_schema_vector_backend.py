"""Schema v4: a v3 store gains the collections' vector-backend columns on open, keeping its data; `set_vector_backend` records and checks them."""

import numpy as np
import pytest
import sqlalchemy as sa

from storage import ImageRecord, Store, _schema
from storage.errors import InvalidRecordError

V4_COLUMNS = ("vector_backend", "vector_uri", "vector_index_type")


def _as_v3(store: Store) -> None:
    """Turn a current store into the v3 one that clipbt released: without the v4 columns, recorded as version 3."""
    with store._engine.begin() as conn:
        for column in V4_COLUMNS:
            conn.execute(sa.text(f"ALTER TABLE collections DROP COLUMN {column}"))
        conn.execute(sa.text("UPDATE clipbt_meta SET value = '3' WHERE key = 'schema_version'"))


def _columns(store: Store) -> list[str]:
    return [c["name"] for c in sa.inspect(store._engine).get_columns("collections")]


def test_a_v3_store_is_upgraded_to_v4(store_url):
    assert _schema.SCHEMA_VERSION == 4
    with Store.open(store_url) as store:
        coll = store.create_collection("photos", "ViT-B-32", "openai", 4)
        ids = store.add_images(coll.id, [ImageRecord(f"/p/{i}.jpg", f"{i:064x}", 2, 2) for i in range(3)], np.eye(3, 4))
        _as_v3(store)
    with Store.open(store_url) as store:
        assert store.schema_version == 4 and set(V4_COLUMNS) <= set(_columns(store))
        coll = store.collection("photos")
        assert (coll.vector_backend, coll.vector_uri, coll.vector_index_type) == (None, None, None)
        assert store.image_ids(coll.id).tolist() == ids and store.check_consistency().ok
        version = store.content_version(coll.id)
        moved = store.set_vector_backend(coll, "milvus", "http://milvus:19530", "hnsw")
        assert store.collection("photos") == moved and moved.vector_uri == "http://milvus:19530"
        assert store.content_version(coll.id) != version  # searchers notice the move
        assert store.set_vector_backend(coll, None, None, None).vector_backend is None


def test_v3_layout_before_the_upgrade_lacks_the_columns(store_url, monkeypatch):
    """The downgrade above really is the v3 layout: code at version 3 opens it without adding columns."""
    with Store.open(store_url) as store:
        store.create_collection("photos", "ViT-B-32", "openai", 4)
        _as_v3(store)
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", 3)
    with Store.open(store_url) as store:
        assert store.schema_version == 3 and not set(V4_COLUMNS) & set(_columns(store))


def test_set_vector_backend_refuses_incomplete_records(store):
    coll = store.create_collection("photos", "ViT-B-32", "openai", 4)
    with pytest.raises(InvalidRecordError, match="needs a URI and an index type"):
        store.set_vector_backend(coll, "milvus", None, "flat")
    with pytest.raises(InvalidRecordError, match="needs a URI and an index type"):
        store.set_vector_backend(coll, None, "http://milvus:19530", None)
    with pytest.raises(InvalidRecordError, match="'qdrant'"):
        store.set_vector_backend(coll, "qdrant", "http://q:6333", "flat")
