"""Preferences recorded by image id or path, and moved as portable JSON records (export / import)."""

import json
from collections.abc import Iterable, Iterator, Sequence

from storage import Collection, Store
from storage.errors import ClipbtError, EmptyCollectionError


class PreferenceRecordError(ClipbtError, ValueError):
    """A line of a preferences file is not a valid pair, ranking or feedback record."""


def check_has_collection(store: Store) -> None:
    """EmptyCollectionError unless the store holds a collection (nothing was indexed yet)."""
    if not store.collections():
        raise EmptyCollectionError("no collection yet: add images with `clipbt index PATH`")


def _image_ids(store: Store, collection: str | int | Collection, refs: Iterable[int | str]) -> list[int]:
    """Ids of live images of `collection` named by id or path; UnknownImageError naming the first unknown ref."""
    return [store.find_image(collection, ref).id for ref in refs]


def record_pair(store: Store, collection: str | int | Collection, user: str, query: str,
                preferred: int | str, rejected: int | str) -> int:
    """Record that `user` preferred one image over another for `query` (user created if new); returns its id."""
    preferred_id, rejected_id = _image_ids(store, collection, [preferred, rejected])
    return store.add_pair(user, query, preferred_id, rejected_id)


def record_ranking(store: Store, collection: str | int | Collection, user: str, query: str,
                   images: Sequence[int | str]) -> int:
    """Record `user`'s full ranking of images for `query`, best first; returns its id."""
    return store.add_ranking(user, query, _image_ids(store, collection, images))


def record_feedback(store: Store, collection: str | int | Collection, user: str, query: str,
                    good: Sequence[int | str], bad: Sequence[int | str]) -> int:
    """Record thumbs up (`good`) and down (`bad`) for `query`, every good over every bad; returns its id."""
    return store.add_feedback(user, query, _image_ids(store, collection, good), _image_ids(store, collection, bad))


def export_preferences(store: Store, user: str | None = None, collection: str | None = None) -> Iterator[dict]:
    """Every stored preference of `user` (or of every user) in `collection` (or in all), oldest first per user, as records:

    {"kind": "pair", "user", "collection", "query", "preferred", "rejected", "weight", "source", "created"}
    {"kind": "ranking", ..., "images": [best first]}   {"kind": "feedback", ..., "good": [...], "bad": [...]}

    Images are named by path (uri), so a file moves between stores that indexed the same files.
    Pairs implied by rankings and feedback are not repeated.
    """
    names = {c.id: c.name for c in store.collections()}
    only = None if collection is None else store.collection(collection).id
    uris: dict[int, dict[int, str]] = {}

    def uri(collection_id: int, image_id: int) -> str:
        if collection_id not in uris:
            uris[collection_id] = {i.id: i.uri for i in store.images(collection_id, include_deleted=True)}
        return uris[collection_id][image_id]

    for name in [user] if user is not None else store.users():
        records = []
        for p in store.pairs(name):
            if p.id is not None:
                records.append((p.created, {
                    "kind": "pair", "user": name, "collection": names[p.collection_id], "query": p.query,
                    "preferred": uri(p.collection_id, p.preferred_id), "rejected": uri(p.collection_id, p.rejected_id),
                    "weight": p.weight, "source": p.source, "created": p.created.isoformat()}))
        for r in store.rankings(name):
            records.append((r.created, {
                "kind": "ranking", "user": name, "collection": names[r.collection_id], "query": r.query,
                "images": [uri(r.collection_id, i) for i in r.image_ids], "source": r.source,
                "created": r.created.isoformat()}))
        for f in store.feedback(name):
            records.append((f.created, {
                "kind": "feedback", "user": name, "collection": names[f.collection_id], "query": f.query,
                "good": [uri(f.collection_id, i) for i in f.good_ids], "bad": [uri(f.collection_id, i) for i in f.bad_ids],
                "source": f.source, "created": f.created.isoformat()}))
        records = [r for r in records if only is None or r[1]["collection"] == names[only]]
        yield from (record for _, record in sorted(records, key=lambda r: r[0]))


def import_preferences(store: Store, lines: Iterable[str], collection: str | None = None) -> dict[str, int]:
    """Add the records of `export_preferences` (one JSON object per line; blank lines skipped),
    resolving image paths in the named collection, or in `collection` when given (a copy of the
    preferences for another collection of the same files). Returns how many of each kind were read.
    Stored anew: `created` becomes the import time; a record equal to the user's last one is
    not duplicated (see `Store.add_pair`)."""
    counts = {"pair": 0, "ranking": 0, "feedback": 0}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind, user, query = record["kind"], record["user"], record["query"]
            target = store.collection(record["collection"] if collection is None else collection)
            source = record.get("source", kind)

            if kind == "pair":
                preferred, rejected = _image_ids(store, target, [record["preferred"], record["rejected"]])
                store.add_pair(user, query, preferred, rejected, record.get("weight", 1.0), source)
            elif kind == "ranking":
                store.add_ranking(user, query, _image_ids(store, target, record["images"]), source)
            elif kind == "feedback":
                good, bad = _image_ids(store, target, record["good"]), _image_ids(store, target, record["bad"])
                store.add_feedback(user, query, good, bad, source)
            else:
                raise PreferenceRecordError(f"line {number}: unknown kind {kind!r} (pair, ranking or feedback)")
        except json.JSONDecodeError as exc:
            raise PreferenceRecordError(f"line {number} is not JSON: {exc.msg}") from None
        except (KeyError, TypeError) as exc:
            raise PreferenceRecordError(f"line {number} lacks field {exc} of a {line.strip()[:80]!r} record") from None
        except ClipbtError as exc:
            if isinstance(exc, PreferenceRecordError):
                raise
            raise type(exc)(f"line {number}: {exc}") from None
        counts[kind] += 1
    return counts
