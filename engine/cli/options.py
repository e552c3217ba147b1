"""Options and command classes shared by every `clipbt` command, defined once."""

from collections.abc import Callable

import click

collection_option = click.option("--collection", "-c", default="default", show_default=True, help="Collection name.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
user_option = click.option("--user", "-u", required=True, help="User name (created if new).")
query_option = click.option("--query", "-q", required=True, help="The query text the preference is about.")
model_option = click.option(
    "--model",
    default=None,
    help="open_clip model name (e.g. ViT-L-14), hf-hub:ORG/REPO, local-dir:PATH, or clipbt-tiny (the shipped "
    "offline model, for clipbt's generated world only) [default: ViT-B-32 laion2b_s34b_b79k for index, "
    "clipbt-tiny elsewhere].",
)
pretrained_option = click.option(
    "--pretrained",
    default=None,
    help="open_clip tag (e.g. openai), a checkpoint file, or 'random' (untrained, for benchmarks).",
)


class DeferredOptions(click.Command):
    """A command whose last options `deferred()` builds when it first parses arguments or shows help,
    so that importing it (as `clipbt --help` does) skips the torch modules their defaults come from."""

    def __init__(self, *args, deferred: Callable[[], list[click.Parameter]], **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._deferred is not None:
            self.params.extend(self._deferred())
            self._deferred = None
        return super().get_params(ctx)
