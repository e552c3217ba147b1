"""Which vector backend: FAISS flat, clipbt's exact kernel, milvus-lite FLAT and HNSW on the same data: build time, one-query and batch latency, recall@10.

    python benchmarks/bench_backends.py              # --size M: 100,000 x 512
    python benchmarks/bench_backends.py --size S     # 10,000 x 512, a quick check

Data: unit vectors of dimension 512 in 1,000 clusters (0.6 of a centre plus 0.8 of a random
direction, rounded to float16 as the store keeps them), queries drawn the same way; the data of
benchmarks/bench_index_types.py. Backends: "faiss:flat" is faiss.IndexFlatIP under IndexIDMap2
(the FAISS backend's flat index); "exact" is indexer.vectors.exact.ExactIndex on the CPU, measured
only when that module is importable; "milvus:FLAT" and "milvus:HNSW" are indexer.vectors.milvus
over a milvus-lite file in a temporary folder (in this process, over gRPC on 127.0.0.1).
Build: from an empty index to searchable through its index (for Milvus: batched inserts, flush,
and `wait_for_index`, as milvus-lite builds segment indexes in a background thread after a flush).
The collections are dropped at the end, so no background work outlives the temporary folder.
Timed for 26 neighbours (what `clipbt search -k 10` asks for): one query at a time (median of
the preset's reps) and batches of 256 in ONE call (median), the backends interleaved in a fresh
random order each repetition; the 1-minute load average before and after is recorded, as other
work on a shared machine slows every backend. Recall@10: share of FAISS flat's top 10 found (ties may differ, so
an exact backend can read slightly under 1).
Writes benchmarks/results/backends.json and backends.png.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from machine import describe  # benchmarks/machine.py

from indexer.vectors.milvus import MilvusConfig, MilvusIndex

RESULTS = Path(__file__).resolve().parent / "results"
DEPTH = 26  # candidate_count(10): max(2 * 10, 10 + 16)
PRESETS = {  # size: (vectors, single-query reps, batch reps)
    "S": (10_000, 30, 3),
    "M": (100_000, 50, 5),
}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng, centres: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors, each 0.6 of a random centre plus 0.8 of a random direction, in float16 precision."""
    noise = unit(rng.standard_normal((n, centres.shape[1])))
    return unit(0.6 * centres[rng.integers(0, len(centres), n)] + 0.8 * noise).astype(np.float16).astype(np.float32)


class FaissFlat:
    """faiss.IndexFlatIP with image ids: the baseline."""

    def __init__(self, dim: int):
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


def backends(dim: int, n: int, folder: str) -> dict:
    """name -> a function making the empty index."""
    made = {"faiss:flat": lambda: FaissFlat(dim)}
    try:
        from indexer.vectors.exact import ExactIndex

        made["exact"] = lambda: ExactIndex(dim)
    except ImportError:
        print("indexer.vectors.exact is not importable: the exact kernel is left out")
    uri = f"{folder}/bench.db"
    made["milvus:FLAT"] = lambda: MilvusIndex(MilvusConfig(uri, "flat", dim, "flat", expected_count=n))
    made["milvus:HNSW"] = lambda: MilvusIndex(MilvusConfig(uri, "hnsw", dim, "hnsw", expected_count=n))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=PRESETS, default="M")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    n, reps, batch_reps = PRESETS[args.size]
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((1000, args.dim)))
    vectors = clustered(rng, centres, n)
    ids = np.arange(n, dtype=np.int64) + 1
    queries = clustered(rng, centres, reps + args.batch)
    singles, batch = queries[:reps], queries[reps:]

    with tempfile.TemporaryDirectory(prefix="bench-backends-") as folder:
        indexes, facts = {}, {}
        for name, make in backends(args.dim, n, folder).items():
            start = time.perf_counter()
            index = make()
            index.add(ids, vectors)
            if isinstance(index, MilvusIndex):
                index.wait_for_index()
            indexes[name] = index
            facts[name] = {"build_s": round(time.perf_counter() - start, 2)}
            print(f"built {name:>12} in {facts[name]['build_s']} s", flush=True)

        _, exact = indexes["faiss:flat"].search(batch, 10)
        for name, index in indexes.items():
            _, found = index.search(batch, 10)
            recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())])
            facts[name]["recall_at_10"] = round(float(recall), 4)
            if isinstance(index, MilvusIndex):
                facts[name]["describe"] = index.describe()

        names = list(indexes)
        single_times = {name: [] for name in names}
        batch_times = {name: [] for name in names}
        for rep in range(reps):
            for name in rng.permutation(names):
                start = time.perf_counter()
                indexes[name].search(singles[rep : rep + 1], DEPTH)
                single_times[name].append(time.perf_counter() - start)
        for _ in range(batch_reps):
            for name in rng.permutation(names):
                start = time.perf_counter()
                indexes[name].search(batch, DEPTH)
                batch_times[name].append(time.perf_counter() - start)
        for index in indexes.values():
            if isinstance(index, MilvusIndex):
                index.drop()
    for name in names:
        facts[name]["single_ms"] = round(1000 * statistics.median(single_times[name]), 3)
        facts[name]["batch_ms"] = round(1000 * statistics.median(batch_times[name]), 1)

    import milvus_lite
    import pymilvus

    machine = {**describe(), "pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__,
               "load_average_1min": [load_before, os.getloadavg()[0]]}  # before, after: a shared machine  # fmt: skip
    result = {"size": args.size, "n": n, "dim": args.dim, "depth": DEPTH, "reps": reps, "batch": args.batch,
              "batch_reps": batch_reps, "machine": machine, "backends": facts}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backends.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backend':>12} {'build':>8} {'one query':>10} {'batch':>10} {'recall@10':>9}")
    for name, f in facts.items():
        print(
            f"{name:>12} {f['build_s']:7.1f}s {f['single_ms']:8.2f}ms {f['batch_ms']:8.1f}ms {f['recall_at_10']:9.3f}"
        )
    _plot(result, RESULTS / "backends.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["backends"])
    panels = (("build_s", "build (s)", True), ("single_ms", "one query (ms)", True),
              ("batch_ms", f"batch of {result['batch']}, one call (ms)", True), ("recall_at_10", "recall@10", False))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
    for ax, (key, label, log) in zip(axes, panels):
        values = [result["backends"][name][key] for name in names]
        ax.bar_label(ax.bar(names, values), labels=[f"{v:.3g}" for v in values], fontsize=8)
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{result['n']:,} x {result['dim']}, {DEPTH} neighbours; milvus-lite {m['milvus_lite']}; "
        f"{m['cpu']}, {m['cores']} cores",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
