"""The service commands of `clipbt`: `users add`, `tokens create|list|revoke`, `serve`."""

import sys

import click

from engine.cli.options import collection_option


@click.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read a password for the web login from stdin (one line).")
@click.pass_obj
def users_add(obj, name, password_stdin):
    """Create the account NAME (its preference user too) for `clipbt serve`.

    Without --password-stdin the account can only use API tokens.

    Example:

        printf '%s\\n' "$PASSWORD" | clipbt users add ann --password-stdin
    """
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.ClickException("--password-stdin read an empty password")
    with obj.open_store() as store:
        store.add_account(name, password)
    click.echo(f"created account {name!r}" + (" with a web password" if password else " (API tokens only)"))


@click.group()
def tokens():
    """Create, list and revoke the API tokens of an account.

    Example:

        clipbt tokens create ann
    """


@tokens.command("create")
@click.argument("name")
@click.pass_obj
def tokens_create(obj, name):
    """Print a new API token of account NAME: one line, shown this once (only its hash is kept).

    Example:

        TOKEN=$(clipbt tokens create ann)
    """
    with obj.open_store() as store:
        token_id, token = store.create_token(name)
    click.echo(token)
    click.echo(
        f"token {token_id} of {name!r}: use it as 'Authorization: Bearer TOKEN'; it is not shown again", err=True
    )


@tokens.command("list")
@click.argument("name")
@click.pass_obj
def tokens_list(obj, name):
    """List the ids and creation times of NAME's tokens.

    Example:

        clipbt tokens list ann
    """
    with obj.open_store() as store:
        for token in store.tokens(name):
            click.echo(f"{token['id']}\t{token['created']}")


@tokens.command("revoke")
@click.argument("name")
@click.option("--id", "token_id", type=int, help="Revoke only this token (see `tokens list`); default: all.")
@click.pass_obj
def tokens_revoke(obj, name, token_id):
    """Revoke NAME's API tokens (all, or one by --id); requests with them get 401 at once.

    Example:

        clipbt tokens revoke ann --id 3
    """
    with obj.open_store() as store:
        removed = store.revoke_tokens(name, token_id)
    click.echo(f"revoked {removed} token{'s' * (removed != 1)} of {name!r}")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@collection_option
@click.option("--https-only", is_flag=True, help="Mark the session cookie Secure (when a TLS proxy stands in front).")
@click.pass_obj
def serve(obj, host, port, collection, https_only):
    """Serve the JSON API (/api/v1, /openapi.json) and the web page (/) over one collection.

    One process, one shared engine: concurrent searches are micro-batched. Create accounts with
    `clipbt users add` first.

    Example:

        clipbt serve --port 8000 --collection default
    """
    try:
        import uvicorn

        from engine.serve import ServeConfig, create_app
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"`clipbt serve` needs {exc.name}: pip install 'clipbt[serve]'") from None
    app = create_app(ServeConfig(home=obj.home, db=obj.db, collection=collection, https_only=https_only))
    click.echo(f"clipbt serving collection {collection!r} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


COMMANDS = (tokens, serve)
