"""The `clipbt index`, `import-embeddings` and `export-embeddings` commands: thin click wrappers over the indexer.

Exit status: 0 done; 3 done with skips (files or rows left out, each listed with its reason);
1 an error (`Error: ...`), nothing further done.
"""

import json
from pathlib import Path

import click

from engine.cli.options import (
    DeferredOptions,
    collection_option,
    json_option,
    model_option,
    pretrained_option,
)
from indexer.vectors.faiss import INDEX_TYPES
from storage.limits import LIMITS

TOKEN_ENV = "CLIPBT_MILVUS_TOKEN"  # = indexer.vectors.milvus.TOKEN_ENV (not imported: --help stays light)
EXIT_DONE = 0  # every file or row was taken
EXIT_SKIPPED = 3  # the run finished, but some files or rows were skipped (see the list)


def _batch_size_option() -> list[click.Parameter]:
    from indexer.pipeline import IndexOptions

    return [
        click.Option(
            ["--batch-size"],
            default=IndexOptions.batch_size,
            show_default=True,
            type=click.IntRange(1, LIMITS.batch_size_max),
            help="Images per encoder batch and per commit.",
        )
    ]


TINY_NOTE = (
    "note: clipbt-tiny, the shipped model, was trained only on clipbt's generated world of coloured "
    "shapes; on photos its results mean little. For your own images use the default model (no --model: "
    "ViT-B-32, laion2b_s34b_b79k) or another open_clip model."
)


def _is_world_folder(path: Path) -> bool:
    """A folder written by `indexer.world.write_collection` (it holds the world's labels file)."""
    from indexer.world import LABELS_FILE

    return (path / LABELS_FILE).is_file()


def vector_options(command):
    """--backend, --milvus-uri and --milvus-token, shared by `index` and `import-embeddings`."""
    for option in reversed(
        (
            click.option(
                "--backend",
                type=click.Choice(["faiss", "milvus"]),
                default=None,
                help="Where the vectors live: faiss (index files in the data home) or milvus (a Milvus "
                "collection) [default: where the collection keeps them; faiss for a new one]. Recorded in the "
                "store: later commands need no flag.",
            ),
            click.option(
                "--milvus-uri",
                metavar="URI",
                default=None,
                help="With --backend milvus: a milvus-lite file (./vectors.db, one process at a time) or "
                "http(s)://host:port of a Milvus server or cluster.",
            ),
            click.option(
                "--milvus-token",
                envvar=TOKEN_ENV,
                show_envvar=True,
                default=None,
                help=f"Milvus credential (a token, or user:password); never stored: other commands read ${TOKEN_ENV}.",
            ),
        )
    ):
        command = option(command)
    return command


def resolve_vectors(obj, collection: str, backend, uri, token, index_type):
    """(VectorBackend, index type): the flags, completed by what the collection records (a Milvus
    collection keeps its URI and index type unless they are given again, flat for a new one); a new
    collection gets FAISS, whose index type stays as given (None: the command's default)."""
    from indexer.vectors.collection import MILVUS, VectorBackend, backend_name

    with obj.open_store() as store:
        existing = store.find_collection(collection)
    recorded = backend_name(None, existing)
    name = backend or recorded
    if name != MILVUS:
        return VectorBackend(name, uri), index_type
    if recorded == MILVUS:
        uri = uri or existing.vector_uri
        index_type = index_type or existing.vector_index_type
    return VectorBackend(MILVUS, uri, token), index_type or "flat"


def _finish(summary: dict, as_json: bool, lines: list[str], problems: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for line in problems:
            click.echo(line, err=True)
        for line in lines:
            click.echo(line)
    click.get_current_context().exit(EXIT_SKIPPED if problems else EXIT_DONE)


@click.command("index", cls=DeferredOptions, deferred=_batch_size_option)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@collection_option
@model_option
@pretrained_option
@click.option("--device", default=None, help="cpu, cuda, cuda:1... [default: CUDA in float16 when present, else CPU].")
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(0, 256),
    help="local: decoding processes [default: CPU cores - 1], 0 decodes in the main process; "
    "ray: encoder actors [default: one per --gpus-per-worker GPUs, else the cluster's CPUs - 1].",
)
@click.option(
    "--index-type",
    default=None,
    help=f"FAISS: {', '.join(INDEX_TYPES)}, exact (clipbt's exact kernel), or a factory string (e.g. 'IVF256,SQ8'); "
    "Milvus: flat, hnsw, ivf, or a Milvus GPU type (GPU_CAGRA...) [default: flat; a Milvus collection keeps its own].",
)
@vector_options
@click.option("--remove-missing", is_flag=True, help="Drop images under PATHS whose files are gone.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
# -- the Ray executor (indexer/ray_executor.py) --
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this machine; ray: decode and encode on a Ray cluster (pip install 'clipbt[ray]').",
)
@click.option(
    "--ray-address",
    default=None,
    help="A running Ray cluster (ray://HEAD:10001, or HEAD:6379 on a node) [default: start a local Ray].",
)
@click.option(
    "--gpus-per-worker",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="ray: GPUs per encoder actor (0.5: two share a GPU); 0 encodes on CPUs.",
)
@json_option
@click.pass_obj
def index_command(
    obj,
    paths,
    collection,
    model,
    pretrained,
    device,
    batch_size,
    workers,
    index_type,
    backend,
    milvus_uri,
    milvus_token,
    remove_missing,
    progress,
    executor,
    ray_address,
    gpus_per_worker,
    as_json,
):
    """Embed the images under PATHS (folders walked recursively) into a collection and its vector index
    (FAISS files in the data home, or a Milvus collection with --backend milvus).

    The default model is ViT-B-32 with LAION-2B weights (laion2b_s34b_b79k), downloaded once into
    the Hugging Face cache. `--model clipbt-tiny` is the shipped offline model, which knows only
    clipbt's generated world (the demo and the tests).

    Only new and changed files (by content hash) are encoded; a rerun after an interruption
    resumes. Bad files (corrupt, truncated, empty, not images, decompression bombs) are skipped
    and listed. Exit status 0: done; 3: done with skips; 1: error.

    Example:

        clipbt index ~/Pictures --model ViT-B-32 --pretrained openai --json

        clipbt index /data/photos --executor ray --ray-address ray://head:10001

        clipbt index /data/photos --backend milvus --milvus-uri http://milvus:19530 --index-type hnsw
    """
    from indexer.encoder import GENERAL_MODEL, SHIPPED_MODEL, Encoder
    from indexer.pipeline import IndexOptions, index_paths

    vectors, index_type = resolve_vectors(obj, collection, backend, milvus_uri, milvus_token, index_type)
    if model is None and pretrained is None:
        model, pretrained = GENERAL_MODEL
    options = IndexOptions(
        batch_size=batch_size,
        workers=workers,
        remove_missing=remove_missing,
        index_type=index_type or "flat",
        vectors=vectors,
        progress=progress,
    )
    if executor == "ray":
        from indexer.ray_executor import RayOptions, index_paths_ray

        ray_options = RayOptions(
            address=ray_address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            device=device,
            staging=str(obj.home / "staging"),
        )
        with obj.open_store() as store:
            report = index_paths_ray(store, paths, collection, model, pretrained, options, ray_options)
    else:
        encoder = Encoder.load(model, pretrained, device)
        if encoder.model_name == SHIPPED_MODEL and not all(_is_world_folder(p) for p in paths):
            click.echo(TINY_NOTE, err=True)
        with obj.open_store() as store:
            report = index_paths(store, paths, collection, encoder, options)
    _finish(
        report.to_dict(),
        as_json,
        [
            f"collection {collection!r}: indexed {report.indexed}, unchanged {report.unchanged}, "
            f"removed {report.removed}, skipped {len(report.skipped)}"
        ],
        [f"skipped {s.path}: {s.reason}" for s in report.skipped],
    )


@click.command("import-embeddings")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@collection_option
@model_option
@pretrained_option
@click.option(
    "--index-type",
    default=None,
    help="With a Milvus collection: flat, hnsw, ivf or a Milvus GPU type [default: the collection's, else flat]. "
    "A FAISS index is built on the first search.",
)
@vector_options
@json_option
@click.pass_obj
def import_embeddings_command(
    obj, directory, collection, model, pretrained, index_type, backend, milvus_uri, milvus_token, as_json
):
    """Import precomputed embeddings in clip-retrieval's layout (img_emb/img_emb_N.npy and
    metadata/metadata_N.parquet with an image_path or url column) made by --model/--pretrained.

    Rows that are not finite, not unit norm or lack a uri are rejected by number; the rest are
    imported. Exit status 0: done; 3: done with rejected rows; 1: error.

    Example:

        clipbt import-embeddings ./embeddings --model ViT-B-32 --pretrained openai

        clipbt import-embeddings ./embeddings --backend milvus --milvus-uri ./vectors.db
    """
    from indexer.embeddings_io import import_embeddings  # pyarrow: imported only by the commands that need it

    vectors, index_type = resolve_vectors(obj, collection, backend, milvus_uri, milvus_token, index_type)
    with obj.open_store() as store:
        report = import_embeddings(
            store,
            directory,
            collection,
            model,
            pretrained,
            vector_backend=vectors,
            index_type=index_type,
        )
    _finish(
        report.to_dict(),
        as_json,
        [
            f"collection {collection!r}: imported {report.imported}, unchanged {report.unchanged}, "
            f"rejected {len(report.rejected)}"
        ],
        [f"rejected row {r.row} ({r.shard}): {r.reason}" for r in report.rejected],
    )


@click.command("export-embeddings")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@collection_option
@click.option(
    "--shard-size",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(1, LIMITS.shard_size_max),
    help="Rows per shard.",
)
@json_option
@click.pass_obj
def export_embeddings_command(obj, directory, collection, shard_size, as_json):
    """Export a collection's embeddings in clip-retrieval's layout, readable by import-embeddings.

    Example:

        clipbt export-embeddings ./embeddings --collection default
    """
    from indexer.embeddings_io import export_embeddings

    with obj.open_store() as store:
        rows = export_embeddings(store, collection, directory, shard_size)
    _finish(
        {"collection": collection, "rows": rows, "directory": str(directory)},
        as_json,
        [f"exported {rows} rows of collection {collection!r} to {directory}"],
        [],
    )
