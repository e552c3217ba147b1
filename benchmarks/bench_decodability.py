"""How linearly decodable each world attribute is from a model's image embeddings: cross-validated ridge R^2 per feature.

    python benchmarks/bench_decodability.py                                  # the shipped clipbt-tiny
    python benchmarks/bench_decodability.py --weights old.safetensors new.safetensors

Simulated users' utilities are linear in indexer.world.features, and a query adapts along directions of the
embedding, so an attribute that no direction of the embedding predicts is one no user can be served on. On
held-out world images (seed 777001), each feature is regressed on the unit embedding (ridge, 5 folds);
R^2 on the held-out folds. Writes benchmarks/results/decodability.json and decodability.png.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from machine import describe  # benchmarks/machine.py

from indexer.default_model import DEFAULT_MODEL_NAME, register, weights_path
from indexer.default_model.quality import HELD_OUT_SEED, encode_images
from indexer.world import FEATURE_NAMES, feature_matrix, generate

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = {
    "shape": "shape=",
    "colour": "colour=",
    "size": "size",
    "filled": "filled",
    "count": "count",
    "background": "background=",
    "x (left-right)": "x",
    "y (top-bottom)": "y",
    "blur": "degraded=blur",
    "noise": "degraded=noise",
    "jpeg": "degraded=jpeg",
}


def ridge_r2(x: np.ndarray, y: np.ndarray, alpha: float = 1e-2, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Cross-validated R^2 (per column of y) of ridge regression y ~ [x, 1], pooled over the held-out folds."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty_like(y)
    xa = np.hstack([x, np.ones((n, 1))])
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        a = xa[train]
        coef = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y[train])
        pred[test] = xa[test] @ coef
    resid = ((y - pred) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    return 1 - resid / np.maximum(total, 1e-12)


def measure(path: Path, n: int) -> dict:
    register()
    model, _, preprocess = open_clip.create_model_and_transforms(DEFAULT_MODEL_NAME, pretrained=str(path))
    model.eval()
    world = generate(n, HELD_OUT_SEED)
    emb = encode_images(model, torch.stack([preprocess(img) for img, _ in world])).numpy().astype(np.float64)
    r2 = ridge_r2(emb, feature_matrix([a for _, a in world]))
    per_feature = dict(zip(FEATURE_NAMES, (float(v) for v in r2)))
    grouped = {
        g: float(np.mean([v for k, v in per_feature.items() if (k.startswith(p) if p.endswith("=") else k == p)]))
        for g, p in GROUPS.items()
    }
    return {"weights": str(path), "per_feature": per_feature, "per_attribute": grouped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", type=Path, default=[weights_path()])
    parser.add_argument("--labels", nargs="+", default=None, help="a name per weights file (default: the file names)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "decodability.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = args.labels or [p.name for p in args.weights]
    start = time.time()
    runs = {label: measure(path, args.images) for label, path in zip(labels, args.weights)}
    report = {
        "command": "python benchmarks/bench_decodability.py --weights "
        + " ".join(map(str, args.weights))
        + (" --labels " + " ".join(labels) if args.labels else "")
        + f" --images {args.images}",
        "machine": describe(),
        "held_out_world_seed": HELD_OUT_SEED,
        "images": args.images,
        "seconds": round(time.time() - start, 1),
        "models": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'attribute':>16} " + " ".join(f"{label[:14]:>14}" for label in labels))
    for g in GROUPS:
        print(f"{g:>16} " + " ".join(f"{runs[label]['per_attribute'][g]:14.3f}" for label in labels))
    _plot(report, args.out.with_suffix(".png"))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=120)
    labels = list(report["models"])
    width = 0.8 / len(labels)
    xs = np.arange(len(GROUPS))
    for i, label in enumerate(labels):
        ax.bar(
            xs + (i - (len(labels) - 1) / 2) * width,
            [report["models"][label]["per_attribute"][g] for g in GROUPS],
            width,
            label=label,
        )
    ax.set_xticks(xs, list(GROUPS), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out R^2 (ridge)")
    ax.set_ylim(0, 1)
    ax.set_title(f"attribute decodability from image embeddings ({report['images']} held-out images)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
