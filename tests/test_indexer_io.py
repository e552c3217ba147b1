"""clip-retrieval layout import/export: round trip, bad rows rejected by number, folder-level problems refused."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from indexer_fixtures import TEST_MODEL, make_images, tiny_encoder

from indexer.embeddings_io import export_embeddings, import_embeddings
from indexer.errors import EmbeddingsFormatError
from indexer.pipeline import index_paths
from storage import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(home=tmp_path / "home") as opened:
        yield opened


def write_layout(root, shards):
    """shards: list of (vectors, metadata rows) written as img_emb_N.npy + metadata_N.parquet."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    for n, (vectors, rows) in enumerate(shards):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", vectors)
        pq.write_table(pa.Table.from_pylist(rows), root / "metadata" / f"metadata_{n}.parquet")


def unit_rows(n, d=32, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_export_then_import_round_trips(store, tmp_path):
    make_images(tmp_path / "photos", 7)
    index_paths(store, [tmp_path / "photos"], encoder=tiny_encoder(), workers=0, progress=False)
    assert export_embeddings(store, "default", tmp_path / "out", shard_size=3) == 7
    assert sorted(p.name for p in (tmp_path / "out" / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(3)]
    report = import_embeddings(store, tmp_path / "out", "copy", TEST_MODEL, "random")
    assert (report.imported, report.unchanged, report.rejected) == (7, 0, [])
    keep = ("uri", "sha256", "width", "height", "caption", "metadata")
    original, copy = store.images("default"), store.images("copy")
    assert [[getattr(im, k) for k in keep] for im in copy] == [[getattr(im, k) for k in keep] for im in original]
    np.testing.assert_array_equal(store.embeddings("copy")[1], store.embeddings("default")[1])
    assert store.collection("copy").pretrained == "random"


def test_bad_rows_are_rejected_by_number_and_the_rest_imported(store, tmp_path):
    vectors = unit_rows(6)
    vectors[1, 0] = np.nan
    vectors[3] *= 2
    rows = [{"url": f"https://example.org/{i}.jpg", "caption": f"c{i}", "width": 10, "height": 20} for i in range(6)]
    rows[4]["url"] = None
    second = unit_rows(2, seed=1)
    write_layout(
        tmp_path / "emb",
        [(vectors, rows), (second, [{"url": "https://example.org/0.jpg"}, {"url": "https://example.org/9.jpg"}])],
    )
    report = import_embeddings(store, tmp_path / "emb", "web", TEST_MODEL, "random")
    assert [(r.row, r.shard) for r in report.rejected] == [
        (1, "img_emb_0.npy"),
        (3, "img_emb_0.npy"),
        (4, "img_emb_0.npy"),
        (6, "img_emb_1.npy"),
    ]
    assert [r.reason for r in report.rejected] == [
        "embedding is not finite",
        "embedding norm is 2, not 1 (within 0.01)",
        "no url",
        "uri 'https://example.org/0.jpg' repeats row 0",
    ]
    assert report.imported == 4
    image = store.find_image("web", "https://example.org/9.jpg")
    assert (image.width, image.height, image.metadata) == (1, 1, {"size_unknown": True})
    again = import_embeddings(store, tmp_path / "emb", "web", TEST_MODEL, "random")
    assert (again.imported, again.unchanged) == (0, 4)


def test_local_files_are_hashed_like_the_indexer_does(store, tmp_path):
    paths = make_images(tmp_path / "photos", 3)
    write_layout(tmp_path / "emb", [(unit_rows(3), [{"image_path": str(p)} for p in paths])])
    import_embeddings(store, tmp_path / "emb", "default", TEST_MODEL, "random")
    report = index_paths(store, [tmp_path / "photos"], encoder=tiny_encoder(), workers=0, progress=False)
    assert (report.indexed, report.unchanged) == (0, 3)


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        (
            [(unit_rows(2, d=16), [{"url": "a"}, {"url": "b"}])],
            r"have dimension 16, but clipbt-test-vit embeds in dimension 32: nothing imported",
        ),
        ([(unit_rows(2), [{"url": "a"}])], r"has 2 rows but .* has 1"),
        ([(unit_rows(1), [{"path": "a"}])], r"no image_path or url column \(columns: path\)"),
    ],
)
def test_folder_problems_are_refused(store, tmp_path, shards, message):
    store.create_collection("default", TEST_MODEL, "random", 32)
    write_layout(tmp_path / "emb", shards)
    with pytest.raises(EmbeddingsFormatError, match=message):
        import_embeddings(store, tmp_path / "emb", "default", TEST_MODEL, "random")


def test_missing_files_are_named(store, tmp_path):
    with pytest.raises(EmbeddingsFormatError, match="no img_emb/img_emb_N.npy files"):
        import_embeddings(store, tmp_path, "default", TEST_MODEL, "random")
    (tmp_path / "img_emb").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", unit_rows(1))
    with pytest.raises(EmbeddingsFormatError, match="has no metadata file .*metadata_0.parquet"):
        import_embeddings(store, tmp_path, "default", TEST_MODEL, "random")
