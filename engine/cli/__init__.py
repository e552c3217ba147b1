"""The `clipbt` command line: each command is a thin click wrapper over a library call.

Library code raises ClipbtError subclasses; they are turned into `Error: ...` (exit 1) here, once.
"""

from dataclasses import dataclass
from pathlib import Path

import click

from engine.demo import DemoConfig, run_demo
from storage.errors import ClipbtError
from storage.home import ENV_VAR, data_home

DB_ENV_VAR = "CLIPBT_DATABASE_URL"


@dataclass
class CliContext:
    """What every command receives through `@click.pass_obj`."""

    home: Path  # the data home ($CLIPBT_HOME or --home): the SQLite file by default, and the index files
    db: str | None = None  # SQLAlchemy URL of the store ($CLIPBT_DATABASE_URL or --db); None: SQLite in `home`

    def open_store(self):
        """The Store every command uses (a context manager): `db`, or the SQLite file in the data home."""
        from storage import Store, StoreConfig

        return Store.open(self.db, home=self.home, config=StoreConfig(index_dir=self.home / "indexes"))


class _TranslatingGroup(click.Group):
    """A group that prints library errors as `Error: ...` instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClipbtError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_TranslatingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    envvar=ENV_VAR,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Data home (default: ${ENV_VAR}, else ~/.local/share/clipbt).",
)
@click.option(
    "--db",
    envvar=DB_ENV_VAR,
    metavar="URL",
    help=f"Database URL (default: ${DB_ENV_VAR}, else SQLite in the data home), e.g. "
    "postgresql://user@host/clipbt or sqlite:////path/clipbt.db. Index files stay in the data home.",
)
@click.version_option(package_name="clipbt")
@click.pass_context
def main(ctx: click.Context, home: Path | None, db: str | None) -> None:
    """clipbt: personalized CLIP image search with Bradley-Terry preference adaptation.

    Example:

        clipbt demo
    """
    ctx.obj = CliContext(home=data_home(home), db=db or None)


@main.command()
@click.option(
    "--images",
    type=click.IntRange(min=20),
    default=DemoConfig.images,
    show_default=True,
    help="How many world images to generate and index.",
)
@click.option("--query", default=DemoConfig.query, show_default=True, help="The query searched before and after.")
@click.option(
    "--questions",
    type=click.IntRange(min=1),
    default=DemoConfig.questions,
    show_default=True,
    help="Pairwise questions the simulated user answers.",
)
@click.pass_obj
def demo(obj: CliContext, images: int, query: str, questions: int) -> None:
    """Show clipbt end to end on a generated collection with the shipped model.

    Generates world images under the data home, indexes them, searches, lets a simulated user
    with a hidden taste answer pairwise questions, searches again and prints both result lists
    with a contact sheet PNG.

    Example:

        clipbt demo --images 2000 --query "a red circle"
    """
    run_demo(obj.home, DemoConfig(images=images, query=query, questions=questions), echo=click.echo, db=obj.db)


from engine.cli.bench import bench  # noqa: E402

main.add_command(bench)

from engine.cli.index import export_embeddings_command, import_embeddings_command, index_command  # noqa: E402

for _command in (index_command, import_embeddings_command, export_embeddings_command):
    main.add_command(_command)

from engine.cli.query import COMMANDS as _QUERY_COMMANDS  # noqa: E402

for _command in _QUERY_COMMANDS:
    main.add_command(_command)

from engine.cli.collections import collections  # noqa: E402

main.add_command(collections)

from engine.cli.serve import COMMANDS as _SERVE_COMMANDS  # noqa: E402
from engine.cli.serve import users_add  # noqa: E402

for _command in _SERVE_COMMANDS:
    main.add_command(_command)
main.commands["users"].add_command(users_add)
