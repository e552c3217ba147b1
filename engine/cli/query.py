"""The query and preference commands of `clipbt`: search, prefer, rank, feedback, compare, prefs, users, info."""

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

from engine.cli.options import DeferredOptions, collection_option, json_option, query_option, user_option
from engine.preferences import (
    export_preferences,
    import_preferences,
)


@contextmanager
def _library(obj, config=None):
    """The library API (`engine.api.Clipbt`) over the command's store."""
    from engine.api import Clipbt
    from engine.search import SearchConfig

    with Clipbt(obj.open_store(), config or SearchConfig()) as clip:
        yield clip


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _adaptation_options() -> list[click.Parameter]:
    from engine.search import SCOPES, SearchConfig

    default = SearchConfig()
    return [
        click.Option(
            ["--method"],
            type=click.Choice(["map", "bt"]),
            help=f"map: posterior mode under a prior on the query; bt: the paper's steps (default {default.method}).",
        ),
        click.Option(["--lr"], type=float, help=f"BT step size of --method bt (default {default.adapt.lr})."),
        click.Option(["--steps"], type=int, help=f"BT gradient steps of --method bt (default {default.adapt.steps})."),
        click.Option(["--beta"], type=float, help=f"BT inverse temperature (default {default.beta})."),
        click.Option(
            ["--scope"], type=click.Choice(SCOPES), help=f"Which of the user's pairs count (default {default.scope})."
        ),
    ]


@click.command(cls=DeferredOptions, deferred=_adaptation_options)
@click.argument("text", required=False)
@click.option("--user", "-u", help="Personalise with this user's preferences.")
@click.option("-k", "k", default=10, show_default=True, help="How many images to return.")
@click.option(
    "--vector",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Search with this query embedding (.npy, shape (dim,)) instead of encoding TEXT.",
)
@click.option("--no-adapt", is_flag=True, help="Ignore the user's preferences: the plain query.")
@collection_option
@json_option
@click.pass_obj
def search(obj, text, user, k, vector, no_adapt, method, lr, steps, beta, scope, collection, as_json):
    """Find the K images that best match TEXT, personalised for --user.

    Example:

        clipbt search "a red circle" --user ann -k 5
    """
    from engine.search import SearchConfig

    default = SearchConfig()
    method = method or ("bt" if lr is not None or steps is not None else default.method)
    changes = {name: value for name, value in (("lr", lr), ("steps", steps), ("beta", beta)) if value is not None}
    config = SearchConfig(
        method=method,
        scope=scope or default.scope,
        adapt=dataclasses.replace(default.adapt, **changes) if method == "bt" else default.adapt,
        map=dataclasses.replace(default.map, beta=beta) if method == "map" and beta else default.map,
    )
    query_vector = None
    if vector is not None:
        try:
            query_vector = np.load(vector, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot read query vector {str(vector)!r}: {exc}") from None
    with _library(obj, config) as clip:
        hits = clip.search(text, None if no_adapt else user, k, collection, query_vector)
    _print_hits(obj, hits, collection, None if no_adapt else user, as_json)


# -- how search results are printed: missing files marked, a user without preferences noted ------


def _print_hits(obj, hits, collection: str, user: str | None, as_json: bool) -> None:
    missing = {hit.id for hit in hits if _file_is_gone(hit.path)}
    if user is not None:
        _note_user_without_preferences(obj, user, collection)
    if as_json:
        _print_json([hit.to_dict() | {"missing": hit.id in missing} for hit in hits])
    else:
        for hit in hits:
            mark = "  (missing)" if hit.id in missing else ""
            click.echo(f"{hit.rank:>3}  {hit.id:>6}  {hit.score:8.4f}  {hit.path}{mark}")
    if missing:
        click.echo(
            f"note: {len(missing)} of these files are gone; drop them from the collection with "
            f"`clipbt index FOLDER --remove-missing --collection {collection}`",
            err=True,
        )


def _file_is_gone(uri: str) -> bool:
    """A local path (not a URL) that no longer exists."""
    return "://" not in uri and not os.path.exists(uri)


def _note_user_without_preferences(obj, user: str, collection: str) -> None:
    """Say on stderr when `user` has no preference in `collection`: the results are the plain search's."""
    import difflib

    with obj.open_store() as store:
        known = store.users()
        if user in known and store.pairs(user, collection):
            return
    what = "is not a known user" if user not in known else f"has no preferences in collection {collection!r}"
    close = difflib.get_close_matches(user, [name for name in known if name != user], n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    click.echo(
        f"note: {user!r} {what}, so these are the plain results{hint}; "
        f"record some with `clipbt prefer --user {user} ...`",
        err=True,
    )


@click.command()
@user_option
@query_option
@click.argument("preferred")
@click.argument("rejected")
@collection_option
@click.pass_obj
def prefer(obj, user, query, preferred, rejected, collection):
    """Record that --user preferred image PREFERRED over REJECTED (ids or paths) for --query.

    Example:

        clipbt prefer --user ann --query "a red circle" 12 7
    """
    with _library(obj) as clip:
        clip.prefer(user, query, preferred, rejected, collection)
    click.echo(f"{user} prefers {preferred} over {rejected} for {query!r}")


@click.command()
@user_option
@query_option
@click.argument("images", nargs=-1, required=True)
@collection_option
@click.pass_obj
def rank(obj, user, query, images, collection):
    """Record --user's ranking of IMAGES (ids or paths), best first, for --query.

    Example:

        clipbt rank --user ann --query "a red circle" 12 7 3
    """
    with _library(obj) as clip:
        clip.rank(user, query, images, collection)
    click.echo(f"{user} ranks {' > '.join(images)} for {query!r}")


@click.command(context_settings={"ignore_unknown_options": True})
@user_option
@query_option
@click.argument("marked", nargs=-1, required=True)
@collection_option
@click.pass_obj
def feedback(obj, user, query, marked, collection):
    """Thumbs up (--good IMAGES...) and down (--bad IMAGES...) for --query; it counts as every good
    image preferred over every bad one.

    Example:

        clipbt feedback --user ann --query "a red circle" --good 12 3 --bad 7 9
    """
    groups = {"--good": [], "--bad": []}
    current = None
    for token in marked:
        if token in groups:
            current = token
        elif current is None or token.startswith("--"):
            raise click.UsageError(f"expected --good or --bad before {token!r}")
        else:
            groups[current].append(token)
    with _library(obj) as clip:
        clip.feedback(user, query, groups["--good"], groups["--bad"], collection)
    click.echo(f"{user}: {len(groups['--good'])} good, {len(groups['--bad'])} bad for {query!r}")


@click.command()
@click.option("--user", "-u", help="Whose preferences apply (none: the plain model).")
@query_option
@click.argument("a")
@click.argument("b")
@collection_option
@json_option
@click.pass_obj
def compare(obj, user, query, a, b, collection, as_json):
    """P(image A beats image B) for --user and --query: the preference model as a reward model.

    Example:

        clipbt compare --user ann --query "a red circle" 12 7 --json
    """
    with _library(obj) as clip:
        p = clip.compare(user, query, a, b, collection)
    if as_json:
        _print_json({"a": a, "b": b, "p": p})
    else:
        click.echo(f"P({a} over {b}) = {p:.4f}")


@click.group()
def prefs():
    """List, export or import preferences.

    Example:

        clipbt prefs export --user ann > ann.jsonl
    """


@prefs.command("list")
@click.option("--user", "-u", help="Only this user (default: everyone).")
@json_option
@click.pass_obj
def prefs_list(obj, user, as_json):
    """List stored preferences (pairs, rankings, feedback), oldest first per user.

    Example:

        clipbt prefs list --user ann --json
    """
    with obj.open_store() as store:
        records = list(export_preferences(store, user))
    if as_json:
        _print_json(records)
        return
    for r in records:
        if r["kind"] == "pair":
            what = f"{r['preferred']} > {r['rejected']}"
        elif r["kind"] == "ranking":
            what = " > ".join(r["images"])
        else:
            what = f"good {', '.join(r['good']) or '-'}; bad {', '.join(r['bad']) or '-'}"
        click.echo(f"{r['user']}\t{r['kind']}\t{r['query']!r}\t{what}")


@prefs.command("export")
@click.option("--user", "-u", help="Only this user (default: everyone).")
@click.option("--collection", "-c", help="Only preferences recorded in this collection (default: all).")
@click.option("--output", "-o", type=click.File("w"), default="-", help="File to write (default: stdout).")
@click.pass_obj
def prefs_export(obj, user, collection, output):
    """Write preferences as JSON lines, images named by path.

    Example:

        clipbt prefs export --user ann -o ann.jsonl
    """
    with obj.open_store() as store:
        for record in export_preferences(store, user, collection):
            output.write(json.dumps(record) + "\n")


@prefs.command("import")
@click.argument("file", type=click.File("rb"))
@click.option(
    "--collection",
    "-c",
    help="Record them in this collection, images matched by path (default: the collection each names).",
)
@json_option
@click.pass_obj
def prefs_import(obj, file, collection, as_json):
    """Read preferences from JSON lines written by `prefs export` (- for stdin), all or nothing:
    every bad line is reported and then nothing is stored. Records already stored are counted as
    present, not stored twice, so importing a file again changes nothing.

    Example:

        clipbt prefs export --collection a | clipbt prefs import --collection b -
    """
    with obj.open_store() as store:
        counts = import_preferences(store, file, collection)
    if as_json:
        _print_json(counts)
    else:
        for state, label in (("new", "imported"), ("present", "already present")):
            click.echo(f"{label}: " + ", ".join(f"{n} {kind}" for kind, n in counts[state].items()))


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def users(ctx, as_json):
    """List users; `users delete U` removes one with every trace of them.

    Example:

        clipbt users --json
    """
    if ctx.invoked_subcommand is not None:
        return
    with ctx.obj.open_store() as store:
        names = store.users()
    if as_json:
        _print_json(names)
    else:
        for name in names:
            click.echo(name)


@users.command("delete")
@click.argument("user")
@click.pass_obj
def users_delete(obj, user):
    """Delete USER and all their preferences.

    Example:

        clipbt users delete ann
    """
    with obj.open_store() as store:
        removed = store.delete_user(user)
    click.echo(
        f"deleted user {user!r}: {removed['pairs']} pairs, {removed['rankings']} rankings, "
        f"{removed['feedback']} feedback"
    )


@click.command()
@collection_option
@json_option
@click.pass_obj
def info(obj, collection, as_json):
    """Show the collection, its model, counts, index type and device.

    Example:

        clipbt info --json
    """
    with _library(obj) as clip:
        data = clip.info(collection)
    if as_json:
        _print_json(data)
    else:
        width = max(map(len, data))
        for key, value in data.items():
            click.echo(f"{key:<{width}}  {value}")


COMMANDS = (search, prefer, rank, feedback, compare, prefs, users, info)
