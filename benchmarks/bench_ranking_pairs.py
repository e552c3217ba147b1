"""How a ranking should adapt a query: all implied pairs, adjacent pairs only, or Plackett-Luce (issue 17, bounded cost).

Simulated users with a hidden taste rank m random images by utility x0.y + strength * taste.y
plus Gumbel noise (a Plackett-Luce draw); the query is adapted on that one ranking with the search
defaults (lr 0.5, 3 steps, beta 1) and scored on 400 held-out image pairs labelled by the
noiseless utility. Writes benchmarks/results/ranking_pairs.json and .png.

    python benchmarks/bench_ranking_pairs.py --users 100
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engine.bt import reference as bt

RESULTS = Path(__file__).parent / "results"


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def variants(ranking: np.ndarray):
    """(preferred, rejected) index arrays of every earlier-over-later pair and of adjacent pairs."""
    m = len(ranking)
    i, j = np.triu_indices(m, 1)
    return {"all pairs": (ranking[i], ranking[j]), "adjacent pairs": (ranking[:-1], ranking[1:])}


def run(users: int, sizes: list[int], d: int, strength: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pool = _unit(rng.standard_normal((2000, d))).astype(np.float32)
    results = {name: {m: [] for m in sizes} for name in ("original", "all pairs", "adjacent pairs", "plackett-luce")}
    seconds = {name: {m: 0.0 for m in sizes} for name in ("all pairs", "adjacent pairs", "plackett-luce")}
    for _ in range(users):
        x0 = _unit(rng.standard_normal(d)).astype(np.float32)
        taste = _unit(rng.standard_normal(d)).astype(np.float32)
        utility = pool @ x0 + strength * (pool @ taste)
        a, b = rng.integers(0, len(pool), (2, 400))
        keep = a != b
        a, b = a[keep], b[keep]
        truth = utility[a] > utility[b]

        def accuracy(x, a=a, b=b, truth=truth):
            return float(np.mean(((pool[a] - pool[b]) @ x > 0) == truth))

        results["original"][sizes[0]].append(accuracy(x0))
        for m in sizes:
            shown = rng.choice(len(pool), m, replace=False)
            noisy = utility[shown] / 0.1 + rng.gumbel(size=m)  # Plackett-Luce draw at temperature 0.1
            ranking = shown[np.argsort(-noisy)]
            for name, (win, lose) in variants(ranking).items():
                start = time.perf_counter()
                x = np.asarray(bt.adapt(x0, pool[win], pool[lose]))
                seconds[name][m] += time.perf_counter() - start
                results[name][m].append(accuracy(x))
            start = time.perf_counter()
            x = np.asarray(bt.adapt_plackett_luce(x0, pool[ranking][None]))
            seconds["plackett-luce"][m] += time.perf_counter() - start
            results["plackett-luce"][m].append(accuracy(x))
    return {
        "accuracy": {name: {m: float(np.mean(v)) for m, v in by.items() if v} for name, by in results.items()},
        "stderr": {
            name: {m: float(np.std(v) / np.sqrt(len(v))) for m, v in by.items() if v} for name, by in results.items()
        },
        "ms_per_adapt": {name: {m: 1000 * s / users for m, s in by.items()} for name, by in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--sizes", default="5,20,50,100")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    out = run(args.users, sizes, args.dim, args.strength, args.seed)
    from benchmarks.machine import describe

    out = {
        "command": "python benchmarks/bench_ranking_pairs.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": describe(),
        **out,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ranking_pairs.json").write_text(json.dumps(out, indent=2))
    for name in ("all pairs", "adjacent pairs", "plackett-luce"):
        print(
            name.ljust(16),
            "  ".join(f"m={m}: {out['accuracy'][name][m]:.3f} ({out['ms_per_adapt'][name][m]:.2f} ms)" for m in sizes),
        )
    print("original".ljust(16), f"{out['accuracy']['original'][sizes[0]]:.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("all pairs", "adjacent pairs", "plackett-luce"):
        ax.errorbar(
            sizes,
            [out["accuracy"][name][m] for m in sizes],
            [out["stderr"][name][m] for m in sizes],
            marker="o",
            label=name,
            capsize=3,
        )
    ax.axhline(out["accuracy"]["original"][sizes[0]], color="grey", ls="--", label="original")
    ax.set_xlabel("images in the one ranking")
    ax.set_ylabel("held-out pair accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "ranking_pairs.png", dpi=120)


if __name__ == "__main__":
    main()
