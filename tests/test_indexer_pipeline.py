"""The ingestion pipeline end to end on real files: good ones indexed, bad ones skipped with reasons, reruns incremental, a killed run resumes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from indexer_fixtures import TEST_MODEL, make_bad_files, make_images, picture, tiny_encoder

from indexer.pipeline import index_paths
from indexer.vectors.collection import IndexFiles, open_index
from storage import Store
from storage.errors import CollectionMismatchError


@pytest.fixture
def store(tmp_path):
    with Store.open(home=tmp_path / "home") as opened:
        yield opened


def state(store: Store, collection: str = "default") -> dict[str, tuple[str, np.ndarray]]:
    """{uri: (sha256, embedding)} of the live images."""
    images = store.images(collection)
    ids, vectors = store.embeddings(collection)
    assert ids.tolist() == [im.id for im in images]
    return {im.uri: (im.sha256, v) for im, v in zip(images, vectors, strict=True)}


def test_good_files_indexed_bad_files_skipped_with_reasons(store, tmp_path):
    good = make_images(tmp_path / "photos", 10)
    reasons = make_bad_files(tmp_path / "photos" / "bad")
    report = index_paths(store, [tmp_path / "photos"], encoder=tiny_encoder(), workers=0, batch_size=4, progress=False)
    assert (report.indexed, report.unchanged, report.removed) == (10, 0, 0)
    assert sorted(state(store)) == sorted(str(p) for p in good)
    assert [os.path.basename(s.path) for s in report.skipped] == sorted(reasons)
    for skip in report.skipped:
        assert reasons[os.path.basename(skip.path)] in skip.reason, skip
    image = store.find_image("default", str(good[0]))
    assert (image.width, image.height) == (32, 32)
    assert store.collection("default").model == TEST_MODEL


def test_rerun_encodes_nothing_and_changes_are_picked_up(store, tmp_path):
    paths = make_images(tmp_path, 6)
    first = index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False)
    before = state(store)
    again = index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False)
    assert (again.indexed, again.unchanged, first.indexed) == (0, 6, 6) and "encode" not in again.seconds
    picture(1000).save(paths[0])  # changed content, same name
    paths[1].unlink()
    make_images(tmp_path, 1, start=50)
    third = index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False, remove_missing=True)
    assert (third.indexed, third.unchanged, third.removed) == (2, 4, 1)
    after = state(store)
    assert str(paths[1]) not in after and after[str(paths[0])][0] != before[str(paths[0])][0]
    assert len(store.images("default", include_deleted=True)) == 8  # replaced and removed rows kept as deleted


def test_remove_missing_only_touches_the_given_paths(store, tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b", 2, start=10)
    index_paths(store, [tmp_path / "a", tmp_path / "b"], encoder=tiny_encoder(), workers=0, progress=False)
    report = index_paths(
        store, [tmp_path / "b"], encoder=tiny_encoder(), workers=0, progress=False, remove_missing=True
    )
    assert report.removed == 0 and len(state(store)) == 4


def test_workers_give_the_same_result_as_in_process_decoding(tmp_path):
    make_images(tmp_path / "photos", 12)
    make_bad_files(tmp_path / "photos")
    results = []
    for workers in (0, 2):
        with Store.open(home=tmp_path / f"home{workers}") as store:
            report = index_paths(
                store, [tmp_path / "photos"], encoder=tiny_encoder(), workers=workers, batch_size=5, progress=False
            )
            results.append((report.skipped, state(store)))
    (skips0, state0), (skips2, state2) = results
    assert skips0 == skips2 and state0.keys() == state2.keys()
    for uri, (sha, vector) in state0.items():
        assert state2[uri][0] == sha
        np.testing.assert_allclose(state2[uri][1], vector, atol=1e-3)


def test_search_finds_each_image_first(store, tmp_path):
    make_images(tmp_path, 8)
    index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False)
    ids, vectors = store.embeddings("default")
    scores, found = open_index(store, "default").search(vectors, 3)
    assert (found[:, 0] == ids).all()
    np.testing.assert_allclose(scores[:, 0], np.sum(vectors * vectors, axis=1), atol=1e-4)


def test_deleted_images_never_come_back_and_a_stale_index_is_rebuilt(store, tmp_path, caplog):
    make_images(tmp_path, 8)
    index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False)
    ids, vectors = store.embeddings("default")
    store.mark_deleted([int(ids[0])])
    _, found = open_index(store, "default").search(vectors[:1], 8)
    assert int(ids[0]) not in found[0].tolist() and (found[0, :7] >= 0).all()
    IndexFiles(store, store.collection("default")).identity_path.unlink()
    _, found = open_index(store, "default").search(vectors[1:2], 1)
    assert found[0, 0] == ids[1] and "rebuilding the vector index of collection 'default'" in caplog.text


def test_another_model_is_refused(store, tmp_path):
    make_images(tmp_path, 2)
    index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False)
    other = type(tiny_encoder()).__new__(type(tiny_encoder()))
    other.__dict__.update(tiny_encoder().__dict__, pretrained="sha256:" + "0" * 64)
    with pytest.raises(CollectionMismatchError):
        index_paths(store, [tmp_path], encoder=other, workers=0, progress=False)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf", "exact"])
def test_other_index_types_are_saved_and_kept(store, tmp_path, index_type):
    make_images(tmp_path, 6)
    index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False, index_type=index_type)
    assert IndexFiles(store, store.collection("default")).identity()["index_type"] == index_type
    make_images(tmp_path, 2, start=20)
    index_paths(store, [tmp_path], encoder=tiny_encoder(), workers=0, progress=False, index_type=index_type)
    ids, vectors = store.embeddings("default")
    _, found = open_index(store, "default").search(vectors, 1)
    assert (found[:, 0] == ids).all()


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from indexer_fixtures import tiny_encoder
from indexer.pipeline import index_paths
from storage import Store

add_images = Store.add_images
def add_then_pause(self, *args, **kwargs):
    ids = add_images(self, *args, **kwargs)
    print("committed", len(ids), flush=True)
    time.sleep(60)
    return ids
Store.add_images = add_then_pause
store = Store.open(home={home!r})
index_paths(store, [{photos!r}], encoder=tiny_encoder(), workers=1, batch_size=8, progress=False)
"""


def test_killed_run_resumes_to_the_uninterrupted_end_state(tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, 40)
    home = tmp_path / "killed"
    code = _CHILD.format(tests=str(Path(__file__).parent), home=str(home), photos=str(photos))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["committed", "8"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with Store.open(home=home) as store:
        assert len(store.images("default")) == 8  # the first batch survived the kill
        resumed = index_paths(store, [photos], encoder=tiny_encoder(), workers=0, progress=False)
        got = state(store)
        _, found = open_index(store, "default").search(np.stack([v for _, v in got.values()]), 1)
        live_ids = [im.id for im in store.images("default")]
    with Store.open(home=tmp_path / "whole") as store:
        index_paths(store, [photos], encoder=tiny_encoder(), workers=0, progress=False)
        want = state(store)
    assert (resumed.indexed, resumed.unchanged) == (32, 8)
    assert {u: s for u, (s, _) in got.items()} == {u: s for u, (s, _) in want.items()}
    for uri, (_, vector) in want.items():
        np.testing.assert_allclose(got[uri][1], vector, atol=1e-3)
    assert (found[:, 0] == live_ids).all()  # the index saved after resuming holds every image
