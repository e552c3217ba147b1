"""The Ray executor: the local pipeline's discovery and hashing, decoding in Ray Data tasks, encoding in a pool of actors, committed shard by shard.

The driver discovers the files and looks up the hashes already committed, exactly as `index_paths`
does. Ray tasks read, hash and decode every file with the local executor's `load_file` (so
unchanged files and skip reasons are the same); a pool of actors, each holding one loaded encoder,
embeds the decoded ones. Each block that comes back with new embeddings is written into a staging
folder under the data home as a clip-retrieval shard (`img_emb/img_emb_N.npy`,
`metadata/metadata_N.parquet` with image_path, sha256, width, height; the block's skipped files and
reasons in `skipped/skipped_N.parquet`), read back, committed in one transaction through the local
executor's `commit`, and deleted.

Crash safety: a shard is complete once its metadata file exists (each file is written under a
temporary name, then renamed; metadata last). A killed run leaves the shards it committed
committed; the next run first commits the complete shards left in staging (rows already committed
are recognised by their hash), then embeds only what is still missing.

Ray is imported only inside this module's functions: install it with `pip install 'clipbt[ray]'`.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from indexer.encoder import Encoder
from indexer.errors import RayClusterError, RayUnavailableError
from indexer.images import Skip, discover
from indexer.pipeline import IndexOptions, IndexReport, commit, finish, live_images, load_file, open_collection, timed
from storage import Collection, ImageRecord, Store
from storage.home import data_home

log = logging.getLogger(__name__)

DECODE = "read+decode (tasks)"  # report.seconds keys summed over workers (busy time, not wall time)
ENCODE = "encode (actors)"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide `index_paths_ray` runs."""

    address: str | None = None  # a running cluster ("ray://HEAD:10001" or "HEAD:6379"); None: a local Ray for the run
    workers: int | None = (
        None  # encoder actors; None: one per gpus_per_worker GPUs, else the cluster's CPUs - 1 (min 1)
    )
    gpus_per_worker: float = 0.0  # GPUs per encoder actor (a fraction shares a GPU); 0 encodes on CPUs
    cpus_per_worker: float = (
        0.5  # CPUs an encoder actor reserves, at most: fractional, so decode tasks always get a core
    )
    device: str | None = None  # the actors' encoder device; None: "cuda" with gpus_per_worker, else "cpu"
    staging: str | None = None  # folder for shards awaiting commit; None: <data home>/staging
    num_cpus: int | None = None  # CPUs of the local Ray started when there is no address; None: all of this machine's


@dataclass
class RayIndexReport(IndexReport):
    """What one `index_paths_ray` run did. In `seconds`, DECODE and ENCODE are summed over the
    workers (busy seconds, not wall time); every other stage is wall time on the driver."""

    files: int = 0  # image files found: indexed + unchanged + skipped files
    images_per_s: float = 0.0  # files hashed, decoded, embedded and committed per second, the whole job's wall time
    workers: int = 0  # encoder actors in the pool
    shards: int = 0  # shards written and committed by this run
    salvaged: int = 0  # images committed from complete shards a killed run left uncommitted


@dataclass(frozen=True)
class ResourcePlan:
    """How the job is laid out on the cluster's resources."""

    workers: int  # encoder actors
    worker_cpus: float  # CPUs each actor reserves
    worker_gpus: float  # GPUs each actor reserves
    decode_cpus: float  # CPUs each decode task reserves
    device: str  # the actors' encoder device


def plan_resources(cpus: float, gpus: float, options: RayOptions) -> ResourcePlan:
    """Size the actor pool for a cluster with `cpus` and `gpus` so that it cannot deadlock.

    The actors together reserve at most the CPUs left after one decode task, so a decode task can
    always run; too few GPUs for the pool is refused (RayClusterError) instead of waiting forever.
    """
    per_gpu = options.gpus_per_worker
    if options.workers is not None and options.workers < 1:
        raise RayClusterError(f"workers {options.workers}: the Ray executor needs at least one encoder actor")
    if per_gpu < 0:
        raise RayClusterError(f"gpus per worker {per_gpu:g}: use 0 (encode on CPUs) or more")
    if cpus <= 0:
        raise RayClusterError("the Ray cluster has no CPUs: decode tasks need at least one")
    if per_gpu > 0:
        fits = int(gpus // per_gpu + 1e-9)
        workers = options.workers or fits
        if workers < 1 or workers > fits:
            raise RayClusterError(
                f"{workers or 1} workers x {per_gpu:g} GPUs need {(workers or 1) * per_gpu:g} GPUs; the cluster has "
                f"{gpus:g}: use --workers {fits} or fewer"
                if fits
                else f"--gpus-per-worker {per_gpu:g} but the cluster has {gpus:g} GPUs: use --gpus-per-worker 0 to encode on CPUs"
            )
    else:
        workers = options.workers or max(1, int(cpus) - 1)
    decode_cpus = min(1.0, cpus / 2)
    worker_cpus = min(options.cpus_per_worker, (cpus - decode_cpus) / workers)
    device = options.device or ("cuda" if per_gpu > 0 else "cpu")
    return ResourcePlan(workers, worker_cpus, per_gpu, decode_cpus, device)


def _import_ray():
    try:
        import ray
        import ray.data  # the extra `ray[data]`, not only the core
    except ImportError as exc:
        raise RayUnavailableError(f"the Ray executor needs ray[data] ({exc}): pip install 'clipbt[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator:
    """The `ray` module, initialised for the block: the Ray this process already runs, else a
    connection to `address`, else a new local Ray with `num_cpus` CPUs (default: all). What it
    started or connected, it shuts down.

    A new local Ray uses token authentication (Ray's default); when no token is configured
    ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), a random one is made for this
    process and its children, so nothing needs setting up and nothing is written to ~/.ray.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        configured = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        if not any(os.environ.get(name) for name in configured) and not (Path.home() / ".ray" / "auth_token").is_file():
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # Ray turns token mode on for a new local cluster
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    else:
        try:
            ray.init(address=address, **quiet)
        except (
            ConnectionError,
            RuntimeError,
            ValueError,
            ray.exceptions.RayError,
        ) as exc:  # unreachable, bad address, auth
            raise RayClusterError(
                f"cannot connect to the Ray cluster at {address!r} ({type(exc).__name__}: {exc}). Give the head's "
                "address as ray://HEAD:10001 (Ray Client) or HEAD:6379 (on a cluster node); if the cluster uses token "
                "authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
            ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def index_paths_ray(
    store: Store,
    paths: Sequence[str | os.PathLike],
    collection: str = "default",
    model: str | None = None,
    pretrained: str | None = None,
    options: IndexOptions | None = None,
    ray_options: RayOptions | None = None,
    **overrides,
) -> RayIndexReport:
    """Index the image files under `paths` into `collection` on Ray; the end state is `index_paths`'s.

    model, pretrained: as `Encoder.load` (None: the shipped model); the driver loads it on the CPU
    for its identity and preprocessing, each actor on its own device. options: IndexOptions (its
    `workers` is unused: see RayOptions.workers), any field of which may be passed by keyword.
    Every path must be readable under the same name on every node of the cluster.
    """
    options = dataclasses.replace(options or IndexOptions(), **overrides)
    ray_options = ray_options or RayOptions()
    started = time.perf_counter()
    report = RayIndexReport(collection)
    clock = functools.partial(timed, report.seconds)
    with clock("load encoder (driver)"):
        encoder = Encoder.load(model, pretrained, "cpu")
    coll = open_collection(store, collection, encoder, options.index_type, options.vectors)
    staging = Path(ray_options.staging or data_home() / "staging") / f"ray-{store.store_id[:12]}-collection-{coll.id}"
    staging.mkdir(parents=True, exist_ok=True)
    lock = FileLock(staging / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RayClusterError(
            f"another run is indexing collection {collection!r} into this store (it holds {staging / '.lock'}): "
            "wait for it to finish"
        ) from None
    try:
        with clock("discover"):
            files, report.skipped = discover(paths)
            live, known = live_images(store, coll)
        added: list[int] = []
        with clock("salvage"):
            for number in _complete_shards(staging):
                ids = _commit_shard(store, coll, live, known, staging, number)
                added += ids
                report.salvaged += len(ids)
        report.files = len(files)
        if files:
            todo = [{"path": path, "known": known.get(path, "")} for path in files]
            added += _embed(
                todo, encoder, model, pretrained, options, ray_options, store, coll, live, known, staging, report
            )
        finish(store, coll, paths, files, added, options, report)
    finally:
        lock.release()
    report.images_per_s = len(files) / (time.perf_counter() - started)
    return report


def _embed(
    todo: list[dict],
    encoder: Encoder,
    model,
    pretrained,
    options: IndexOptions,
    ray_options: RayOptions,
    store: Store,
    coll: Collection,
    live: dict,
    known: dict,
    staging: Path,
    report: RayIndexReport,
) -> list[int]:
    """Run the Ray Data job over `todo` and commit what comes back, one shard per block; returns the new ids."""
    clock = functools.partial(timed, report.seconds)
    added: list[int] = []
    with contextlib.ExitStack() as stack:
        with clock("ray start"):
            ray = stack.enter_context(ray_session(ray_options.address, ray_options.num_cpus))
            resources = ray.cluster_resources()
            plan = plan_resources(resources.get("CPU", 0.0), resources.get("GPU", 0.0), ray_options)
        report.workers = plan.workers
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar below counts files, not blocks
        context.print_on_execution_start = False
        blocks = max(1, math.ceil(len(todo) / options.batch_size))
        dataset = (
            ray.data.from_items(todo, override_num_blocks=blocks)
            .map_batches(
                _decode_batch,
                batch_size=options.batch_size,
                batch_format="numpy",
                num_cpus=plan.decode_cpus,
                fn_kwargs={
                    "preprocess": encoder.preprocess,
                    "min_side": encoder.image_size,
                    "max_pixels": options.max_pixels,
                },
            )
            .map_batches(
                _EncodeWorker,
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=plan.workers),
                num_cpus=plan.worker_cpus,
                num_gpus=plan.worker_gpus or None,
                fn_constructor_kwargs={"model": model, "pretrained": pretrained, "device": plan.device},
            )
        )
        bar = stack.enter_context(
            tqdm(
                total=len(todo),
                unit="file",
                disable=not options.progress,
                desc=f"indexing {coll.name} on Ray ({plan.workers} encoder workers)",
            )
        )
        batches = iter(dataset.iter_batches(batch_size=options.batch_size, batch_format="numpy"))
        for stage in (DECODE, ENCODE):
            report.seconds[stage] = 0.0
        while True:
            with clock("wait for blocks"):
                try:
                    batch = next(batches, None)
                except ray.exceptions.RayError as exc:  # a task or actor failed: a node lost, clipbt missing on it...
                    raise RayClusterError(
                        f"the Ray job failed after {report.shards} shards, which stay committed (rerun to resume): "
                        f"{str(exc).strip().splitlines()[-1]}"
                    ) from exc
            if batch is None:
                break
            report.seconds[DECODE] += float(batch["decode_s"].sum())
            report.seconds[ENCODE] += float(batch["encode_s"].sum())
            report.unchanged += int(batch["unchanged"].sum())
            skipped = batch["reason"] != ""
            report.skipped += [
                Skip(path, reason) for path, reason in zip(batch["path"][skipped], batch["reason"][skipped])
            ]
            if (~skipped & ~batch["unchanged"]).any():
                with clock("write shards"):
                    _write_shard(staging, report.shards, batch)
                with clock("commit"):
                    ids = _commit_shard(store, coll, live, known, staging, report.shards)
                added += ids
                report.indexed += len(ids)
                report.shards += 1
            bar.update(len(batch["path"]))
            bar.set_postfix(skipped=len(report.skipped), refresh=False)
    return added


def _decode_batch(batch: dict[str, np.ndarray], preprocess, min_side: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: read, hash and (unless unchanged) decode each file; pixels travel as float32 bytes."""
    start = time.perf_counter()
    loaded = [
        load_file(str(path), str(known) or None, preprocess, min_side, max_pixels)
        for path, known in zip(batch["path"], batch["known"], strict=True)
    ]
    items = [item for item, _ in loaded]
    n = len(items)
    return {
        "path": np.array([item.path for item in items], dtype=object),
        "sha256": np.array([item.sha256 for item in items], dtype=object),
        "width": np.array([item.width for item in items], dtype=np.int64),
        "height": np.array([item.height for item in items], dtype=np.int64),
        "reason": np.array([item.reason for item in items], dtype=object),
        "unchanged": np.array([item.unchanged for item in items], dtype=bool),
        "pixels": np.array([b"" if p is None else p.numpy().tobytes() for _, p in loaded], dtype=object),
        "shape": np.array([(0, 0, 0) if p is None else tuple(p.shape) for _, p in loaded], dtype=np.int64).reshape(
            n, 3
        ),
        "decode_s": np.full(n, (time.perf_counter() - start) / max(n, 1)),
    }


class _EncodeWorker:
    """Ray actor: loads the encoder once, then embeds the decoded rows of each batch (the others get zeros)."""

    def __init__(self, model: str | None, pretrained: str | None, device: str):
        self.encoder = Encoder.load(model, pretrained, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["path"])
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        fresh = [i for i, pixels in enumerate(batch["pixels"]) if len(pixels)]
        if fresh:
            pixels = np.stack([np.frombuffer(batch["pixels"][i], np.float32).reshape(batch["shape"][i]) for i in fresh])
            vectors[fresh] = self.encoder.encode_images(torch.from_numpy(pixels))
        out = {key: batch[key] for key in ("path", "sha256", "width", "height", "reason", "unchanged", "decode_s")}
        return out | {"embedding": vectors, "encode_s": np.full(n, (time.perf_counter() - start) / max(n, 1))}


def _shard_files(staging: Path, number: int) -> tuple[Path, Path, Path]:
    """(embeddings, metadata, skipped) files of shard `number`."""
    return (
        staging / "img_emb" / f"img_emb_{number}.npy",
        staging / "metadata" / f"metadata_{number}.parquet",
        staging / "skipped" / f"skipped_{number}.parquet",
    )


def _write_shard(staging: Path, number: int, batch: dict[str, np.ndarray]) -> None:
    """Write the batch's embedded rows as shard `number`, its skipped files beside them (a record for
    whoever reads the staging folder; the report takes them from the batch); the metadata file last."""
    skipped = batch["reason"] != ""
    fresh = ~skipped & ~batch["unchanged"]
    emb, meta, skip = _shard_files(staging, number)
    for path in (emb, meta, skip):
        path.parent.mkdir(exist_ok=True)
    with open(emb.with_name(emb.name + ".tmp"), "wb") as f:
        np.save(f, np.ascontiguousarray(batch["embedding"][fresh], dtype=np.float32))
    pq.write_table(
        pa.table(
            {
                "path": pa.array(batch["path"][skipped].tolist(), pa.string()),
                "reason": pa.array(batch["reason"][skipped].tolist(), pa.string()),
            }
        ),
        skip.with_name(skip.name + ".tmp"),
    )
    pq.write_table(
        pa.table(
            {
                "image_path": pa.array(batch["path"][fresh].tolist(), pa.string()),
                "sha256": pa.array(batch["sha256"][fresh].tolist(), pa.string()),
                "width": pa.array(batch["width"][fresh], pa.int64()),
                "height": pa.array(batch["height"][fresh], pa.int64()),
            }
        ),
        meta.with_name(meta.name + ".tmp"),
    )
    for path in (emb, skip, meta):
        os.replace(path.with_name(path.name + ".tmp"), path)


def _complete_shards(staging: Path) -> list[int]:
    """Numbers of the complete shards in staging, ascending; leftovers of incomplete ones are deleted."""
    complete = sorted(
        int(p.name[len("metadata_") : -len(".parquet")]) for p in staging.glob("metadata/metadata_*.parquet")
    )
    keep = {path for number in complete for path in _shard_files(staging, number)}
    for path in [*staging.glob("img_emb/*"), *staging.glob("skipped/*"), *staging.glob("metadata/*")]:
        if path not in keep:
            path.unlink()
    return complete


def _commit_shard(
    store: Store, coll: Collection, live: dict[str, int], known: dict[str, str], staging: Path, number: int
) -> list[int]:
    """Commit shard `number` in one transaction (rows whose hash is already live excepted: a run
    killed after committing it), then delete it. Returns the new ids."""
    emb, meta, skip = _shard_files(staging, number)
    vectors = np.load(emb)
    rows = pq.read_table(meta).to_pylist()
    keep = [i for i, row in enumerate(rows) if known.get(row["image_path"]) != row["sha256"]]
    records = [ImageRecord(rows[i]["image_path"], rows[i]["sha256"], rows[i]["width"], rows[i]["height"]) for i in keep]
    ids = commit(store, coll, live, records, vectors[keep]) if records else []
    known.update((record.uri, record.sha256) for record in records)
    for path in (meta, emb, skip):  # metadata first: without it the shard is incomplete, never committed again
        path.unlink()
    return ids
