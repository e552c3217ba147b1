"""What must survive: concurrent writers, SIGKILLed writers, and stores written by older schemas."""

import hashlib
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from indexer.vectors.collection import IndexFiles
from indexer.vectors.faiss import FaissIndex
from storage import ImageRecord, Store, _schema
from storage.errors import SchemaVersionError

V1_DUMP = Path(__file__).parent / "data" / "store_v1.sql"


def add_photos(store, n):
    coll = store.get_or_create_collection("photos", "ViT-B-32", "openai", 4)
    records = [ImageRecord(f"/p/{i}.jpg", hashlib.sha256(b"%d" % i).hexdigest(), 8, 8) for i in range(n)]
    vectors = np.random.default_rng(0).standard_normal((n, 4))
    return coll, store.add_images(coll.id, records, vectors)


def url_text(store_url):
    return None if store_url is None else store_url.render_as_string(hide_password=False)


# -- concurrency ------------------------------------------------------------------------------


def _write_pairs(url, worker, ids, n):
    """One writer process: n distinct pairs from the same user; returns the ids it was given."""
    got = []
    with Store.open(url) as store:
        for i in range(n):
            a, b = ids[i % len(ids)], ids[(i + 1 + worker) % len(ids)]
            got.append(store.add_pair("shared", f"worker {worker} query {i}", a, b))
    return got


@pytest.mark.slow
def test_four_processes_write_2000_pairs(store_url):
    """4 x 500 pairs into one SQLite file (4 x 100 on PostgreSQL, where one user's writes queue
    on a row lock at a network round trip each): every row lands once, no error reaches a writer."""
    n = 500 if store_url is None else 100
    with Store.open(store_url) as store:
        _, ids = add_photos(store, 8)
    url = url_text(store_url)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_write_pairs, [(url, w, ids, n) for w in range(4)])
    returned = [i for r in results for i in r]
    assert len(returned) == len(set(returned)) == 4 * n
    with Store.open(store_url) as store:
        report = store.check_consistency()
        assert report.ok, str(report)
        assert report.counts["pairs"] == 4 * n
        assert sorted(p.id for p in store.pairs("shared")) == sorted(returned)
        assert store.preference_version("shared") & 0xFFFFFFFF == 4 * n


# -- crash ------------------------------------------------------------------------------------


def _crash_writer(write_fd, run, coll_id, ids):
    """Forked child: write forever, printing what each returned call stored; never returns."""
    try:
        out = os.fdopen(write_fd, "w", buffering=1)
        rng = np.random.default_rng(run)
        with Store.open() as store:
            print("open", file=out)
            for step in range(10**9):
                if step % 7 == 3:
                    order = [int(i) for i in rng.permutation(ids)[:3]]
                    rid = store.add_ranking("crash", f"run {run} step {step}", order)
                    print("ranking", rid, *order, file=out)
                elif step % 5 == 4:
                    uri = f"/run{run}/{step}.jpg"
                    record = ImageRecord(uri, hashlib.sha256(uri.encode()).hexdigest(), 8, 8)
                    [new] = store.add_images(coll_id, [record], rng.standard_normal((1, 4)))
                    print("image", new, uri, file=out)
                else:
                    a, b = (int(i) for i in rng.choice(ids, 2, replace=False))
                    pid = store.add_pair("crash", f"run {run} step {step}", a, b)
                    print("pair", pid, a, b, file=out)
    finally:
        os._exit(0)


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_write(isolated_home):
    """24 seeded runs: a forked writer is SIGKILLed after a random delay (sometimes while it is
    still opening the store); every write it reported must be there and the store consistent."""
    with Store.open() as store:
        coll, ids = add_photos(store, 10)
    rng = random.Random(1234)
    acked = {"pair": {}, "ranking": {}, "image": {}}
    for run in range(24):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _crash_writer(write_fd, run, coll.id, ids)
        os.close(write_fd)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd) as pipe:
            lines = pipe.read().splitlines()
        for line in lines[1:]:
            kind, key, *rest = line.split()
            if len(rest) == (1 if kind == "image" else 2 if kind == "pair" else 3):  # a complete line
                acked[kind][int(key)] = rest
        with Store.open() as store:
            report = store.check_consistency()
            assert report.ok, f"run {run}: {report}"
            pairs = {p.id: [str(p.preferred_id), str(p.rejected_id)] for p in store.pairs("crash") if p.id}
            assert {k: pairs.get(k) for k in acked["pair"]} == acked["pair"], f"run {run}"
            rankings = {r.id: [str(i) for i in r.image_ids] for r in store.rankings("crash")}
            assert {k: rankings.get(k) for k in acked["ranking"]} == acked["ranking"], f"run {run}"
            image_ids = sorted(acked["image"])
            assert [[store.image(i).uri] for i in image_ids] == [acked["image"][i] for i in image_ids]
            assert store.embeddings(coll.id, image_ids)[0].tolist() == image_ids
    assert min(len(v) for v in acked.values()) > 0, acked  # the kills did land mid-work


def _save_forever(write_fd, coll_name, index):
    try:
        out = os.fdopen(write_fd, "w", buffering=1)
        with Store.open() as store:
            vs = IndexFiles(store, store.collection(coll_name))
            while True:
                vs.save(index, "flat")
                print("saved", file=out)
    finally:
        os._exit(0)


@pytest.mark.slow
def test_sigkill_during_index_save_leaves_a_loadable_index(isolated_home):
    with Store.open() as store:
        coll, ids = add_photos(store, 200)
        index = FaissIndex.build(*store.embeddings(coll.id), "flat", gpu=False)
        IndexFiles(store, coll).save(index, "flat")
    rng = random.Random(99)
    for run in range(10):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _save_forever(write_fd, coll.name, index)
        os.close(write_fd)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        with Store.open() as store:
            vs = IndexFiles(store, coll)
            loaded = vs.load()
            assert loaded is not None, f"run {run}: {vs.reason}"
            assert len(loaded) == 200


# -- schema versions --------------------------------------------------------------------------


def open_v1_dump(home):
    """The frozen store written by schema version 1, restored into <home>/clipbt.db."""
    conn = sqlite3.connect(home / "clipbt.db")
    conn.executescript(V1_DUMP.read_text())
    conn.close()
    return Store.open()


def test_v1_store_opens_with_everything_intact(isolated_home):
    with open_v1_dump(isolated_home) as store:
        assert store.schema_version == _schema.SCHEMA_VERSION
        assert store.store_id == "03116c9cc5104c26af6a8dc75a25e29f"
        report = store.check_consistency()
        assert report.ok, str(report)
        photos, art = store.collections()
        assert (photos.name, photos.dim, photos.embedding_dtype) == ("photos", 4, "float16")
        assert art.pretrained.startswith("sha256:be4e4dc1") and art.embedding_dtype == "float32"
        assert photos.checkpoint_path is None and art.checkpoint_path is None  # v2's column, empty
        images = store.images(photos.id, include_deleted=True)
        assert [(i.id, i.uri, i.deleted) for i in images] == [
            (1, "/data/photos/0.jpg", False),
            (2, "/data/photos/1.jpg", False),
            (3, "/data/photos/2.jpg", False),
            (4, "/data/photos/3.jpg", True),
        ]
        assert (images[0].caption, images[1].metadata) == ("a cat", {"exif": {"iso": 100}})
        expected = [[0.35, 0.82, 0.33, -1.3], [0.91, 0.45, -0.54, 0.58], [0.36, 0.29, 0.03, 0.55]]
        np.testing.assert_array_equal(store.embeddings(photos.id)[1], np.float16(expected))
        np.testing.assert_array_equal(
            store.embeddings(art.id)[1],
            np.float32([[0.04, -0.29, -0.78, -0.26], [0.01, -0.28, 1.29, 1.01]]),
        )
        assert [(p.query, p.preferred_id, p.rejected_id, p.weight, p.source) for p in store.pairs("ann")] == [
            ("a cat", 1, 2, 1.0, "pair"),
            ("a dog", 3, 1, 0.5, "click"),
            ("a cat", 2, 3, 1.0, "ranking"),
            ("a cat", 2, 1, 1.0, "ranking"),
            ("a cat", 3, 1, 1.0, "ranking"),
        ]
        assert [r.image_ids for r in store.rankings("ann")] == [[2, 3, 1]]
        assert [(f.good_ids, f.bad_ids) for f in store.feedback("bob")] == [([3], [1, 2])]
        assert store.users() == ["ann", "bob"]
        # and it keeps working: new ids continue after the old ones
        [new] = store.add_images(photos.id, [ImageRecord("/n.jpg", "0" * 64, 1, 1)], np.ones((1, 4)))
        assert new == 7
        assert store.add_pair("ann", "a cat", new, 1) == 4


def test_upgraded_v1_schema_equals_a_fresh_one(isolated_home, tmp_path):
    def shape(engine):
        inspector = sa.inspect(engine)
        return {
            t: (
                sorted(c["name"] for c in inspector.get_columns(t)),
                sorted(i["name"] for i in inspector.get_indexes(t)),
            )
            for t in inspector.get_table_names()
        }

    with open_v1_dump(isolated_home) as upgraded:
        with Store.open(f"sqlite:///{tmp_path}/fresh.db") as fresh:
            assert shape(upgraded._engine) == shape(fresh._engine)


CURRENT = _schema.SCHEMA_VERSION


def _patch_migrations(monkeypatch, fail_at=None):
    """Pretend the code is two schema versions ahead, with two more migrations."""

    def add_rating(conn):
        conn.execute(sa.text("ALTER TABLE images ADD COLUMN rating INTEGER"))

    def add_index(conn):
        if fail_at == 2:
            raise RuntimeError("migration 2 failed")
        conn.execute(sa.text("CREATE INDEX ix_images_rating ON images (rating)"))

    monkeypatch.setattr(_schema, "SCHEMA_VERSION", CURRENT + 2)
    monkeypatch.setattr(_schema, "MIGRATIONS", {**_schema.MIGRATIONS, CURRENT: add_rating, CURRENT + 1: add_index})


def test_migrations_upgrade_in_one_transaction(store_url, monkeypatch):
    with Store.open(store_url) as store:
        coll, ids = add_photos(store, 3)
        store.add_pair("ann", "cat", ids[0], ids[1])
    with monkeypatch.context() as patch:
        _patch_migrations(patch, fail_at=2)
        with pytest.raises(RuntimeError, match="migration 2 failed"):
            Store.open(store_url)
    with Store.open(store_url) as store:  # rolled back: still a good store at the current version
        assert store.schema_version == CURRENT
        assert "rating" not in [c["name"] for c in sa.inspect(store._engine).get_columns("images")]
    _patch_migrations(monkeypatch)
    with Store.open(store_url) as store:
        assert store.schema_version == CURRENT + 2
        assert "rating" in [c["name"] for c in sa.inspect(store._engine).get_columns("images")]
        assert [i.id for i in store.images(coll.id)] == ids
        assert len(store.pairs("ann")) == 1
    with Store.open(store_url) as store:  # migrations run once
        assert store.schema_version == CURRENT + 2


def test_a_newer_store_is_refused(store_url):
    with Store.open(store_url) as store:
        with store._engine.begin() as conn:
            conn.execute(sa.text("UPDATE clipbt_meta SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(
        SchemaVersionError, match=f"schema version 99, newer than this clipbt understands \\({CURRENT}\\)"
    ):
        Store.open(store_url)
