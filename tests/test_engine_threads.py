"""One Engine shared by many threads: the same answers as the same requests run one at a time, and one loaded index."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_engine_search import make_collection

from engine.api import Clipbt
from engine.search import SearchConfig
from storage import Store

THREADS, REQUESTS = 8, 200
TEXTS = ("a cat", "a dog", "a red circle", "a blue star")


def script(user: int) -> list[tuple]:
    """A user's seeded mix of searches and preferences: ("search", text, k) or ("prefer", text, a rank, b rank)."""
    rng = np.random.default_rng(user)
    steps = []
    for _ in range(REQUESTS):
        text = TEXTS[rng.integers(len(TEXTS))]
        if rng.random() < 0.15:
            a, b = rng.choice(10, 2, replace=False)
            steps.append(("prefer", text, int(a), int(b)))
        else:
            steps.append(("search", text, int(rng.integers(1, 12))))
    return steps


def play(clip: Clipbt, user: int) -> list:
    """Run one user's script; returns what every step answered."""
    name, answers, last = f"user{user}", [], {}
    for step in script(user):
        if step[0] == "search":
            hits = clip.search(step[1], name, step[2])
            last[step[1]] = [h.id for h in hits]
            answers.append([(h.id, round(h.score, 5), h.path) for h in hits])
        else:
            ids = last.get(step[1]) or [h.id for h in clip.search(step[1], name, 10)]
            a, b = ids[step[2] % len(ids)], ids[step[3] % len(ids)]
            if a != b:
                clip.prefer(name, step[1], a, b)
            answers.append(("prefer", a, b))
    return answers


@pytest.fixture
def two_stores(encoder, tmp_path):
    """Two identical stores of one seeded collection, each with its own library."""
    libraries = []
    for name in ("shared", "serial"):
        store = Store.open(home=tmp_path / name)
        make_collection(store, n=80)
        clip = Clipbt(store, SearchConfig())
        clip.engine("default")._encoder = encoder
        libraries.append(clip)
    yield libraries
    for clip in libraries:
        clip.close()


def test_threads_sharing_one_engine_answer_as_serial_requests_do(two_stores):
    shared, serial = two_stores
    want = [play(serial, user) for user in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda user: play(shared, user), range(THREADS)))
    for user in range(THREADS):
        assert got[user] == want[user], f"user{user} got other answers when sharing the engine"
    assert sum(step[0] == "prefer" for answers in got for step in answers if isinstance(step, tuple)) > 50
    assert shared.engine("default").index_loads == 1
    assert len(shared.store.pairs("user0")) == len(serial.store.pairs("user0")) > 0
