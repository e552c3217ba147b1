"""`clipbt demo`: a generated collection, the shipped model, one simulated user's answers, results before and after."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from indexer.world import FEATURE_NAMES, LABELS_FILE, Attributes, SimulatedUser, read_collection, write_collection
from storage import Store

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


def run_demo(home: Path, config: DemoConfig = DemoConfig(), echo: Callable[[str], None] = print,
             progress: bool = True) -> DemoResult:
    """Generate, index, search, collect `config.questions` answers from the demo user, search again."""
    folder = home / DEMO_COLLECTION / "images"
    labels = folder / LABELS_FILE
    if not labels.is_file() or len(labels.read_text().splitlines()) != config.images:
        echo(f"Generating {config.images} world images in {folder} (seed {config.seed}) ...")
        write_collection(folder, config.images, seed=config.seed)
    truth = {os.path.abspath(path): attrs for path, attrs in read_collection(folder)}

    from engine.search import Engine  # the engine and the indexer pull in torch and open_clip
    from indexer.pipeline import index_paths

    with Store.open(home=home) as store:
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

    result = DemoResult(before, after, share(before), share(after), len(asked),
                        home / DEMO_COLLECTION / "contact_sheet.png")
    echo(f'\nSearch "{config.query}" before any preference:')
    echo(_table(before, truth))
    echo(f"\n{DEMO_USER} (hidden taste: {user.describe()}) answered {len(asked)} pairwise questions.")
    echo(f'\nSearch "{config.query}" for {DEMO_USER} after adaptation:')
    echo(_table(after, truth))
    echo(f"\nShare of the top {config.k} matching the taste (outlined shapes): "
         f"before {result.share_before:.0%}, after {result.share_after:.0%}")
    contact_sheet(before, after, truth, result.contact_sheet)
    echo(f"Contact sheet: {result.contact_sheet}")
    echo(f'Next: clipbt search "a blue star" --collection {DEMO_COLLECTION} --user {DEMO_USER}')
    return result


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
        a, b = choose_duel(ids, embeddings, query, np.array(preferred) if preferred else None,
                           np.array(rejected) if rejected else None, asked, rng=rng)
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


def contact_sheet(before: list[Hit], after: list[Hit], truth: dict[str, Attributes], out: Path,
                  thumb: int = 96) -> Path:
    """A PNG with the `before` results on the top row and `after` below; a green frame marks a taste match."""
    label_width, pad = 70, 6
    columns = max(len(before), len(after))
    sheet = Image.new("RGB", (label_width + columns * (thumb + pad) + pad, 2 * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, hits) in enumerate((("before", before), ("after", after))):
        top = pad + row * (thumb + pad)
        draw.text((pad, top + thumb // 2 - 6), name, fill="black")
        for col, hit in enumerate(hits):
            left = label_width + pad + col * (thumb + pad)
            with Image.open(hit.path) as img:
                sheet.paste(img.convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST), (left, top))
            colour = "green" if matches_taste(truth[hit.path]) else "red"
            draw.rectangle((left - 2, top - 2, left + thumb + 1, top + thumb + 1), outline=colour, width=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
