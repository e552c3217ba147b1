"""Held-out quality of the shipped clipbt-tiny model: zero-shot shape/colour accuracy and precision@10, as JSON and a plot.

    python benchmarks/eval_default_model.py            # preset M: 5000 held-out images
    python benchmarks/eval_default_model.py --size L   # 20000

Precision@10 depends on the collection size (more matching images, more confident ones to rank first), so it is
also measured on the smaller collections: 1000 images (about 21 per "a {colour} {shape}" query) and 2000 (the demo's).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from indexer.default_model import DEFAULT_MODEL_NAME, load_default_model, weights_path
from indexer.default_model.quality import HELD_OUT_SEED, measure

SIZES = {"S": 1000, "M": 5000, "L": 20000}
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="M", help="held-out set size preset")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, preprocess, tokenizer = load_default_model()
    start = time.perf_counter()
    quality = measure(model, preprocess, tokenizer, n_images=SIZES[args.size])
    seconds = time.perf_counter() - start
    p_at_10 = {
        n: measure(model, preprocess, tokenizer, n_images=n).precision_at_10
        for n in (1000, 2000)
        if n < quality.n_images
    }
    p_at_10[quality.n_images] = quality.precision_at_10
    result = {
        "model": DEFAULT_MODEL_NAME,
        "weights": weights_path().name,
        "held_out_world_seed": HELD_OUT_SEED,
        "size": args.size,
        "seconds": round(seconds, 1),
        **quality.to_dict(),
        "precision_at_10_by_collection_size": p_at_10,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_default_model.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'images':>8} {'shape acc':>10} {'colour acc':>11} {'p@10':>6}  (targets: 0.90, 0.90, 0.80)")
    print(
        f"{quality.n_images:>8} {quality.shape_accuracy:>10.3f} {quality.colour_accuracy:>11.3f} {quality.precision_at_10:>6.3f}"
    )
    print(f"\n{'images':>8} {'p@10':>6}")
    for n, p in p_at_10.items():
        print(f"{n:>8} {p:>6.3f}")
    print(f"\n{'quality':>8} {'n':>6} {'shape acc':>10} {'colour acc':>11}")
    for kind, row in quality.by_quality.items():
        print(f"{kind:>8} {row['n']:>6} {row['shape_accuracy']:>10.3f} {row['colour_accuracy']:>11.3f}")
    _plot(quality.by_quality, RESULTS / "eval_default_model.png")


def _plot(by_quality: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(by_quality)
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = range(len(kinds))
    ax.bar([x - 0.2 for x in xs], [by_quality[k]["shape_accuracy"] for k in kinds], 0.4, label="shape")
    ax.bar([x + 0.2 for x in xs], [by_quality[k]["colour_accuracy"] for k in kinds], 0.4, label="colour")
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(xs), kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("zero-shot accuracy")
    ax.set_title(f"{DEFAULT_MODEL_NAME} by image degradation")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
