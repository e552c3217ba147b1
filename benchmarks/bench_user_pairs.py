"""The first search after a new preference of a user with many pairs: the cached pairs extended by the new one, against a full reload (issue 17).

A SQLite store with one user holding P pairs over 2,000 images (d 512); per repetition the user
records one pair, then `Engine._user_pairs` is timed on the engine that has the user cached
(extends by the new pair) and on a fresh engine (reads all P pairs), in alternating order.
Writes benchmarks/results/user_pairs.json.

    python benchmarks/bench_user_pairs.py --pairs 20000
"""

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.search import Engine, SearchConfig
from storage import ImageRecord, PreferenceRecord, Store

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as home, Store.open(home=home) as store:
        coll = store.create_collection("default", "ViT-B-32", "openai", 512)
        vectors = rng.standard_normal((2000, 512)).astype(np.float32)
        records = [ImageRecord(f"/img/{i}.png", hashlib.sha256(str(i).encode()).hexdigest(), 8, 8) for i in range(2000)]
        ids = np.array(store.add_images(coll.id, records, vectors))
        pick = rng.choice(ids, (args.pairs, 2))
        pick = pick[pick[:, 0] != pick[:, 1]]
        store.import_preferences(
            [
                PreferenceRecord("pair", "ann", coll.id, f"q{n % 50}", ((int(a), 0), (int(b), 1)), "pair")
                for n, (a, b) in enumerate(pick)
            ]
        )
        cached = Engine(store, coll, config=SearchConfig(scope="all"))
        cached._user_pairs("ann", store.preference_version("ann"))
        times = {"extend cached": [], "full reload": []}
        for rep in range(args.repeats):
            a, b = (int(i) for i in rng.choice(ids, 2, replace=False))
            store.add_pair("ann", f"new {rep}", a, b)
            version = store.preference_version("ann")
            order = ["extend cached", "full reload"] if rep % 2 else ["full reload", "extend cached"]
            for name in order:
                engine = cached if name == "extend cached" else Engine(store, coll, config=SearchConfig(scope="all"))
                start = time.perf_counter()
                engine._user_pairs("ann", version)
                times[name].append(time.perf_counter() - start)
    from benchmarks.machine import describe

    out = {
        "command": f"python benchmarks/bench_user_pairs.py --pairs {args.pairs} --repeats {args.repeats}",
        "machine": describe(),
        "pairs": len(pick),
        "median_ms": {k: 1000 * float(np.median(v)) for k, v in times.items()},
        "ms": {k: [1000 * t for t in v] for k, v in times.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "user_pairs.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["median_ms"]), "pairs", out["pairs"])


if __name__ == "__main__":
    main()
