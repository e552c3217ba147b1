"""Query latency on CPU: plain vs personalised search through the Engine, one query and a batch of 256 users.

    python benchmarks/bench_query.py              # preset M: flat index of 100,000 x 512 (the issue's target)
    python benchmarks/bench_query.py --size S     # 10,000 x 512, a quick check

Setup: a SQLite store in a temporary folder with n seeded random unit embeddings (dim 512), a flat
FAISS index saved beside it and opened by the engine as `clipbt search` opens it (so every search
also checks that the collection's images have not changed), the random-weight ViT-B-32 text
tower as encoder (its speed is real; query texts are cached after their first use, as in the
product), and `users` users with `pairs` preference pairs each, recorded under a handful of
query texts.

Timed (interleaved, median of `--reps`):
  plain        Engine.search(text) without a user
  personal     the same text for a user with 50 pairs, the adapted-query cache emptied before
               each call (what a query costs the first time it is asked after a new preference;
               the user's pairs stay in memory)
  personal_sql as `personal` with the user's pairs also reloaded from SQL each call (the first
               query right after a new preference)
  cached       the same personalised query again (adapted-query cache hit)
  batch_plain  Engine.search_many of 256 different texts, no users
  batch_personal the same 256 texts for 256 different users (adapted-query caches emptied)
Writes benchmarks/results/query_cpu.json and query_cpu.png (`--out STEM` for other names); `--method bt` times
the paper's steps instead of the default MAP adaptation.
"""

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py

from engine.bt import AdaptConfig
from engine.search import Engine, SearchConfig, SearchRequest
from indexer.encoder import Encoder
from indexer.vectors.collection import EXACT, rebuild
from storage import ImageRecord, Store, StoreConfig

SIZES = {"S": 10_000, "M": 100_000, "L": 300_000}
DIM = 512
RESULTS = Path(__file__).resolve().parent / "results"
TEXTS = [
    f"a photo of {c} {s}"
    for c in ("red", "blue", "green", "small", "large", "dark", "bright", "striped")
    for s in ("circles", "squares", "stars", "crosses", "cats", "dogs", "cars", "houses")
]


def build(folder: Path, n: int, users: int, pairs: int, seed: int, index_type: str = "flat"):
    rng = np.random.default_rng(seed)
    store = Store.open(home=folder, config=StoreConfig(sqlite_synchronous="NORMAL"))
    coll = store.create_collection("bench", "ViT-B-32", "random", DIM, "float32")
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = []
    for start in range(0, n, 10_000):
        chunk = range(start, min(n, start + 10_000))
        records = [
            ImageRecord(f"/bench/{i:07d}.jpg", hashlib.sha256(str(i).encode()).hexdigest(), 64, 64) for i in chunk
        ]
        ids += store.add_images(coll.id, records, vectors[chunk.start : chunk.stop])
    ids = np.array(ids, dtype=np.int64)
    for u in range(users):
        for _ in range(pairs):
            a, b = rng.choice(ids, 2, replace=False)
            store.add_pair(f"user{u:03d}", TEXTS[rng.integers(0, 8)], int(a), int(b))
    rebuild(store, coll, index_type)  # built from the embeddings in SQL and saved, as `clipbt index` does
    return store, coll  # the engine loads the saved index as `clipbt search` does, and checks it per search


def timed(fn, before=None) -> float:
    if before is not None:
        before()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="M", help="collection size preset")
    parser.add_argument("--reps", type=int, default=200, help="single-query repetitions per mode")
    parser.add_argument("--batch-reps", type=int, default=30, help="batch repetitions per mode")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scope", default=SearchConfig().scope)
    parser.add_argument(
        "--method",
        choices=("map", "bt"),
        default=SearchConfig().method,
        help="adaptation method (default: the search default)",
    )
    parser.add_argument(
        "--index-type", choices=("flat", EXACT), default="flat", help="FAISS flat, or clipbt's exact kernel"
    )
    parser.add_argument("--out", default="query_cpu", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    n = SIZES[args.size]
    config = SearchConfig(method=args.method, adapt=AdaptConfig(steps=args.steps), scope=args.scope)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store, coll = build(Path(tmp), n, args.batch, args.pairs, seed=0, index_type=args.index_type)
        encoder = Encoder.load("ViT-B-32", "random", device="cpu")
        engine = Engine(store, coll, encoder=encoder, config=config)
        print(
            f"setup: {n} x {DIM} {args.index_type}, {args.batch} users x {args.pairs} pairs, {time.perf_counter() - t0:.0f}s"
        )

        text, user = TEXTS[0], "user000"
        requests_plain = [SearchRequest(TEXTS[i % len(TEXTS)], None, 10) for i in range(args.batch)]
        requests_user = [SearchRequest(TEXTS[i % len(TEXTS)], f"user{i:03d}", 10) for i in range(args.batch)]
        engine.search_many(requests_user)  # warm-up: encode texts, load every user's pairs, FAISS pages
        engine.search_many(requests_plain)

        def clear_adapted():
            engine._adapted.clear()

        def clear_all():
            engine.forget(user)

        single = {
            "plain": (lambda: engine.search(text, k=10), None),
            "personal": (lambda: engine.search(text, user=user, k=10), clear_adapted),
            "personal_sql": (lambda: engine.search(text, user=user, k=10), clear_all),
            "cached": (lambda: engine.search(text, user=user, k=10), None),
        }
        batch = {
            "batch_plain": (lambda: engine.search_many(requests_plain), None),
            "batch_personal": (lambda: engine.search_many(requests_user), clear_adapted),
        }
        times = {name: [] for name in (*single, *batch)}
        # Interleaved in a fresh random order every repetition, so load on the shared CPU, and
        # whatever one mode leaves behind (warm caches, spinning threads), hits every mode alike.
        order = np.random.default_rng(1)
        for _rep in range(args.reps):
            for name in order.permutation(list(single)):
                times[name].append(timed(*single[name]))
        for _rep in range(args.batch_reps):
            for name in order.permutation(list(batch)):
                times[name].append(timed(*batch[name]))
        store.close()

    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "personal_over_plain": medians["personal"] / medians["plain"],
        "personal_sql_over_plain": medians["personal_sql"] / medians["plain"],
        "cached_over_plain": medians["cached"] / medians["plain"],
        "batch_personal_over_batch_plain": medians["batch_personal"] / medians["batch_plain"],
    }
    goals = {"personal_over_plain": 1.10, "batch_personal_over_batch_plain": 1.25}
    result = {
        "method": args.method,
        "size": args.size,
        "n": n,
        "dim": DIM,
        "index": args.index_type,
        "k": 10,
        "pairs_per_user": args.pairs,
        "steps": args.steps,
        "scope": args.scope,
        "batch": args.batch,
        "reps": args.reps,
        "batch_reps": args.batch_reps,
        "machine": describe(),
        "median_ms": {name: round(1000 * m, 3) for name, m in medians.items()},
        "p90_ms": {name: round(1000 * float(np.percentile(t, 90)), 3) for name, t in times.items()},
        "ratios": {name: round(r, 3) for name, r in ratios.items()},
        "goals": goals,
        "met": {name: ratios[name] <= goal for name, goal in goals.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, m in medians.items():
        print(f"{name:>16} {1000 * m:9.2f} ms (median of {len(times[name])})")
    for name, r in ratios.items():
        goal = goals.get(name)
        print(f"{name:>32} {r:6.3f}" + (f"  goal <= {goal}: {'met' if r <= goal else 'MISSED'}" if goal else ""))
    _plot(times, result, RESULTS / f"{args.out}.png")


def _plot(times: dict, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, names in zip(axes, (["plain", "personal", "personal_sql", "cached"], ["batch_plain", "batch_personal"])):
        ax.boxplot([np.array(times[n]) * 1000 for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
        ax.set_ylabel("latency (ms)")
    axes[0].set_title(f"one query, {result['pairs_per_user']} pairs, {result['steps']} steps")
    axes[1].set_title(f"batch of {result['batch']} users")
    m = result["machine"]
    fig.suptitle(
        f"flat {result['n']:,} x {result['dim']}; {m['cpu']}, {m['cores']} cores; "
        f"ratios {result['ratios']['personal_over_plain']:.3f} / "
        f"{result['ratios']['batch_personal_over_batch_plain']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
