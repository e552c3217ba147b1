"""Preferences recorded by image id or path, and moved as portable JSON records (export / import)."""

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

from storage import Collection, PreferenceRecord, Store
from storage.errors import ClipbtError, EmptyCollectionError, InvalidPreferenceError
from storage.limits import LIMITS, check_preference_size, check_query_text, check_text, normalize_user


class PreferenceRecordError(ClipbtError, ValueError):
    """A line of a preferences file is not a valid pair, ranking or feedback record."""


def check_has_collection(store: Store) -> None:
    """EmptyCollectionError unless the store holds a collection (nothing was indexed yet)."""
    if not store.collections():
        raise EmptyCollectionError("no collection yet: add images with `clipbt index PATH`")


def _image_ids(store: Store, collection: str | int | Collection, refs: Iterable[int | str]) -> list[int]:
    """Ids of live images of `collection` named by id or path; UnknownImageError naming the first unknown ref."""
    return [store.find_image(collection, ref).id for ref in refs]


def record_pair(
    store: Store, collection: str | int | Collection, user: str, query: str, preferred: int | str, rejected: int | str
) -> int:
    """Record that `user` preferred one image over another for `query` (user created if new); returns its id."""
    preferred_id, rejected_id = _image_ids(store, collection, [preferred, rejected])
    return store.add_pair(user, query, preferred_id, rejected_id)


def record_ranking(
    store: Store, collection: str | int | Collection, user: str, query: str, images: Sequence[int | str]
) -> int:
    """Record `user`'s full ranking of images for `query`, best first; returns its id."""
    check_preference_size("ranking", len(images))
    return store.add_ranking(user, query, _image_ids(store, collection, images))


def record_feedback(
    store: Store,
    collection: str | int | Collection,
    user: str,
    query: str,
    good: Sequence[int | str],
    bad: Sequence[int | str],
) -> int:
    """Record thumbs up (`good`) and down (`bad`) for `query`, every good over every bad; returns its id."""
    check_preference_size("feedback", len(good), len(bad))
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
                records.append(
                    (
                        p.created,
                        {
                            "kind": "pair",
                            "user": name,
                            "collection": names[p.collection_id],
                            "query": p.query,
                            "preferred": uri(p.collection_id, p.preferred_id),
                            "rejected": uri(p.collection_id, p.rejected_id),
                            "weight": p.weight,
                            "source": p.source,
                            "created": p.created.isoformat(),
                        },
                    )
                )
        for r in store.rankings(name):
            records.append(
                (
                    r.created,
                    {
                        "kind": "ranking",
                        "user": name,
                        "collection": names[r.collection_id],
                        "query": r.query,
                        "images": [uri(r.collection_id, i) for i in r.image_ids],
                        "source": r.source,
                        "created": r.created.isoformat(),
                    },
                )
            )
        for f in store.feedback(name):
            records.append(
                (
                    f.created,
                    {
                        "kind": "feedback",
                        "user": name,
                        "collection": names[f.collection_id],
                        "query": f.query,
                        "good": [uri(f.collection_id, i) for i in f.good_ids],
                        "bad": [uri(f.collection_id, i) for i in f.bad_ids],
                        "source": f.source,
                        "created": f.created.isoformat(),
                    },
                )
            )
        records = [r for r in records if only is None or r[1]["collection"] == names[only]]
        yield from (record for _, record in sorted(records, key=lambda r: r[0]))


def import_preferences(
    store: Store, lines: Iterable[str | bytes], collection: str | None = None
) -> dict[str, dict[str, int]]:
    """Add the records of `export_preferences` (one JSON object per line, UTF-8; blank lines
    skipped), all or nothing.

    Every line is checked first (text, JSON object, field types, user name, query, images resolved
    in the named collection); if any is bad, PreferenceRecordError lists every bad line with its
    number and reason and nothing is stored. Then all records are stored in one transaction. A
    record already in the store (see `Store.import_preferences`) is counted as present, not stored
    again: re-importing a file is a no-op. `created` is kept when the record has it. With
    `collection`, every record goes to that collection, its images matched by path (a copy of the
    preferences for another collection of the same files).
    Returns {"new": {kind: n}, "present": {kind: n}}.
    """
    records, problems = [], []
    collections: dict = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = _parse_record(store, collections, line, collection)
        except ClipbtError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if record is not None:
            records.append(record)
    if problems:
        raise PreferenceRecordError(
            f"nothing imported: {len(problems)} bad line{'s' if len(problems) > 1 else ''}\n" + "\n".join(problems)
        )
    return store.import_preferences(records)


_FIELDS = {"pair": ("preferred", "rejected"), "ranking": ("images",), "feedback": ("good", "bad")}


def _parse_record(
    store: Store, collections: dict, line: str | bytes, target: str | None = None
) -> PreferenceRecord | None:
    """One line as a PreferenceRecord (None for a blank line); PreferenceRecordError or another
    ClipbtError saying what is wrong with it."""
    if isinstance(line, bytes):
        if len(line) > LIMITS.import_max_line_bytes:
            raise PreferenceRecordError(f"is {len(line)} bytes long; the maximum is {LIMITS.import_max_line_bytes}")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PreferenceRecordError(f"is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not line.strip():
        return None
    if len(line) > LIMITS.import_max_line_bytes:
        raise PreferenceRecordError(f"is {len(line)} characters long; the maximum is {LIMITS.import_max_line_bytes}")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PreferenceRecordError(f"is not JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise PreferenceRecordError(f"is JSON but not an object: {type(data).__name__} {line.strip()[:40]!r}")
    kind = data.get("kind")
    if kind not in _FIELDS:
        raise PreferenceRecordError(f"unknown kind {kind!r} (pair, ranking or feedback)")
    for name in ("user", "collection", "query", *_FIELDS[kind]):
        if name not in data:
            raise PreferenceRecordError(f"a {kind} record needs the field {name!r}")
    for name in ("user", "collection", "query", "source", "created"):
        if name in data and not isinstance(data[name], str):
            raise PreferenceRecordError(f"field {name!r} must be a string, got {_json_type(data[name])}")
    weight = data.get("weight", 1.0)
    if kind != "pair" and "weight" in data:
        raise PreferenceRecordError(f"field 'weight' belongs to pair records, not {kind}")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise PreferenceRecordError(f"field 'weight' must be a number, got {_json_type(weight)}")
    refs = {}
    for name in _FIELDS[kind]:
        value = data[name]
        single = kind == "pair"
        if single:
            value = [value]
        elif not isinstance(value, list):
            raise PreferenceRecordError(f"field {name!r} must be a list of image ids or paths, got {_json_type(value)}")
        for ref in value:
            if isinstance(ref, bool) or not isinstance(ref, int | str):
                what = "an image id or path" if single else "a list of image ids or paths"
                raise PreferenceRecordError(
                    f"field {name!r} must be {what}, got {_json_type(ref)} {json.dumps(ref)[:40]}"
                )
            if isinstance(ref, str):
                check_text(ref, f"field {name!r}")
        refs[name] = value
    created = None
    if "created" in data:
        try:
            created = datetime.fromisoformat(check_text(data["created"], "field 'created'"))
        except ValueError:
            raise PreferenceRecordError(f"field 'created' is not an ISO 8601 time: {data['created'][:40]!r}") from None
        created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    user = normalize_user(data["user"])
    query = check_query_text(data["query"])
    source = data.get("source", kind)
    check_text(source, "field 'source'")
    name = target if target is not None else check_text(data["collection"], "field 'collection'")
    if name not in collections:
        collections[name] = store.collection(name)
    collection = collections[name]
    ids = {field: _image_ids(store, collection, value) for field, value in refs.items()}
    if kind == "pair":
        items = ((ids["preferred"][0], 0), (ids["rejected"][0], 1))
    elif kind == "ranking":
        items = tuple((i, position) for position, i in enumerate(ids["images"]))
    else:
        items = tuple([(i, 0) for i in ids["good"]] + [(i, 1) for i in ids["bad"]])
    _check_items(kind, items)
    return PreferenceRecord(kind, user, collection.id, query, items, source, float(weight), created)


def _check_items(kind: str, items: tuple[tuple[int, int], ...]) -> None:
    """The checks `Store.add_pair`, `add_ranking` and `add_feedback` make, on resolved ids."""
    ids = [i for i, _ in items]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InvalidPreferenceError(f"images {repeated} appear more than once in the {kind}")
    if kind == "ranking" and len(ids) < 2:
        raise InvalidPreferenceError(f"a ranking needs at least 2 images, got {ids}")
    if kind == "feedback" and not ids:
        raise InvalidPreferenceError("feedback needs at least one good or bad image, got none")
    if kind == "feedback":
        check_preference_size(kind, sum(tier == 0 for _, tier in items), sum(tier == 1 for _, tier in items))
    else:
        check_preference_size(kind, len(ids))


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
