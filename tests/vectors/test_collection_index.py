"""The saved index of a stored collection: round trips, staleness against SQL, damaged files refused, not raised."""

import json

import faiss
import numpy as np
import pytest

from indexer.vectors.collection import IndexFiles
from indexer.vectors.faiss import FaissIndex
from storage import ImageRecord
from storage.errors import InvalidIndexError
from tests.test_storage import add_photos, sha


def build_index(store, coll, include_deleted=False):
    return FaissIndex.build(*store.embeddings(coll.id, include_deleted=include_deleted), "flat", gpu=False)


def test_index_round_trip(store):
    coll, ids, vectors = add_photos(store, n=20)
    vs = IndexFiles(store, coll)
    assert vs.load() is None and vs.reason == "no saved index for collection 'photos'"
    manifest = vs.save(build_index(store, coll), "IDMap2,Flat")
    assert (manifest["count"], manifest["min_id"], manifest["max_id"]) == (20, ids[0], ids[-1])
    assert (manifest["model"], manifest["dim"], manifest["index_type"]) == (
        "ViT-B-32",
        8,
        "IDMap2,Flat",
    )
    assert vs.identity().items() <= manifest.items()
    loaded = vs.load()
    assert loaded is not None, vs.reason
    stored_ids, stored = store.embeddings(coll.id)
    _, found = loaded.search(vectors[:3], 1)
    assert found[:, 0].tolist() == stored_ids[np.argmax(vectors[:3] @ stored.T, axis=1)].tolist()


def test_index_stale_after_changes(store):
    coll, ids, _ = add_photos(store, n=5)
    vs = IndexFiles(store, coll)
    vs.save(build_index(store, coll), "flat")
    store.mark_deleted([ids[0]])  # deleted ids may stay in the index: filtered at query time
    assert vs.load() is not None and vs.deleted_in_index == 1
    [new] = store.add_images(coll.id, [ImageRecord("/n.jpg", sha("n"), 1, 1)], np.ones((1, 8)))
    assert vs.load() is None
    assert vs.reason == f"index of collection 'photos' is stale: 1 of 5 images are not in it (e.g. ids [{new}])"
    vs.save(build_index(store, coll), "flat")
    assert vs.load() is not None and vs.deleted_in_index == 0
    other = vs.expected()
    assert vs.load(type(other)(**{**other.__dict__, "live_ids": other.live_ids[1:]})) is None
    assert "holds 1 ids that are not images of the collection" in vs.reason
    assert vs.load(type(other)(**{**other.__dict__, "model": "ViT-L-14"})) is None
    assert vs.reason == ("index of collection 'photos' was built for model 'ViT-B-32', the collection has 'ViT-L-14'")


def test_damaged_index_files_are_refused_not_raised(store):
    coll, ids, _ = add_photos(store, n=5)
    vs = IndexFiles(store, coll)
    manifest = vs.save(build_index(store, coll), "flat")
    path = vs.directory / manifest["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert vs.load() is None and "is corrupt: its checksum differs" in vs.reason
    path.write_bytes(b"")
    assert vs.load() is None and "is corrupt" in vs.reason
    path.unlink()
    assert vs.load() is None and "is unreadable" in vs.reason
    (vs.directory / "manifest.json").write_text('{"format": 2, "collec')
    assert vs.load() is None and "is missing or unreadable" in vs.reason
    # a save killed before its manifest rename leaves a temporary file and the old state
    (vs.directory / ".tmp-dead.faiss").write_bytes(b"partial")
    vs.save(build_index(store, coll), "flat")
    assert vs.load() is not None
    assert sorted(p.name for p in vs.directory.glob("index-*.faiss")) == [manifest_of(vs)["file"]]
    assert not list(vs.directory.glob(".tmp-*"))


def test_save_refuses_indexes_without_image_ids(store):
    coll, ids, vectors = add_photos(store, n=40)
    vs = IndexFiles(store, coll)
    with pytest.raises(
        InvalidIndexError,
        match="a IndexFlatL2 does not carry image ids; wrap it in faiss.IndexIDMap2",
    ):
        FaissIndex(faiss.IndexFlatL2(8))
    with pytest.raises(InvalidIndexError, match="index has dimension 4, collection 'photos' has 8"):
        vs.save(FaissIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(4)), gpu=False), "flat")
    with pytest.raises(InvalidIndexError, match="manifest says model = 'RN50'"):
        vs.save(build_index(store, coll), "flat", {"model": "RN50"})
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, 4)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, np.array(ids))
    assert vs.save(FaissIndex(ivf, "ivf", gpu=False), "ivf")["count"] == 40
    assert vs.load() is not None, vs.reason


def manifest_of(vs):
    return json.loads((vs.directory / "manifest.json").read_text())
