"""`clipbt collections`: list, delete and rename the collections of a store."""

import json

import click

from engine.cli.options import json_option


def _backend(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).get_backend_name()


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def collections(ctx, as_json):
    """List collections (name, model, dim, images, users, backend); `delete` and `rename` change them.

    Example:

        clipbt collections
    """
    if ctx.invoked_subcommand is not None:
        return
    with ctx.obj.open_store() as store:
        rows = store.collection_summaries()
        backend = _backend(store.url)
    rows = [row | {"backend": backend} for row in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no collection yet: add images with `clipbt index PATH`", err=True)
        return
    columns = ("name", "model", "dim", "images", "users", "backend")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    click.echo("  ".join(f"{c:<{widths[c]}}" for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(f"{row[c]!s:<{widths[c]}}" for c in columns).rstrip())


@collections.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def collections_delete(obj, name, yes):
    """Delete collection NAME: its images, embeddings, index files (or Milvus collection) and the
    preferences recorded in it.

    The image files themselves and the users are kept.

    Example:

        clipbt collections delete photos --yes
    """
    with obj.open_store() as store:
        summary = next((row for row in store.collection_summaries() if row["name"] == name), None)
        if summary is None:
            store.collection(name)  # raises UnknownCollectionError listing the existing ones
        if not yes:
            click.confirm(
                f"Delete collection {name!r} ({summary['images']} images, preferences of {summary['users']} users)?",
                abort=True,
                err=True,
            )
        coll = store.collection(name)
        removed = store.delete_collection(name)
        if coll.vector_backend is not None:  # after the SQL delete: a failure here leaves vectors, never images
            from indexer.vectors.collection import drop_milvus

            drop_milvus(store, coll)
    click.echo(
        f"deleted collection {name!r}: {removed['images']} images, {removed['pairs']} pairs, "
        f"{removed['rankings']} rankings, {removed['feedback']} feedback"
    )


@collections.command("rename")
@click.argument("old")
@click.argument("new")
@click.pass_obj
def collections_rename(obj, old, new):
    """Rename collection OLD to NEW (its images, preferences and index stay).

    Example:

        clipbt collections rename default photos
    """
    with obj.open_store() as store:
        store.rename_collection(old, new)
    click.echo(f"renamed collection {old!r} to {new!r}")
