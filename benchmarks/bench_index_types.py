"""Which FAISS index type for a CPU collection: build time, size, latency of one query and of a batch, recall@10.

    python benchmarks/bench_index_types.py              # 100,000 x 512, the size of bench_query.py
    python benchmarks/bench_index_types.py --n 20000    # a quick check

Data: n unit vectors of dimension 512 in 1,000 clusters (cosine about 0.6 to their centre: CLIP's
space is clumpy, and uniform random vectors would be a worst case no index is built for), rounded
to float16 as the store keeps embeddings by default (so "flat16" is exact on them); queries drawn
the same way, so they fall among the images rather than on one. Every search goes through `indexer.vectors.faiss.FaissIndex.search`, the product's path,
for 26 neighbours (what `clipbt search -k 10` asks FAISS for). Timed: one query at a time (median
of `--reps`) and batches of `--batch` (median of `--batch-reps`), the types interleaved in a fresh
random order each repetition. Recall@10: share of the exact top 10 (flat) found.
Writes benchmarks/results/index_types.json and index_types.png.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
from machine import describe  # benchmarks/machine.py

from indexer.vectors.faiss import FaissIndex, plan_index

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("flat", "flat16", "ivf", "hnsw", "ivfpq")
DEPTH = 26  # candidate_count(10): max(2 * 10, 10 + 16)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng, centres: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors, each 0.6 of a random centre plus 0.8 of a random direction, in float16 precision."""
    noise = unit(rng.standard_normal((n, centres.shape[1])))
    return unit(0.6 * centres[rng.integers(0, len(centres), n)] + 0.8 * noise).astype(np.float16).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=100, help="single queries per type")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch-reps", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((1000, args.dim)))
    vectors = clustered(rng, centres, args.n)
    ids = np.arange(args.n, dtype=np.int64) + 1
    queries = clustered(rng, centres, args.reps + args.batch)
    singles, batch = queries[: args.reps], queries[args.reps :]

    indexes, facts = {}, {}
    for kind in TYPES:
        start = time.perf_counter()
        indexes[kind] = FaissIndex.build(ids, vectors, kind)
        facts[kind] = {
            "factory": plan_index(kind, args.n, args.dim),
            "build_s": round(time.perf_counter() - start, 2),
            "size_mb": round(faiss.serialize_index(indexes[kind].cpu).size / 2**20, 1),
        }
        print(f"built {kind:>7} ({facts[kind]['factory']}) in {facts[kind]['build_s']} s, {facts[kind]['size_mb']} MB")

    _, exact = indexes["flat"].search(batch, 10)
    for kind, index in indexes.items():
        _, found = index.search(batch, 10)
        facts[kind]["recall_at_10"] = round(
            float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])), 4
        )

    single_times = {kind: [] for kind in TYPES}
    batch_times = {kind: [] for kind in TYPES}
    for rep in range(args.reps):
        for kind in rng.permutation(TYPES):
            start = time.perf_counter()
            indexes[kind].search(singles[rep : rep + 1], DEPTH)
            single_times[kind].append(time.perf_counter() - start)
    for _ in range(args.batch_reps):
        for kind in rng.permutation(TYPES):
            start = time.perf_counter()
            indexes[kind].search(batch, DEPTH)
            batch_times[kind].append(time.perf_counter() - start)
    for kind in TYPES:
        facts[kind]["single_ms"] = round(1000 * statistics.median(single_times[kind]), 3)
        facts[kind]["batch_ms"] = round(1000 * statistics.median(batch_times[kind]), 1)

    result = {
        "n": args.n,
        "dim": args.dim,
        "depth": DEPTH,
        "reps": args.reps,
        "batch": args.batch,
        "batch_reps": args.batch_reps,
        "machine": describe(),
        "types": facts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "index_types.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'type':>7} {'one query':>10} {'batch':>10} {'recall@10':>9} {'size':>9} {'build':>8}")
    for kind, f in facts.items():
        print(
            f"{kind:>7} {f['single_ms']:8.2f}ms {f['batch_ms']:8.1f}ms {f['recall_at_10']:9.3f} "
            f"{f['size_mb']:7.1f}MB {f['build_s']:7.1f}s"
        )
    _plot(result, RESULTS / "index_types.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["types"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        ("single_ms", "batch_ms", "recall_at_10"),
        ("one query (ms)", f"batch of {result['batch']} (ms)", "recall@10"),
    ):
        ax.bar(kinds, [result["types"][k][key] for k in kinds])
        ax.set_title(label)
    m = result["machine"]
    fig.suptitle(f"{result['n']:,} x {result['dim']}, 26 neighbours; {m['cpu']}, {m['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
