"""The Store on SQLite and PostgreSQL: round trips, typed errors, consistency checks."""

import hashlib
import sqlite3

import numpy as np
import pytest
import sqlalchemy as sa

from storage import ImageRecord, Store, StoreConfig
from storage.errors import (
    CollectionExistsError,
    CollectionMismatchError,
    DuplicateImageError,
    ForeignImageError,
    InvalidPreferenceError,
    InvalidRecordError,
    UnknownCollectionError,
    UnknownImageError,
    UnknownUserError,
)


def add_photos(store, n=6, dim=8, seed=0, name="photos", dtype="float16"):
    """A collection of n seeded random images: (collection, ids, float32 vectors)."""
    coll = store.get_or_create_collection(name, "ViT-B-32", "openai", dim, dtype)
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    records = [
        ImageRecord(
            f"/data/{name}/{i}.jpg",
            hashlib.sha256(f"{name}{i}".encode()).hexdigest(),
            640 + i,
            480,
            caption=f"photo {i}" if i % 2 else None,
            metadata={"n": i} if i % 3 == 0 else None,
        )
        for i in range(n)
    ]
    return coll, store.add_images(coll.id, records, vectors), vectors


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


# -- opening ----------------------------------------------------------------------------------


def test_default_store_is_sqlite_in_data_home_with_pragmas(isolated_home):
    with Store.open() as store:
        assert (isolated_home / "clipbt.db").exists()
        assert store.index_dir.parent == isolated_home / "indexes"
        with store._engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("synchronous") == 2  # FULL
            assert pragma("busy_timeout") == 30000


def test_reopen_keeps_data_and_store_id(store_url):
    with Store.open(store_url) as store:
        coll, ids, _ = add_photos(store)
        store.add_pair("ann", "red car", ids[0], ids[1])
        store_id = store.store_id
    with Store.open(store_url) as store:
        assert store.store_id == store_id
        assert [i.id for i in store.images(coll.id)] == ids
        assert len(store.pairs("ann")) == 1


def test_bad_urls_are_refused_with_the_url():
    from storage.errors import StoreError

    with pytest.raises(StoreError, match="mysql://u@h/db"):
        Store.open("mysql://u@h/db")
    with pytest.raises(StoreError, match="not a database URL: 'nonsense'"):
        Store.open("nonsense")
    with pytest.raises(StoreError, match="sqlite_synchronous must be .* got 'OFF'"):
        StoreConfig(sqlite_synchronous="OFF")


def test_unreachable_postgres_is_a_store_error():
    from storage.errors import StoreError

    with pytest.raises(StoreError, match="cannot open store 'postgresql\\+psycopg://u:\\*\\*\\*@127.0.0.1:9/x'"):
        Store.open("postgresql://u:secret@127.0.0.1:9/x")


# -- collections ------------------------------------------------------------------------------


def test_collections(store):
    a = store.create_collection("photos", "ViT-B-32", "openai", 512)
    assert store.collection("photos") == a == store.collection(a.id)
    assert store.get_or_create_collection("photos", "ViT-B-32", "openai", 512) == a
    checkpoint = "sha256:" + sha("weights")
    b = store.get_or_create_collection("art", "ViT-L-14", checkpoint, 768, "float32")
    assert store.collections() == [a, b]
    assert store.find_collection("art") == b and store.find_collection("nope") is None
    assert b.embedding_dtype == "float32"
    with pytest.raises(CollectionExistsError, match="'photos' already exists"):
        store.create_collection("photos", "ViT-B-32", "openai", 512)
    with pytest.raises(
        CollectionMismatchError,
        match="ViT-B-32/openai \\(dim 512\\), not ViT-L-14/openai \\(dim 768\\)",
    ):
        store.get_or_create_collection("photos", "ViT-L-14", "openai", 768)
    with pytest.raises(UnknownCollectionError, match="unknown collection 'nope'; existing: photos, art"):
        store.collection("nope")
    with pytest.raises(InvalidRecordError, match="'sha256:abc'"):
        store.create_collection("x", "ViT-B-32", "sha256:abc", 512)
    with pytest.raises(InvalidRecordError, match="dim must be a positive int, got 0"):
        store.create_collection("x", "ViT-B-32", "openai", 0)


def test_a_checkpoint_path_is_recorded_and_follows_the_file(store):
    checkpoint = "sha256:" + sha("weights")
    art = store.get_or_create_collection("art", "ViT-L-14", checkpoint, 768, checkpoint_path="/models/a.pt")
    assert art.checkpoint_path == "/models/a.pt" == store.collection("art").checkpoint_path
    assert store.get_or_create_collection("art", "ViT-L-14", checkpoint, 768) == art  # no path: kept
    moved = store.get_or_create_collection("art", "ViT-L-14", checkpoint, 768, checkpoint_path="/new/a.pt")
    assert moved.checkpoint_path == "/new/a.pt" == store.collection("art").checkpoint_path
    with pytest.raises(CollectionMismatchError):  # another checkpoint: refused, and the path is untouched
        store.get_or_create_collection("art", "ViT-L-14", "sha256:" + sha("other"), 768, checkpoint_path="/b.pt")
    assert store.collection("art").checkpoint_path == "/new/a.pt"
    with pytest.raises(InvalidRecordError, match="checkpoint_path must be an absolute path.*got 'a.pt'"):
        store.create_collection("x", "ViT-L-14", checkpoint, 768, checkpoint_path="a.pt")
    with pytest.raises(InvalidRecordError, match="got '/a.pt' for pretrained 'openai'"):
        store.create_collection("x", "ViT-L-14", "openai", 768, checkpoint_path="/a.pt")


# -- images and embeddings --------------------------------------------------------------------


def test_images_round_trip(store):
    coll, ids, vectors = add_photos(store)
    assert ids == sorted(ids) and len(set(ids)) == 6
    images = store.images(coll.id)
    assert [i.uri for i in images] == [f"/data/photos/{i}.jpg" for i in range(6)]
    first = store.image(ids[0])
    assert (first.width, first.height, first.metadata, first.caption, first.deleted) == (
        640,
        480,
        {"n": 0},
        None,
        False,
    )
    assert first.added.tzinfo is not None
    assert store.image(ids[1]).caption == "photo 1"
    got_ids, got = store.embeddings(coll.id)
    assert got_ids.dtype == np.int64 and got.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got, vectors, rtol=1e-3, atol=1e-3)  # float16 storage
    np.testing.assert_array_equal(got, vectors.astype(np.float16).astype(np.float32))
    sub_ids, sub = store.embeddings(coll.id, [ids[3], ids[1]])
    np.testing.assert_array_equal(sub_ids, [ids[1], ids[3]])
    np.testing.assert_array_equal(sub, got[[1, 3]])


def test_float32_embeddings_are_exact(store):
    coll, ids, vectors = add_photos(store, dtype="float32")
    np.testing.assert_array_equal(store.embeddings(coll.id)[1], vectors)


def test_bad_batches_store_nothing(store):
    coll, ids, _ = add_photos(store, n=2)
    good = ImageRecord("/new/a.jpg", sha("a"), 10, 10)
    with pytest.raises(InvalidRecordError, match="shape \\(1, 3\\); collection 'photos' needs \\(1, 8\\)"):
        store.add_images(coll.id, [good], np.zeros((1, 3)))
    with pytest.raises(InvalidRecordError, match="row 1 \\('/new/b.jpg'\\) is not finite as float16"):
        store.add_images(
            coll.id,
            [good, ImageRecord("/new/b.jpg", sha("b"), 1, 1)],
            np.array([[0.0] * 8, [1e6] * 8]),
        )
    with pytest.raises(InvalidRecordError, match="sha256 must be 64 lowercase hex digits, got 'XYZ'"):
        store.add_images(coll.id, [ImageRecord("/new/c.jpg", "XYZ", 1, 1)], np.zeros((1, 8)))
    with pytest.raises(InvalidRecordError, match="width must be a positive int, got -1"):
        store.add_images(coll.id, [ImageRecord("/new/c.jpg", sha("c"), -1, 1)], np.zeros((1, 8)))
    with pytest.raises(DuplicateImageError, match=f"'/data/photos/1.jpg' is already image {ids[1]}"):
        store.add_images(coll.id, [good, ImageRecord("/data/photos/1.jpg", sha("d"), 1, 1)], np.zeros((2, 8)))
    with pytest.raises(DuplicateImageError, match="appears twice in the batch \\(records 0 and 1\\)"):
        store.add_images(coll.id, [good, good], np.zeros((2, 8)))
    assert [i.id for i in store.images(coll.id)] == ids
    assert store.check_consistency().ok


def test_find_image(store, tmp_path):
    coll, ids, _ = add_photos(store, n=3)
    other, other_ids, _ = add_photos(store, n=2, name="other")
    path = tmp_path / "cat.jpg"
    [cat] = store.add_images(coll.id, [ImageRecord(str(path), sha("cat"), 1, 1)], np.zeros((1, 8)))
    assert store.find_image(coll.id, ids[1]).id == ids[1]
    assert store.find_image("photos", str(ids[1])).id == ids[1]
    assert store.find_image(coll, "/data/photos/2.jpg").id == ids[2]
    assert store.find_image(coll.id, str(tmp_path / "x" / ".." / "cat.jpg")).id == cat
    with pytest.raises(UnknownImageError, match="no image '/nope.jpg' in collection 'photos'"):
        store.find_image(coll.id, "/nope.jpg")
    with pytest.raises(ForeignImageError, match=f"image {other_ids[0]} .* is in collection 'other', not 'photos'"):
        store.find_image(coll.id, other_ids[0])
    store.mark_deleted([ids[0]])
    with pytest.raises(UnknownImageError, match=f"image {ids[0]} \\(/data/photos/0.jpg\\) was deleted"):
        store.find_image(coll.id, ids[0])
    with pytest.raises(UnknownImageError, match="unknown image id 999"):
        store.image(999)


def test_content_version_changes_with_the_images_only(store):
    coll, ids, _ = add_photos(store)
    other, _, _ = add_photos(store, n=2, name="other")
    seen = [store.content_version(coll.id)]
    store.add_pair("ann", "cat", ids[0], ids[1])  # preferences are not content
    assert store.content_version(coll.id) == seen[-1]
    store.mark_deleted([ids[2]])
    seen.append(store.content_version(coll.id))
    store.mark_deleted([ids[2]])  # already deleted: nothing changes
    assert store.content_version(coll.id) == seen[-1]
    add_photos(store, n=1, seed=1, name="photos_extra")
    store.add_images(coll.id, [ImageRecord("/data/new.jpg", sha("new"), 1, 1)], np.zeros((1, 8)))
    seen.append(store.content_version(coll.id))
    assert len(set(seen)) == 3
    assert store.content_version(other.id) == store.content_version(other.id)
    with pytest.raises(UnknownCollectionError, match="unknown collection id 999"):
        store.content_version(999)


def test_mark_deleted(store):
    coll, ids, vectors = add_photos(store)
    assert store.mark_deleted([ids[1], ids[4]]) == 2
    assert store.mark_deleted([ids[1]]) == 0
    np.testing.assert_array_equal(store.deleted_ids(coll.id), [ids[1], ids[4]])
    np.testing.assert_array_equal(store.image_ids(coll.id), [ids[0], ids[2], ids[3], ids[5]])
    assert [i.id for i in store.images(coll.id)] == [ids[0], ids[2], ids[3], ids[5]]
    assert len(store.images(coll.id, include_deleted=True)) == 6
    assert store.embeddings(coll.id)[0].tolist() == [ids[0], ids[2], ids[3], ids[5]]
    with pytest.raises(UnknownImageError, match=f"\\[{ids[1]}\\] are not live images"):
        store.embeddings(coll.id, [ids[1]])
    assert store.embeddings(coll.id, [ids[1]], include_deleted=True)[0].tolist() == [ids[1]]
    with pytest.raises(UnknownImageError, match="unknown image ids \\[999\\]"):
        store.mark_deleted([ids[0], 999])
    assert not store.image(ids[0]).deleted
    # a deleted uri may come back as a new image, with a new id
    [again] = store.add_images(coll.id, [ImageRecord("/data/photos/1.jpg", sha("x"), 1, 1)], np.zeros((1, 8)))
    assert again > max(ids)


# -- preferences ------------------------------------------------------------------------------


def test_pairs_and_duplicates(store):
    coll, ids, _ = add_photos(store)
    p1 = store.add_pair("ann", " red car ", ids[0], ids[1])
    assert store.users() == ["ann"]
    assert store.add_pair("ann", "red car", ids[0], ids[1]) == p1  # resubmitted: stored once
    p2 = store.add_pair("ann", "red car", ids[1], ids[0], weight=0.5, source="click")
    p3 = store.add_pair("ann", "red car", ids[0], ids[1])  # again, but not in a row: new evidence
    assert len({p1, p2, p3}) == 3
    pairs = store.pairs("ann")
    assert [(p.id, p.query, p.preferred_id, p.rejected_id, p.weight, p.source) for p in pairs] == [
        (p1, "red car", ids[0], ids[1], 1.0, "pair"),
        (p2, "red car", ids[1], ids[0], 0.5, "click"),
        (p3, "red car", ids[0], ids[1], 1.0, "pair"),
    ]
    assert all(p.user == "ann" and p.collection_id == coll.id and p.ranking_id is None for p in pairs)


def test_bad_preferences_name_the_value(store):
    coll, ids, _ = add_photos(store)
    _, other_ids, _ = add_photos(store, n=2, name="other")
    cases = [
        (InvalidPreferenceError, f"same image {ids[0]}", (ids[0], ids[0])),
        (UnknownImageError, "unknown image id 999", (ids[0], 999)),
        (ForeignImageError, f"image {other_ids[0]} is in collection", (ids[0], other_ids[0])),
    ]
    for error, message, (a, b) in cases:
        with pytest.raises(error, match=message):
            store.add_pair("ann", "cat", a, b)
    with pytest.raises(InvalidPreferenceError, match="non-empty query text, got '  '"):
        store.add_pair("ann", "  ", ids[0], ids[1])
    with pytest.raises(InvalidPreferenceError, match="positive finite number, got nan"):
        store.add_pair("ann", "cat", ids[0], ids[1], weight=float("nan"))
    store.mark_deleted([ids[2]])
    with pytest.raises(UnknownImageError, match=f"image {ids[2]} was deleted"):
        store.add_pair("ann", "cat", ids[2], ids[1])
    with pytest.raises(InvalidPreferenceError, match="at least 2 images, got \\[" + str(ids[0])):
        store.add_ranking("ann", "cat", [ids[0]])
    with pytest.raises(InvalidPreferenceError, match=f"images \\[{ids[1]}\\] appear more than once"):
        store.add_ranking("ann", "cat", [ids[1], ids[0], ids[1]])
    with pytest.raises(InvalidPreferenceError, match=f"images \\[{ids[0]}\\] are marked both good and bad"):
        store.add_feedback("ann", "cat", [ids[0]], [ids[0], ids[1]])
    with pytest.raises(UnknownUserError, match="unknown user 'bob'"):
        store.pairs("bob")
    assert store.users() == []  # refused calls store nothing, not even the user


def test_rankings_and_feedback_imply_pairs(store):
    coll, ids, _ = add_photos(store)
    a, b, c, d, e, f = ids
    r = store.add_ranking("ann", "beach", [c, a, b])
    assert store.add_ranking("ann", "beach", [c, a, b]) == r
    fb = store.add_feedback("ann", "beach", good_ids=[d, e], bad_ids=[f])
    thumbs_only = store.add_feedback("ann", "forest", good_ids=[a], bad_ids=[])
    [ranking] = store.rankings("ann")
    assert (ranking.id, ranking.query, ranking.image_ids, ranking.source) == (
        r,
        "beach",
        [c, a, b],
        "ranking",
    )
    got = store.feedback("ann")
    assert [(x.id, x.good_ids, x.bad_ids) for x in got] == [
        (fb, [d, e], [f]),
        (thumbs_only, [a], []),
    ]
    pairs = store.pairs("ann")
    assert [(p.preferred_id, p.rejected_id, p.ranking_id, p.source) for p in pairs] == [
        (c, a, r, "ranking"),
        (c, b, r, "ranking"),
        (a, b, r, "ranking"),
        (d, f, fb, "feedback"),
        (e, f, fb, "feedback"),
    ]
    assert all(p.id is None and p.weight == 1.0 and p.query == "beach" for p in pairs)


def test_pair_filters(store):
    coll, ids, _ = add_photos(store)
    other, other_ids, _ = add_photos(store, n=2, name="other")
    store.add_pair("ann", "cat", ids[0], ids[1])
    store.add_pair("ann", "dog", ids[2], ids[3])
    store.add_pair("ann", "cat", other_ids[0], other_ids[1])
    store.add_ranking("ann", "cat", [ids[4], ids[5]])
    store.add_pair("bob", "cat", ids[1], ids[0])
    assert len(store.pairs("ann")) == 4
    assert [(p.query, p.collection_id) for p in store.pairs("ann", collection_id=coll.id)] == [
        ("cat", coll.id),
        ("dog", coll.id),
        ("cat", coll.id),
    ]
    assert [p.preferred_id for p in store.pairs("ann", "photos", query="cat")] == [ids[0], ids[4]]
    assert [p.preferred_id for p in store.pairs("ann", other.id)] == [other_ids[0]]
    assert store.rankings("ann", other.id) == []
    assert [p.preferred_id for p in store.pairs("bob")] == [ids[1]]


def test_preference_version_and_delete_user(store):
    coll, ids, _ = add_photos(store)
    store.ensure_user("ann")
    versions = [store.preference_version("ann")]
    store.add_pair("ann", "cat", ids[0], ids[1])
    versions.append(store.preference_version("ann"))
    store.add_pair("ann", "cat", ids[0], ids[1])  # duplicate: no change
    assert store.preference_version("ann") == versions[-1]
    store.add_ranking("ann", "cat", ids[:3])
    versions.append(store.preference_version("ann"))
    store.add_feedback("ann", "dog", [ids[3]], [ids[4]])
    versions.append(store.preference_version("ann"))
    store.add_pair("bob", "cat", ids[0], ids[1])
    assert store.preference_version("ann") == versions[-1]
    assert len(set(versions)) == 4
    assert store.delete_user("ann") == {"pairs": 1, "rankings": 1, "feedback": 1, "users": 1}
    assert store.users() == ["bob"]
    with pytest.raises(UnknownUserError, match="unknown user 'ann'"):
        store.preference_version("ann")
    counts = store.check_consistency().counts
    assert (counts["pairs"], counts["rankings"], counts["ranking_items"]) == (1, 0, 0)
    store.ensure_user("ann")  # re-created: never an old version, so no stale cache hit
    assert store.preference_version("ann") not in versions
    assert store.preference_versions(["bob", "ann", "carol", "bob"]) == {
        "ann": store.preference_version("ann"),
        "bob": store.preference_version("bob"),
        "carol": None,
    }
    many = store.preference_versions([f"nobody{i}" for i in range(1200)] + ["bob"])  # several IN chunks
    assert len(many) == 1201 and many["bob"] == store.preference_version("bob") and many["nobody7"] is None


def test_consistency_check_finds_damage(store):
    coll, ids, _ = add_photos(store, n=3)
    store.add_pair("ann", "cat", ids[0], ids[1])
    report = store.check_consistency()
    assert report.ok, str(report)
    assert report.counts["images"] == 3
    with store._engine.begin() as conn:  # damage behind the API's back
        conn.execute(sa.text("DELETE FROM embeddings WHERE image_id = :i"), {"i": ids[2]})
        conn.execute(
            sa.text("UPDATE embeddings SET data = :d WHERE image_id = :i"),
            {"d": b"xx", "i": ids[1]},
        )
    report = store.check_consistency()
    assert not report.ok
    assert f"images without an embedding, e.g. [{ids[2]}]" in str(report)
    assert f"embeddings of the wrong size, e.g. [{ids[1]}]" in str(report)


def test_sqlite_file_is_a_real_database(isolated_home):
    with Store.open() as store:
        add_photos(store, n=2)
    rows = sqlite3.connect(isolated_home / "clipbt.db").execute("SELECT uri FROM images ORDER BY id").fetchall()
    assert rows == [("/data/photos/0.jpg",), ("/data/photos/1.jpg",)]
