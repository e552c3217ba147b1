"""Ingestion throughput: images/s end to end (`index_paths`: discover, read + hash, decode, encode, commit, FAISS) per model.

Models run with seeded random weights (`--pretrained random`): speed does not depend on weight
values, and nothing downloads. Images are JPEGs of photo size (512x384), written once per run.
The encoder alone is also timed on a preprocessed batch, so the slow stage is visible.

    .venv/bin/python benchmarks/bench_ingest.py --preset S        # CPU: a few minutes
    .venv/bin/python benchmarks/bench_ingest.py --preset L        # GPU machine
    .venv/bin/python benchmarks/bench_ingest.py --preset S --ray  # local vs Ray executor, runs interleaved

Writes benchmarks/results/ingest_<device>.json and .png (with --ray: ingest_ray_<device>.json and
.png), and prints one line per model (with --ray: per model and executor). The Ray runs share one
Ray started before them (its start time is recorded apart), as on a running cluster.
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

from machine import describe  # noqa: E402  (benchmarks/machine.py)

from indexer.encoder import Encoder  # noqa: E402
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


def encoder_only(encoder: Encoder, folder: Path, batch_size: int) -> float:
    """Images/s of the encoder alone on one preprocessed batch, after a warm-up."""
    pixels = torch.stack(
        [encoder.preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:batch_size]]
    )
    encoder.encode_images(pixels)  # warm-up
    start = time.perf_counter()
    encoder.encode_images(pixels)
    return len(pixels) / (time.perf_counter() - start)


def timed_run(index, folder: Path) -> dict:
    """One end-to-end run of `index(store)` into a fresh store: seconds, images/s, the report's stages."""
    n = len(list(folder.iterdir()))
    with tempfile.TemporaryDirectory() as home, Store.open(home=home) as store:
        start = time.perf_counter()
        report = index(store)
        seconds = time.perf_counter() - start
    assert report.indexed == n, report
    extra = {"workers": report.workers} if hasattr(report, "workers") else {}  # the Ray executor's actor count
    return {"seconds": seconds, "images_per_s": n / seconds, "stages": report.seconds, **extra}


def bench_model(model: str, folder: Path, repeats: int, batch_size: int, workers: int | None) -> dict:
    encoder = Encoder.load(model, "random")
    options = IndexOptions(batch_size=batch_size, workers=workers, progress=False)
    runs = [
        timed_run(lambda store: index_paths(store, [folder], "bench", encoder, options), folder) for _ in range(repeats)
    ]
    best = max(runs, key=lambda r: r["images_per_s"])
    return {
        "model": model,
        "images": len(list(folder.iterdir())),
        "device": str(encoder.device),
        "dtype": str(encoder.dtype),
        "batch_size": batch_size,
        "workers": workers,
        "encoder_only_images_per_s": encoder_only(encoder, folder, batch_size),
        "images_per_s": best["images_per_s"],
        "stages": best["stages"],
        "runs": runs,
    }


def bench_ray(
    model: str,
    folder: Path,
    repeats: int,
    batch_size: int,
    workers: int | None,
    ray_workers: int | None,
    gpus_per_worker: float,
) -> dict:
    """Local and Ray executors on the same images, runs interleaved (local, Ray, local, Ray...)."""
    from indexer.ray_executor import ENCODE, RayOptions, index_paths_ray

    encoder = Encoder.load(model, "random")
    options = IndexOptions(batch_size=batch_size, workers=workers, progress=False)
    ray_options = RayOptions(workers=ray_workers, gpus_per_worker=gpus_per_worker)
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(repeats):
        runs["local"].append(timed_run(lambda store: index_paths(store, [folder], "bench", encoder, options), folder))
        runs["ray"].append(
            timed_run(
                lambda store: index_paths_ray(store, [folder], "bench", model, "random", options, ray_options), folder
            )
        )
    n = len(list(folder.iterdir()))
    result = {
        "model": model,
        "images": n,
        "batch_size": batch_size,
        "ray_workers": ray_workers,
        "gpus_per_worker": gpus_per_worker,
        "encoder_only_images_per_s": encoder_only(encoder, folder, batch_size),
    }
    for executor, executor_runs in runs.items():
        best = max(executor_runs, key=lambda r: r["images_per_s"])
        result[executor] = {"images_per_s": best["images_per_s"], "stages": best["stages"], "runs": executor_runs}
    # while encoding, each actor's own rate: the figure that scales with the number of workers
    result["ray"]["encode_images_per_s_per_worker"] = n / result["ray"]["stages"][ENCODE]
    return result


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


def plot_ray(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["model"] for r in results]
    x = np.arange(len(names))
    ax.bar(x - 0.27, [r["local"]["images_per_s"] for r in results], 0.27, label="local executor, end to end")
    ax.bar(
        x,
        [r["ray"]["images_per_s"] for r in results],
        0.27,
        label=f"Ray executor ({results[0]['ray']['runs'][0]['workers']} workers), end to end",
    )
    ax.bar(
        x + 0.27,
        [r["ray"]["encode_images_per_s_per_worker"] for r in results],
        0.27,
        label="one Ray worker while encoding",
    )
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_ray(args, preset: dict, batch_size: int, device: str) -> None:
    from indexer.ray_executor import ray_session

    results = []
    load_before = os.getloadavg()  # other work on the machine slows both executors alike (runs interleave)
    start = time.perf_counter()
    with ray_session() as ray, tempfile.TemporaryDirectory() as tmp:
        ray_start = time.perf_counter() - start
        ray_workers = args.ray_workers or (None if args.gpus_per_worker else os.cpu_count())
        resources = ray.cluster_resources()
        for model in args.models:
            folder = Path(tmp) / model
            folder.mkdir()
            make_jpegs(folder, preset[model])
            result = bench_ray(
                model, folder, preset["repeats"], batch_size, args.workers, ray_workers, args.gpus_per_worker
            )
            results.append(result)
            for executor in ("local", "ray"):
                stages = ", ".join(f"{k} {v:.1f}s" for k, v in result[executor]["stages"].items())
                print(
                    f"{model:10s} {executor:5s} {result['images']:6d} images  {result[executor]['images_per_s']:9.1f} "
                    f"images/s end to end  ({stages})",
                    flush=True,
                )
            print(
                f"{model:10s} ray   {result['ray']['encode_images_per_s_per_worker']:9.1f} images/s per worker while "
                f"encoding, {result['encoder_only_images_per_s']:9.1f} encoder only in-process",
                flush=True,
            )
    out = {
        "preset": args.preset,
        "machine": describe(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "ray_start_s": ray_start,
        "ray_cluster": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ingest_ray_{device}.json").write_text(json.dumps(out, indent=2))
    plot_ray(
        results,
        RESULTS / f"ingest_ray_{device}.png",
        f"clipbt ingestion, local vs Ray, {out['machine']['gpu'] or out['machine']['cpu']} ({os.cpu_count()} cores)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="S")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 512 on CUDA")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1)")
    parser.add_argument("--ray", action="store_true", help="compare the local and Ray executors (needs clipbt[ray])")
    parser.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="Ray encoder actors (default: one per GPU with --gpus-per-worker, else one per core)",
    )
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray encoder actor")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    batch_size = args.batch_size or (512 if cuda else 32)
    if args.ray:
        main_ray(args, preset, batch_size, "gpu" if cuda else "cpu")
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            folder.mkdir()
            make_jpegs(folder, preset[model])
            result = bench_model(model, folder, preset["repeats"], batch_size, args.workers)
            results.append(result)
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in result["stages"].items())
            print(
                f"{model:10s} {result['images']:6d} images  {result['images_per_s']:9.1f} images/s end to end  "
                f"{result['encoder_only_images_per_s']:9.1f} encoder only  ({result['device']}, {stages})",
                flush=True,
            )
    device = "gpu" if cuda else "cpu"
    RESULTS.mkdir(exist_ok=True)
    out = {"preset": args.preset, "machine": describe(), "results": results}
    (RESULTS / f"ingest_{device}.json").write_text(json.dumps(out, indent=2))
    plot(
        results,
        RESULTS / f"ingest_{device}.png",
        f"clipbt ingestion, {out['machine']['gpu'] or out['machine']['cpu']} ({os.cpu_count()} cores)",
    )


if __name__ == "__main__":
    main()
