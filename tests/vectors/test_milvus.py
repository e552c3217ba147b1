"""The Milvus backend through milvus-lite: the conformance suite for flat, hnsw and ivf, reopening, repair after a killed writer, `milvus-lite server`, and the errors for bad URIs."""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from indexer.errors import IndexTypeError, MilvusError
from indexer.vectors.base import brute_force_topk
from indexer.vectors.milvus import (
    TOKEN_ENV,
    MilvusConfig,
    MilvusIndex,
    plan_index,
    repair,
)
from storage.errors import InvalidIndexError
from tests.local_servers import free_port, wait_for_port
from tests.vectors.conformance import (
    Conformance,
    assert_topk_equal,
    clustered,
    recall_at,
)

ROOT = Path(__file__).resolve().parents[2]
_names = (f"c{i}" for i in itertools.count())  # a fresh Milvus collection per index


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory) -> str:
    """One milvus-lite file per module: its in-process server starts once; each index is a new collection in it."""
    return str(tmp_path_factory.mktemp("milvus") / "vectors.db")


def new_index(uri: str, dim: int, index_type: str = "flat", **kwargs) -> MilvusIndex:
    return MilvusIndex(MilvusConfig(uri, next(_names), dim, index_type, expected_count=3000, **kwargs))


class MilvusConformance(Conformance):
    index_type = "flat"

    @pytest.fixture(autouse=True)
    def _uri(self, lite_uri):
        self.uri = lite_uri

    def new_index(self, dim: int) -> MilvusIndex:
        return new_index(self.uri, dim, self.index_type)


class TestMilvusFlat(MilvusConformance):
    exact = True


class TestMilvusHnsw(MilvusConformance):
    index_type = "hnsw"
    exact = False
    recall_floor = 0.95


class TestMilvusIvf(MilvusConformance):
    index_type = "ivf"
    exact = False
    recall_floor = 0.95


def test_plan_index():
    assert plan_index("flat", 512, 10**6).milvus_type == "FLAT" and plan_index("flat", 512, 10**6).exact
    hnsw = plan_index("HNSW", 512, 10**6)
    assert (hnsw.milvus_type, hnsw.build, hnsw.search, hnsw.exact) == (
        "HNSW",
        {"M": 32, "efConstruction": 80},
        {"ef": 128},
        False,
    )
    assert plan_index("ivf", 512, 10**6).build == {"nlist": 4000} and plan_index("ivf", 512, 10**6).search == {
        "nprobe": 250
    }
    assert plan_index("ivf", 32, 3000).build == {"nlist": 76} and plan_index("ivf", 32, 3000).search == {"nprobe": 16}
    assert plan_index("ivf", 32, 10).build == {"nlist": 1} and plan_index("ivf", 32, 10).search == {"nprobe": 1}
    assert plan_index("gpu_ivf_pq", 768, 10**6).build == {"nlist": 4000, "m": 64, "nbits": 8}
    assert plan_index("GPU_CAGRA", 512, 10).milvus_type == "GPU_CAGRA"
    assert plan_index("GPU_BRUTE_FORCE", 512, 10).exact
    with pytest.raises(IndexTypeError, match="'diskann'.*flat, hnsw, ivf"):
        plan_index("diskann", 512, 10)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_milvus_lite_builds_with_the_planned_parameters(lite_uri, index_type):
    index = new_index(lite_uri, 8, index_type)
    stored = index._client.describe_index(index.config.collection, "embedding")
    assert stored["params"] == index.config.plan.build == index.describe()["index_params"]


def test_wait_for_index_builds_every_segment_index(tmp_path):
    uri = tmp_path / "wait.db"
    ids, base, queries = clustered(3000, 16, 10, seed=13)
    index = MilvusIndex(MilvusConfig(str(uri), "waited", 16, "hnsw", expected_count=3000))
    for part in np.array_split(np.arange(3000), 3):  # three flushes: three segments
        index.add(ids[part], base[part])
    index.wait_for_index()
    folder = uri / "collections" / "waited" / "partitions" / "_default"
    segments = {p.name.removesuffix(".parquet") for p in (folder / "data").glob("*.parquet")}
    indexed = {p.name.split(".")[0] for p in (folder / "indexes").glob("*.hnsw.idx")}
    assert segments and segments <= indexed
    assert recall_at(10, ids, base, queries, index.search(queries, 10)[1]) >= 0.95


def test_reopened_ivf_probes_for_its_own_lists(lite_uri):
    """nprobe follows the nlist the collection was built with, whatever size the opener expects."""
    ids, base, queries = clustered(3000, 16, 10, seed=14)
    built = new_index(lite_uri, 16, "ivf")  # planned for 3000: nlist 76, nprobe 16
    built.add(ids, base)
    config = MilvusConfig(lite_uri, built.config.collection, 16, "ivf", expected_count=10**6)
    assert config.plan.search == {"nprobe": 250}
    reopened = MilvusIndex(config)
    assert reopened.search_params == {"nprobe": 16} == reopened.describe()["search_params"]
    assert recall_at(10, ids, base, queries, reopened.search(queries, 10)[1]) >= 0.95


def test_search_params_grow_with_k(lite_uri):
    """HNSW's ef must reach k: a k above the default ef still returns k distinct ids."""
    ids, base, queries = clustered(400, 16, 5, seed=7)
    index = new_index(lite_uri, 16, "hnsw")
    index.add(ids, base)
    _, got = index.search(queries, 300)
    assert (got >= 0).all() and all(len(set(row)) == 300 for row in got.tolist())
    assert recall_at(10, ids, base, queries, got) >= 0.95
    with pytest.raises(ValueError, match="16384"):
        index.search(queries, 16385)


def test_reopen_after_save_without_the_token(lite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    ids, base, queries = clustered(1200, 24, 20, seed=8)
    index = new_index(lite_uri, 24, "hnsw")
    index.add(ids, base)
    index.remove(ids[:100])
    manifest = index.save(tmp_path / "saved")
    text = (tmp_path / "saved" / "manifest.json").read_text()
    assert json.loads(text) == manifest and "s3cret" not in text and "s3cret" not in repr(index.describe())
    assert manifest["uri"] == lite_uri and manifest["count"] == 1100 and manifest["index_type"] == "hnsw"
    loaded = MilvusIndex.load(tmp_path / "saved")
    assert loaded.kind == "milvus:HNSW" and np.array_equal(loaded.ids(), np.sort(ids[100:]))
    assert recall_at(10, ids[100:], base[100:], queries, loaded.search(queries, 10)[1]) >= 0.95


def test_load_refuses_a_missing_manifest_or_collection(lite_uri, tmp_path):
    with pytest.raises(InvalidIndexError, match="manifest.json"):
        MilvusIndex.load(tmp_path)
    index = new_index(lite_uri, 8)
    index.add(np.arange(3), np.eye(3, 8, dtype=np.float32))
    index.save(tmp_path)
    index.drop()
    with pytest.raises(InvalidIndexError, match=f"{index.config.collection}.*does not exist.*rebuild"):
        MilvusIndex.load(tmp_path)


def test_existing_collection_of_another_layout_is_refused(lite_uri):
    index = new_index(lite_uri, 8)
    with pytest.raises(MilvusError, match="dim 8, index FLAT.*asked for dim 9"):
        MilvusIndex(MilvusConfig(lite_uri, index.config.collection, 9))
    with pytest.raises(MilvusError, match="index FLAT.*index HNSW"):
        MilvusIndex(MilvusConfig(lite_uri, index.config.collection, 8, "hnsw"))
    assert MilvusIndex(MilvusConfig(lite_uri, index.config.collection, 8)).dim == 8  # the same layout reopens


def test_duplicate_ids_are_refused(lite_uri):
    index = new_index(lite_uri, 8)
    index.add(np.array([1, 2]), np.eye(2, 8, dtype=np.float32))
    with pytest.raises(ValueError, match=r"already in the index: \[2\]"):
        index.add(np.array([3, 2]), np.eye(2, 8, dtype=np.float32))
    with pytest.raises(ValueError, match=r"repeat within the batch: \[5\]"):
        index.add(np.array([5, 5]), np.eye(2, 8, dtype=np.float32))
    assert np.array_equal(index.ids(), [1, 2])


def test_repair_makes_the_index_hold_the_live_ids(lite_uri):
    ids, base, queries = clustered(1500, 16, 20, seed=9)
    rows = {int(i): r for r, i in enumerate(ids)}
    index = new_index(lite_uri, 16)
    index.add(ids[:1200], base[:1200])  # the last 300 were committed in SQL but never reached Milvus
    index.add(np.array([7, 8]), base[:2])  # rows Milvus kept although SQL rolled them back
    live = np.setdiff1d(ids, ids[:50])  # and 50 deleted in SQL whose Milvus delete was lost
    report = repair(index, live, lambda some: base[[rows[int(i)] for i in some]])
    assert (report.added, report.removed) == (300, 52)
    assert np.array_equal(index.ids(), live)
    keep = np.isin(ids, live)
    assert_topk_equal(ids[keep], base[keep], queries, 10, *index.search(queries, 10))
    assert repair(index, live, lambda some: base[[rows[int(i)] for i in some]]) == type(report)(0, 0)


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from indexer.vectors.milvus import MilvusConfig, MilvusIndex
    from tests.vectors.conformance import clustered
    ids, base, _ = clustered(1000, 16, 1, seed=10)
    index = MilvusIndex(MilvusConfig(sys.argv[1], "crashed", 16))
    index.add(ids[:600], base[:600])
    index._client.insert("crashed", [{"id": int(i), "embedding": v} for i, v in zip(ids[600:700], base[600:700])])
    print("written", flush=True)  # 100 more rows inserted without a flush, then killed
    time.sleep(120)
    """
)


def test_repair_after_the_writer_is_killed(tmp_path):
    """A process killed in the middle of writing to Milvus (after the SQL commit) holds the file
    until it dies; the next opener repairs the collection from the SQL ids."""
    uri = str(tmp_path / "crash.db")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, uri], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert writer.stdout.readline().strip() == "written"
        with pytest.raises(
            MilvusError, match="open in another process.*milvus-lite server --data-dir .*crash.db --host 127.0.0.1"
        ):
            MilvusIndex(MilvusConfig(uri, "crashed", 16))
    finally:
        writer.kill()
        writer.wait(timeout=30)
    ids, base, queries = clustered(1000, 16, 20, seed=10)
    index = MilvusIndex(MilvusConfig(uri, "crashed", 16), create=False)
    survived = index.ids()
    assert np.isin(ids[:600], survived).all()  # flushed before the kill
    report = repair(index, ids, lambda some: base[np.searchsorted(ids, some)])
    assert report.added == 1000 - survived.size and report.removed == 0
    assert_topk_equal(ids, base, queries, 10, *index.search(queries, 10))


def test_milvus_lite_server_on_localhost(tmp_path):
    """`milvus-lite server` shares one file between processes over http://127.0.0.1:PORT; a lost server is a MilvusError naming the URI."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "shared.db"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(server, port, 60)
        ids, base, queries = clustered(800, 16, 10, seed=11)
        index = MilvusIndex(MilvusConfig(uri, "shared", 16), token="root:Milvus")
        index.add(ids, base)
        assert index.describe()["device"] == "milvus server" and index.describe()["uri"] == uri
        assert_topk_equal(ids, base, queries, 10, *index.search(queries, 10))
    finally:
        server.kill()
        server.wait(timeout=30)
    with pytest.raises(MilvusError, match=f"Milvus at {uri}"):
        index.search(queries, 10)


def test_bad_uris_are_milvus_errors(tmp_path):
    with pytest.raises(MilvusError, match=r"'vectors' is neither http\(s\)://host:port nor .*\.db"):
        MilvusConfig("vectors", "c", 8)
    with pytest.raises(MilvusError, match="folder .*missing does not exist"):
        MilvusIndex(MilvusConfig(str(tmp_path / "missing" / "v.db"), "c", 8))
    port = free_port()
    with pytest.raises(MilvusError, match=f"cannot reach Milvus at http://127.0.0.1:{port} .*{TOKEN_ENV}"):
        MilvusIndex(MilvusConfig(f"http://127.0.0.1:{port}", "c", 8, timeout=2))
    with pytest.raises(MilvusError, match="carries credentials") as refused:
        MilvusConfig("https://alice:pa55word@milvus.example:19530", "c", 8)
    assert "pa55word" not in str(refused.value)
    with pytest.raises(MilvusError, match="'my-images' is invalid"):
        MilvusConfig(str(tmp_path / "v.db"), "my-images", 8)
    with pytest.raises(IndexTypeError, match="GPU_CAGRA needs a Milvus cluster"):
        MilvusConfig(str(tmp_path / "v.db"), "c", 8, "gpu_cagra")
    assert MilvusConfig("https://milvus.example:19530", "c", 8, "gpu_cagra").plan.milvus_type == "GPU_CAGRA"


def test_brute_force_reference_agrees_with_milvus_scores(lite_uri):
    """Milvus FLAT scores are float32 inner products: within 1e-6 of the float64 reference."""
    ids, base, queries = clustered(2000, 64, 30, seed=12)
    index = new_index(lite_uri, 64)
    index.add(ids, base)
    scores, _ = index.search(queries, 20)
    want, _ = brute_force_topk(ids, base, queries, 20)
    assert np.abs(scores - want).max() < 1e-6
