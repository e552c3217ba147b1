"""Which of a user's pairs should adapt a query: all equally, or weighted by a kernel on query similarity?

    python benchmarks/bench_scope.py            # 200 simulated users, seeds fixed

Synthetic, with the answer known: each user has a global taste g and, per query j, a query-specific
taste v_j; their utility of image y under query j is (1 - alpha) g.y + alpha v_j.y. They record
10 BT-sampled pairs under each of 5 related queries (text embeddings with cosine ~0.8, as related
CLIP prompts have). We adapt (engine.search weights + engine.bt.adapt_batched, default
AdaptConfig) for one of those queries ("seen") and for a new related query ("unseen"), and score
held-out pairs by the sign of beta * s(x', y1) - s(x', y2) against the true utility (the paper's
section 3.1 accuracy). alpha = 0: taste is global; alpha = 1: it depends on the query.
Writes benchmarks/results/scope.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from engine.bt import adapt_batched
from engine.search import SearchConfig, effective_weights, pair_weights

RESULTS = Path(__file__).resolve().parent / "results"
DIM, QUERIES, PAIRS, TEST_PAIRS, STRENGTH = 64, 5, 10, 400, 20.0


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def trial(rng, alpha: float, scope: str, bandwidth: float) -> tuple[float, float]:
    """Held-out accuracy (seen query, unseen query) for one simulated user."""
    centre = _unit(rng.standard_normal(DIM))
    texts = _unit(centre + 0.5 * _unit(rng.standard_normal((QUERIES + 1, DIM))))  # cos ~0.8
    g = _unit(rng.standard_normal(DIM))
    v = _unit(rng.standard_normal((QUERIES + 1, DIM)))

    def utility(j, y):
        return y @ ((1 - alpha) * g + alpha * v[j])

    pairs = _unit(rng.standard_normal((QUERIES * PAIRS, 2, DIM)))
    owner_query = np.repeat(np.arange(QUERIES), PAIRS)
    first_wins = np.array(
        [
            rng.random() < 1 / (1 + np.exp(-STRENGTH * (utility(j, a) - utility(j, b))))
            for j, (a, b) in zip(owner_query, pairs)
        ]
    )
    preferred = np.where(first_wins[:, None], pairs[:, 0], pairs[:, 1])
    rejected = np.where(first_wins[:, None], pairs[:, 1], pairs[:, 0])
    accuracy = []
    for j in (0, QUERIES):  # a query with its own pairs, a new one
        w = pair_weights(texts[j], texts, owner_query, np.ones(len(owner_query)), scope, bandwidth)
        x = adapt_batched(
            texts[j][None].astype(np.float32),
            preferred.astype(np.float32),
            rejected.astype(np.float32),
            np.zeros(len(w), dtype=np.int64),
            weights=effective_weights(w).astype(np.float32),
        )[0]
        test = _unit(rng.standard_normal((TEST_PAIRS, 2, DIM)))
        truth = utility(j, test[:, 0]) > utility(j, test[:, 1])
        accuracy.append(float(np.mean(((test[:, 0] - test[:, 1]) @ x > 0) == truth)))
    return accuracy[0], accuracy[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--bandwidth", type=float, default=SearchConfig().bandwidth)
    args = parser.parse_args()
    rows = []
    print(f"{'alpha':>5} {'scope':>13} {'seen':>6} {'unseen':>7}")
    for alpha in (0.0, 0.5, 1.0):
        for scope in ("all", "query-kernel"):
            rng = np.random.default_rng(0)  # the same users for both scopes
            acc = np.array([trial(rng, alpha, scope, args.bandwidth) for _ in range(args.users)])
            row = {
                "alpha": alpha,
                "scope": scope,
                "seen": float(acc[:, 0].mean()),
                "unseen": float(acc[:, 1].mean()),
                "seen_se": float(acc[:, 0].std() / np.sqrt(len(acc))),
                "unseen_se": float(acc[:, 1].std() / np.sqrt(len(acc))),
            }
            rows.append(row)
            print(f"{alpha:>5} {scope:>13} {row['seen']:6.3f} {row['unseen']:7.3f}")
    mean = {
        s: float(np.mean([(r["seen"] + r["unseen"]) / 2 for r in rows if r["scope"] == s]))
        for s in ("all", "query-kernel")
    }
    print("mean accuracy:", {s: round(m, 3) for s, m in mean.items()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scope.json").write_text(
        json.dumps({"users": args.users, "bandwidth": args.bandwidth, "rows": rows, "mean": mean}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
