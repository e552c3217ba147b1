"""Precomputed embeddings in clip-retrieval's layout: `img_emb/img_emb_N.npy` beside `metadata/metadata_N.parquet`.

Metadata columns read: the uri from `image_path` (else `url`); `caption`, `sha256`, `width` and
`height` when present; every other column becomes the image's metadata (nulls dropped). Export
writes exactly these columns back, so an export imports again unchanged.

The store wants a content hash and a size for every image. When the metadata lacks them: a uri that
is a readable local file is hashed and its header read; otherwise sha256 is that of the uri text
and the size 1x1, flagged with metadata `{"size_unknown": true}`.

An import into a Milvus-backed collection (`vector_backend`, or one recorded so) ends by bringing the
Milvus collection in step with SQL: the new rows inserted in batches, then flushed. A FAISS index
is built on the first search instead.
"""

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

from indexer.errors import EmbeddingsFormatError
from indexer.vectors.collection import (
    MILVUS,
    VectorBackend,
    backend_name,
    check_index_type,
    refresh,
    use_backend,
)
from storage import ImageRecord, Store
from storage._sql import _SHA256
from storage.limits import LimitError, check_text

URI_COLUMNS = ("image_path", "url")  # first one present names the image
_KNOWN_COLUMNS = ("caption", "sha256", "width", "height")
NORM_TOLERANCE = 0.01  # a row is rejected when |norm - 1| exceeds this
_SHARD = re.compile(r"img_emb_(\d+)\.npy")


@dataclass(frozen=True)
class RejectedRow:
    """A row left out of an import, and why."""

    row: int  # 0-based, counted across shards in shard order
    shard: str  # the img_emb file it came from
    reason: str


@dataclass
class ImportReport:
    """What one `import_embeddings` run did."""

    collection: str
    imported: int = 0  # rows added
    unchanged: int = 0  # rows whose uri was already a live image of the collection
    rejected: list[RejectedRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        return asdict(self)


def shards(directory: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(embedding file, metadata file) pairs of a clip-retrieval folder, by shard number."""
    root = Path(directory)
    found = sorted(
        (int(m.group(1)), p) for p in (root / "img_emb").glob("img_emb_*.npy") if (m := _SHARD.fullmatch(p.name))
    )
    if not found:
        raise EmbeddingsFormatError(f"no img_emb/img_emb_N.npy files in {str(root)!r}")
    pairs = []
    for number, emb in found:
        meta = root / "metadata" / f"metadata_{number}.parquet"
        if not meta.is_file():
            raise EmbeddingsFormatError(f"{emb} has no metadata file {meta}")
        pairs.append((emb, meta))
    return pairs


def import_embeddings(
    store: Store,
    directory: str | os.PathLike,
    collection: str = "default",
    model: str | None = None,
    pretrained: str | None = None,
    batch_rows: int = 4096,
    vector_backend: VectorBackend | None = None,
    index_type: str | None = None,
) -> ImportReport:
    """Add the rows of a clip-retrieval folder to `collection`, made by `model`/`pretrained`
    (see indexer.encoder.model_identity; None: the shipped default model). `vector_backend`:
    where the collection's vectors go (None: where it keeps them); `index_type`: the Milvus index type
    (None: the collection's, else flat).

    Whole-folder problems (missing files, wrong dimension, row counts that differ) raise
    EmbeddingsFormatError before anything is written; bad rows (not finite, norm not 1, no uri,
    uri repeated) are rejected by number and the rest imported, one transaction per `batch_rows`.
    A rerun skips rows already imported, so an interrupted import resumes.
    """
    pairs = shards(directory)
    tables = []
    for emb_path, meta_path in pairs:
        vectors = _read_npy(emb_path)
        table = _read_parquet(meta_path)
        if vectors.ndim != 2:
            raise EmbeddingsFormatError(f"{emb_path} holds an array of shape {vectors.shape}, not (rows, dim)")
        if len(vectors) != table.num_rows:
            raise EmbeddingsFormatError(f"{emb_path} has {len(vectors)} rows but {meta_path} has {table.num_rows}")
        uri_column = next((c for c in URI_COLUMNS if c in table.column_names), None)
        if uri_column is None:
            raise EmbeddingsFormatError(
                f"{meta_path} has no {' or '.join(URI_COLUMNS)} column (columns: {', '.join(table.column_names)})"
            )
        tables.append((emb_path, vectors, table, uri_column))
    dims = {vectors.shape[1] for _, vectors, _, _ in tables}
    if len(dims) > 1:
        raise EmbeddingsFormatError(f"shards of {str(directory)!r} have different dimensions {sorted(dims)}")
    from indexer.encoder import model_identity  # indexer.encoder loads torch, which export does not need

    name, recorded = model_identity(model, pretrained)
    model_dim = _model_dim(name)
    if model_dim is not None and model_dim != min(dims):
        raise EmbeddingsFormatError(
            f"embeddings of {str(directory)!r} have dimension {min(dims)}, but {name} embeds in dimension "
            f"{model_dim}: nothing imported; give the --model and --pretrained they were made with"
        )
    existing = store.find_collection(collection)
    if existing is not None and (existing.model, existing.pretrained, existing.dim) != (name, recorded, min(dims)):
        raise EmbeddingsFormatError(
            f"embeddings of {str(directory)!r} are {name}/{recorded} (dim {min(dims)}), but collection "
            f"{collection!r} holds {existing.model}/{existing.pretrained} (dim {existing.dim}): nothing imported; "
            "import into another --collection, or give the --model and --pretrained they were made with"
        )
    if backend_name(vector_backend, existing) == MILVUS:
        index_type = index_type or (existing and existing.vector_index_type) or "flat"
        check_index_type(index_type, min(dims), MILVUS)
    elif index_type is not None:
        raise EmbeddingsFormatError(
            f"--index-type {index_type!r} is for a Milvus collection; a FAISS index is built on the first "
            "search (choose its type with `clipbt index --index-type`)"
        )
    coll = store.get_or_create_collection(collection, name, recorded, dims.pop())
    coll = use_backend(store, coll, vector_backend, index_type)
    report = ImportReport(collection)
    live = {image.uri for image in store.images(coll.id)}
    first_row: dict[str, int] = {}
    offset = 0
    for emb_path, vectors, table, uri_column in tables:
        for start in range(0, len(vectors), batch_rows):
            block = np.asarray(vectors[start : start + batch_rows], dtype=np.float32)
            rows = table.slice(start, len(block)).to_pylist()
            records, keep = [], []
            for i, (vector, row) in enumerate(zip(block, rows, strict=True)):
                number = offset + start + i
                reason, uri = _row_problem(vector, row, uri_column), row.get(uri_column)
                if not reason and uri in first_row:
                    reason = f"uri {uri!r} repeats row {first_row[uri]}"
                if reason:
                    report.rejected.append(RejectedRow(number, emb_path.name, reason))
                    continue
                first_row[uri] = number
                if uri in live:
                    report.unchanged += 1
                    continue
                records.append(_record(uri, row, uri_column))
                keep.append(i)
            if records:
                store.add_images(coll.id, records, block[keep])
                report.imported += len(records)
        offset += len(vectors)
    if coll.vector_backend == MILVUS:
        refresh(
            store, coll, index_type, np.empty(0, np.int64), vector_backend.token if vector_backend is not None else None
        )
    return report


def _model_dim(name: str) -> int | None:
    """The embedding dimension of an open_clip architecture (or the shipped model) from its
    config, without loading weights; None when unknown here (hf-hub:, local-dir:)."""
    import open_clip

    from indexer import default_model

    default_model.register()
    config = open_clip.get_model_config(name)
    return int(config["embed_dim"]) if config and "embed_dim" in config else None


def _read_npy(path: Path) -> np.ndarray:
    """The array of an .npy file, memory-mapped; EmbeddingsFormatError when it is not a whole one."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise EmbeddingsFormatError(f"{path} is not a readable .npy array (truncated or damaged?): {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise EmbeddingsFormatError(f"{path} does not hold a numeric array")
    return array


def _read_parquet(path: Path) -> pa.Table:
    """The columns of a parquet file that an import can use (strings, numbers, booleans; others,
    such as timestamps or binary, are left out); EmbeddingsFormatError when it cannot be read."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise EmbeddingsFormatError(f"{path} is not a readable parquet file: {exc}") from None
    usable = [
        name
        for name, kind in zip(table.column_names, table.schema.types)
        if pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_null(kind)
    ]
    return table.select(usable)


def _row_problem(vector: np.ndarray, row: dict, uri_column: str) -> str:
    if not np.isfinite(vector).all():
        return "embedding is not finite"
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return f"embedding norm is {norm:.4g}, not 1 (within {NORM_TOLERANCE})"
    uri = row.get(uri_column)
    if not isinstance(uri, str) or not uri:
        return f"no {uri_column}"
    for name in (uri_column, "caption"):
        if isinstance(row.get(name), str):
            try:
                check_text(row[name], name)
            except LimitError as exc:
                return str(exc)
    return ""


def _record(uri: str, row: dict, uri_column: str) -> ImageRecord:
    metadata = {k: v for k, v in row.items() if k not in (uri_column, *_KNOWN_COLUMNS) and v is not None}
    sha, width, height = row.get("sha256"), row.get("width"), row.get("height")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha) and _positive(width) and _positive(height)):
        sha, width, height = _describe(uri, metadata)
    return ImageRecord(uri, sha, int(width), int(height), row.get("caption"), metadata or None)


def _describe(uri: str, metadata: dict) -> tuple[str, int, int]:
    """(sha256, width, height) of the file at `uri`, or of the uri text and 1x1 when it cannot be read."""
    from indexer.encoder import file_sha256

    try:
        with PILImage.open(uri) as image:
            width, height = image.size
        return file_sha256(uri), width, height
    except Exception:  # a URL, a missing file or a non-image: the content is unknown here
        metadata["size_unknown"] = True
        return hashlib.sha256(uri.encode()).hexdigest(), 1, 1


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def export_embeddings(store: Store, collection: str, directory: str | os.PathLike, shard_size: int = 1_000_000) -> int:
    """Write the live images of `collection` to `directory` in the clip-retrieval layout; returns the row count.

    Refuses (EmbeddingsFormatError) a folder that already holds img_emb shards.
    """
    root = Path(directory)
    if list((root / "img_emb").glob("img_emb_*.npy")):
        raise EmbeddingsFormatError(f"{str(root)!r} already holds img_emb shards: export to an empty folder")
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    images = store.images(collection)
    ids, vectors = store.embeddings(collection)
    if [image.id for image in images] != ids.tolist():
        raise EmbeddingsFormatError(f"collection {collection!r} changed while exporting: run the export again")
    for number, start in enumerate(range(0, max(len(images), 1), shard_size)):
        part = images[start : start + shard_size]
        np.save(root / "img_emb" / f"img_emb_{number}.npy", vectors[start : start + shard_size])
        rows = [
            {
                URI_COLUMNS[0]: im.uri,
                "caption": im.caption,
                "sha256": im.sha256,
                "width": im.width,
                "height": im.height,
                **(im.metadata or {}),
            }
            for im in part
        ]
        columns = list(dict.fromkeys(key for row in rows for key in row)) or [URI_COLUMNS[0], *_KNOWN_COLUMNS]
        table = (
            pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
            if rows
            else pa.table({c: pa.array([], pa.string()) for c in columns})
        )
        pq.write_table(table, root / "metadata" / f"metadata_{number}.parquet")
    return len(images)
