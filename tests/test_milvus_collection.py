"""Collections kept in Milvus (milvus-lite) through the CLI: the same answers as FAISS, the backend recorded in SQL, repair after a kill between the SQL commit and the Milvus write, and the typed errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, clipbt_argv, make_images, register_test_model

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from engine.cli import main
from indexer.vectors.base import brute_force_topk
from indexer.vectors.collection import milvus_config, open_index
from indexer.vectors.milvus import TOKEN_ENV, MilvusIndex
from storage import Store

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", TEST_MODEL, "--pretrained", "random", "--workers", "0", "--no-progress"]
QUERIES = ("a red picture", "a dark blue picture", "green")


@pytest.fixture(autouse=True)
def test_model():
    register_test_model()


def run(home, *args):
    result = CliRunner().invoke(main, ["--home", str(home), *args])
    assert result.exit_code == 0, result.output
    return result


def hits(home, query, *args):
    """(ids, scores) of `clipbt search QUERY -k 4 --json`."""
    found = json.loads(run(home, "search", query, "-k", "4", "--json", *args).stdout)
    return [h["id"] for h in found], np.array([h["score"] for h in found])


def milvus_ids(home) -> tuple[np.ndarray, np.ndarray]:
    """(ids in the Milvus collection, live ids in SQL) of collection "default" under `home`."""
    with Store.open(home=home) as store:
        coll = store.collection("default")
        index = MilvusIndex(milvus_config(store, coll), create=False)
        return index.ids(), store.image_ids(coll.id)


def test_milvus_collection_answers_as_faiss(tmp_path):
    """Index, search plain and personalised, delete an image (--remove-missing), search again:
    the milvus-lite collection and the FAISS one give the same ids and scores at every step, and
    later commands find Milvus from what SQL records, with no flag."""
    pictures = make_images(tmp_path / "pics", 8)
    faiss_home, milvus_home, uri = tmp_path / "faiss", tmp_path / "milvus", tmp_path / "vectors.db"
    run(faiss_home, "index", str(tmp_path / "pics"), *MODEL)
    run(milvus_home, "index", str(tmp_path / "pics"), *MODEL, "--backend", "milvus", "--milvus-uri", str(uri))
    info = json.loads(run(milvus_home, "info", "--json").stdout)
    assert (info["backend"], info["index_type"], info["images"]) == (f"milvus at {uri}", "flat", 8)
    assert json.loads(run(faiss_home, "info", "--json").stdout)["backend"].startswith("faiss")
    assert list(faiss_home.rglob("*.faiss")) and not list(milvus_home.rglob("*.faiss"))  # no FAISS files beside Milvus

    def same_answers(*args):
        for query in QUERIES:
            ids, scores = hits(milvus_home, query, *args)
            want_ids, want_scores = hits(faiss_home, query, *args)
            assert ids == want_ids and np.allclose(scores, want_scores, atol=1e-5), query
        return ids

    plain = same_answers()
    for home in (faiss_home, milvus_home):  # ann prefers the 4th result of the last query over the 1st
        run(home, "prefer", "--user", "ann", "--query", QUERIES[-1], str(plain[3]), str(plain[0]))
    personal = same_answers("--user", "ann")
    assert plain[3] in personal and (plain[0] not in personal or personal.index(plain[3]) < personal.index(plain[0]))
    gone = pictures[3]
    gone.unlink()
    for home in (faiss_home, milvus_home):
        result = run(home, "index", str(tmp_path / "pics"), *MODEL, "--remove-missing")
        assert "removed 1" in result.stdout
    in_milvus, live = milvus_ids(milvus_home)
    assert np.array_equal(in_milvus, live) and live.size == 7
    after = same_answers("--user", "ann")
    with Store.open(home=milvus_home) as store:
        deleted = store.deleted_ids("default").tolist()
    assert len(deleted) == 1 and deleted[0] not in after and len(after) == 4


def test_backend_is_recorded_in_sql_and_the_token_is_not(tmp_path, monkeypatch):
    make_images(tmp_path / "pics", 3)
    uri = tmp_path / "v.db"
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    home = tmp_path / "home"
    run(home, "index", str(tmp_path / "pics"), *MODEL, "--backend", "milvus", "--milvus-uri", str(uri))
    with Store.open(home=home) as store:
        coll = store.collection("default")
        assert (coll.vector_backend, coll.vector_uri, coll.vector_index_type) == ("milvus", str(uri), "flat")
    stored = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert b"s3cret" not in stored
    # a new index type fills a new Milvus collection and drops the old one
    run(home, "index", str(tmp_path / "pics"), *MODEL, "--index-type", "hnsw")
    with Store.open(home=home) as store:
        coll = store.collection("default")
        assert (coll.vector_backend, coll.vector_index_type) == ("milvus", "hnsw")
        index = open_index(store, coll)
        assert index.kind == "milvus:HNSW" and len(index) == 3
        assert index._client.list_collections() == [index.config.collection]
    # and back to FAISS files
    run(home, "index", str(tmp_path / "pics"), *MODEL, "--backend", "faiss")
    with Store.open(home=home) as store:
        assert store.collection("default").vector_backend is None
        assert open_index(store, "default").kind.startswith("faiss")


def test_import_embeddings_into_milvus(tmp_path):
    make_images(tmp_path / "pics", 5)
    source, home = tmp_path / "src", tmp_path / "home"
    run(source, "index", str(tmp_path / "pics"), *MODEL)
    run(source, "export-embeddings", str(tmp_path / "emb"))
    uri = tmp_path / "v.db"
    result = run(
        home, "import-embeddings", str(tmp_path / "emb"), "--model", TEST_MODEL, "--pretrained", "random",
        "--backend", "milvus", "--milvus-uri", str(uri), "--index-type", "ivf", "--json",
    )  # fmt: skip
    assert json.loads(result.stdout)["imported"] == 5
    in_milvus, live = milvus_ids(home)
    assert np.array_equal(in_milvus, live) and live.size == 5
    for query in QUERIES:
        (ids, scores), (want_ids, want_scores) = hits(home, query), hits(source, query)
        assert ids == want_ids and np.allclose(scores, want_scores, atol=1e-5)


def test_errors_are_typed_and_name_the_fix(tmp_path):
    make_images(tmp_path / "pics", 2)
    home = tmp_path / "home"

    def error(*args):
        result = CliRunner().invoke(main, ["--home", str(home), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return result.stderr

    pics = str(tmp_path / "pics")
    assert "--backend milvus needs --milvus-uri URI" in error("index", pics, *MODEL, "--backend", "milvus")
    assert "is for --backend milvus" in error("index", pics, *MODEL, "--milvus-uri", str(tmp_path / "v.db"))
    unreachable = error("index", pics, *MODEL, "--backend", "milvus", "--milvus-uri", "http://127.0.0.1:9")
    assert "cannot reach Milvus at http://127.0.0.1:9" in unreachable and TOKEN_ENV in unreachable
    assert "unknown Milvus index type 'ivfpq'" in error(
        "index", pics, *MODEL, "--backend", "milvus", "--milvus-uri", str(tmp_path / "v.db"), "--index-type", "ivfpq"
    )
    with pytest.MonkeyPatch.context() as patch:  # as if pymilvus were not installed
        patch.setitem(sys.modules, "pymilvus", None)
        missing = error("index", pics, *MODEL, "--backend", "milvus", "--milvus-uri", str(tmp_path / "v.db"))
    assert "the Milvus client is not installed" in missing and "pip install 'clipbt[milvus]'" in missing
    with Store.open(home=home) as store:  # nothing was encoded or recorded by the failed runs
        assert [c.vector_backend for c in store.collections()] in ([], [None])
        assert all(store.image_ids(c.id).size == 0 for c in store.collections())


def clipbt_process(mode: str, *args) -> subprocess.CompletedProcess:
    argv, env = clipbt_argv(mode, *args)
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=120)


def test_a_kill_between_the_sql_commit_and_the_milvus_write_is_repaired(tmp_path):
    """`clipbt index --remove-missing` is SIGKILLed after committing 3 new images and 1 deletion
    to SQL, before writing Milvus; a row SQL never had is in Milvus too. The next `clipbt search`
    finds Milvus out of step, repairs it from SQL and answers as brute force over the live images."""
    pictures = make_images(tmp_path / "pics", 6)
    home, uri = tmp_path / "home", tmp_path / "v.db"
    args = ["--home", str(home), "index", str(tmp_path / "pics"), *MODEL]
    first = clipbt_process("run", *args, "--backend", "milvus", "--milvus-uri", str(uri))
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    make_images(tmp_path / "pics", 3, start=6)
    pictures[0].unlink()
    killed = clipbt_process("kill", *args, "--remove-missing")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    with Store.open(home=home) as store:
        coll = store.collection("default")
        live = store.image_ids(coll.id)
        index = MilvusIndex(milvus_config(store, coll), create=False)
        index.add(np.array([live.max() + 100]), np.ones((1, coll.dim), np.float32) / np.sqrt(coll.dim))
        before = index.ids()
        assert live.size == 8 and np.setdiff1d(live, before).size == 3 and np.setdiff1d(before, live).size == 2
    ids, scores = hits(home, QUERIES[0])  # a new process would do the same: open, reconcile, search
    in_milvus, live = milvus_ids(home)
    assert np.array_equal(in_milvus, live)
    with Store.open(home=home) as store:
        from indexer.encoder import Encoder

        query = Encoder.load(TEST_MODEL, "random", "cpu").encode_text([QUERIES[0]])
        want_scores, want_ids = brute_force_topk(*store.embeddings("default"), query, 4)
    assert ids == want_ids[0].tolist()  # the printed scores are the cosines scaled by one factor
    assert np.allclose(scores / scores[0], want_scores[0] / want_scores[0, 0], atol=1e-5)


def test_a_running_engine_follows_a_change_of_index_type(tmp_path):
    """A long-running searcher (as `clipbt serve` keeps) opens the new Milvus collection once
    another process re-indexes with another index type and drops the old one."""
    from engine.api import Clipbt

    make_images(tmp_path / "pics", 5)
    home = tmp_path / "home"
    run(home, "index", str(tmp_path / "pics"), *MODEL, "--backend", "milvus", "--milvus-uri", str(tmp_path / "v.db"))
    with Clipbt.open(home) as clip:
        before = [hit.id for hit in clip.search(QUERIES[0], k=4)]
        assert clip.engine().index.kind == "milvus:FLAT"
        run(home, "index", str(tmp_path / "pics"), *MODEL, "--index-type", "hnsw")
        assert [hit.id for hit in clip.search(QUERIES[0], k=4)] == before
        assert clip.engine().index.kind == "milvus:HNSW"
