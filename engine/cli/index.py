"""The `clipbt index`, `import-embeddings` and `export-embeddings` commands: thin click wrappers over the indexer.

Exit status: 0 done; 3 done with skips (files or rows left out, each listed with its reason);
1 an error (`Error: ...`), nothing further done.
"""

import json
from pathlib import Path

import click

from indexer.embeddings_io import export_embeddings, import_embeddings
from indexer.vectors.faiss import INDEX_TYPES
from engine.cli.options import (
    DeferredOptions,
    collection_option,
    json_option,
    model_option,
    pretrained_option,
)
from storage import Store

EXIT_DONE = 0  # every file or row was taken
EXIT_SKIPPED = 3  # the run finished, but some files or rows were skipped (see the list)

def _batch_size_option() -> list[click.Parameter]:
    from indexer.pipeline import IndexOptions
    from storage.limits import LIMITS

    return [click.Option(["--batch-size"], default=IndexOptions.batch_size, show_default=True,
                         type=click.IntRange(1, LIMITS.batch_size_max),
                         help="Images per encoder batch and per commit.")]


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
@click.option("--workers", default=None, type=click.IntRange(0, 256),
              help="Decoding processes [default: CPU cores - 1]; 0 decodes in the main process.")
@click.option("--index-type", default="flat", show_default=True,
              help=f"{', '.join(INDEX_TYPES)}, or a FAISS factory string (e.g. 'IVF256,SQ8').")
@click.option("--remove-missing", is_flag=True, help="Drop images under PATHS whose files are gone.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@json_option
@click.pass_obj
def index_command(obj, paths, collection, model, pretrained, device, batch_size, workers, index_type,
                  remove_missing, progress, as_json):
    """Embed the images under PATHS (folders walked recursively) into a collection and its FAISS index.

    Only new and changed files (by content hash) are encoded; a rerun after an interruption
    resumes. Bad files (corrupt, truncated, empty, not images, decompression bombs) are skipped
    and listed. Exit status 0: done; 3: done with skips; 1: error.

    Example:

        clipbt index ~/Pictures --model ViT-B-32 --pretrained openai --json
    """
    from indexer.encoder import Encoder
    from indexer.pipeline import IndexOptions, index_paths

    encoder = Encoder.load(model, pretrained, device)
    options = IndexOptions(batch_size=batch_size, workers=workers, remove_missing=remove_missing,
                           index_type=index_type, progress=progress)
    with Store.open(home=obj.home) as store:
        report = index_paths(store, paths, collection, encoder, options)
    _finish(
        report.to_dict(), as_json,
        [f"collection {collection!r}: indexed {report.indexed}, unchanged {report.unchanged}, "
         f"removed {report.removed}, skipped {len(report.skipped)}"],
        [f"skipped {s.path}: {s.reason}" for s in report.skipped],
    )


@click.command("import-embeddings")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@collection_option
@model_option
@pretrained_option
@json_option
@click.pass_obj
def import_embeddings_command(obj, directory, collection, model, pretrained, as_json):
    """Import precomputed embeddings in clip-retrieval's layout (img_emb/img_emb_N.npy and
    metadata/metadata_N.parquet with an image_path or url column) made by --model/--pretrained.

    Rows that are not finite, not unit norm or lack a uri are rejected by number; the rest are
    imported. Exit status 0: done; 3: done with rejected rows; 1: error.

    Example:

        clipbt import-embeddings ./embeddings --model ViT-B-32 --pretrained openai
    """
    with Store.open(home=obj.home) as store:
        report = import_embeddings(store, directory, collection, model, pretrained)
    _finish(
        report.to_dict(), as_json,
        [f"collection {collection!r}: imported {report.imported}, unchanged {report.unchanged}, "
         f"rejected {len(report.rejected)}"],
        [f"rejected row {r.row} ({r.shard}): {r.reason}" for r in report.rejected],
    )


@click.command("export-embeddings")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@collection_option
@click.option("--shard-size", default=1_000_000, show_default=True, type=click.IntRange(1), help="Rows per shard.")
@json_option
@click.pass_obj
def export_embeddings_command(obj, directory, collection, shard_size, as_json):
    """Export a collection's embeddings in clip-retrieval's layout, readable by import-embeddings.

    Example:

        clipbt export-embeddings ./embeddings --collection default
    """
    with Store.open(home=obj.home) as store:
        rows = export_embeddings(store, collection, directory, shard_size)
    _finish({"collection": collection, "rows": rows, "directory": str(directory)}, as_json,
            [f"exported {rows} rows of collection {collection!r} to {directory}"], [])
