"""`clipbt bench`: benchmark commands, thin wrappers over engine.bench.protocol."""

import json
import shlex

import click

from engine.cli.options import DeferredOptions


def _sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers like 0,1,5, got {value!r}") from None
    if any(n < 0 for n in sizes):
        raise click.BadParameter(f"sizes must be >= 0, got {value!r}")
    return sizes


@click.group()
def bench() -> None:
    """Benchmarks that measure clipbt on public or simulated data.

    Example:

        clipbt bench preference world --per-user
    """


def _format_option() -> list[click.Parameter]:
    from engine.bench.datasets import FORMATS

    return [
        click.Option(
            ["--format", "fmt"],
            type=click.Choice(FORMATS),
            help="Layout of DATASET (default: detected from its suffix and contents).",
        )
    ]


@bench.command(cls=DeferredOptions, deferred=_format_option)
@click.argument("dataset")
@click.option(
    "--sizes",
    default="0,1,2,5,10,20,50",
    show_default=True,
    callback=_sizes,
    help="Training-set sizes N, comma-separated.",
)
@click.option("--repeats", default=10, show_default=True, help="Random training sets per N and split.")
@click.option(
    "--splits",
    default=3,
    show_default=True,
    help="Evaluation/tuning/pool splits, each seeded apart: the spread over splits is reported too.",
)
@click.option(
    "--eval-size",
    default=2000,
    show_default=True,
    help="Evaluation pairs (per user with --per-user), or as many as the split leaves.",
)
@click.option(
    "--query",
    type=click.Choice(["global", "pair"]),
    default="global",
    show_default=True,
    help='Score pairs against "An amazing and high-quality image" (global) or their own prompt (pair).',
)
@click.option(
    "--per-user", is_flag=True, help="Adapt to each user's pairs, evaluate on that user's, average over users."
)
@click.option("--model", default=None, help="open_clip model name (default: the shipped default model).")
@click.option("--pretrained", default=None, help="Weights tag or checkpoint file for --model.")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, the draws and the world.")
@click.option("--methods", default=None, help="Comma-separated methods to run (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the .json, .md and .png results (default: <home>/bench).",
)
@click.pass_obj
def preference(
    obj,
    dataset,
    fmt,
    sizes,
    repeats,
    splits,
    eval_size,
    query,
    per_user,
    model,
    pretrained,
    seed,
    methods,
    as_json,
    out,
):
    """Preference classification (Gallego 2023, section 3.1): accuracy of original, positive, BT and
    baselines at each training size N, on DATASET: a Pick-a-Pic .parquet, an HPD v2 or ImageReward
    test .json, a .jsonl of pairs, an embeddings .npz, or `world` (the default world's simulated users).

    Example:

        clipbt bench preference world --per-user --out benchmarks/results
    """
    from engine.bench import datasets as preference_data
    from engine.bench import protocol as preference_bench

    chosen = {"methods": tuple(methods.split(","))} if methods else {}
    config = preference_bench.BenchConfig(
        sizes=sizes, repeats=repeats, splits=splits, eval_size=eval_size, per_user=per_user, seed=seed, **chosen
    )
    fmt = fmt or preference_data.detect_format(dataset)
    if fmt == "world":
        data = preference_data.load_world(
            obj.home / "bench" / f"world-{seed}", preference_data.WorldBenchConfig(seed=seed)
        )
    else:
        data = preference_data.load(dataset, fmt)
    encoder = None
    if fmt != "npz":
        from indexer.encoder import Encoder

        encoder = Encoder.load(model, pretrained)
    encoded = preference_data.encode(
        data, encoder, query=query, cache=preference_data.EmbeddingCache(obj.home / "cache" / "bench-embeddings")
    )
    result = preference_bench.run(encoded, config, name=data.name)
    result.counts["ties_skipped"] = data.ties_skipped
    result.config.update(
        query=query, model=encoder.model_name if encoder else None, pretrained=encoder.pretrained if encoder else None
    )
    result.command = _command(
        dataset, fmt, sizes, repeats, splits, eval_size, query, per_user, model, pretrained, seed, out
    )
    result.command += f" --methods {methods}" if methods else ""
    stem = "preference_" + ("world" if fmt == "world" else fmt) + ("_per_user" if per_user else "")
    paths = preference_bench.write(result, out or obj.home / "bench", stem)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.table())
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()), err=as_json)


def _command(dataset, fmt, sizes, repeats, splits, eval_size, query, per_user, model, pretrained, seed, out) -> str:
    """The command line that reproduces a run, options spelled out."""
    args = [
        "clipbt",
        "bench",
        "preference",
        dataset,
        "--format",
        fmt,
        "--sizes",
        ",".join(map(str, sizes)),
        "--repeats",
        str(repeats),
        "--splits",
        str(splits),
        "--eval-size",
        str(eval_size),
        "--query",
        query,
        "--seed",
        str(seed),
    ]
    args += ["--per-user"] * per_user + ["--model", model] * bool(model)
    args += ["--pretrained", pretrained] * bool(pretrained)
    args += ["--out", str(out)] * bool(out)
    return shlex.join(args)
