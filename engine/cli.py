"""The `clipbt` command line: each command is a thin click wrapper over a library call.

Library code raises ClipbtError subclasses; they are turned into `Error: ...` (exit 1) here, once.
"""

from dataclasses import dataclass
from pathlib import Path

import click

from storage.errors import ClipbtError
from storage.home import ENV_VAR, data_home


@dataclass
class CliContext:
    """What every command receives through `@click.pass_obj`."""

    home: Path  # the data home ($CLIPBT_HOME or --home)


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
@click.version_option(package_name="clipbt")
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """clipbt: personalized CLIP image search with Bradley-Terry preference adaptation.

    Example:

        clipbt demo
    """
    ctx.obj = CliContext(home=data_home(home))
