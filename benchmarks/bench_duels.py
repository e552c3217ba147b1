"""Duel strategies on the world: taste share and relevance of the top 10, held-out pair accuracy after 5/10/20 answers.

    python benchmarks/bench_duels.py                 # preset M: 2000 images, 12 users x 8 queries
    python benchmarks/bench_duels.py --preset S      # 1000 images, 6 users x 4 queries

For every simulated user (indexer.world.sample_users, plus the demo's user) and query "a {colour} {shape}", the
candidates are the plain search's top 40; each strategy of engine.duels asks 20 questions one at a time, the
user answers by its own BT model, and after 5, 10 and 20 answers the search is run as clipbt runs it (MAP
adaptation, FAISS-equivalent exact top, `rank_candidates` with the direct comparisons). Measured:
taste share = share of the top 10 whose utility is above the median utility of the images matching the query;
relevance = share of the top 10 matching the query's colour and shape; pair accuracy = expected share of the
other candidate pairs that the adapted query orders as the user would (the user's BT probability of the
favoured image, averaged). Writes benchmarks/results/duels.json and duels.png.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/machine.py

from engine.bt import PairSet, logistic, map_adapt_many
from engine.bt.map import MapConfig
from engine.demo import demo_user
from engine.duels import DEFAULT_STRATEGY, STRATEGIES, DuelConfig, choose_duel
from engine.ranking import RankConfig, fit_strengths, rank_candidates
from indexer.world import COLOURS, SHAPES, generate, sample_users

PRESETS = {"XS": (300, 2, 2), "S": (1000, 6, 4), "M": (2000, 12, 8)}
CHECKPOINTS = (5, 10, 20)
RESULTS = Path(__file__).resolve().parent / "results"


def encode_world(n: int, seed: int, pretrained: str | None):
    from indexer.encoder import Encoder

    if pretrained:
        from indexer.default_model import DEFAULT_MODEL_NAME, register

        register()
        encoder = Encoder.load(DEFAULT_MODEL_NAME, pretrained)
    else:
        encoder = Encoder.load()
    world = generate(n, seed)
    pixels = torch.stack([encoder.preprocess(img) for img, _ in world])
    images = np.concatenate([encoder.encode_images(pixels[i : i + 256]) for i in range(0, n, 256)])
    return encoder, images.astype(np.float32), [a for _, a in world]


def search(x0, pairs_emb, pair_ids, images, beta: float, posterior: MapConfig, rank: RankConfig, k: int = 10):
    """The top k image indices for a user with these pairs: MAP-adapted query, exact top max(2k, k + 16), ranked
    with the user's direct comparisons among them; and the adapted query."""
    if pair_ids:
        p, r = pairs_emb
        x = map_adapt_many(
            x0[None], [PairSet.of(np.stack(p), np.stack(r))], [None], posterior.prior_precision, posterior.beta
        )[0]
    else:
        x = x0
    sim = images @ x
    depth = max(2 * k, k + 16)
    top = np.argsort(-sim, kind="stable")[:depth]
    where = {int(i): c for c, i in enumerate(top)}
    direct = [(where[a], where[b]) for a, b in pair_ids if a in where and b in where]
    win = np.array([a for a, _ in direct], dtype=np.int64)
    lose = np.array([b for _, b in direct], dtype=np.int64)
    ranking = rank_candidates(sim[top], beta, win, lose, None, rank)
    return top[ranking.order[:k]], x


def run_one(strategy, user, x0, relevant, images, utilities, candidates, rng, config: DuelConfig, rank: RankConfig):
    """Answers to 20 duels chosen by `strategy`; the metrics at each checkpoint."""
    u = utilities
    threshold = np.median(u[relevant])
    good = (u > threshold) & relevant
    asked, pairs_ids, pref, rej, out = [], [], [], [], {}
    cand = np.array(candidates)
    for t in range(1, max(CHECKPOINTS) + 1):
        a, b = choose_duel(
            cand,
            images[cand],
            x0,
            np.stack(pref) if pref else None,
            np.stack(rej) if rej else None,
            asked,
            strategy,
            rng,
            config,
        )
        asked.append((a, b))
        win = rng.random() < logistic(u[a] - u[b])
        w, lose = (a, b) if win else (b, a)
        pairs_ids.append((w, lose))
        pref.append(images[w])
        rej.append(images[lose])
        if t in CHECKPOINTS:
            top, x = search(x0, (pref, rej), pairs_ids, images, config.posterior.beta, config.posterior, rank)
            s = images[cand] @ x
            i, j = np.triu_indices(len(cand), 1)
            keep = np.array([frozenset((cand[p], cand[q])) not in {frozenset(z) for z in asked} for p, q in zip(i, j)])
            i, j = i[keep], j[keep]
            p_true = logistic(u[cand[i]] - u[cand[j]])
            acc = np.where(s[i] > s[j], p_true, np.where(s[i] < s[j], 1 - p_true, 0.5)).mean()
            out[t] = {
                "taste": float(good[top].mean()),
                "relevance": float(relevant[top].mean()),
                "pair_accuracy": float(acc),
            }
    return out, pairs_ids, x


PRIORS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1e6)  # ranking prior precisions tried for compare's probabilities
TEMPERATURES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # and the scale t of P = sigmoid(t (theta_a - theta_b))


def compare_calibration(x, pairs_ids, images, utilities, candidates, beta: float) -> dict:
    """compare's P(a over b) for every pair of the candidates (asked ones included: the user answers afresh),
    per (ranking prior precision, probability temperature t): the expected log-likelihood of the user's answer,
    the expected calibration error (10 bins; a bin's accuracy is the mean true probability that its favoured
    image wins) and the mean probability given to the side the user chose on the asked pairs."""
    cand = np.asarray(candidates)
    where = {int(i): c for c, i in enumerate(cand)}
    direct = [(where[a], where[b]) for a, b in pairs_ids if a in where and b in where]
    win = np.array([a for a, _ in direct], dtype=np.int64)
    lose = np.array([b for _, b in direct], dtype=np.int64)
    i, j = np.triu_indices(len(cand), 1)
    p_true = logistic(utilities[cand[i]] - utilities[cand[j]])
    out = {}
    for prior in PRIORS:
        theta = fit_strengths(beta * (images[cand] @ x), win, lose, None, prior, RankConfig().newton_steps)
        for t in TEMPERATURES:
            p = np.clip(logistic(t * (theta[i] - theta[j])), 1e-9, 1 - 1e-9)
            conf = np.maximum(p, 1 - p)
            hit = np.where(p >= 0.5, p_true, 1 - p_true)
            edges = np.minimum(((conf - 0.5) * 20).astype(int), 9)
            ece = sum(
                (edges == b).mean() * abs(hit[edges == b].mean() - conf[edges == b].mean())
                for b in range(10)
                if (edges == b).any()
            )
            chosen = logistic(t * (theta[win] - theta[lose])) if len(win) else np.array([np.nan])
            out[prior, t] = {
                "log_likelihood": float(np.mean(p_true * np.log(p) + (1 - p_true) * np.log(1 - p))),
                "ece": float(ece),
                "p_of_stated_answer": float(np.mean(chosen)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="M")
    parser.add_argument("--seed", type=int, default=3, help="world seed (the demo's is 0) and users' seed")
    parser.add_argument("--pretrained", default=None, help="weights of clipbt-tiny (default: the shipped ones)")
    parser.add_argument(
        "--strategies",
        default=",".join([DEFAULT_STRATEGY] + [s for s in STRATEGIES if s != DEFAULT_STRATEGY]),
        help="comma-separated; compare's calibration is measured on the first",
    )
    parser.add_argument(
        "--prior-precision",
        type=float,
        default=MapConfig().prior_precision,
        help="lambda of the MAP posterior the duels and the search use (default: search's)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "duels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_images, n_users, n_queries = PRESETS[args.preset]
    start = time.time()
    encoder, images, attrs = encode_world(n_images, args.seed, args.pretrained)
    users = sample_users(n_users - 1, seed=args.seed) + [demo_user()]
    qrng = np.random.default_rng([args.seed, 5])
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    queries = [combos[i] for i in qrng.choice(len(combos), n_queries, replace=False)]
    texts = encoder.encode_text([f"a {c} {s}" for c, s in queries]).astype(np.float32)
    config, rank = DuelConfig(posterior=MapConfig(prior_precision=args.prior_precision)), RankConfig()
    strategies = args.strategies.split(",")
    results = {s: {t: {"taste": [], "relevance": [], "pair_accuracy": []} for t in CHECKPOINTS} for s in strategies}
    plain = {"taste": [], "relevance": [], "pair_accuracy": []}
    calibration = {
        (prior, t): {"log_likelihood": [], "ece": [], "p_of_stated_answer": []}
        for prior in PRIORS
        for t in TEMPERATURES
    }
    for ui, user in enumerate(users):
        utilities = user.utilities(attrs)
        for qi, ((colour, shape), x0) in enumerate(zip(queries, texts)):
            relevant = np.array([a.colour == colour and a.shape == shape for a in attrs])
            candidates = np.argsort(-(images @ x0), kind="stable")[:40]
            top = candidates[:10]
            plain["taste"].append(float(((utilities > np.median(utilities[relevant])) & relevant)[top].mean()))
            plain["relevance"].append(float(relevant[top].mean()))
            for strategy in strategies:
                rng = np.random.default_rng([args.seed, ui, qi])  # the same answers' randomness for every strategy
                rows, pairs_ids, x = run_one(
                    strategy, user, x0, relevant, images, utilities, candidates, rng, config, rank
                )
                for t, row in rows.items():
                    for key, value in row.items():
                        results[strategy][t][key].append(value)
                if strategy == strategies[0]:
                    for setting, row in compare_calibration(
                        x, pairs_ids, images, utilities, candidates, config.posterior.beta
                    ).items():
                        for key, value in row.items():
                            calibration[setting][key].append(value)
        print(f"user {ui + 1}/{len(users)} done, {time.time() - start:.0f} s", flush=True)
    summary = {
        s: {
            t: {k: {"mean": float(np.mean(v)), "sem": float(np.std(v) / np.sqrt(len(v)))} for k, v in row.items()}
            for t, row in by_t.items()
        }
        for s, by_t in results.items()
    }
    report = {
        "command": "python benchmarks/bench_duels.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": describe(),
        "world_seed": args.seed,
        "images": n_images,
        "users": len(users),
        "queries": [f"a {c} {s}" for c, s in queries],
        "pretrained": args.pretrained or "shipped clipbt-tiny",
        "posterior": {"prior_precision": config.posterior.prior_precision, "beta": config.posterior.beta},
        "before": {k: float(np.mean(v)) for k, v in plain.items()},
        "strategies": summary,
        "compare_calibration": {
            "strategy": strategies[0],
            "answers": max(CHECKPOINTS),
            "by_prior_precision_and_temperature": {
                str(prior): {
                    str(t): {k: float(np.mean(v)) for k, v in calibration[prior, t].items()} for t in TEMPERATURES
                }
                for prior in PRIORS
            },
            "best": dict(
                zip(
                    ("prior_precision", "temperature"),
                    max(calibration, key=lambda s: np.mean(calibration[s]["log_likelihood"])),
                )
            ),
            "in_use": {"prior_precision": rank.prior_precision, "temperature": rank.temperature},
        },
        "seconds": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'strategy':>13} {'answers':>7} {'taste':>7} {'relevance':>9} {'pair acc':>8}")
    print(f"{'(before)':>13} {0:>7} {report['before']['taste']:7.3f} {report['before']['relevance']:9.3f}")
    for s in strategies:
        for t in CHECKPOINTS:
            r = summary[s][t]
            print(
                f"{s:>13} {t:>7} {r['taste']['mean']:7.3f} {r['relevance']['mean']:9.3f} {r['pair_accuracy']['mean']:8.3f}"
            )
    print(
        f"\ncompare after {max(CHECKPOINTS)} answers ({strategies[0]}): ranking prior precision, temperature -> "
        "expected log-likelihood, ECE, P(stated answer)"
    )
    for prior, by_t in report["compare_calibration"]["by_prior_precision_and_temperature"].items():
        for t, row in by_t.items():
            print(
                f"{float(prior):>10g} {float(t):5.2f} {row['log_likelihood']:8.4f} {row['ece']:6.3f} "
                f"{row['p_of_stated_answer']:6.3f}"
            )
    print("best by log-likelihood:", report["compare_calibration"]["best"])
    _plot(report, args.out.with_suffix(".png"))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=120)
    for ax, key, title in zip(
        axes,
        ("taste", "relevance", "pair_accuracy"),
        ("taste share of top 10", "relevance of top 10", "held-out pair accuracy"),
    ):
        for s, by_t in report["strategies"].items():
            ts = [int(t) for t in by_t]
            mean = np.array([by_t[t][key]["mean"] for t in by_t])
            sem = np.array([by_t[t][key]["sem"] for t in by_t])
            ax.errorbar(ts, mean, yerr=sem, marker="o", ms=3, capsize=2, label=s)
        if key in report["before"]:
            ax.axhline(report["before"][key], color="black", ls="--", lw=1, label="before")
        ax.set_xlabel("answers")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"duel strategies, world seed {report['world_seed']}, {report['users']} users x "
        f"{len(report['queries'])} queries",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
