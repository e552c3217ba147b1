"""The section 3.1 protocol: reproducible draws, N = 0, known answers, tuning blind to evaluation, fast paths."""

import json

import numpy as np
import pytest

from engine import bt
from engine.bench import protocol as pb
from engine.bench.datasets import EncodedDataset

SMALL = dict(sizes=(0, 1, 5, 20), repeats=3, eval_size=300, tune_size=100, tune_repeats=2, splits=1)


def unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(seed=0, m=600, d=8, k=120, strength=6.0, query="random", users=1, ranked=False, noiseless=False):
    """Images on the unit sphere, a hidden direction w per user, labels sampled from BT on strength * w.y
    (or its sign when noiseless). query: "random" (orthogonal to user 0's w), "w", "-w" or "pair" (a random
    query per pair)."""
    rng = np.random.default_rng(seed)
    images = unit(rng.normal(size=(k, d)))
    ws = unit(rng.normal(size=(users, d)))
    if ranked:  # groups of 4 images ranked by utility: all 6 pairs of each group
        groups = rng.permutation(k).reshape(-1, 4)
        a = np.concatenate([[g[i] for i in range(4) for j in range(i + 1, 4)] for g in groups])
        b = np.concatenate([[g[j] for i in range(4) for j in range(i + 1, 4)] for g in groups])
        group = np.repeat(np.arange(len(groups)), 6)
        owner = np.zeros(len(a), dtype=int)
    else:
        a = rng.integers(0, k, m)
        b = (a + 1 + rng.integers(0, k - 1, m)) % k
        group = np.arange(m)
        owner = rng.integers(0, users, m)
    u = strength * np.einsum("md,md->m", ws[owner], images[a] - images[b])
    p = 1 / (1 + np.exp(-u))
    win = u > 0 if noiseless else rng.random(len(a)) < p
    rank = None
    if ranked:
        rank = np.empty(k)
        for g in groups:
            rank[g] = np.argsort(np.argsort(-(images[g] @ ws[0])))  # 0 = best by the true utility
        win = rank[a] < rank[b]
    r = rng.normal(size=(1, d))
    x = {"random": unit(r - (r @ ws[0]) * ws[:1]), "w": ws[:1], "-w": -ws[:1]}.get(query)  # random: orthogonal to w
    queries = unit(rng.normal(size=(len(a), d))) if query == "pair" else np.repeat(x, len(a), axis=0)
    bayes = np.maximum(p, 1 - p)
    return EncodedDataset(
        images=images,
        queries=queries,
        preferred=np.where(win, a, b),
        rejected=np.where(win, b, a),
        users=np.array([f"u{o}" for o in owner]) if users > 1 else None,
        group=group,
        image_rank=rank,
        bayes=bayes,
        bayes_pooled=bayes if users == 1 else None,
    )


def test_seeded_runs_are_reproducible_and_seed_matters():
    data = synthetic()
    one = pb.run(data, pb.BenchConfig(**SMALL))
    two = pb.run(data, pb.BenchConfig(**SMALL))
    assert json.dumps(one.to_json()) == json.dumps(two.to_json())
    other = pb.run(data, pb.BenchConfig(**SMALL, seed=1))
    assert other.methods["bt"]["mean"] != one.methods["bt"]["mean"]
    np.testing.assert_array_equal(pb.draw(np.arange(100), 5, 0, 0, 3, 0), pb.draw(np.arange(100), 5, 0, 0, 3, 0))


@pytest.mark.parametrize("kind", ["global", "pair", "ranked", "per_user"])
def test_n_zero_equals_original_for_every_method(kind):
    data = {
        "global": lambda: synthetic(),
        "pair": lambda: synthetic(query="pair"),
        "ranked": lambda: synthetic(ranked=True, k=400),
        "per_user": lambda: synthetic(users=3, m=900),
    }[kind]()
    small = {**SMALL, "eval_size": 60, "tune_size": 40} if kind == "pair" else SMALL  # pair: one query per eval pair
    result = pb.run(data, pb.BenchConfig(**small, per_user=kind == "per_user"))
    expected = set(pb.METHODS) if kind == "ranked" else set(pb.METHODS) - {"plackett_luce"}
    assert set(result.methods) == expected
    original = result.methods["original"]
    for name, row in result.methods.items():
        assert row["N"] == [0, 1, 5, 20]
        assert row["mean"][0] == original["mean"][0] and row["std_draws"][0] == 0.0, name


def test_split_does_not_depend_on_the_sizes_and_splits_differ():
    data = synthetic(users=3, m=900)
    for per_user in (False, True):
        small, large = (
            pb.BenchConfig(**{**SMALL, "sizes": sizes}, per_user=per_user) for sizes in ((0, 5), (0, 1, 50))
        )
        for a, b in zip(pb.split(data, small)[0], pb.split(data, large)[0]):
            for name in ("eval", "tune", "pool"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        first, second = pb.split(data, small, 0)[0][0], pb.split(data, small, 1)[0][0]
        assert not np.array_equal(first.eval, second.eval)


def test_spreads_over_splits_and_draws():
    result = pb.run(synthetic(), pb.BenchConfig(**{**SMALL, "splits": 3}, methods=("original", "bt")))
    row = result.methods["original"]
    assert row["std_draws"] == [0.0] * 4 and row["std_splits"][0] > 0  # the unadapted query only sees the split
    assert all(len(result.hyperparameters[m]) == 3 for m in ("original", "bt"))
    assert (
        result.methods["bt"]["std"][3]
        >= max(result.methods["bt"]["std_draws"][3], result.methods["bt"]["std_splits"][3]) - 1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_at_one_pair_is_never_below_no_adaptation(seed):
    """Held-out accuracy of the tuned MAP adaptation at N = 1 is at least that of the unadapted query, on
    seeded per-user data with queries that know nothing (random) or something (w) of the users' taste."""
    for query in ("random", "w"):
        data = synthetic(seed=seed, users=4, m=1600, d=16, query=query)
        result = pb.run(
            data,
            pb.BenchConfig(
                sizes=(1, 5),
                repeats=10,
                tune_repeats=4,
                eval_size=200,
                tune_size=100,
                splits=2,
                per_user=True,
                methods=("original", "map"),
            ),
        )
        assert result.methods["map"]["mean"][0] >= result.methods["original"]["mean"][0], (query, result.methods)


def test_calibration_of_known_probabilities():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    won = rng.random(len(p)) < p  # the preferred image is the one that won: store p of the actual winner
    p_preferred = np.where(won, p, 1 - p)
    assert pb.expected_calibration_error(p_preferred) < 0.01
    assert pb.expected_calibration_error(np.where(won, 0.99, 0.01)) > 0.2  # over-confident
    rows = pb.reliability(p_preferred)
    assert sum(rows["count"]) == len(p) and np.allclose(rows["accuracy"], rows["confidence"], atol=0.02)


def test_known_answers_query_on_the_true_direction():
    right = pb.run(synthetic(query="w", noiseless=True), pb.BenchConfig(**SMALL, methods=("original",)))
    wrong = pb.run(synthetic(query="-w", noiseless=True), pb.BenchConfig(**SMALL, methods=("original",)))
    assert right.methods["original"]["mean"] == [1.0] * 4
    assert wrong.methods["original"]["mean"] == [0.0] * 4


def test_bt_approaches_the_bayes_optimal_accuracy():
    """Labels from BT along a hidden w, a query orthogonal to w: original is a coin flip, and BT with 200
    pairs recovers w well enough to come within 2 points of the Bayes-optimal accuracy (87.6%)."""
    result = pb.run(
        synthetic(m=2500, d=8, strength=8.0),
        pb.BenchConfig(sizes=(0, 200), repeats=5, tune_repeats=2, methods=("original", "bt")),
    )
    assert abs(result.methods["original"]["mean"][0] - 0.5) < 0.05
    assert result.oracle - 0.02 < result.methods["bt"]["mean"][1] <= result.oracle + 0.02


def test_tuning_never_sees_the_evaluation_pairs():
    data = synthetic()
    config = pb.BenchConfig(**SMALL)
    parts, _ = pb.split(data, config)
    flipped = EncodedDataset(**{**data.__dict__})
    ev = parts[0].eval
    flipped.preferred, flipped.rejected = data.preferred.copy(), data.rejected.copy()
    flipped.preferred[ev], flipped.rejected[ev] = data.rejected[ev], data.preferred[ev]
    methods = [m for m in pb.METHODS if m != "plackett_luce"]
    assert pb.tune(data, parts, methods, config) == pb.tune(flipped, parts, methods, config)
    assert pb.run(flipped, config).methods["original"]["mean"][0] == pytest.approx(
        1 - pb.run(data, config).methods["original"]["mean"][0]
    )


def test_split_is_disjoint_keeps_groups_and_users():
    data = synthetic(ranked=True, k=400)
    (part,), _ = pb.split(data, pb.BenchConfig(**SMALL))
    sets = [set(part.eval), set(part.tune), set(part.pool)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == len(data.preferred)
    assert [
        len({data.group[i] for i in s} & {data.group[i] for i in t})
        for s, t in ((sets[0], sets[2]), (sets[1], sets[2]), (sets[0], sets[1]))
    ] == [0, 0, 0]
    users = synthetic(users=3, m=900)
    parts, skipped = pb.split(users, pb.BenchConfig(**SMALL, per_user=True))
    assert [p.user for p in parts] == ["u0", "u1", "u2"] and skipped == []
    for p in parts:
        assert set(users.users[np.concatenate([p.eval, p.tune, p.pool])]) == {p.user}
    with pytest.raises(pb.PreferenceBenchError, match="too few pairs for sizes up to 20"):
        pb.split(synthetic(m=24), pb.BenchConfig(**SMALL))


def test_per_user_oracle_is_the_mean_over_users():
    data = synthetic(users=3, m=900)
    result = pb.run(data, pb.BenchConfig(**SMALL, per_user=True, methods=("original", "bt")))
    parts, _ = pb.split(data, pb.BenchConfig(**SMALL, per_user=True))
    assert result.oracle == pytest.approx(np.mean([data.bayes[p.eval].mean() for p in parts]))
    assert result.counts["users"] == 3 and result.counts["users_skipped"] == 0


def batch_for(data, n, per_query):
    rng = np.random.default_rng(1)
    train = np.stack([rng.choice(len(data.preferred), n, replace=False) for _ in range(3)])
    rows = 4 if per_query else 1
    queries = unit(rng.normal(size=(3 * rows, data.images.shape[1])))
    return pb._Batch(queries, np.repeat(np.arange(3), rows), train)


@pytest.mark.parametrize(
    "method,params",
    [
        ("bt", {"lr": 3.0, "steps": 5, "beta": 10.0}),
        ("map", {"prior_precision": 1.0, "beta": 10.0}),
        ("bt_margin", {"lr": 3.0, "steps": 2, "beta": 1.0}),
        ("bt_selected", {"lr": 1.0, "steps": 3, "beta": 10.0, "keep": 0.25}),
        ("positive", {"lr": 0.3}),
        ("rocchio", {"alpha": 1.0, "beta": 0.75, "gamma": 0.15}),
        ("average_vector", {}),
    ],
)
def test_batched_methods_match_one_call_per_query(method, params):
    """The fast paths (adapt_batched, affine baselines) against the obvious loop over engine.bt."""
    data = synthetic()
    batch = batch_for(data, 8, per_query=True)
    got = pb.adapt(method, params, data, batch, pb.BenchConfig())
    for row, (x, t) in enumerate(zip(batch.queries, batch.task)):
        p, r = data.images[data.preferred[batch.train[t]]], data.images[data.rejected[batch.train[t]]]
        if method == "positive":
            want = bt.positive_only(x, p, **params)
        elif method == "rocchio":
            want = bt.rocchio(x, p, r, **params)
        elif method == "average_vector":
            want = bt.average_vector(x, p, r)
        elif method == "map":
            want = bt.map_adapt_reference(x, p, r, None, **params)
        else:
            gap = (p - r) @ x
            keep = np.ones(len(p), bool)
            if method == "bt_selected":  # adapt on the selected pairs alone
                keep = np.zeros(len(p), bool)
                keep[np.argsort(-pb.pair_quality(gap, np.linalg.norm(p - r, axis=1), params["beta"]))[:2]] = True
            w = 1 / (1 + np.exp((gap - 0.1) / 0.05)) if method == "bt_margin" else None
            want = bt.adapt(x, p[keep], r[keep], lr=params["lr"], steps=params["steps"], beta=params["beta"], weights=w)
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)


def test_margin_weight_is_the_slides_formula():
    gap = np.array([-1.0, 0.0, 0.1, 0.2, 5.0])
    np.testing.assert_allclose(pb.margin_weights(gap, 0.1, 0.05), 1 / (1 + np.exp((gap - 0.1) / 0.05)))
    assert pb.margin_weights(np.array([100.0]))[0] == 0.0  # no overflow warning, no NaN


def test_selection_weights_average_over_the_kept_pairs():
    quality = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    w = pb.selection_weights(quality, keep=0.5)
    np.testing.assert_array_equal(w, [[0, 2, 2, 0], [2, 2, 0, 0]])
    assert pb.selection_weights(quality, keep=0.01).sum(axis=1).tolist() == [4.0, 4.0]  # at least one pair


def test_plackett_luce_rankings_follow_the_human_ranks():
    data = synthetic(ranked=True, k=400)
    first = np.flatnonzero(data.group == 0)  # 6 pairs of group 0
    (ranking,) = pb.pl_rankings(data, first[[0, 5]])
    assert len(ranking) == len(set(data.preferred[first[[0, 5]]]) | set(data.rejected[first[[0, 5]]]))
    assert np.all(np.diff(data.image_rank[ranking]) > 0)


def test_write_json_table_and_plot(tmp_path):
    result = pb.run(synthetic(), pb.BenchConfig(**SMALL, methods=("original", "bt", "positive")), name="syn")
    result.command = "clipbt bench preference x.npz"
    paths = pb.write(result, tmp_path, "syn")
    saved = json.loads(paths["json"].read_text())
    assert set(saved["methods"]) == {"original", "bt", "positive"}
    assert saved["methods"]["bt"]["N"] == [0, 1, 5, 20] and len(saved["methods"]["bt"]["std"]) == 4
    assert len(saved["methods"]["bt"]["ece"]) == 4 and paths["reliability"].is_file()
    assert 0.5 <= saved["oracle"] <= 1.0
    md = paths["md"].read_text()
    assert "clipbt bench preference x.npz" in md and "| bt | " in md and "oracle (Bayes-optimal)" in md
    assert "expected calibration error" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
