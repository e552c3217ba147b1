"""`clipbt demo`: a generated collection, the shipped model, one simulated user's answers, results before and after."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from indexer.world import FEATURE_NAMES, LABELS_FILE, Attributes, SimulatedUser, read_collection, write_collection
from storage import Store, StoreConfig

if TYPE_CHECKING:
    from engine.search import Hit

DEMO_COLLECTION = "demo"
DEMO_USER = "demo-user"
# The demo user's hidden taste: outlined shapes over filled ones, sharp images over blurred ones.
DEMO_TASTE = {"filled": -3.0, "degraded=blur": -2.0, "degraded=noise": -1.0}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults are the README's run."""

    images: int = 2000  # world images generated and indexed
    query: str = "a red circle"
    questions: int = 20  # pairwise questions the simulated user answers
    candidates: int = 40  # the questions pair up images from the plain search's top candidates
    k: int = 10  # results shown before and after
    seed: int = 0


@dataclass
class DemoResult:
    """What the demo showed: the two result lists and how many of each match the taste."""

    before: list[Hit]
    after: list[Hit]
    share_before: float  # share of `before` that matches the taste (outlined shapes)
    share_after: float
    answers: int  # pairs the user answered and stored
    contact_sheet: Path


def demo_user() -> SimulatedUser:
    """The simulated user of the demo, with the DEMO_TASTE utility."""
    weights = np.zeros(len(FEATURE_NAMES))
    for name, weight in DEMO_TASTE.items():
        weights[FEATURE_NAMES.index(name)] = weight
    return SimulatedUser(weights=weights, name=DEMO_USER)


def matches_taste(attrs: Attributes) -> bool:
    """The visible part of the taste: the shape is outlined, not filled."""
    return not attrs.filled


def run_demo(
    home: Path,
    config: DemoConfig = DemoConfig(),
    echo: Callable[[str], None] = print,
    progress: bool = True,
    db: str | None = None,
) -> DemoResult:
    """Generate, index, search, collect `config.questions` answers from the demo user, search again.
    db: the store's URL (default: SQLite in `home`); images and index files stay under `home`."""
    folder = home / DEMO_COLLECTION / "images"
    labels = folder / LABELS_FILE
    if not labels.is_file() or len(labels.read_text().splitlines()) != config.images:
        echo(f"Generating {config.images} world images in {folder} (seed {config.seed}) ...")
        write_collection(folder, config.images, seed=config.seed)
    truth = {os.path.abspath(path): attrs for path, attrs in read_collection(folder)}

    from engine.search import Engine  # the engine and the indexer pull in torch and open_clip
    from indexer.pipeline import index_paths

    with Store.open(db, home=home, config=StoreConfig(index_dir=home / "indexes")) as store:
        _drop_if_stale(store, echo)
        echo("Indexing with the default model ...")
        report = index_paths(store, [folder], collection=DEMO_COLLECTION, progress=progress)
        echo(f"  indexed {report.indexed}, unchanged {report.unchanged}, skipped {len(report.skipped)}")
        engine = Engine.open(store, DEMO_COLLECTION)
        if DEMO_USER in store.users():
            store.delete_user(DEMO_USER)  # every run starts from a user with no answers

        plain = engine.search(config.query, k=max(config.candidates, config.k))
        before = plain[: config.k]
        user = demo_user()
        rng = np.random.default_rng(config.seed)
        asked = _duels(engine, store, plain, config, lambda a, b: user.prefers(truth[a.path], truth[b.path], rng), rng)
        after = engine.search(config.query, user=DEMO_USER, k=config.k)

    def share(hits: list[Hit]) -> float:
        return sum(matches_taste(truth[h.path]) for h in hits) / len(hits)

    result = DemoResult(
        before, after, share(before), share(after), len(asked), home / DEMO_COLLECTION / "contact_sheet.png"
    )
    echo(f'\nSearch "{config.query}" before any preference:')
    echo(_table(before, truth))
    echo(f"\n{DEMO_USER} (hidden taste: {user.describe()}) answered {len(asked)} pairwise questions.")
    echo(f'\nSearch "{config.query}" for {DEMO_USER} after adaptation:')
    echo(_table(after, truth))
    echo(
        f"\nShare of the top {config.k} matching the taste (outlined shapes): "
        f"before {result.share_before:.0%}, after {result.share_after:.0%}"
    )
    contact_sheet(
        before,
        after,
        truth,
        result.contact_sheet,
        title=(
            f'"{config.query}": top {config.k} before and after {DEMO_USER} answered {len(asked)} questions',
            f"{DEMO_USER}'s hidden taste: outlined shapes over filled ones, sharp images over "
            f"blurred or noisy ones ({user.describe()})",
        ),
    )
    echo(f"Contact sheet: {result.contact_sheet}")
    echo(f'Next: {clipbt_command(home, db)} search "a blue star" --collection {DEMO_COLLECTION} --user {DEMO_USER}')
    return result


def _drop_if_stale(store: Store, echo: Callable[[str], None]) -> None:
    """Remove the demo's own collection when it was indexed by other weights than the shipped model's (an
    earlier clipbt's), so that the demo re-indexes it instead of refusing to mix the two models."""
    from indexer.encoder import model_identity

    existing = store.find_collection(DEMO_COLLECTION)
    model, pretrained = model_identity(None, None)
    if existing is not None and (existing.model, existing.pretrained) != (model, pretrained):
        echo(f"The shipped model changed since collection {DEMO_COLLECTION!r} was indexed; indexing it again.")
        store.delete_collection(DEMO_COLLECTION)


def clipbt_command(home: Path, db: str | None = None) -> str:
    """How to run `clipbt` again from this shell: its name if it is on PATH, else the path of the one
    beside this Python (the virtual environment's); with --home / --db when they differ from the defaults."""
    import shlex
    import shutil
    import sys

    from storage.home import data_home

    beside = Path(sys.executable).parent / "clipbt"
    on_path = shutil.which("clipbt")
    if on_path and (not beside.exists() or Path(on_path).resolve() == beside.resolve()):
        command = "clipbt"
    elif beside.exists():
        command = os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") else str(beside)
    else:
        command = f"{shlex.quote(sys.executable)} -m engine.cli"
    if Path(home).resolve() != data_home().resolve():
        command += f" --home {shlex.quote(str(home))}"
    if db and db != os.environ.get("CLIPBT_DATABASE_URL"):
        import sqlalchemy as sa

        command += f" --db {shlex.quote(sa.make_url(db).render_as_string(hide_password=True))}"
    return command


def _duels(engine, store, plain: list[Hit], config: DemoConfig, prefers, rng: np.random.Generator) -> list[tuple]:
    """Ask `config.questions` duels among the plain search's candidates, one at a time, each chosen by
    engine.duels.choose_duel from the answers so far; store every answer. Returns the asked id pairs."""
    from engine.duels import choose_duel

    by_id = {h.id: h for h in plain}
    ids = [h.id for h in plain]
    stored_ids, vectors = store.embeddings(engine.collection.id, ids)
    embeddings = vectors[np.searchsorted(stored_ids, ids)]
    query = engine.encode([config.query])[0]
    asked, preferred, rejected = [], [], []
    for _ in range(min(config.questions, len(ids) * (len(ids) - 1) // 2)):
        a, b = choose_duel(
            ids,
            embeddings,
            query,
            np.array(preferred) if preferred else None,
            np.array(rejected) if rejected else None,
            asked,
            rng=rng,
        )
        asked.append((a, b))
        win, lose = (a, b) if prefers(by_id[a], by_id[b]) else (b, a)
        engine.prefer(DEMO_USER, config.query, win, lose)
        preferred.append(embeddings[ids.index(win)])
        rejected.append(embeddings[ids.index(lose)])
    return asked


def _describe(attrs: Attributes) -> str:
    fill = "filled" if attrs.filled else "outlined"
    return f"{attrs.size} {fill} {attrs.colour} {attrs.shape} x{attrs.count}, {attrs.quality}"


def _table(hits: list[Hit], truth: dict[str, Attributes]) -> str:
    lines = [f"{'rank':>4}  {'id':>5}  {'score':>7}  taste  {'file':<24}  attributes"]
    for h in hits:
        attrs = truth[h.path]
        mark = "  yes" if matches_taste(attrs) else "   no"
        lines.append(f"{h.rank:>4}  {h.id:>5}  {h.score:7.3f}  {mark}  {Path(h.path).name:<24}  {_describe(attrs)}")
    return "\n".join(lines)


def taste_frame(attrs: Attributes) -> str:
    """The frame colour of an image for the demo user's whole taste: green outlined and sharp (all of
    it), orange outlined but blurred or noisy (part of it), red filled (the strongest dislike)."""
    if attrs.filled:
        return "red"
    return "orange" if attrs.quality in ("blur", "noise") else "green"


_LEGEND = (
    ("green", "outlined and sharp: the whole taste"),
    ("orange", "outlined but blurred or noisy: part of it"),
    ("red", "filled: disliked"),
)


def contact_sheet(
    before: list[Hit],
    after: list[Hit],
    truth: dict[str, Attributes],
    out: Path,
    thumb: int = 96,
    title: Sequence[str] = (),
) -> Path:
    """A PNG that reads on its own: `title` lines, the `before` results on the top row and `after`
    below (labelled), each framed by `taste_frame`, and a legend of the frames."""
    from PIL import ImageFont

    font = ImageFont.load_default(14)
    label_width, pad, line = 70, 6, 20
    columns = max(len(before), len(after))
    width = max(label_width + columns * (thumb + pad) + pad, 760)
    top_rows = pad + line * len(title) + (pad if title else 0)
    legend_top = top_rows + 2 * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, legend_top + line + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(title):
        draw.text((pad, pad + i * line), text, fill="black", font=font)
    for row, (name, hits) in enumerate((("before", before), ("after", after))):
        top = top_rows + row * (thumb + pad)
        draw.text((pad, top + thumb // 2 - 8), name, fill="black", font=font)
        for col, hit in enumerate(hits):
            left = label_width + pad + col * (thumb + pad)
            with Image.open(hit.path) as img:
                sheet.paste(img.convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST), (left, top))
            colour = taste_frame(truth[hit.path])
            draw.rectangle((left - 2, top - 2, left + thumb + 1, top + thumb + 1), outline=colour, width=3)
    left = pad
    for colour, text in _LEGEND:
        draw.rectangle((left, legend_top + 3, left + 12, legend_top + 15), outline=colour, width=3)
        draw.text((left + 18, legend_top), text, fill="black", font=font)
        left += 24 + int(draw.textlength(text, font=font))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
