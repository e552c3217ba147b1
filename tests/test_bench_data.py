"""The preference-dataset loaders on tiny files in each exact layout, and the cached encoding."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from indexer_fixtures import tiny_encoder
from PIL import Image

from engine.bench.datasets import (
    EmbeddingCache,
    PreferenceDataError,
    WorldBenchConfig,
    detect_format,
    encode,
    load,
    load_world,
)
from engine.bt import GLOBAL_QUALITY_QUERY
from indexer import world


def png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def save_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * k % 256, 90, 200 - 20 * k)).save(folder / name)


def test_pickapic_parquet_skips_and_counts_ties(tmp_path):
    red, blue, green, grey = (png_bytes(c) for c in ("red", "blue", "green", "grey"))
    table = pa.table(
        {
            "are_different": [True, True, True, True],
            "best_image_uid": ["b", "c", "", "x"],
            "caption": ["a red fox", "a blue car", "a tie", "a grey cat"],
            "created_at": pa.array([0, 1, 2, 3], pa.int64()),
            "has_label": [True, True, True, True],
            "image_0_uid": ["a", "c", "e", "x"],
            "image_1_uid": ["b", "d", "f", "y"],
            "jpg_0": pa.array([red, blue, red, grey], pa.binary()),
            "jpg_1": pa.array([blue, green, green, red], pa.binary()),
            "label_0": [0.0, 1.0, 0.5, 1.0],
            "label_1": [1.0, 0.0, 0.5, 0.0],
            "model_0": ["sd", "sd", "sd", "sd"],
            "model_1": ["sdxl", "sdxl", "sdxl", "sdxl"],
            "ranking_id": pa.array([10, 11, 12, 13], pa.int64()),
            "user_id": pa.array([7, 7, 9, 9], pa.int64()),
            "num_example_per_prompt": pa.array([1, 1, 1, 1], pa.int64()),
        }
    )
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "pickapic"
    data = load(path)
    assert len(data) == 3 and data.ties_skipped == 1
    assert [data.images[i] for i in data.preferred] == [blue, blue, grey]
    assert [data.images[i] for i in data.rejected] == [red, green, red]
    assert data.prompts == ["a red fox", "a blue car", "a grey cat"]
    assert data.users.tolist() == ["7", "7", "9"]


def test_pickapic_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), tmp_path / "bad.parquet")
    with pytest.raises(PreferenceDataError, match=r"lacks column\(s\) \['jpg_1', 'label_0', 'label_1', 'user_id'\]"):
        load(tmp_path / "bad.parquet")


def test_hpdv2_test_json_all_untied_pairs_of_each_ranking(tmp_path):
    names = ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg", "00005.jpg", "00006.jpg", "00007.jpg"]
    save_images(tmp_path / "test", names)  # HPD v2 ships test.json beside test/
    records = [
        {
            "prompt": "a castle",
            "image_path": names[:4],
            "rank": [2, 1, 4, 3],
            "raw_annotations": [[2, 1, 4, 3]],
            "user_hash": ["u1"],
        },
        {
            "prompt": "a dog",
            "image_path": names[4:],
            "rank": [1, 2, 3, 4],
            "raw_annotations": [[1, 2, 3, 4]],
            "user_hash": ["u2"],
        },
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    assert detect_format(tmp_path / "test.json") == "hpdv2"
    data = load(tmp_path / "test.json")
    assert len(data) == 12 and data.ties_skipped == 0
    assert data.group.tolist() == [0] * 6 + [1] * 6
    assert np.all(data.image_rank[data.preferred] < data.image_rank[data.rejected])
    first = [(data.images[p].name, data.images[r].name) for p, r in zip(data.preferred[:6], data.rejected[:6])]
    assert ("00001.jpg", "00000.jpg") in first and ("00003.jpg", "00002.jpg") in first
    assert data.prompts[0] == "a castle" and data.prompts[-1] == "a dog"


def test_imagereward_test_json_skips_tied_ranks(tmp_path):
    names = ["images/test/0/a.webp", "images/test/0/b.webp", "images/test/0/c.webp", "images/test/0/d.webp"]
    save_images(tmp_path, [n.replace(".webp", ".png") for n in names])
    for n in names:  # Pillow may lack webp; the loader never decodes
        (tmp_path / n.replace(".webp", ".png")).rename(tmp_path / n)
    records = [{"id": "000864-0061", "prompt": "a lighthouse", "generations": names, "ranking": [1, 2, 2, 3]}]
    (tmp_path / "test.json").write_text(json.dumps(records))
    assert detect_format(tmp_path / "test.json") == "imagereward"
    data = load(tmp_path / "test.json")
    assert len(data) == 5 and data.ties_skipped == 1
    pairs = {(data.images[p].name, data.images[r].name) for p, r in zip(data.preferred, data.rejected)}
    assert pairs == {
        ("a.webp", "b.webp"),
        ("a.webp", "c.webp"),
        ("a.webp", "d.webp"),
        ("b.webp", "d.webp"),
        ("c.webp", "d.webp"),
    }


def test_ranked_json_missing_image_is_named(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps([{"prompt": "p", "image_path": ["gone.jpg"], "rank": [1]}]))
    with pytest.raises(PreferenceDataError, match="image 'gone.jpg' not found"):
        load(tmp_path / "test.json")


def test_unknown_json_layout_asks_for_format(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"prompt": "p", "images": []}]))
    with pytest.raises(PreferenceDataError, match="name the layout with --format"):
        detect_format(tmp_path / "x.json")


def test_jsonl_pairs_with_users(tmp_path):
    save_images(tmp_path / "img", ["1.png", "2.png", "3.png"])
    lines = [
        {"prompt": "sunset", "image_a": "img/1.png", "image_b": "img/2.png", "preferred": "b", "user": "ann"},
        {"prompt": "sunset", "image_a": "img/1.png", "image_b": "img/3.png", "preferred": "a", "user": "bob"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = load(tmp_path / "pairs.jsonl")
    assert len(data.images) == 3  # img/1.png is one image, used twice
    assert [(data.images[p].name, data.images[r].name) for p, r in zip(data.preferred, data.rejected)] == [
        ("2.png", "1.png"),
        ("1.png", "3.png"),
    ]
    assert data.users.tolist() == ["ann", "bob"]


def test_jsonl_without_users_and_bad_choice(tmp_path):
    save_images(tmp_path, ["1.png", "2.png"])
    good = {"prompt": "x", "image_a": "1.png", "image_b": "2.png", "preferred": "a"}
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")
    assert load(tmp_path / "ok.jsonl").users is None
    (tmp_path / "bad.jsonl").write_text(json.dumps({**good, "preferred": "left"}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"bad.jsonl:1: preferred is 'left'; expected 'a' or 'b'"):
        load(tmp_path / "bad.jsonl")


def test_npz_shared_and_per_pair_queries(tmp_path):
    rng = np.random.default_rng(3)
    pref, rej = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    np.savez(
        tmp_path / "shared.npz",
        query=rng.normal(size=(1, 4)),
        preferred=pref,
        rejected=rej,
        user=np.array(["a", "a", "b", "b", "b"]),
    )
    data = load(tmp_path / "shared.npz")
    enc = encode(data)  # no encoder needed
    assert enc.queries.shape == (5, 4) and np.allclose(enc.queries, enc.queries[0])
    np.testing.assert_allclose(enc.images[enc.preferred], pref / np.linalg.norm(pref, axis=1, keepdims=True), rtol=1e-6)
    assert data.users.tolist() == ["a", "a", "b", "b", "b"]
    np.savez(tmp_path / "pair.npz", query=rng.normal(size=(5, 4)), preferred=pref, rejected=rej)
    assert not np.allclose(encode(load(tmp_path / "pair.npz")).queries, encode(data).queries[0])
    np.savez(tmp_path / "bad.npz", query=rng.normal(size=(2, 4)), preferred=pref, rejected=rej)
    with pytest.raises(PreferenceDataError, match=r"query has shape \(2, 4\); expected \(5, 4\) or \(1, 4\)"):
        load(tmp_path / "bad.npz")


def test_world_pairs_and_bayes_accuracy(tmp_path):
    config = WorldBenchConfig(images=24, users=2, pairs_per_user=15, seed=5)
    data = load_world(tmp_path / "w", config)
    again = load_world(tmp_path / "w", config)  # the collection on disk is reused
    np.testing.assert_array_equal(data.preferred, again.preferred)
    assert len(data) == 30 and data.prompts is None and sorted(set(data.users)) == ["user0", "user1"]
    attrs = [a for _, a in world.read_collection(tmp_path / "w")]
    users = world.sample_users(2, seed=5)
    for _k, user in enumerate(users):
        mine = np.flatnonzero(data.users == user.name)
        pairs = [(attrs[data.preferred[i]], attrs[data.rejected[i]]) for i in mine]
        assert data.bayes[mine].mean() == pytest.approx(world.bayes_optimal_accuracy(user, pairs))
    assert np.all(data.bayes_pooled <= np.maximum(data.bayes, 1.0) + 1e-12) and np.all(data.bayes_pooled >= 0.5)


def test_encode_caches_images_by_content(tmp_path):
    save_images(tmp_path, ["1.png", "2.png", "3.png"])
    (tmp_path / "copy.png").write_bytes((tmp_path / "1.png").read_bytes())
    lines = [
        {"prompt": "a red square", "image_a": "1.png", "image_b": "2.png", "preferred": "a"},
        {"prompt": "a blue circle", "image_a": "3.png", "image_b": "copy.png", "preferred": "b"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    data = load(tmp_path / "p.jsonl")
    encoder, cache = tiny_encoder(), EmbeddingCache(tmp_path / "cache")
    first = encode(data, encoder, query="global", cache=cache)
    (file,) = (tmp_path / "cache").iterdir()
    assert file.name == "clipbt-test-vit-random.npz"
    with np.load(file) as z:
        assert len(z["keys"]) == 3  # copy.png has the bytes of 1.png: encoded once
    np.testing.assert_array_equal(first.images[0], first.images[3])
    np.testing.assert_allclose(
        first.images,
        encoder.encode_images(torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in data.images])),
        atol=1e-5,
    )
    np.testing.assert_allclose(first.queries[1], encoder.encode_text([GLOBAL_QUALITY_QUERY])[0], atol=1e-6)
    stamp = file.stat().st_mtime_ns
    second = encode(data, encoder, query="pair", cache=cache)
    assert file.stat().st_mtime_ns == stamp  # nothing new to encode: the cache file is not rewritten
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_allclose(second.queries[1], encoder.encode_text(["a blue circle"])[0], atol=1e-6)


def test_pair_query_needs_prompts(tmp_path):
    data = load_world(tmp_path / "w", WorldBenchConfig(images=6, users=1, pairs_per_user=3))
    with pytest.raises(PreferenceDataError, match="has no prompts: use --query global"):
        encode(data, tiny_encoder(), query="pair")
