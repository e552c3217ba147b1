"""The ingestion pipeline: discover -> read + hash -> decode in workers -> encode -> commit per batch -> vector index.

Crash safety: each batch is one `Store.add_images` transaction, so a killed run loses at most the
batch in flight; the next run hashes every file again, finds the committed ones unchanged and
encodes the rest. A changed file's old row is marked deleted just before its new row is added
(two transactions: a kill between them only means that file is encoded again next run). The vector
index is saved after the last batch; a run killed earlier leaves it stale, which the next run or
`indexer.vectors.collection.open_index` notices and rebuilds from the embeddings in SQL.
"""

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from indexer.encoder import Encoder
from indexer.images import DEFAULT_MAX_PIXELS, BadImageError, Skip, decode, discover, read_bytes
from indexer.vectors.collection import VectorBackend, backend_name, check_index_type, refresh, use_backend
from storage import Collection, ImageRecord, Store
from storage.limits import LIMITS, check_count

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5  # with the progress bar on, encoding reports back at least this often


@dataclass(frozen=True)
class IndexOptions:
    """How `index_paths` runs."""

    batch_size: int = 256  # images per encoder batch, and per committed transaction (what a kill can lose)
    workers: int | None = None  # decoding processes; None: one per CPU core but one (max 32); 0: in-process
    remove_missing: bool = False  # mark deleted the collection's images under `paths` whose files are gone
    index_type: str = "flat"  # "flat", "ivf", "ivfpq", "hnsw" or a FAISS factory string (indexer.vectors.faiss);
    # for Milvus "flat", "hnsw", "ivf" or a Milvus GPU type (indexer.vectors.milvus)
    vectors: VectorBackend | None = None  # where the vectors go (None: where the collection keeps them, new: FAISS)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs
    progress: bool = True  # tqdm bar on stderr, moving every PROGRESS_EVERY_S or so: files/s and skipped count

    def __post_init__(self):
        check_count(self.batch_size, "batch_size", 1, LIMITS.batch_size_max)
        if self.workers is not None:
            check_count(self.workers, "workers", 0, 256)


@dataclass
class IndexReport:
    """What one `index_paths` run did."""

    collection: str
    indexed: int = 0  # files encoded and committed (new or changed)
    unchanged: int = 0  # files whose content hash was already in the collection
    removed: int = 0  # images marked deleted because their file is gone (remove_missing)
    skipped: list[Skip] = field(default_factory=list)  # files and folders left out, with the reason
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage

    def to_dict(self) -> dict:
        """A JSON-ready summary: counts, the skipped list as {path, reason} objects, stage times."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FileItem:
    """One file as a decoding worker returns it: indexed (pixels), unchanged, or skipped (reason)."""

    path: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""  # set when skipped
    unchanged: bool = False


class _Files(torch.utils.data.Dataset):
    """Reads, hashes and (unless unchanged) decodes and preprocesses one file per item."""

    def __init__(self, files: list[str], known: dict[str, str], encoder: Encoder, max_pixels: int):
        self.files, self.known, self.max_pixels = files, known, max_pixels
        self.preprocess, self.min_side = encoder.preprocess, encoder.image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[FileItem, torch.Tensor | None]:
        path = self.files[i]
        return load_file(path, self.known.get(path), self.preprocess, self.min_side, self.max_pixels)


def load_file(
    path: str, known_sha256: str | None, preprocess, min_side: int, max_pixels: int
) -> tuple[FileItem, torch.Tensor | None]:
    """Read and hash one file; unless its hash is `known_sha256`, decode and preprocess it.

    Returns (item, pixels (3, H, W)); pixels is None when the file is unchanged or skipped.
    """
    try:
        data = read_bytes(path)
        sha = hashlib.sha256(data).hexdigest()
        if known_sha256 == sha:
            return FileItem(path, sha, unchanged=True), None
        image, width, height = decode(data, max_pixels, min_side)
    except BadImageError as exc:
        return FileItem(path, reason=str(exc)), None
    return FileItem(path, sha, width, height), preprocess(image)


def _collate(batch: list[tuple[FileItem, torch.Tensor | None]]) -> tuple[list[FileItem], torch.Tensor | None]:
    pixels = [p for _, p in batch if p is not None]
    return [item for item, _ in batch], torch.stack(pixels) if pixels else None


def index_paths(
    store: Store,
    paths: Sequence[str | os.PathLike],
    collection: str = "default",
    encoder: Encoder | None = None,
    options: IndexOptions | None = None,
    **overrides,
) -> IndexReport:
    """Index the image files under `paths` into `collection` and save its vector index.

    encoder: default `Encoder.load()` (the shipped model). options: IndexOptions, any field of
    which may also be passed by keyword (`remove_missing=True`). The collection records the
    encoder's model identity; CollectionMismatchError if it was made with another model.
    Two runs on one collection at once take turns (a file lock beside its index).
    """
    options = dataclasses.replace(options or IndexOptions(), **overrides)
    encoder = encoder or Encoder.load()
    report = IndexReport(collection)
    clock = functools.partial(timed, report.seconds)
    coll = open_collection(store, collection, encoder, options.index_type, options.vectors)
    with indexing_lock(store, coll):  # runs on one collection take turns
        with clock("discover"):
            files, report.skipped = discover(paths)
            live, known = live_images(store, coll)
        workers = options.workers if options.workers is not None else max(1, min(32, (os.cpu_count() or 2) - 1))
        loader = torch.utils.data.DataLoader(
            _Files(files, known, encoder, options.max_pixels),
            batch_size=options.batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=encoder.device.type == "cuda",
        )
        added: list[int] = []
        bar = tqdm(total=len(files), unit="file", desc=f"indexing {collection}", disable=not options.progress)
        pace = _Pace()
        batches = iter(loader)
        try:
            while True:
                with clock("read+decode (wait)"):
                    batch = next(batches, None)
                if batch is None:
                    break
                items, pixels = batch
                fresh = [item for item in items if not item.reason and not item.unchanged]
                report.unchanged += sum(item.unchanged for item in items)
                report.skipped += [Skip(item.path, item.reason) for item in items if item.reason]
                bar.update(len(items) - len(fresh))
                if fresh:
                    with clock("encode"):
                        vectors = (
                            pace.encode(encoder, pixels, bar.update)
                            if options.progress
                            else encoder.encode_images(pixels)
                        )
                    with clock("commit"):
                        records = [ImageRecord(item.path, item.sha256, item.width, item.height) for item in fresh]
                        added += commit(store, coll, live, records, vectors)
                    report.indexed += len(fresh)
                bar.set_postfix(skipped=len(report.skipped), refresh=False)
        finally:
            bar.close()
        finish(store, coll, paths, files, added, options, report)
    return report


def open_collection(
    store: Store, name: str, encoder: Encoder, index_type: str, vectors: VectorBackend | None = None
) -> Collection:
    """The collection `name` for `encoder`'s embeddings, created if missing (CollectionMismatchError
    if it holds another model's), its vectors placed on `vectors` (None: where it keeps them);
    IndexTypeError for an index type that cannot hold them."""
    existing = store.find_collection(name)
    check_index_type(index_type, encoder.dim, backend_name(vectors, existing))
    coll = store.get_or_create_collection(
        name, encoder.model_name, encoder.pretrained, encoder.dim, checkpoint_path=encoder.checkpoint_path
    )
    return use_backend(store, coll, vectors, index_type)


def indexing_lock(store: Store, coll: Collection) -> FileLock:
    """The lock that makes indexing runs on one collection take turns: a second run started during
    the first waits, then finds the files the first one added unchanged (instead of failing on
    their uris)."""
    lock_dir = store.collection_index_dir(coll)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return FileLock(str(lock_dir / ".indexing.lock"))


def live_images(store: Store, coll: Collection) -> tuple[dict[str, int], dict[str, str]]:
    """({uri: image id}, {uri: sha256}) of the collection's live images."""
    images = store.images(coll.id)
    return {image.uri: image.id for image in images}, {image.uri: image.sha256 for image in images}


def commit(
    store: Store, coll: Collection, live: dict[str, int], records: list[ImageRecord], vectors: np.ndarray
) -> list[int]:
    """Add `records` with their embeddings (n, dim) in one transaction, first marking deleted the
    live image each replaces (same uri); `live` is updated. Returns the new ids in order."""
    replaced = [live[record.uri] for record in records if record.uri in live]
    if replaced:
        store.mark_deleted(replaced)
    ids = store.add_images(coll.id, records, vectors)
    live.update((record.uri, i) for record, i in zip(records, ids, strict=True))
    return ids


def finish(
    store: Store,
    coll: Collection,
    paths,
    files: list[str],
    added: list[int],
    options: IndexOptions,
    report: IndexReport,
) -> None:
    """After the last batch: remove missing files (when asked), bring the FAISS index up to date, sort the skips."""
    clock = functools.partial(timed, report.seconds)
    if options.remove_missing:
        report.removed = _remove_missing(store, coll, paths, set(files), report.skipped)
    with clock("vector index"):
        token = options.vectors.token if options.vectors is not None else None
        refresh(store, coll, options.index_type, np.asarray(added, dtype=np.int64), token)
    report.skipped.sort(key=lambda s: s.path)
    log.info("indexed %s: %s", coll.name, ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items()))


def _remove_missing(store: Store, coll: Collection, paths, present: set[str], skipped: list[Skip]) -> int:
    """Mark deleted the live images under `paths` whose file was not found (folders that could not be read excepted)."""
    roots = [os.path.abspath(p) for p in paths]
    unreadable = [s.path for s in skipped]

    def under(uri: str, folders: list[str]) -> bool:
        return any(uri == f or uri.startswith(f.rstrip(os.sep) + os.sep) for f in folders)

    gone = [
        image.id
        for image in store.images(coll.id)
        if image.uri not in present and under(image.uri, roots) and not under(image.uri, unreadable)
    ]
    return store.mark_deleted(gone) if gone else 0


class _Pace:
    """Encodes a batch in slices sized so that each takes about PROGRESS_EVERY_S, from the time per
    image measured so far, so the progress bar moves at least that often even on a slow CPU model."""

    def __init__(self, first: int = 4):
        self.seconds_per_image: float | None = None
        self.first = first  # images in the first slice, before any timing

    def encode(self, encoder: Encoder, pixels: torch.Tensor, done) -> np.ndarray:
        """`encoder.encode_images(pixels)` slice by slice, calling done(n) after each slice of n images."""
        parts, start = [], 0
        while start < len(pixels):
            size = (
                self.first
                if self.seconds_per_image is None
                else int(PROGRESS_EVERY_S / max(self.seconds_per_image, 1e-9))
            )
            part = pixels[start : start + max(1, size)]
            began = time.perf_counter()
            parts.append(encoder.encode_images(part))
            self.seconds_per_image = (time.perf_counter() - began) / len(part)
            start += len(part)
            done(len(part))
        return np.concatenate(parts)


@contextmanager
def timed(seconds: dict[str, float], stage: str):
    """Add the wall time of the block to seconds[stage]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
