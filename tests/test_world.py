"""Tests of the procedural world: determinism, truthful captions, collections on disk, simulated users."""

import math
import re

import numpy as np
import pytest
from PIL import Image

from indexer.world import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    FEATURE_NAMES,
    QUALITY_WORDS,
    SHAPES,
    SIZES,
    SimulatedUser,
    WorldConfig,
    WorldError,
    bayes_optimal_accuracy,
    caption,
    feature_matrix,
    generate,
    generate_one,
    read_collection,
    sample_users,
    write_collection,
)


def _pixels(world):
    return [np.asarray(img).tobytes() for img, _ in world]


def test_same_seed_same_pixels_and_labels():
    a, b = generate(40, seed=3), generate(40, seed=3)
    assert _pixels(a) == _pixels(b)
    assert [x for _, x in a] == [x for _, x in b]


def test_different_seeds_differ():
    a, b = generate(40, seed=3), generate(40, seed=4)
    assert all(pa != pb for pa, pb in zip(_pixels(a), _pixels(b)))
    assert [x for _, x in a] != [x for _, x in b]


def test_an_image_depends_only_on_seed_and_index():
    img, attrs = generate_one(17, seed=5)
    ((img2, attrs2),) = generate(1, seed=5, start=17)
    assert attrs == attrs2 and np.array_equal(np.asarray(img), np.asarray(img2))


def test_images_are_rgb_at_the_configured_size():
    for size in (64, 96):
        for img, _ in generate(5, seed=0, config=WorldConfig(image_size=size)):
            assert img.mode == "RGB" and img.size == (size, size)


def test_bad_config_names_the_value():
    with pytest.raises(WorldError, match="got 32"):
        WorldConfig(image_size=32)
    with pytest.raises(WorldError, match="got 5"):
        WorldConfig(max_count=5)


def test_attributes_cover_the_world():
    attrs = [a for _, a in generate(600, seed=1)]
    assert {a.shape for a in attrs} == set(SHAPES)
    assert {a.colour for a in attrs} == set(COLOURS)
    assert {a.size for a in attrs} == set(SIZES)
    assert {a.background for a in attrs} == set(BACKGROUNDS)
    assert {a.count for a in attrs} == {1, 2, 3}
    assert {a.filled for a in attrs} == {True, False}
    assert {a.quality for a in attrs} == {"clean", "blur", "noise", "jpeg"}
    assert all(0 < a.x < 1 and 0 < a.y < 1 for a in attrs)
    assert all((a.quality == "clean") == (a.quality_level == 0) for a in attrs)


HIDDEN_WORDS = {
    "left",
    "right",
    "top",
    "bottom",
    "centre",
    "center",
    "corner",
    "blur",
    "blurry",
    "blurred",
    "noise",
    "noisy",
    "jpeg",
    "compressed",
    "sharp",
    "clean",
    "quality",
}
PLURALS = {s + "s": s for s in SHAPES} | {"crosses": "cross"}


def test_captions_are_truthful_and_by_default_never_mention_quality_or_position():
    rng = np.random.default_rng(0)
    world = generate(400, seed=2)
    both = 0
    for _, a in world:
        text = caption(a, rng)
        words = set(re.findall(r"[a-z]+", text))
        assert not words & HIDDEN_WORDS, text
        assert words & set(COLOURS) <= {a.colour}, text
        assert {PLURALS.get(w, w) for w in words} & set(SHAPES) <= {a.shape}, text
        assert words & set(SIZES) <= {a.size}, text
        assert words & set(BACKGROUNDS) <= {a.background}, text
        assert not (words & {"outlined", "hollow"} and a.filled) and not ("filled" in words and not a.filled), text
        if a.count > 1:
            assert COUNT_WORDS[a.count] in words and words & (set(PLURALS) | {"shapes"}), text
        assert a.colour in words or a.shape in {PLURALS.get(w, w) for w in words}, text
        both += a.colour in words and a.shape in {PLURALS.get(w, w) for w in words}
    assert both / len(world) > 0.7


def test_captions_name_quality_and_position_truthfully_when_asked():
    rng = np.random.default_rng(1)
    world = generate(300, seed=4)
    named = {"quality": 0, "position": 0}
    for _, a in world:
        text = caption(a, rng, p_quality=0.5, p_position=0.5)
        words = set(re.findall(r"[a-z]+", text))
        quality = words & {w for ws in QUALITY_WORDS.values() for w in ws}
        assert quality <= set(QUALITY_WORDS[a.quality]), text
        named["quality"] += bool(quality)
        where = words & {"left", "right", "top", "bottom", "centre"}
        assert ("left" not in where or a.x < 1 / 3) and ("right" not in where or a.x > 2 / 3), (text, a.x)
        assert ("top" not in where or a.y < 1 / 3) and ("bottom" not in where or a.y > 2 / 3), (text, a.y)
        assert "centre" not in where or (1 / 3 <= a.x <= 2 / 3 and 1 / 3 <= a.y <= 2 / 3), text
        named["position"] += bool(where)
    assert 0.4 < named["quality"] / len(world) < 0.6 and 0.4 < named["position"] / len(world) < 0.6


def test_shares_of_shape_only_and_colour_only_captions_are_what_is_asked():
    rng = np.random.default_rng(3)
    world = generate(300, seed=5)
    only = {"shape": 0, "colour": 0}
    for _, a in world:
        words = set(re.findall(r"[a-z]+", caption(a, rng, p_shape_only=0.3, p_colour_only=0.4)))
        shapes = {PLURALS.get(w, w) for w in words} & set(SHAPES)
        only["shape"] += a.colour not in words
        only["colour"] += not shapes
        assert a.colour in words or shapes == {a.shape}, words
    assert 0.22 < only["shape"] / len(world) < 0.38 and 0.32 < only["colour"] / len(world) < 0.48, only


def test_captions_vary():
    rng = np.random.default_rng(0)
    _, a = generate_one(0, seed=0)
    assert len({caption(a, rng) for _ in range(100)}) >= 8


def test_collection_round_trips_through_disk(tmp_path):
    written = write_collection(tmp_path, 12, seed=9)
    assert (tmp_path / "labels.jsonl").is_file()
    read = read_collection(tmp_path)
    assert [(p.name, a) for p, a in read] == [(p.name, a) for p, a in written]
    for (path, attrs), (img, truth) in zip(read, generate(12, seed=9)):
        assert attrs == truth and np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))


def test_missing_labels_names_the_folder(tmp_path):
    with pytest.raises(WorldError, match=str(tmp_path)):
        read_collection(tmp_path)


def test_features_one_hot_blocks():
    attrs = [a for _, a in generate(50, seed=0)]
    x = feature_matrix(attrs)
    assert x.shape == (50, len(FEATURE_NAMES))
    assert np.all(x[:, : len(SHAPES)].sum(1) == 1)
    assert np.all(x[:, len(SHAPES) : len(SHAPES) + len(COLOURS)].sum(1) == 1)


def _user_on(feature: str, weight: float) -> SimulatedUser:
    w = np.zeros(len(FEATURE_NAMES))
    w[FEATURE_NAMES.index(feature)] = weight
    return SimulatedUser(weights=w)


def test_user_answers_follow_bradley_terry():
    user = sample_users(1, seed=4)[0]
    attrs = [a for _, a in generate(200, seed=0)]
    u = user.utilities(attrs)
    i, j = min(((i, j) for i in range(20) for j in range(20)), key=lambda ij: abs(u[ij[0]] - u[ij[1]] - 0.8))
    p = user.probability(attrs[i], attrs[j])
    assert p == pytest.approx(1 / (1 + math.exp(-(u[i] - u[j]))))
    rng = np.random.default_rng(0)
    n = 4000
    rate = np.mean([user.prefers(attrs[i], attrs[j], rng) for _ in range(n)])
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_bayes_optimal_accuracy_hand_computed():
    user = _user_on("size", math.log(3))  # large vs small: sigmoid(ln 3) = 3/4
    small = next(a for _, a in generate(50, seed=0) if a.size == "small")
    large = next(a for _, a in generate(50, seed=0) if a.size == "large")
    assert user.probability(large, small) == pytest.approx(0.75)
    # pairs: (small, large) -> max(1/4, 3/4); (small, small) -> 1/2; mean 0.625
    assert bayes_optimal_accuracy(user, [(small, large), (small, small)]) == pytest.approx(0.625)


def test_users_are_seeded_and_distinct():
    a, b = sample_users(3, seed=1), sample_users(3, seed=1)
    assert all(np.array_equal(x.weights, y.weights) for x, y in zip(a, b))
    assert not np.array_equal(a[0].weights, a[1].weights)
    assert "likes" in a[0].describe() or "dislikes" in a[0].describe()


def test_user_weights_shape_is_checked():
    with pytest.raises(WorldError, match=r"\(3,\)"):
        SimulatedUser(weights=np.zeros(3))
