"""Ingestion throughput: images/s end to end (`index_paths`: discover, read + hash, decode, encode, commit, FAISS) per model.

Models run with seeded random weights (`--pretrained random`): speed does not depend on weight
values, and nothing downloads. Images are JPEGs of photo size (512x384), written once per run.
The encoder alone is also timed on a preprocessed batch, so the slow stage is visible.

    .venv/bin/python benchmarks/bench_ingest.py --preset S        # CPU: a few minutes
    .venv/bin/python benchmarks/bench_ingest.py --preset L        # GPU machine

Writes benchmarks/results/ingest_<device>.json and .png, and prints one line per model.
Figures to beat (issue 5): clip-retrieval 2,500 (ViT-B-32) and 312 (ViT-L-14) images/s on one
A100; goal 10,000 and 2,000 images/s end to end on an H100.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.encoder import Encoder  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py)
from indexer.pipeline import IndexOptions, index_paths  # noqa: E402
from storage import Store  # noqa: E402

PRESETS = {  # images per model, repeats
    "S": {"ViT-B-32": 96, "ViT-L-14": 12, "repeats": 1},
    "M": {"ViT-B-32": 2_000, "ViT-L-14": 500, "repeats": 2},
    "L": {"ViT-B-32": 50_000, "ViT-L-14": 20_000, "repeats": 3},
}
RESULTS = Path(__file__).parent / "results"


def make_jpegs(folder: Path, n: int, size=(512, 384)) -> None:
    """n distinct photo-sized JPEGs: a few random tiles, upsampled (smooth, like photos), quality 90."""
    rng = np.random.default_rng(0)
    for i in range(n):
        tiles = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(tiles).resize(size, Image.Resampling.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)


def bench_model(model: str, folder: Path, repeats: int, batch_size: int, workers: int | None) -> dict:
    encoder = Encoder.load(model, "random")
    pixels = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:batch_size]])
    encoder.encode_images(pixels)  # warm-up
    start = time.perf_counter()
    encoder.encode_images(pixels)
    encoder_only = len(pixels) / (time.perf_counter() - start)
    n = len(list(folder.iterdir()))
    runs = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as home, Store.open(home=home) as store:
            options = IndexOptions(batch_size=batch_size, workers=workers, progress=False)
            start = time.perf_counter()
            report = index_paths(store, [folder], f"bench{repeat}", encoder, options)
            seconds = time.perf_counter() - start
        assert report.indexed == n, report
        runs.append({"seconds": seconds, "images_per_s": n / seconds, "stages": report.seconds})
    best = max(runs, key=lambda r: r["images_per_s"])
    return {"model": model, "images": n, "device": str(encoder.device), "dtype": str(encoder.dtype),
            "batch_size": batch_size, "workers": workers, "encoder_only_images_per_s": encoder_only,
            "images_per_s": best["images_per_s"], "stages": best["stages"], "runs": runs}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["model"] for r in results]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [r["images_per_s"] for r in results], 0.4, label="end to end")
    ax.bar(x + 0.2, [r["encoder_only_images_per_s"] for r in results], 0.4, label="encoder only")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="S")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 512 on CUDA")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    batch_size = args.batch_size or (512 if cuda else 32)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            folder.mkdir()
            make_jpegs(folder, preset[model])
            result = bench_model(model, folder, preset["repeats"], batch_size, args.workers)
            results.append(result)
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in result["stages"].items())
            print(f"{model:10s} {result['images']:6d} images  {result['images_per_s']:9.1f} images/s end to end  "
                  f"{result['encoder_only_images_per_s']:9.1f} encoder only  ({result['device']}, {stages})", flush=True)
    device = "gpu" if cuda else "cpu"
    RESULTS.mkdir(exist_ok=True)
    out = {"preset": args.preset, "machine": describe(), "results": results}
    (RESULTS / f"ingest_{device}.json").write_text(json.dumps(out, indent=2))
    plot(results, RESULTS / f"ingest_{device}.png",
         f"clipbt ingestion, {out['machine']['gpu'] or out['machine']['cpu']} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
