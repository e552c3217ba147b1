"""Exact search: clipbt's ExactIndex against FAISS IndexFlatIP, one query and a batch, same data, same run, and whether every result is exact.

    python benchmarks/bench_exact.py              # size M: 100,000 x 512, the size of bench_query.py
    python benchmarks/bench_exact.py --size S     # 10,000 x 512, a quick check
    python benchmarks/bench_exact.py --size L     # 1,000,000 x 512

Data: unit vectors of dimension 512 in 1,000 clusters (0.6 of a centre plus 0.8 of a random
direction, as benchmarks/bench_index_types.py), rounded to float16 as the store keeps embeddings;
queries drawn the same way. k = 26 (what `clipbt search -k 10` asks the index for). Timed: one
query at a time (median of `--reps`) and batches of 256 on a CPU, 1024 on a GPU (median of
`--batch-reps`), the two methods interleaved in a fresh random order each repetition. `exact`:
every result of the method equals the float64 brute-force top-k (each returned id carries the
reference's score at its rank, to 1e-5; ties allowed). `kernels`: the bare score products
(float32, bfloat16, float16 matmul; fbgemm int8) with top-k, measured the same way, which is why
ExactIndex picks its candidate pass per device. `by_batch_ms`: both methods at batch sizes 1 to
256, to see where one overtakes the other. FAISS runs as clipbt configures it
(`indexer.vectors.faiss.require_faiss`: batches of 20+ queries through BLAS). `load_average`: the machine's 1/5/15-minute load
before and after, since other work on a shared machine slows both methods.
Writes benchmarks/results/exact_cpu.json (exact_gpu.json on a GPU) and a PNG beside it.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/machine.py

from indexer.vectors.exact import (
    ExactConfig,
    ExactIndex,
    choose_flat_backend,
    configure_threads,
    int8_available,
    sketch_rows,
)
from indexer.vectors.faiss import require_faiss

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"S": 10_000, "M": 100_000, "L": 1_000_000}
DEPTH = 26  # candidate_count(10): max(2 * 10, 10 + 16)
SWEEP = (1, 4, 16, 64, 256)  # batch sizes timed for both methods: where one overtakes the other


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng, centres: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors, each 0.6 of a random centre plus 0.8 of a random direction, in float16 precision."""
    noise = unit(rng.standard_normal((n, centres.shape[1])))
    return unit(0.6 * centres[rng.integers(0, len(centres), n)] + 0.8 * noise).astype(np.float16).astype(np.float32)


def reference(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 16384) -> np.ndarray:
    """(B, k) float64 best scores, scanned in blocks of rows."""
    best = np.full((len(queries), 0), -np.inf)
    q = queries.astype(np.float64)
    for start in range(0, len(vectors), block):
        s = q @ vectors[start : start + block].astype(np.float64).T
        best = -np.sort(-np.hstack([best, s]), axis=1)[:, :k]
    return best


def is_exact(vectors, row_of, queries, want, scores, ids) -> bool:
    """Every returned id carries the reference's score at its rank (1e-5), and so does the returned score."""
    rows = np.vectorize(row_of.get)(ids)
    true = np.einsum("bkd,bd->bk", vectors[rows].astype(np.float64), queries.astype(np.float64))
    return bool(
        np.allclose(true, want, atol=1e-5)
        and np.allclose(scores, want, atol=1e-5)
        and all(len(set(r)) == len(r) for r in ids.tolist())
    )


def timed(methods: dict, inputs: list, reps: int, rng) -> dict:
    """Median seconds per call of each method, the methods in a fresh random order each repetition."""
    times = {name: [] for name in methods}
    for rep in range(reps):
        for name in rng.permutation(list(methods)):
            start = time.perf_counter()
            methods[name](inputs[rep % len(inputs)])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def kernels(vectors: np.ndarray, single: np.ndarray, batch: np.ndarray, device: str, rng) -> dict:
    """The bare product + top-k in each precision, ms for one query and for the batch."""
    x = torch.from_numpy(vectors).to(device)
    products = {
        "float32": (x, lambda q, x: q @ x.T),
        "bfloat16": (x.bfloat16(), lambda q, x: q.bfloat16() @ x.T),
        "float16": (x.half(), lambda q, x: q.half() @ x.T),
    }
    if device == "cpu" and int8_available():
        from indexer.vectors.exact import _int8_product

        packed = sketch_rows(x, "int8")[0]
        products["int8"] = (packed, lambda q, p: _int8_product(torch.round(q * 63) / 64, p))
    out = {}
    for label, queries, reps in (("single_ms", single[:1], 9), ("batch_ms", batch, 3)):
        q = torch.from_numpy(queries).to(device)
        methods = {
            name: (lambda _, f=f, s=s, q=q: (f(q, s).float().topk(DEPTH, dim=1), _sync(device)))
            for name, (s, f) in products.items()
        }
        timed(methods, [None], 1, rng)  # warm-up
        for name, seconds in timed(methods, [None], reps, rng).items():
            out.setdefault(name, {})[label] = round(1000 * seconds, 2)
    return out


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="M")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=60, help="single queries per method")
    parser.add_argument("--batch-reps", type=int, default=7)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = 1024 if device == "cuda" else 256
    threads = configure_threads()
    rng = np.random.default_rng(0)
    n = SIZES[args.size]
    centres = unit(rng.standard_normal((1000, args.dim)))
    vectors = clustered(rng, centres, n)
    ids = np.arange(n, dtype=np.int64) * 3 + 11
    row_of = {int(i): r for r, i in enumerate(ids)}
    singles = clustered(rng, centres, args.reps)
    batch = clustered(rng, centres, batch_size)

    load_before = os.getloadavg()
    start = time.perf_counter()
    flat = require_faiss().IndexFlatIP(args.dim)
    flat.add(vectors)
    build = {"faiss_flat": time.perf_counter() - start}
    start = time.perf_counter()
    ours = ExactIndex(args.dim, ExactConfig(device=device))
    ours.add(ids, vectors)
    build["clipbt"] = time.perf_counter() - start
    print(
        f"{n:,} x {args.dim} on {device}, {threads} threads; built faiss {build['faiss_flat']:.2f} s, "
        f"clipbt {build['clipbt']:.2f} s ({ours.kind})"
    )

    def faiss_search(q):
        scores, rows = flat.search(q, DEPTH)
        return scores, ids[rows]

    methods = {"faiss_flat": faiss_search, "clipbt": lambda q: ours.search(q, DEPTH)}
    want_single, want_batch = reference(vectors, singles, DEPTH), reference(vectors, batch, DEPTH)
    facts = {}
    for name, method in methods.items():
        got_single = [method(singles[i : i + 1]) for i in range(len(singles))]
        exact_single = is_exact(
            vectors,
            row_of,
            singles,
            want_single,
            np.vstack([s for s, _ in got_single]),
            np.vstack([i for _, i in got_single]),
        )
        facts[name] = {"exact": exact_single and is_exact(vectors, row_of, batch, want_batch, *method(batch))}
    one = timed(methods, [singles[i : i + 1] for i in range(len(singles))], args.reps, rng)
    many = timed(methods, [batch], args.batch_reps, rng)
    for name in methods:
        facts[name].update(
            single_ms=round(1000 * one[name], 3), batch_ms=round(1000 * many[name], 1), build_s=round(build[name], 2)
        )
    sweep = {}
    for size in SWEEP:
        if size <= batch_size:
            ms = timed(methods, [batch[:size]], max(3, min(15, 256 // size)), rng)
            sweep[size] = {name: round(1000 * seconds, 2) for name, seconds in ms.items()}
    print("by batch size (ms):", sweep)
    backend, reason = choose_flat_backend(n, args.dim, device)
    result = {
        "size": args.size,
        "n": n,
        "dim": args.dim,
        "k": DEPTH,
        "batch": batch_size,
        "reps": args.reps,
        "batch_reps": args.batch_reps,
        "device": device,
        "machine": describe(),
        "faiss_flat": facts["faiss_flat"],
        "clipbt": facts["clipbt"],
        "speedup_single": round(facts["faiss_flat"]["single_ms"] / facts["clipbt"]["single_ms"], 2),
        "speedup_batch": round(facts["faiss_flat"]["batch_ms"] / facts["clipbt"]["batch_ms"], 2),
        "exact": facts["clipbt"]["exact"],
        "fallbacks": ours.describe()["fallbacks"],
        "index": ours.describe(),
        "by_batch_ms": sweep,
        "choice": {"backend": backend, "reason": reason},
        "kernels": kernels(vectors, singles, batch, device, rng),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"exact_{'gpu' if device == 'cuda' else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name in methods:
        f = facts[name]
        print(
            f"{name:>10} one query {f['single_ms']:8.2f} ms  batch of {batch_size} {f['batch_ms']:8.1f} ms  exact {f['exact']}"
        )
    print(
        f"speedup one query {result['speedup_single']}x, batch {result['speedup_batch']}x, "
        f"fallbacks {result['fallbacks']}; kernels {result['kernels']}"
    )
    _plot(result, path.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, label in zip(axes, ("single_ms", "batch_ms"), ("one query (ms)", f"batch of {result['batch']} (ms)")):
        names = ["faiss_flat", "clipbt"] + [f"{kind} matmul+topk" for kind in result["kernels"]]
        values = [result["faiss_flat"][key], result["clipbt"][key]] + [v[key] for v in result["kernels"].values()]
        ax.bar(names, values, color=["tab:gray", "tab:blue"] + ["tab:orange"] * len(result["kernels"]))
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    sizes = [int(b) for b in result["by_batch_ms"]]
    for name, colour in (("faiss_flat", "tab:gray"), ("clipbt", "tab:blue")):
        per_query = [result["by_batch_ms"][b][name] / int(b) for b in result["by_batch_ms"]]
        axes[2].plot(sizes, per_query, marker="o", color=colour, label=name)
    axes[2].set(xscale="log", yscale="log", xlabel="batch size", title="ms per query, by batch size")
    axes[2].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{result['n']:,} x {result['dim']}, k={result['k']}, exact={result['exact']}; "
        f"{m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; speedup {result['speedup_single']}x / "
        f"{result['speedup_batch']}x",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
