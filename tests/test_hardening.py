"""Issue 17, one test per class of failure: bad input refused with its exact error and nothing stored, imports all-or-nothing and repeatable, bounded cost, a full disk, concurrency, privacy."""

import hashlib
import json
import os
import stat
import threading

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from test_engine_search import DIM, TEST_MODEL, _unit

from engine.cli import main
from engine.preferences import (
    PreferenceRecordError,
    export_preferences,
    import_preferences,
)
from engine.search import (
    Engine,
    SearchConfig,
    SearchInputError,
    _append_pairs,
    _keep_recent,
)
from storage import ImageRecord, Store
from storage.errors import (
    DiskFullError,
    InvalidPreferenceError,
    InvalidRecordError,
    InvalidUserError,
    UnknownImageError,
)
from storage.limits import LIMITS, LimitError, normalize_user


def fill(store, n=12, seed=0, start=0):
    """n seeded images with unit embeddings in collection 'default' (uris /img/NNN.png); their ids."""
    rng = np.random.default_rng(seed)
    coll = store.get_or_create_collection("default", TEST_MODEL, "random", DIM, "float32")
    records = [
        ImageRecord(f"/img/{i:03d}.png", hashlib.sha256(str(i).encode()).hexdigest(), 32, 32)
        for i in range(start, start + n)
    ]
    return store.add_images(coll.id, records, _unit(rng.standard_normal((n, DIM))))


def stored_rows(store) -> dict[str, int]:
    """Rows of every preference table: what "nothing stored" is checked against."""
    with store._engine.connect() as conn:
        return {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("users", "pairs", "rankings", "ranking_items")
        }


def nothing_stored(store) -> bool:
    return stored_rows(store) == {"users": 0, "pairs": 0, "rankings": 0, "ranking_items": 0}


# -- prefs import: all or nothing, every bad line reported, repeatable --------------------------------


def _lines(ids):
    good = {
        "kind": "pair",
        "user": "ann",
        "collection": "default",
        "query": "a cat",
        "preferred": ids[0],
        "rejected": "/img/001.png",
    }
    return [
        json.dumps(good).encode(),  # 1 good
        b'{"kind": "pair", "user": "\xff\xfe"}',  # 2 not UTF-8
        b"[1, 2]",  # 3 JSON, not an object
        json.dumps({**good, "kind": "ranking", "images": "12"}).encode(),  # 4 wrong type
        b'{"kind": "pair", "user": "ann", "collection": "default", "query": "\\ud800", '
        b'"preferred": 1, "rejected": 2}',  # 5 lone surrogate
        json.dumps({**good, "user": "a\x00b"}).encode(),  # 6 NUL
        json.dumps({**good, "preferred": 10**30}).encode(),  # 7 id beyond int64
        b"",  # 8 blank: skipped
        json.dumps({**good, "query": "a dog"}).encode(),  # 9 good
        b"{not json",  # 10
        json.dumps({**good, "weight": "2"}).encode(),  # 11 weight a string
    ]


BAD_LINES = [
    "nothing imported: 8 bad lines",
    "line 2: is not UTF-8 text (byte 26: invalid start byte)",
    "line 3: is JSON but not an object: list '[1, 2]'",
    "line 4: field 'images' must be a list of image ids or paths, got a string",
    "line 5: query text contains a lone surrogate '\\ud800' at character 0, which is not valid Unicode text",
    "line 6: user name contains a NUL character (\\x00), which cannot be stored: 'a\\x00b'",
    "line 7: image id 1000000000000000000000000000000 is outside the range of ids (0 to 9223372036854775807)",
    "line 10: is not JSON: Expecting property name enclosed in double quotes (column 2)",
    "line 11: field 'weight' must be a number, got a string",
]


def test_prefs_import_reports_every_bad_line_and_stores_nothing(store):
    ids = fill(store)
    with pytest.raises(PreferenceRecordError) as caught:
        import_preferences(store, _lines(ids))
    assert str(caught.value) == "\n".join(BAD_LINES)
    assert nothing_stored(store)


def test_prefs_import_cli_refuses_the_file_with_every_line(tmp_path):
    with Store.open(home=tmp_path) as store:
        ids = fill(store)
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(_lines(ids)))
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "prefs", "import", str(tmp_path / "bad.jsonl")])
    assert (result.exit_code, result.output) == (1, "Error: " + "\n".join(BAD_LINES) + "\n")
    with Store.open(home=tmp_path) as store:
        assert nothing_stored(store)


def test_prefs_import_twice_is_a_no_op_with_counts(store):
    ids = fill(store)
    store.add_pair("ann", "a cat", ids[0], ids[1])
    store.add_pair("ann", "a dog", ids[2], ids[3])
    store.add_ranking("bo", "a cow", ids[4:8])
    store.add_feedback("bo", "a cow", ids[8:9], ids[9:11])
    lines = [json.dumps(r) for r in export_preferences(store)]
    before = stored_rows(store)
    assert import_preferences(store, lines) == {
        "new": {"pair": 0, "ranking": 0, "feedback": 0},
        "present": {"pair": 2, "ranking": 1, "feedback": 1},
    }
    assert stored_rows(store) == before
    store.delete_user("ann")
    store.delete_user("bo")
    first = import_preferences(store, lines)
    assert first == {
        "new": {"pair": 2, "ranking": 1, "feedback": 1},
        "present": {"pair": 0, "ranking": 0, "feedback": 0},
    }
    assert import_preferences(store, lines) == {"new": dict.fromkeys(first["new"], 0), "present": first["new"]}
    assert stored_rows(store) == before
    assert [json.dumps(r) for r in export_preferences(store)] == lines


def test_prefs_import_cli_prints_new_and_present(tmp_path):
    with Store.open(home=tmp_path) as store:
        ids = fill(store)
    record = {
        "kind": "pair",
        "user": "ann",
        "collection": "default",
        "query": "a cat",
        "preferred": ids[0],
        "rejected": ids[1],
        "created": "2026-01-02T03:04:05.678901+00:00",
    }
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")

    def run():
        return CliRunner().invoke(main, ["--home", str(tmp_path), "prefs", "import", str(tmp_path / "a.jsonl")])

    assert run().output == "imported: 1 pair, 0 ranking, 0 feedback\nalready present: 0 pair, 0 ranking, 0 feedback\n"
    assert run().output == "imported: 0 pair, 0 ranking, 0 feedback\nalready present: 1 pair, 0 ranking, 0 feedback\n"


# -- text, names and ids: the same rules on SQLite and PostgreSQL, before any write -------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda s, i: s.add_pair("a\x00", "q", i[0], i[1]),
            InvalidUserError,
            "user name contains a NUL character (\\x00), which cannot be stored: 'a\\x00'",
        ),
        (
            lambda s, i: s.add_pair("ann", "a\x00cat", i[0], i[1]),
            LimitError,
            "query text contains a NUL character (\\x00), which cannot be stored: 'a\\x00cat'",
        ),
        (
            lambda s, i: s.add_pair("ann\ud800", "q", i[0], i[1]),
            InvalidUserError,
            "user name contains a lone surrogate '\\ud800' at character 3, which is not valid Unicode text",
        ),
        (
            lambda s, i: s.add_pair("ann", "x" * 1001, i[0], i[1]),
            LimitError,
            "query text is 1001 characters long; the maximum is 1000",
        ),
        (
            lambda s, i: s.add_pair("a" * 129, "q", i[0], i[1]),
            InvalidUserError,
            "user name is 129 characters long; the maximum is 128",
        ),
        (
            lambda s, i: s.add_pair("ali\u200bce", "q", i[0], i[1]),
            InvalidUserError,
            "user name 'ali\\u200bce' contains the invisible or control character U+200B at position 3; "
            "use visible characters only",
        ),
        (
            lambda s, i: s.add_pair("ann", "q", 2**63, i[1]),
            UnknownImageError,
            "image id 9223372036854775808 is outside the range of ids (0 to 9223372036854775807)",
        ),
        (lambda s, i: s.add_pair("ann", "q", 2**31, i[1]), UnknownImageError, "unknown image id 2147483648"),
        (
            lambda s, i: s.add_ranking("ann", "q", list(range(1, 102))),
            InvalidPreferenceError,
            "a ranking holds at most 100 images, got 101: record the top of it, or several rankings",
        ),
        (
            lambda s, i: s.add_feedback("ann", "q", list(range(1, 60)), list(range(60, 102))),
            InvalidPreferenceError,
            "one feedback marks at most 100 images, got 59 good and 42 bad",
        ),
    ],
)
def test_bad_text_names_and_ids_are_refused_before_writing(store, call, error, message):
    ids = fill(store)
    with pytest.raises(error) as caught:
        call(store, ids)
    assert str(caught.value) == message
    assert nothing_stored(store)


def test_user_names_are_normalised_to_one_user(store):
    ids = fill(store)
    store.add_pair("alice", "q", ids[0], ids[1])
    store.add_pair(" alice ", "r", ids[0], ids[1])
    store.add_pair("Ame\u0301lie", "q", ids[0], ids[1])  # decomposed é
    assert store.users() == ["Am\u00e9lie", "alice"]
    assert len(store.pairs("alice\t")) == 2
    assert normalize_user("  Am\u00e9lie ") == "Am\u00e9lie"


def test_image_refs_are_plain_decimal_ids_or_known_paths(store):
    ids = fill(store)
    assert store.find_image("default", str(ids[3])).id == ids[3]
    assert store.find_image("default", "/img/004.png").id == ids[4]
    for ref, message in [
        ("\u00b9", "no image '¹' in collection 'default'"),
        ("\u0661\u0662", "no image '١٢' in collection 'default'"),
        ("+1", "no image '+1' in collection 'default'"),
        ("9" * 31, "image id 9999999999999999999999999999999 is outside the range of ids (0 to 9223372036854775807)"),
        (2**40, "no image 1099511627776 in collection 'default'"),
    ]:
        with pytest.raises(UnknownImageError) as caught:
            store.find_image("default", ref)
        assert str(caught.value) == message


# -- racing writes and deletes of one user --------------------------------------------------------------


def test_prefer_racing_users_delete_loses_no_write_and_counts_every_row(store_url):
    """A write after a delete recreates the user; what every delete reports plus what is left is
    exactly what was written."""
    with Store.open(store_url) as store:
        ids = fill(store)
    written, removed, errors = [], [], []

    def writer():
        with Store.open(store_url) as s:
            for n in range(60):
                try:
                    if n % 3 == 2:
                        s.add_ranking("u", f"q{n}", ids[:3])
                    else:
                        s.add_pair("u", f"q{n}", ids[0], ids[1])
                    written.append("rankings" if n % 3 == 2 else "pairs")
                except Exception as exc:  # noqa: BLE001 - every failure is collected
                    errors.append(exc)

    def deleter():
        with Store.open(store_url) as s:
            for _ in range(30):
                try:
                    removed.append(s.delete_user("u"))
                except Exception as exc:  # noqa: BLE001
                    if "unknown user" not in str(exc):
                        errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store.open(store_url) as store:
        left = {"pairs": 0, "rankings": 0}
        if "u" in store.users():
            left = {"pairs": sum(p.id is not None for p in store.pairs("u")), "rankings": len(store.rankings("u"))}
    for kind in ("pairs", "rankings"):
        assert sum(r[kind] for r in removed) + left[kind] == written.count(kind)


# -- search input ---------------------------------------------------------------------------------------


@pytest.fixture
def engine(store, encoder):
    fill(store, 40)
    return Engine(store, store.collection("default"), encoder=encoder, config=SearchConfig(scope="all"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=LIMITS.k_max + 1), "k must be at most 10000, got 10001"),
        (dict(k=10**30), "k must be at most 10000, got 1000000000000000000000000000000"),
        (dict(k=41), "k is 41, but collection 'default' has 40 images: ask for at most 40"),
        (dict(query="x" * 1001), "query text is 1001 characters long; the maximum is 1000"),
        (dict(query="a\x00b"), "query text contains a NUL character (\\x00), which cannot be stored: 'a\\x00b'"),
    ],
)
def test_search_bounds(engine, kwargs, message):
    with pytest.raises((SearchInputError, LimitError)) as caught:
        engine.search(**{"query": "a cat", **kwargs})
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(steps=LIMITS.steps_max + 1), "steps must be a whole number from 0 to 100, got 101"),
        (dict(lr=float("nan")), "lr must be a number in [0, 100], got nan"),
        (dict(lr=1e9), "lr must be a number in [0, 100], got 1000000000.0"),
        (dict(beta=0.0), "beta must be a number in (0, 1000], got 0.0"),
    ],
)
def test_adaptation_settings_are_bounded(changes, message):
    from dataclasses import replace

    with pytest.raises(LimitError) as caught:
        SearchConfig(adapt=replace(SearchConfig().adapt, **changes))
    assert str(caught.value) == message


def test_compare_of_an_image_with_itself_is_refused(engine):
    ids = engine.store.image_ids("default")
    with pytest.raises(SearchInputError) as caught:
        engine.compare(None, "a cat", int(ids[2]), "/img/002.png")
    assert (
        str(caught.value)
        == f"compare needs two different images, got image {ids[2]} twice ({int(ids[2])!r} and '/img/002.png')"
    )


def test_a_query_vector_whose_norm_overflows_float32_keeps_its_direction(engine):
    direction = _unit(np.random.default_rng(3).standard_normal(DIM))
    huge = np.sign(direction) * np.float32(1e38) * (np.abs(direction) > 0.05)
    small = huge / np.float32(1e38)
    assert [h.id for h in engine.search(vector=huge, k=5)] == [h.id for h in engine.search(vector=small, k=5)]
    assert engine.search(vector=huge, k=1)[0].similarity > 0.2


CLI_REFUSALS = [
    (("search", "--vector", "{v}", "-k", "1000000000"), "Error: k must be at most 10000, got 1000000000\n"),
    (("search", "--vector", "{v}", "-k", "9" * 31), f"Error: k must be at most 10000, got {'9' * 31}\n"),
    (
        ("search", "--vector", "{v}", "-k", "13"),
        "Error: k is 13, but collection 'default' has 12 images: ask for at most 12\n",
    ),
    (
        ("search", "--vector", "{v}", "--steps", "1000000"),
        "Error: steps must be a whole number from 0 to 100, got 1000000\n",
    ),
    (("search", "--vector", "{v}", "--lr", "inf"), "Error: lr must be a number in [0, 100], got inf\n"),
    (
        ("prefer", "-u", "ann", "-q", "a cat", str(2**64), "2"),
        "Error: image id 18446744073709551616 is outside the range of ids (0 to 9223372036854775807)\n",
    ),
    (("prefer", "-u", "ann", "-q", "a cat", "\u00b92", "2"), "Error: no image '¹2' in collection 'default'\n"),
    (
        ("prefer", "-u", "ann\u200b", "-q", "a cat", "1", "2"),
        "Error: user name 'ann\\u200b' contains the invisible or control character U+200B at position 3; use visible characters only\n",
    ),
    (
        ("prefer", "-u", "ann", "-q", "x" * 1001, "1", "2"),
        "Error: query text is 1001 characters long; the maximum is 1000\n",
    ),
    (
        ("rank", "-u", "ann", "-q", "q", *map(str, range(1, 102))),
        "Error: a ranking holds at most 100 images, got 101: record the top of it, or several rankings\n",
    ),
    (
        ("compare", "-q", "a cat", "3", "3"),
        "Error: compare needs two different images, got image 3 twice ('3' and '3')\n",
    ),
]


@pytest.mark.parametrize(("args", "expected"), CLI_REFUSALS)
def test_cli_refusals_exit_1_without_traceback_and_store_nothing(tmp_path, args, expected):
    with Store.open(home=tmp_path) as store:
        fill(store)
    np.save(tmp_path / "v.npy", np.ones(DIM, np.float32))
    args = [a.replace("{v}", str(tmp_path / "v.npy")) for a in args]
    result = CliRunner().invoke(main, ["--home", str(tmp_path), *args])
    assert (result.exit_code, result.output) == (1, expected)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    with Store.open(home=tmp_path) as store:
        assert nothing_stored(store)


# -- bounded cost: a user's cached pairs grow by the new ones, capped --------------------------------------


def test_new_pairs_extend_the_cached_state_as_a_full_reload_would(store, encoder):
    ids = fill(store, 40)
    coll = store.collection("default")
    cached = Engine(store, coll, encoder=encoder, config=SearchConfig(scope="all"))
    rng = np.random.default_rng(1)
    for _step in range(4):  # grows from below the dimension (a Gram matrix) to above it (none)
        for _ in range(12):
            a, b = rng.choice(ids, 2, replace=False)
            store.add_pair("ann", f"q{rng.integers(3)}", int(a), int(b))
        store.add_ranking("ann", "q9", [int(i) for i in rng.choice(ids, 3, replace=False)])
        version = store.preference_version("ann")
        fast = cached._user_pairs("ann", version)
        slow = Engine(store, coll, encoder=encoder)._user_pairs("ann", version)

        def order(p):
            return np.lexsort((p.rejected, p.preferred))

        f, s = order(fast), order(slow)
        assert np.array_equal(fast.preferred[f], slow.preferred[s]) and np.array_equal(
            fast.rejected[f], slow.rejected[s]
        )
        assert [fast.texts[i] for i in fast.text_of_pair[f]] == [slow.texts[i] for i in slow.text_of_pair[s]]
        assert np.allclose(fast.pair_set.diffs[f], slow.pair_set.diffs[s])
        if slow.pair_set.gram is None:
            assert fast.pair_set.gram is None
        else:
            assert np.allclose(fast.pair_set.gram[np.ix_(f, f)], slow.pair_set.gram[np.ix_(s, s)])
        assert np.allclose(
            cached.search(vector=np.ones(DIM), user="ann", k=5)[0].similarity,
            Engine(store, coll, encoder=encoder, config=SearchConfig(scope="all"))
            .search(vector=np.ones(DIM), user="ann", k=5)[0]
            .similarity,
        )


def test_only_the_most_recent_pairs_are_kept():
    from engine.bt import PairSet
    from engine.search import _UserPairs

    rng = np.random.default_rng(0)

    def pairs(n, texts, version, first=0):
        y = _unit(rng.standard_normal((2 * n, DIM)))
        return _UserPairs(
            version,
            np.arange(first, first + n),
            np.arange(first, first + n) + 1000,
            np.ones(n),
            texts,
            np.arange(n) % len(texts),
            PairSet.of(y[:n], y[n:]),
            (first + n, 0),
        )

    old, new = pairs(20, ("a", "b"), 1), pairs(10, ("a", "b", "c"), 2, first=20)
    joined = _append_pairs(old, new, cap=25)
    assert joined.preferred.tolist() == list(range(5, 30))
    diffs = np.concatenate([old.pair_set.diffs, new.pair_set.diffs])[5:]
    assert np.allclose(joined.pair_set.diffs, diffs)
    assert np.allclose(joined.pair_set.gram, diffs.astype(np.float64) @ diffs.astype(np.float64).T)
    assert [joined.texts[i] for i in joined.text_of_pair] == [("a", "b")[i % 2] for i in range(5, 20)] + [
        ("a", "b", "c")[i % 3] for i in range(10)
    ]
    assert _keep_recent(old, cap=25) is old


# -- the loaded index is caught up, not rebuilt --------------------------------------------------------


def test_a_long_running_engine_adds_new_images_to_its_loaded_index(store, encoder):
    fill(store, 30)
    coll = store.collection("default")
    engine = Engine(store, coll, encoder=encoder)
    query = _unit(np.random.default_rng(5).standard_normal(DIM))
    engine.search(vector=query, k=5)
    new = fill(store, 3, seed=9, start=100)
    store.add_images(coll.id, [ImageRecord("/img/exact.png", "0" * 64, 32, 32)], query[None])
    store.mark_deleted([new[0]])
    hits = [h.id for h in engine.search(vector=query, k=10)]
    assert (engine.index_loads, engine.index_updates) == (1, 1)
    assert hits == [h.id for h in Engine(store, coll, encoder=encoder).search(vector=query, k=10)]
    assert hits[0] == store.find_image(coll.id, "/img/exact.png").id and new[0] not in hits


# -- import-embeddings --------------------------------------------------------------------------------


def _layout(root, vectors, table):
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", vectors)
    pq.write_table(table, root / "metadata" / "metadata_0.parquet")


def test_import_embeddings_refusals_name_the_problem_and_store_nothing(store, tmp_path):
    import datetime

    import pyarrow as pa

    from indexer.embeddings_io import import_embeddings
    from indexer.errors import EmbeddingsFormatError

    vectors = _unit(np.random.default_rng(0).standard_normal((3, DIM)))
    table = pa.table(
        {
            "image_path": ["a", "b", "c"],
            "taken": pa.array([datetime.datetime(2026, 1, 1)] * 3, pa.timestamp("us")),
            "blob": pa.array([b"x"] * 3, pa.binary()),
            "score": [1.0, 2.0, 3.0],
        }
    )
    _layout(tmp_path / "ok", vectors, table)
    store.create_collection("other", "ViT-B-32", "openai", 512)
    with pytest.raises(EmbeddingsFormatError) as caught:
        import_embeddings(store, tmp_path / "ok", "other", TEST_MODEL, "random")
    assert str(caught.value) == (
        f"embeddings of {str(tmp_path / 'ok')!r} are {TEST_MODEL}/random (dim 32), but collection 'other' holds "
        "ViT-B-32/openai (dim 512): nothing imported; import into another --collection, or give the --model and "
        "--pretrained they were made with"
    )
    _layout(tmp_path / "cut", vectors, table)
    data = (tmp_path / "cut" / "img_emb" / "img_emb_0.npy").read_bytes()
    (tmp_path / "cut" / "img_emb" / "img_emb_0.npy").write_bytes(data[:-40])
    with pytest.raises(
        EmbeddingsFormatError, match=r"img_emb_0.npy is not a readable .npy array \(truncated or damaged\?\)"
    ):
        import_embeddings(store, tmp_path / "cut", "default", TEST_MODEL, "random")
    _layout(tmp_path / "bad", vectors, table)
    (tmp_path / "bad" / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(EmbeddingsFormatError, match=r"metadata_0.parquet is not a readable parquet file: "):
        import_embeddings(store, tmp_path / "bad", "default", TEST_MODEL, "random")
    assert [c.name for c in store.collections()] == ["other"]
    report = import_embeddings(store, tmp_path / "ok", "default", TEST_MODEL, "random")
    assert (report.imported, report.rejected) == (3, [])
    assert [im.metadata for im in store.images("default")] == [
        {"score": 1.0, "size_unknown": True},
        {"score": 2.0, "size_unknown": True},
        {"score": 3.0, "size_unknown": True},
    ]


# -- index files: stale temporaries, a full disk, two runs at once -----------------------------------------


def test_temporaries_of_a_killed_save_are_removed_on_open(store):
    from indexer.vectors.collection import IndexFiles, open_index

    fill(store)
    coll = store.collection("default")
    open_index(store, coll)
    stale = IndexFiles(store, coll).directory / ".tmp-0123abcd.faiss"
    stale.write_bytes(b"half an index")
    assert open_index(store, coll) is not None
    assert not stale.exists()


def test_a_full_database_disk_is_named_and_stores_nothing(tmp_path):
    with Store.open(home=tmp_path) as store:
        fill(store, 2)

        @sa.event.listens_for(store._engine, "connect")
        def tiny(dbapi_conn, _record):
            dbapi_conn.execute(f"PRAGMA max_page_count = {dbapi_conn.execute('PRAGMA page_count').fetchone()[0]}")

        store._engine.dispose()
        vectors = _unit(np.random.default_rng(1).standard_normal((200, DIM)))
        records = [ImageRecord(f"/big/{i}.png" + "x" * 500, "1" * 64, 32, 32) for i in range(200)]
        with pytest.raises(DiskFullError) as caught:
            store.add_images("default", records, vectors)
        assert str(caught.value) == (
            f"no space left on {tmp_path}: free some space and run the command again "
            "(the unfinished write was discarded; what was stored before is intact)"
        )
        assert len(store.image_ids("default")) == 2


def test_a_full_index_disk_keeps_the_last_good_index_searchable(store, encoder, monkeypatch):
    """The index file is written to /dev/full: the operating system's real ENOSPC, through FAISS's writer."""
    import faiss

    from indexer.vectors.collection import IndexFiles, open_index, refresh

    fill(store, 200)  # more than one write buffer of FAISS's file writer
    coll = store.collection("default")
    open_index(store, coll)
    added = fill(store, 5, seed=2, start=500)
    real = faiss.write_index
    monkeypatch.setattr(faiss, "write_index", lambda index, path: real(index, "/dev/full"))
    files = IndexFiles(store, coll)
    with pytest.raises(DiskFullError) as caught:
        refresh(store, coll, "flat", np.array(added, dtype=np.int64))
    assert str(caught.value).startswith(f"no space left on {files.directory}: ")
    assert files.identity() is not None and not list(files.directory.glob(".tmp-*"))
    hits = Engine(store, coll, encoder=encoder).search(vector=np.ones(DIM), k=205)  # rebuilt in memory, not saved
    assert sorted(h.id for h in hits) == sorted(store.image_ids(coll.id).tolist())


def test_two_index_runs_on_one_folder_take_turns(tmp_path):
    from indexer.pipeline import index_paths
    from tests.indexer_fixtures import make_images, tiny_encoder

    make_images(tmp_path / "photos", 8)
    encoder = tiny_encoder()
    with Store.open(home=tmp_path / "home"):
        pass
    reports, errors = [], []

    def run():
        try:
            with Store.open(home=tmp_path / "home") as store:
                reports.append(index_paths(store, [tmp_path / "photos"], encoder=encoder, workers=0, progress=False))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted((r.indexed, r.unchanged) for r in reports) == [(0, 8), (8, 0)]


# -- privacy --------------------------------------------------------------------------------------------


def test_home_is_private_and_a_deleted_user_leaves_no_trace(tmp_path):
    home = tmp_path / "fresh"
    with Store.open(home=home) as store:
        ids = fill(store)
        store.add_pair("zebediah-secret", "a very private query", ids[0], ids[1])
        store.delete_user("zebediah-secret")
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "clipbt.db").st_mode) == 0o600
    with Store.open(home=home) as store, store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1  # set, whatever SQLite's build default
    data = b"".join(p.read_bytes() for p in home.glob("clipbt.db*"))
    assert b"zebediah-secret" not in data and b"a very private query" not in data


def test_image_text_that_postgresql_cannot_store_is_refused_on_both(store):
    coll = store.get_or_create_collection("default", TEST_MODEL, "random", DIM, "float32")
    bad = ImageRecord("/img/a\x00.png", "0" * 64, 32, 32)
    with pytest.raises(InvalidRecordError) as caught:
        store.add_images(coll.id, [bad], np.ones((1, DIM), np.float32))
    assert (
        str(caught.value) == "record 0 uri contains a NUL character (\\x00), which cannot be stored: '/img/a\\x00.png'"
    )
    assert store.images(coll.id) == []


def test_index_batch_sizes_are_bounded(tmp_path):
    from indexer.pipeline import IndexOptions

    with pytest.raises(LimitError) as caught:
        IndexOptions(batch_size=LIMITS.batch_size_max + 1)
    assert str(caught.value) == "batch_size must be a whole number from 1 to 65536, got 65537"
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "index", str(tmp_path), "--batch-size", "65537"])
    assert (
        result.exit_code == 2
        and "Error: Invalid value for '--batch-size': 65537 is not in the range 1<=x<=65536." in result.output
    )


def test_export_shard_size_is_bounded(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    result = CliRunner().invoke(main, ["export-embeddings", str(tmp_path / "out"), "--shard-size", "10000001"])
    assert result.exit_code == 2 and "10000001 is not in the range 1<=x<=10000000" in result.output
    assert not (tmp_path / "out").exists()
