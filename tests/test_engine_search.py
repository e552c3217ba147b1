"""The query path against brute-force numpy: adaptation, candidates, ranking, batching, caches, scopes."""

import hashlib

import numpy as np
import pytest

from engine import bt
from engine.bt import AdaptConfig
from engine.bt.map import MapConfig
from engine.ranking import RankConfig, fit_strengths
from engine.search import (
    EmptyCollectionError,
    Engine,
    SearchConfig,
    SearchInputError,
    SearchRequest,
    candidate_count,
    effective_weights,
    pair_weights,
)
from storage import ImageRecord, Store
from storage.errors import UnknownImageError

TEST_MODEL = "clipbt-test-vit"  # tests/model_configs/clipbt-test-vit.json, random weights
DIM = 32


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def make_collection(store, n=60, seed=0, name="default"):
    """n seeded unit vectors: two clusters (ids in the first half lean one way, the rest the other)."""
    rng = np.random.default_rng(seed)
    axis = _unit(rng.standard_normal(DIM))
    side = np.where(np.arange(n) < n // 2, 1.0, -1.0)[:, None]
    vectors = _unit(rng.standard_normal((n, DIM)) + 1.5 * side * axis)
    coll = store.get_or_create_collection(name, TEST_MODEL, "random", DIM, "float32")
    records = [
        ImageRecord(f"/img/{name}/{i:03d}.png", hashlib.sha256(f"{name}{i}".encode()).hexdigest(), 32, 32)
        for i in range(n)
    ]
    ids = np.array(store.add_images(coll.id, records, vectors), dtype=np.int64)
    return coll, ids, vectors, axis


@pytest.fixture
def world(encoder, tmp_path):
    store = Store.open(home=tmp_path)
    coll, ids, vectors, axis = make_collection(store)
    yield Engine(store, coll, encoder=encoder), ids, vectors, axis
    store.close()


def reference_search(query, vectors, ids, pairs, k, config, live=None):
    """Brute force: eq. 4 step by step in plain Python (method bt) or full-space Newton (method map), every
    similarity, a sort, the ranking fit."""
    a = config.adapt
    x = np.asarray(query, dtype=np.float64)
    vec = {int(i): v.astype(np.float64) for i, v in zip(ids, vectors)}
    if config.method == "map" and pairs:
        x = bt.map_adapt_reference(
            x,
            np.array([vec[w] for w, _ in pairs]),
            np.array([vec[lose] for _, lose in pairs]),
            None,
            config.map.prior_precision,
            config.map.beta,
        )
    for _ in range(a.steps if pairs and config.method == "bt" else 0):
        grad = np.zeros_like(x)
        for win, lose in pairs:
            diff = vec[win] - vec[lose]
            p = 1.0 / (1.0 + np.exp(-a.beta * diff @ x))
            grad += a.beta * (p - 1.0) * diff
        x = x - a.lr * grad / len(pairs)
    live = ids if live is None else live
    s = {int(i): float(vec[int(i)] @ x) for i in live}
    candidates = sorted(s, key=lambda i: -s[i])[: candidate_count(k, config)]
    where = {i: j for j, i in enumerate(candidates)}
    comparisons = [(where[w], where[lose]) for w, lose in pairs if w in where and lose in where]
    theta = fit_strengths(
        config.beta * np.array([s[i] for i in candidates]),
        [w for w, _ in comparisons],
        [lose for _, lose in comparisons],
        prior_precision=config.rank.prior_precision,
        steps=config.rank.newton_steps,
    )
    order = sorted(range(len(candidates)), key=lambda j: -theta[j])[:k]
    return [candidates[j] for j in order], theta[order], x


def test_plain_query_is_exact_nearest_neighbours(world):
    engine, ids, vectors, _ = world
    query = engine.encode(["a red circle"])[0]
    hits = engine.search("a red circle", k=5)
    expected, theta, _ = reference_search(query, vectors, ids, [], 5, engine.config)
    assert [h.id for h in hits] == expected
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h.score for h in hits], theta, atol=1e-5)
    np.testing.assert_allclose(
        [h.similarity for h in hits], [vectors[ids == i][0] @ query for i in expected], atol=1e-5
    )
    assert hits[0].path == f"/img/default/{int(np.flatnonzero(ids == expected[0])[0]):03d}.png"
    assert hits[-1].p_next is not None and 0.5 <= hits[0].p_next <= 1


@pytest.mark.parametrize("method", ["bt", "map"])
def test_personalised_search_equals_brute_force(world, method):
    engine, ids, vectors, _ = world
    rng = np.random.default_rng(3)
    query = engine.encode(["a blue star"])[0]
    plain = [h.id for h in engine.search("a blue star", k=8)]
    pairs = [(int(ids[i]), int(ids[j])) for i, j in rng.integers(0, len(ids), size=(12, 2)) if i != j]
    pairs += [(plain[5], plain[0]), (plain[7], plain[1])]  # direct comparisons among the candidates
    for win, lose in pairs:
        engine.prefer("ann", "a blue star", win, lose)
    config = SearchConfig(method=method, adapt=AdaptConfig(lr=0.5, steps=4, beta=3.0))
    hits = engine.search("a blue star", user="ann", k=8, config=config)
    expected, theta, adapted = reference_search(query, vectors, ids, pairs, 8, config)
    assert [h.id for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], theta, atol=1e-4)
    t = config.rank.temperature
    np.testing.assert_allclose([h.p_next for h in hits[:-1]], 1 / (1 + np.exp(-t * np.diff(-theta))), atol=1e-4)


@pytest.mark.parametrize("method,least", [("bt", 9), ("map", 8)])  # map's prior keeps more of the query
def test_preferences_move_results_to_the_preferred_side(world, method, least):
    # a weaker prior than search's default (tuned on the world, whose queries carry more meaning than this one)
    engine, ids, vectors, axis = world
    side_a, side_b = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    direction = np.random.default_rng(7).standard_normal(DIM)
    neutral = _unit(direction - (direction @ axis) * axis)  # orthogonal to the axis splitting the two sides
    before = {h.id for h in engine.search(vector=neutral, user="bob", k=10)}
    rng = np.random.default_rng(1)
    for win, lose in zip(rng.choice(side_b, 10), rng.choice(side_a, 10)):
        engine.prefer("bob", "anything", int(win), int(lose))
    after = {
        h.id
        for h in engine.search(
            vector=neutral,
            user="bob",
            k=10,
            config=SearchConfig(method=method, scope="all", map=MapConfig(prior_precision=30.0)),
        )
    }
    assert len(after & set(side_b)) >= least and len(before & set(side_b)) <= 6
    assert {h.id for h in engine.search(vector=neutral, k=10)} == before  # nobody else is affected


def test_batched_equals_one_by_one(world):
    engine, ids, _, _ = world
    rng = np.random.default_rng(5)
    for user in ("u0", "u1", "u2"):
        for _ in range(6):
            i, j = rng.choice(len(ids), 2, replace=False)
            engine.prefer(user, rng.choice(["a cat", "a dog"]), int(ids[i]), int(ids[j]))
    requests = [
        SearchRequest("a cat", "u0", 5),
        SearchRequest("a dog", "u1", 3),
        SearchRequest("a cat", None, 4),
        SearchRequest("a dog", "u2", 7),
        SearchRequest("a cat", "nobody", 2),
        SearchRequest("a dog", "u0", 5),
    ]
    for scope in ("all", "query-kernel"):
        config = SearchConfig(scope=scope)
        batched = engine.search_many(requests, config)
        engine.forget("u0"), engine.forget("u1"), engine.forget("u2")
        single = [engine.search(r.query, r.user, r.k, config=config) for r in requests]
        assert [[h.id for h in hits] for hits in batched] == [[h.id for h in hits] for hits in single]
        for b, s in zip(batched, single):
            np.testing.assert_allclose([h.score for h in b], [h.score for h in s], atol=1e-5)


def test_batch_with_direct_comparisons_equals_brute_force(world):
    """Several users in one batch, each with comparisons among their own candidates: every
    request's ranking is the brute-force one of its own user."""
    engine, ids, vectors, _ = world
    config = SearchConfig(method="bt", scope="all", adapt=AdaptConfig(lr=0.5, steps=3, beta=2.0))
    rng = np.random.default_rng(11)
    texts = ["a cat", "a dog", "a red circle"]
    pairs = {}
    for n, user in enumerate(("v0", "v1", "v2")):
        plain = [h.id for h in engine.search(texts[n], k=12)]
        pairs[user] = [(plain[8 - n], plain[n]), (plain[11], plain[2])]  # among the candidates
        pairs[user] += [(int(ids[i]), int(ids[j])) for i, j in rng.integers(0, len(ids), size=(4, 2)) if i != j]
        for win, lose in pairs[user]:
            engine.prefer(user, texts[n], win, lose)
    requests = [
        SearchRequest(texts[0], "v0", 6),
        SearchRequest(texts[1], "v1", 9),
        SearchRequest(texts[2], None, 5),
        SearchRequest(texts[2], "v2", 4),
        SearchRequest(texts[1], "v0", 7),
    ]
    for request, hits in zip(requests, engine.search_many(requests, config)):
        query = engine.encode([request.query])[0]
        expected, theta, _ = reference_search(query, vectors, ids, pairs.get(request.user, []), request.k, config)
        assert [h.id for h in hits] == expected, request
        np.testing.assert_allclose([h.score for h in hits], theta, atol=1e-4)


def test_adapted_query_cache_is_dropped_on_a_new_preference(world):
    engine, ids, _, _ = world
    engine.prefer("cat", "a cat", int(ids[0]), int(ids[40]))
    first = engine.search("a cat", user="cat", k=5)
    cached = [k for k in engine._adapted if k[0] == "cat"]
    assert len(cached) == 1
    assert engine.search("a cat", user="cat", k=5) == first  # served from the cache
    assert [k for k in engine._adapted if k[0] == "cat"] == cached
    engine.prefer("cat", "a cat", int(ids[45]), int(ids[first[0].id - ids[0]]))
    assert not [k for k in engine._adapted if k[0] == "cat"]
    second = engine.search("a cat", user="cat", k=5)
    assert [k for k in engine._adapted if k[0] == "cat"] != cached
    assert [h.score for h in second] != [h.score for h in first]


def test_a_preference_recorded_elsewhere_invalidates_by_version(world, encoder):
    engine, ids, _, _ = world
    engine.prefer("dan", "a cat", int(ids[0]), int(ids[40]))
    first = engine.search("a cat", user="dan", k=5)
    other = Engine(engine.store, engine.collection, encoder=encoder)  # another process, in effect
    other.prefer("dan", "a cat", int(ids[41]), int(ids[1]))
    assert engine.search("a cat", user="dan", k=5) != first
    assert len([k for k in engine._adapted if k[0] == "dan"]) == 1


def test_a_long_running_engine_sees_images_added_and_deleted_elsewhere(world):
    engine, ids, vectors, _ = world
    query = vectors[7]
    assert engine.search(vector=query, k=1)[0].id == ids[7]
    with Store.open(engine.store.url) as other:  # another process, in effect
        [new] = other.add_images(engine.collection.id, [ImageRecord("/img/new.png", "f" * 64, 32, 32)], query[None])
        assert {h.id for h in engine.search(vector=query, k=2)} == {new, int(ids[7])}  # a tie with image 7
        other.mark_deleted([new, int(ids[7])])
        assert {h.id for h in engine.search(vector=query, k=5)}.isdisjoint({new, int(ids[7])})
    given = Engine(engine.store, engine.collection, encoder=engine.encoder, index=engine.index)
    engine.store.mark_deleted([int(ids[8])])
    assert given.index is engine._index  # a caller's index is never swapped


def test_text_is_encoded_once(world):
    engine, _, _, _ = world
    calls = []
    encode_text = engine.encoder.encode_text
    engine.encoder.encode_text = lambda texts: calls.append(list(texts)) or encode_text(texts)
    try:
        engine.search_many([SearchRequest("a cat"), SearchRequest("a dog"), SearchRequest("a cat")])
        engine.search("a dog")
    finally:
        del engine.encoder.encode_text
    assert calls == [["a cat", "a dog"]]


def test_caches_smaller_than_the_batch_give_the_same_results(world):
    """A batch with more texts and users than the caches hold: entries are evicted, never lost mid-batch."""
    engine, ids, _, _ = world
    for n, user in enumerate(("w0", "w1", "w2")):
        for i in range(4):
            engine.prefer(user, f"text {i}", int(ids[n + 5 * i]), int(ids[59 - n - i]))
    requests = [SearchRequest(f"text {i}", f"w{i % 3}", 5) for i in range(6)]
    want = engine.search_many(requests)
    tiny = Engine(
        engine.store,
        engine.collection,
        encoder=engine.encoder,
        config=SearchConfig(text_cache_size=1, query_cache_size=1, user_cache_size=1),
    )
    for _ in range(2):  # cold, then with whatever the tiny caches kept
        got = tiny.search_many(requests)
        assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in want]
        np.testing.assert_allclose(
            [h.score for hits in got for h in hits], [h.score for hits in want for h in hits], atol=1e-6
        )
    assert len(tiny._texts) == len(tiny._pairs) == len(tiny._adapted) == 1
    with pytest.raises(SearchInputError, match="user_cache_size must be >= 1, got 0"):
        SearchConfig(user_cache_size=0)


def test_deleted_images_never_come_back(world, encoder):
    engine, ids, vectors, _ = world
    query = engine.encode(["a cat"])[0]
    top = [h.id for h in engine.search("a cat", k=4)]
    engine.store.mark_deleted(top[:2])
    fresh = Engine(engine.store, engine.collection, encoder=encoder)
    live = [i for i in ids if i not in top[:2]]
    expected, _, _ = reference_search(query, vectors, ids, [], 4, fresh.config, live=live)
    assert [h.id for h in fresh.search("a cat", k=4)] == expected


def test_kernel_weights_and_their_normalisation():
    q = _unit(np.array([1.0, 0.0]))
    texts = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    w = pair_weights(q, texts, np.array([0, 1, 2, 1]), np.array([1.0, 1.0, 2.0, 3.0]), "query-kernel", 0.5)
    far, diagonal = np.exp(-2.0), np.exp(-(1 - np.sqrt(0.5)) / 0.5)
    np.testing.assert_allclose(w, [1.0, far, 2 * diagonal, 3 * far], rtol=1e-6)
    np.testing.assert_allclose(pair_weights(q, texts, np.arange(3), np.ones(3), "all", 0.5), np.ones(3))
    g = np.random.default_rng(0).standard_normal((3, 4))  # per-pair gradients
    for w in (np.array([0.1, 0.2, 0.05]), np.array([1.0, 1.0, 2.0])):  # under / over one pair in total
        np.testing.assert_allclose(
            (effective_weights(w)[:, None] * g).mean(0), (w[:, None] * g).sum(0) / max(w.sum(), 1)
        )


def test_kernel_scope_keeps_other_queries_out(world):
    engine, ids, _, axis = world
    for i in range(8):
        engine.prefer("eve", "something else entirely", int(ids[30 + i]), int(ids[i]))
    kernel = SearchConfig(scope="query-kernel", bandwidth=0.01)
    plain = engine.search("a cat", k=5)
    assert [h.id for h in engine.search("a cat", user="eve", k=5, config=kernel)] == [h.id for h in plain]
    assert [h.id for h in engine.search("a cat", user="eve", k=5, config=SearchConfig(scope="all"))] != [
        h.id for h in plain
    ]


def test_compare_is_the_bt_probability_of_the_adapted_query(world):
    engine, ids, vectors, _ = world
    query = engine.encode(["a cat"])[0]
    p = engine.compare(None, "a cat", int(ids[3]), int(ids[50]))
    s3, s50 = vectors[3] @ query, vectors[50] @ query
    t = engine.config.rank.temperature
    assert p == pytest.approx(1 / (1 + np.exp(-t * engine.config.beta * (s3 - s50))), abs=1e-6)
    assert engine.compare(None, "a cat", int(ids[50]), int(ids[3])) == pytest.approx(1 - p, abs=1e-6)
    engine.prefer("fay", "a cat", int(ids[50]), int(ids[3]))
    stated = engine.compare("fay", "a cat", int(ids[50]), int(ids[3]))
    assert stated > 1 - p + 0.01  # moved towards the side fay stated, at the calibrated temperature
    uncooled = engine.compare("fay", "a cat", int(ids[50]), int(ids[3]), SearchConfig(rank=RankConfig(temperature=1)))
    assert uncooled > stated and np.log(stated / (1 - stated)) == pytest.approx(
        engine.config.rank.temperature * np.log(uncooled / (1 - uncooled)), rel=1e-6
    )


def test_torch_device_path_equals_numpy(world):
    engine, ids, _, _ = world
    for i in range(5):
        engine.prefer("gus", "a cat", int(ids[i]), int(ids[59 - i]))
    on_torch = engine.search("a cat", user="gus", k=6, config=SearchConfig(device="cpu"))
    engine.forget("gus")
    on_numpy = engine.search("a cat", user="gus", k=6)
    assert [h.id for h in on_torch] == [h.id for h in on_numpy]
    np.testing.assert_allclose([h.score for h in on_torch], [h.score for h in on_numpy], atol=1e-5)


@pytest.mark.parametrize(
    "request_, error, message",
    [
        (SearchRequest("a cat", k=0), SearchInputError, "k must be a whole number >= 1, got 0"),
        (SearchRequest(None), SearchInputError, "a search needs query text or a vector, got query None"),
        (
            SearchRequest(vector=np.ones(3)),
            SearchInputError,
            "query vector has shape (3,), but collection 'default' has dimension 32",
        ),
        (SearchRequest(vector=np.r_[np.nan, np.ones(DIM - 1)]), SearchInputError, "query vector[0] is nan"),
        (SearchRequest(vector=np.zeros(DIM)), SearchInputError, "query vector is all zeros"),
    ],
)
def test_bad_requests_name_the_value(world, request_, error, message):
    engine, _, _, _ = world
    with pytest.raises(error) as err:
        engine.search_many([request_])
    assert message in str(err.value)


def test_unknown_image_and_empty_collection(world, encoder, tmp_path):
    engine, _, _, _ = world
    with pytest.raises(UnknownImageError, match="no image 9999 in collection 'default'"):
        engine.prefer("hal", "a cat", 9999, 1)
    empty = engine.store.get_or_create_collection("empty", TEST_MODEL, "random", DIM, "float32")
    with pytest.raises(EmptyCollectionError, match="collection 'empty' has no images"):
        Engine(engine.store, empty, encoder=encoder).search("a cat")
    with Store.open(home=tmp_path / "fresh") as fresh, pytest.raises(EmptyCollectionError, match="no collection yet"):
        Engine.open(fresh)


def test_a_deleted_preference_stops_counting_for_a_cached_user(world):
    engine, ids, _, axis = world
    before = [h.id for h in engine.search("a cat", None, 10)]
    engine.prefer("eve", "a cat", int(before[-1]), int(before[0]))
    adapted = [h.id for h in engine.search("a cat", "eve", 10)]
    [pair] = [p for p in engine.store.pairs("eve") if p.id is not None]
    assert engine.store.delete_preference("eve", "pair", pair.id)  # as the service's DELETE does, behind the engine
    engine.prefer("eve", "a cat", int(before[1]), int(before[2]))  # a new record too, so only a count can tell
    engine.store.delete_preference("eve", "pair", max(p.id for p in engine.store.pairs("eve") if p.id))
    assert [h.id for h in engine.search("a cat", "eve", 10)] == before != adapted
