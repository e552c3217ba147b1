"""The query and preference commands of `clipbt`: search, prefer, rank, feedback, compare, prefs, users, info."""

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

from engine.preferences import (
    check_has_collection,
    collection_info,
    export_preferences,
    import_preferences,
    record_feedback,
    record_pair,
    record_ranking,
)
from engine.cli.options import DeferredOptions, collection_option, json_option, query_option, user_option
from storage import Store

@contextmanager
def _store(obj):
    with Store.open(home=obj.home) as store:
        yield store


@contextmanager
def _indexed_store(obj):
    """The store once it holds a collection (`check_has_collection`, as in `Engine.open`)."""
    with _store(obj) as store:
        check_has_collection(store)
        yield store


@contextmanager
def _engine(obj, collection: str, config=None):
    from engine.search import Engine, SearchConfig

    with _store(obj) as store:
        yield Engine.open(store, collection, config or SearchConfig())


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _adaptation_options() -> list[click.Parameter]:
    from engine.search import SCOPES, SearchConfig

    default = SearchConfig()
    return [
        click.Option(["--method"], type=click.Choice(["map", "bt"]),
                     help=f"map: posterior mode under a prior on the query; bt: the paper's steps (default {default.method})."),
        click.Option(["--lr"], type=float, help=f"BT step size of --method bt (default {default.adapt.lr})."),
        click.Option(["--steps"], type=int, help=f"BT gradient steps of --method bt (default {default.adapt.steps})."),
        click.Option(["--beta"], type=float, help=f"BT inverse temperature (default {default.beta})."),
        click.Option(["--scope"], type=click.Choice(SCOPES),
                     help=f"Which of the user's pairs count (default {default.scope})."),
    ]


@click.command(cls=DeferredOptions, deferred=_adaptation_options)
@click.argument("text", required=False)
@click.option("--user", "-u", help="Personalise with this user's preferences.")
@click.option("-k", "k", default=10, show_default=True, help="How many images to return.")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Search with this query embedding (.npy, shape (dim,)) instead of encoding TEXT.")
@click.option("--no-adapt", is_flag=True, help="Ignore the user's preferences: the plain query.")
@collection_option
@json_option
@click.pass_obj
def search(obj, text, user, k, vector, no_adapt, method, lr, steps, beta, scope, collection, as_json):
    """Find the K images that best match TEXT, personalised for --user.

    Example:

        clipbt search "a red circle" --user ann -k 5
    """
    from engine.search import SearchConfig, SearchRequest

    default = SearchConfig()
    method = method or ("bt" if lr is not None or steps is not None else default.method)
    changes = {name: value for name, value in (("lr", lr), ("steps", steps), ("beta", beta)) if value is not None}
    config = SearchConfig(method=method, scope=scope or default.scope,
                          adapt=dataclasses.replace(default.adapt, **changes) if method == "bt" else default.adapt,
                          map=dataclasses.replace(default.map, beta=beta) if method == "map" and beta else default.map)
    query_vector = None
    if vector is not None:
        try:
            query_vector = np.load(vector, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot read query vector {str(vector)!r}: {exc}") from None
    with _engine(obj, collection, config) as engine:
        hits = engine.search_many([SearchRequest(text, None if no_adapt else user, k, query_vector)])[0]
    if as_json:
        _print_json([hit.to_dict() for hit in hits])
        return
    for hit in hits:
        click.echo(f"{hit.rank:>3}  {hit.id:>6}  {hit.score:8.4f}  {hit.path}")


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
    with _indexed_store(obj) as store:
        record_pair(store, collection, user, query, preferred, rejected)
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
    with _indexed_store(obj) as store:
        record_ranking(store, collection, user, query, images)
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
    with _indexed_store(obj) as store:
        record_feedback(store, collection, user, query, groups["--good"], groups["--bad"])
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
    with _engine(obj, collection) as engine:
        p = engine.compare(user, query, a, b)
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
    with _store(obj) as store:
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
@click.option("--output", "-o", type=click.File("w"), default="-", help="File to write (default: stdout).")
@click.pass_obj
def prefs_export(obj, user, output):
    """Write preferences as JSON lines, images named by path.

    Example:

        clipbt prefs export --user ann -o ann.jsonl
    """
    with _store(obj) as store:
        for record in export_preferences(store, user):
            output.write(json.dumps(record) + "\n")


@prefs.command("import")
@click.argument("file", type=click.File("r"))
@json_option
@click.pass_obj
def prefs_import(obj, file, as_json):
    """Read preferences from JSON lines written by `prefs export` (- for stdin).

    Example:

        clipbt prefs import ann.jsonl
    """
    with _store(obj) as store:
        counts = import_preferences(store, file)
    if as_json:
        _print_json(counts)
    else:
        click.echo(", ".join(f"{n} {kind}" for kind, n in counts.items()) + " imported")


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
    with _store(ctx.obj) as store:
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
    with _store(obj) as store:
        removed = store.delete_user(user)
    click.echo(f"deleted user {user!r}: {removed['pairs']} pairs, {removed['rankings']} rankings, "
               f"{removed['feedback']} feedback")


@click.command()
@collection_option
@json_option
@click.pass_obj
def info(obj, collection, as_json):
    """Show the collection, its model, counts, index type and device.

    Example:

        clipbt info --json
    """
    with _indexed_store(obj) as store:
        data = collection_info(store, collection)
    if as_json:
        _print_json(data)
    else:
        width = max(map(len, data))
        for key, value in data.items():
            click.echo(f"{key:<{width}}  {value}")


COMMANDS = (search, prefer, rank, feedback, compare, prefs, users, info)
