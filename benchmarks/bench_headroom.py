"""Per-user accuracy if the embedding carried a world attribute perfectly: where a better default model would pay off.

    python benchmarks/bench_headroom.py                 # worlds 0 (the benchmark's) and 1 (never tuned on)

The issue's goal asks a retrained clipbt-tiny that sees position and image quality to lift per-user
accuracy at N = 50 (the protocol of `clipbt bench preference world --per-user`, method "map"). Before
training for it, this measures the most such a model could give: each variant appends ground-truth
attribute columns (indexer.world.features) to the shipped model's unit image embeddings, standardised
and scaled to `scale` times the embedding's root-mean-square per-dimension spread, then renormalises
the rows; the query gets zeros there, so only the pairs can teach their weight. A model that decoded
those attributes perfectly and linearly would score like its row. The last variant keeps the
embedding and shapes the MAP prior instead: Sigma = B B^T + floor I, B the ridge map from embedding to
all attributes (what a prior learned from infinitely many users of this world would approach).
Writes benchmarks/results/headroom.json and headroom.png.
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_prior_shape import encoded_world, in_prior_basis, map_accuracy  # benchmarks/bench_prior_shape.py
from machine import describe  # benchmarks/machine.py

from engine.bench import datasets, protocol
from indexer import world
from indexer.encoder import Encoder

RESULTS = Path(__file__).resolve().parent / "results"
ATTRIBUTES = {
    "position": ("x", "y"),
    "quality": ("degraded=blur", "degraded=noise", "degraded=jpeg"),
    "position and quality": ("x", "y", "degraded=blur", "degraded=noise", "degraded=jpeg"),
    "shape and colour": tuple(n for n in world.FEATURE_NAMES if n.startswith(("shape=", "colour="))),
    "all attributes": world.FEATURE_NAMES,
}
SUBSPACE_FLOOR = 0.01  # the attribute-subspace prior adds this times its mean eigenvalue to every direction


def appended(data: datasets.EncodedDataset, columns: np.ndarray, scale: float) -> datasets.EncodedDataset:
    """Images [embedding, scaled standardised columns] renormalised; queries padded with zeros."""
    images = data.images.astype(np.float64)
    spread = np.sqrt(np.trace(np.cov(images.T)) / images.shape[1])
    extra = (columns - columns.mean(0)) / np.maximum(columns.std(0), 1e-12) * spread * scale
    joined = np.hstack([images, extra])
    joined /= np.linalg.norm(joined, axis=1, keepdims=True)
    queries = np.hstack([data.queries, np.zeros((len(data.queries), extra.shape[1]), np.float32)])
    return dataclasses.replace(data, images=joined.astype(np.float32), queries=queries)


def subspace_prior(data: datasets.EncodedDataset, features: np.ndarray) -> datasets.EncodedDataset:
    """`data` with the MAP prior Sigma = B B^T + floor I, B the ridge map from image embeddings to attributes."""
    images = data.images.astype(np.float64)
    centred = features - features.mean(0)
    ridge = np.linalg.solve(images.T @ images + 1e-2 * np.eye(images.shape[1]), images.T @ centred)
    eigenvalues, basis = np.linalg.eigh(ridge @ ridge.T)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    return in_prior_basis(data, eigenvalues + SUBSPACE_FLOOR * eigenvalues.mean(), basis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1", help="worlds to run (seed 0 is the one the defaults were tuned on)")
    parser.add_argument("--sizes", default="1,5,10,20,50")
    parser.add_argument("--scales", default="1,3", help="strengths of the appended columns")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--out", default="headroom", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    scales = [float(s) for s in args.scales.split(",")]
    encoder = Encoder.load(None, None)
    result = {
        "sizes": list(sizes),
        "scales": scales,
        "repeats": args.repeats,
        "splits": args.splits,
        "method": "map",
        "machine": describe(),
        "worlds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = Path(tmp) / f"world-{seed}"
            encoded = encoded_world(folder, seed, encoder)
            features = world.feature_matrix([a for _, a in world.read_collection(folder)])
            config = protocol.BenchConfig(
                sizes=sizes, repeats=args.repeats, splits=args.splits, per_user=True, seed=seed, methods=("map",)
            )
            variants = {"shipped embedding": encoded}
            for name, columns in ATTRIBUTES.items():
                picked = features[:, [world.FEATURE_NAMES.index(c) for c in columns]]
                for scale in scales:
                    variants[f"+ {name} (scale {scale:g})"] = appended(encoded, picked, scale)
            variants["prior on the attribute subspace"] = subspace_prior(encoded, features)
            rows = {}
            for name, data in variants.items():
                rows[name], run = map_accuracy(data, config, f"world {seed}, {name}")
            result["worlds"][str(seed)] = {"oracle": round(100 * run.oracle, 2), "variants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, RESULTS / f"{args.out}.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = result["worlds"]
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.4), squeeze=False)
    for ax, (seed, rows) in zip(axes[0], worlds.items()):
        for i, (name, row) in enumerate(rows["variants"].items()):
            style = "-" if name == "shipped embedding" else "--" if "prior" in name else ":"
            colour = plt.cm.tab20(i / max(1, len(rows["variants"]) - 1))
            ax.plot(result["sizes"], row["mean"], style, color=colour, marker="o", markersize=3, label=name)
        ax.axhline(66, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training pairs per user (N)")
        ax.set_ylabel("held-out pair accuracy (%)")
        ax.set_title(f"world {seed} (oracle {rows['oracle']:.1f}%)", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle("MAP per user with ground-truth attributes appended to the shipped embedding", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
