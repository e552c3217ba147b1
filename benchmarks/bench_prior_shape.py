"""Per-user MAP accuracy with the prior's covariance shaped by the collection's own embeddings: does a shaped prior learn more per click?

    python benchmarks/bench_prior_shape.py                  # worlds 0 (the benchmark's) and 1 (never tuned on)
    python benchmarks/bench_prior_shape.py --betas 10 --out prior_shape_beta10   # beta held at the search's

MAP adaptation (engine.bt.map) puts an isotropic Gaussian prior of precision lambda on the adapted
query around the text query. A prior N(x0, Sigma / lambda) with another covariance Sigma is the
same MAP after a change of basis: images y -> Sigma^(1/2) y and queries x0 -> Sigma^(-1/2) x0 keep
every score x0 . y, and the isotropic prior in the new basis is Sigma in the old. So each variant
below transforms the world's embeddings and runs the unchanged protocol of `clipbt bench
preference world --per-user` (engine.bench.protocol: split, tuning on the tuning pairs, the same
seeded draws for every variant) on method "map". Sigma is built from the eigen-decomposition
C = U diag(e) U^T of the covariance of the collection's image embeddings (no labels, no pairs):

  isotropic   Sigma = I (what clipbt runs)
  principal   Sigma ~ U diag(e) U^T: more prior variance along the directions the images vary most
  whitening   Sigma ~ U diag(1 / (e + 0.5 mean(e))) U^T: the same prior variance per unit of image
              variation, so attributes the embedding keeps in small directions are as cheap to use

(each normalised to mean eigenvalue 1). lambda and beta are tuned per variant on a grid wider
than the protocol's (lambda down to 3e-4, beta down to 0.3: the whitened prior's best values sit
below the protocol's grid; `--betas` narrows beta). Writes benchmarks/results/prior_shape.json and
prior_shape.png (`--out STEM` for other names).
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py

from engine.bench import datasets, protocol
from indexer.encoder import Encoder

RESULTS = Path(__file__).resolve().parent / "results"
PRIOR_PRECISIONS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
VARIANTS = {"isotropic": None, "principal": 1.0, "whitening": -1.0}  # power of the eigenvalues in Sigma
WHITENING_FLOOR = 0.5  # whitening adds this times the mean eigenvalue before inverting: noise directions stay bounded


def shaped(data: datasets.EncodedDataset, power: float | None) -> datasets.EncodedDataset:
    """`data` in the basis where the prior Sigma (eigenvalues e^power of the images' covariance) is isotropic."""
    if power is None:
        return data
    eigenvalues, basis = np.linalg.eigh(np.cov(data.images.astype(np.float64).T))
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    if power < 0:
        eigenvalues = eigenvalues + WHITENING_FLOOR * eigenvalues.mean()
    return in_prior_basis(data, eigenvalues**power, basis)


def in_prior_basis(
    data: datasets.EncodedDataset, eigenvalues: np.ndarray, basis: np.ndarray
) -> datasets.EncodedDataset:
    """`data` in the basis where the prior Sigma = basis diag(eigenvalues) basis^T (normalised to mean 1) is isotropic."""
    sigma = eigenvalues / eigenvalues.mean()
    root, inverse_root = (basis * np.sqrt(sigma)) @ basis.T, (basis / np.sqrt(sigma)) @ basis.T
    return dataclasses.replace(
        data,
        images=(data.images.astype(np.float64) @ root).astype(np.float32),
        queries=(data.queries.astype(np.float64) @ inverse_root).astype(np.float32),
    )


def encoded_world(folder: Path, seed: int, encoder: Encoder) -> datasets.EncodedDataset:
    """The benchmark's world of this seed (images written into `folder`), encoded against the global query."""
    world = datasets.load_world(folder, datasets.WorldBenchConfig(seed=seed))
    return datasets.encode(world, encoder, query="global", cache=None)


def map_accuracy(data: datasets.EncodedDataset, config: protocol.BenchConfig, label: str):
    """The per-user protocol on method "map": (row of % accuracies per N, mean and std over draws and over
    splits; the run), printed with its time."""
    start = time.perf_counter()
    run = protocol.run(data, config, name=label)
    row = {key: [round(100 * v, 2) for v in run.methods["map"][key]] for key in ("mean", "std_draws", "std_splits")}
    print(f"{label:>50}: {row['mean']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return row, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1", help="worlds to run (seed 0 is the one the defaults were tuned on)")
    parser.add_argument("--sizes", default="1,2,5,10,20,50")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--betas", default="0.3,1,3,10", help="the BT temperatures tuning chooses from")
    parser.add_argument("--out", default="prior_shape", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    grid = [{"prior_precision": lam, "beta": float(b)} for b in args.betas.split(",") for lam in PRIOR_PRECISIONS]
    protocol.GRIDS = {**protocol.GRIDS, "map": grid}  # the wider grid, for every variant alike
    encoder = Encoder.load(None, None)
    result = {
        "sizes": list(sizes),
        "repeats": args.repeats,
        "splits": args.splits,
        "betas": [float(b) for b in args.betas.split(",")],
        "machine": describe(),
        "worlds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            encoded = encoded_world(Path(tmp) / f"world-{seed}", seed, encoder)
            eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(encoded.images.astype(np.float64).T)), 0.0, None)
            config = protocol.BenchConfig(
                sizes=sizes, repeats=args.repeats, splits=args.splits, per_user=True, seed=seed, methods=("map",)
            )
            rows = {"effective_dimensions": float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())}
            for name, power in VARIANTS.items():
                row, run = map_accuracy(shaped(encoded, power), config, f"world {seed}, {name}")
                rows[name] = {**row, "chosen": run.hyperparameters["map"]}
            rows["oracle"] = round(100 * run.oracle, 2)
            result["worlds"][str(seed)] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, RESULTS / f"{args.out}.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = result["worlds"]
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 4), squeeze=False)
    for ax, (seed, rows) in zip(axes[0], worlds.items()):
        for name in VARIANTS:
            ax.errorbar(result["sizes"], rows[name]["mean"], yerr=rows[name]["std_splits"], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training pairs per user (N)")
        ax.set_ylabel("held-out pair accuracy (%)")
        ax.set_title(f"world {seed} (oracle {rows['oracle']:.1f}%)")
        ax.legend()
    fig.suptitle("MAP per user, prior covariance shaped by the collection's embeddings", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
