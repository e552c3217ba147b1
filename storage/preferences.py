"""The users and preferences part of the Store: pairs, rankings, feedback and preference versions."""

import functools
import math
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from storage import _schema as S
from storage._sql import _bump, _chunks, _now, _utc
from storage.collections import _image_id, _one_collection
from storage.errors import (
    InvalidPreferenceError,
    UnknownUserError,
)
from storage.limits import check_preference_size, check_query_text, check_text, normalize_user
from storage.records import (
    Collection,
    Feedback,
    PreferencePair,
    PreferenceRecord,
    Ranking,
)


class PreferencesMixin:
    """Users and their pairs, rankings and feedback, and the preference version of a user."""

    # -- users ---------------------------------------------------------------------------------

    def ensure_user(self, name: str) -> int:
        """The id of user `name`, created if missing."""
        with self._write() as conn:
            return self._user_id(conn, name, create=True)

    def users(self) -> list[str]:
        """Every user name, sorted."""
        with self._read() as conn:
            return list(conn.execute(sa.select(S.users.c.name).order_by(S.users.c.name)).scalars())

    def delete_user(self, name: str) -> dict[str, int]:
        """Remove a user and every trace of them; returns the rows removed per kind."""
        with self._write() as conn:
            # FOR UPDATE waits for a concurrent preference write of this user (which holds the
            # same row lock) to commit, so the counts below include it; a write that comes after
            # the delete creates the user anew (`_user_id`).
            uid = self._user_id(conn, name, create=False, lock=True)
            kinds = dict(
                conn.execute(
                    sa.select(S.rankings.c.kind, sa.func.count())
                    .where(S.rankings.c.user_id == uid)
                    .group_by(S.rankings.c.kind)
                ).all()
            )
            conn.execute(
                S.ranking_items.delete().where(
                    S.ranking_items.c.ranking_id.in_(sa.select(S.rankings.c.id).where(S.rankings.c.user_id == uid))
                )
            )
            conn.execute(S.rankings.delete().where(S.rankings.c.user_id == uid))
            n_pairs = conn.execute(S.pairs.delete().where(S.pairs.c.user_id == uid)).rowcount
            conn.execute(S.users.delete().where(S.users.c.id == uid))
        return {
            "pairs": n_pairs,
            "rankings": kinds.get("ranking", 0),
            "feedback": kinds.get("feedback", 0),
            "users": 1,
        }

    def _user_id(self, conn: sa.Connection, name: str, create: bool, lock: bool = False) -> int:
        """The id of user `name` (normalised: `storage.limits.normalize_user`); with `create`, the
        user is created if missing, also when a concurrent `delete_user` removed them between
        the INSERT and the SELECT (PostgreSQL): a write after a delete recreates the user."""
        name = normalize_user(name)
        # FOR UPDATE (PostgreSQL) serialises one user's preference writes and deletion, so the
        # "same as the last one" duplicate check cannot race; SQLite writers are serial already.
        query = sa.select(S.users.c.id).where(S.users.c.name == name)
        if create or lock:
            query = query.with_for_update()
        for _ in range(3 if create else 1):
            if create:
                dialect = sqlite if self._sqlite else postgresql
                conn.execute(
                    dialect.insert(S.users)
                    .values(name=name, pref_version=0, created=_now())
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            uid = conn.execute(query).scalar()
            if uid is not None:
                return uid
        raise UnknownUserError(f"unknown user {name!r}")

    # -- preferences ---------------------------------------------------------------------------

    def add_pair(
        self,
        user: str,
        query: str,
        preferred_id: int,
        rejected_id: int,
        weight: float = 1.0,
        source: str = "pair",
    ) -> int:
        """Record that `user`, searching `query`, preferred one image over another; returns its id.

        The user is created if new. A pair identical (query, images, weight, source) to that user's
        most recent pair is a duplicate (a resubmit): its id is returned and nothing is stored.
        """
        query, weight, source = _check_query(query), _check_weight(weight), _check_source(source)
        preferred_id, rejected_id = _image_id(preferred_id), _image_id(rejected_id)
        if preferred_id == rejected_id:
            raise InvalidPreferenceError(f"preferred and rejected are the same image {preferred_id}")
        with self._write() as conn:
            uid = self._user_id(conn, user, create=True)
            cid = _one_collection(conn, [preferred_id, rejected_id])
            last = conn.execute(
                sa.select(S.pairs).where(S.pairs.c.user_id == uid).order_by(S.pairs.c.id.desc()).limit(1)
            ).first()
            fields = (cid, query, preferred_id, rejected_id, weight, source)
            if last is not None and fields == (
                last.collection_id,
                last.query,
                last.preferred_id,
                last.rejected_id,
                last.weight,
                last.source,
            ):
                return last.id
            record = PreferenceRecord("pair", user, cid, query, ((preferred_id, 0), (rejected_id, 1)), source, weight)
            pair_id = self._insert_record(conn, uid, record, _now())
            _bump(conn, S.users.c.pref_version, [uid])
        return pair_id

    def add_ranking(self, user: str, query: str, image_ids: Sequence[int], source: str = "ranking") -> int:
        """Record a ranking of two or more images, best first; returns its id.

        Stored as a ranking (for Plackett-Luce); `pairs()` also reports it broken into every
        earlier-over-later pair. Duplicates as for `add_pair`, against the user's last ranking.
        """
        ids = [_image_id(i) for i in image_ids]
        if len(ids) < 2:
            raise InvalidPreferenceError(f"a ranking needs at least 2 images, got {ids}")
        check_preference_size("ranking", len(ids))
        return self._add_tiers(user, query, "ranking", [(i, pos) for pos, i in enumerate(ids)], source)

    def add_feedback(
        self,
        user: str,
        query: str,
        good_ids: Sequence[int],
        bad_ids: Sequence[int],
        source: str = "feedback",
    ) -> int:
        """Record thumbs up (`good_ids`) and down (`bad_ids`) for one query; returns its id.

        Stored as such (see `feedback()`); `pairs()` also reports every good over every bad.
        """
        good = [_image_id(i) for i in good_ids]
        bad = [_image_id(i) for i in bad_ids]
        if not good and not bad:
            raise InvalidPreferenceError("feedback needs at least one good or bad image, got none")
        check_preference_size("feedback", len(good), len(bad))
        both = sorted(set(good) & set(bad))
        if both:
            raise InvalidPreferenceError(f"images {both} are marked both good and bad")
        return self._add_tiers(user, query, "feedback", [(i, 0) for i in good] + [(i, 1) for i in bad], source)

    def _add_tiers(self, user: str, query: str, kind: str, items: list[tuple[int, int]], source: str) -> int:
        query, source = _check_query(query), _check_source(source)
        ids = [i for i, _ in items]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise InvalidPreferenceError(f"images {repeated} appear more than once in the {kind}")
        with self._write() as conn:
            uid = self._user_id(conn, user, create=True)
            cid = _one_collection(conn, ids)
            last = conn.execute(
                sa.select(S.rankings)
                .where(S.rankings.c.user_id == uid, S.rankings.c.kind == kind)
                .order_by(S.rankings.c.id.desc())
                .limit(1)
            ).first()
            if last is not None and (last.collection_id, last.query, last.source) == (
                cid,
                query,
                source,
            ):
                last_items = conn.execute(
                    sa.select(S.ranking_items.c.image_id, S.ranking_items.c.tier)
                    .where(S.ranking_items.c.ranking_id == last.id)
                    .order_by(S.ranking_items.c.position)
                ).all()
                if [tuple(r) for r in last_items] == items:
                    return last.id
            rid = self._insert_record(conn, uid, PreferenceRecord(kind, user, cid, query, tuple(items), source), _now())
            _bump(conn, S.users.c.pref_version, [uid])
        return rid

    def import_preferences(self, records: Sequence[PreferenceRecord]) -> dict[str, dict[str, int]]:
        """Store `records` in ONE transaction: all of them or, on any error, none.

        A record already stored (same user, collection, kind, query, images in order, source,
        weight, and `created` when the record gives it) is counted as present and not stored
        again, so importing the same file twice is a no-op. Returns
        {"new": {kind: n}, "present": {kind: n}}.
        """
        counts = {state: {"pair": 0, "ranking": 0, "feedback": 0} for state in ("new", "present")}
        now = _now()
        with self._write() as conn:
            users: dict[str, int] = {}
            for record in records:
                uid = users.get(record.user)
                if uid is None:
                    uid = users[record.user] = self._user_id(conn, record.user, create=True)
                ids = [i for i, _ in record.items]
                if _one_collection(conn, ids) != record.collection_id:
                    raise InvalidPreferenceError(f"images {ids} are not in collection {record.collection_id}")
                stored = self._stored_record(conn, uid, record)
                counts["present" if stored else "new"][record.kind] += 1
                if not stored:
                    self._insert_record(conn, uid, record, record.created or now)
            changed = {users[r.user] for r in records}
            if counts["new"] and changed:
                _bump(conn, S.users.c.pref_version, sorted(changed))
        return counts

    def _stored_record(self, conn: sa.Connection, uid: int, record: PreferenceRecord) -> bool:
        """Whether `record` (its natural key, see `import_preferences`) is already stored."""
        if record.kind == "pair":
            (preferred, _), (rejected, _) = record.items
            t = S.pairs.c
            rows = conn.execute(
                sa.select(t.created).where(
                    t.user_id == uid,
                    t.collection_id == record.collection_id,
                    t.query == record.query,
                    t.preferred_id == preferred,
                    t.rejected_id == rejected,
                    t.weight == record.weight,
                    t.source == record.source,
                )
            ).scalars()
            return any(record.created is None or _utc(c) == record.created for c in rows)
        t = S.rankings.c
        heads = conn.execute(
            sa.select(t.id, t.created).where(
                t.user_id == uid,
                t.kind == record.kind,
                t.collection_id == record.collection_id,
                t.query == record.query,
                t.source == record.source,
            )
        ).all()
        for head in heads:
            if record.created is not None and _utc(head.created) != record.created:
                continue
            items = conn.execute(
                sa.select(S.ranking_items.c.image_id, S.ranking_items.c.tier)
                .where(S.ranking_items.c.ranking_id == head.id)
                .order_by(S.ranking_items.c.position)
            ).all()
            if tuple(tuple(r) for r in items) == record.items:
                return True
        return False

    def _insert_record(self, conn: sa.Connection, uid: int, record: PreferenceRecord, created) -> int:
        """Insert one pair, ranking or feedback of user `uid`; returns its id (no checks, no version bump)."""
        if record.kind == "pair":
            (preferred, _), (rejected, _) = record.items
            return conn.execute(
                S.pairs.insert()
                .values(
                    user_id=uid,
                    collection_id=record.collection_id,
                    query=record.query,
                    preferred_id=preferred,
                    rejected_id=rejected,
                    weight=record.weight,
                    source=record.source,
                    created=created,
                )
                .returning(S.pairs.c.id)
            ).scalar_one()
        rid = conn.execute(
            S.rankings.insert()
            .values(
                user_id=uid,
                collection_id=record.collection_id,
                kind=record.kind,
                query=record.query,
                source=record.source,
                created=created,
            )
            .returning(S.rankings.c.id)
        ).scalar_one()
        conn.execute(
            S.ranking_items.insert(),
            [
                {"ranking_id": rid, "position": pos, "image_id": i, "tier": tier}
                for pos, (i, tier) in enumerate(record.items)
            ],
        )
        return rid

    def delete_preference(self, user: str, kind: str, record_id: int) -> bool:
        """Remove one of `user`'s own records: a "pair", "ranking" or "feedback" by id; False if
        `user` has none with this id (another user's record is never touched)."""
        if kind not in ("pair", "ranking", "feedback"):
            raise InvalidPreferenceError(f"kind must be pair, ranking or feedback, got {kind!r}")
        with self._write() as conn:
            uid = self._user_id(conn, user, create=False)
            if kind == "pair":
                removed = conn.execute(S.pairs.delete().where(S.pairs.c.id == record_id, S.pairs.c.user_id == uid))
            else:
                mine = sa.select(S.rankings.c.id).where(
                    S.rankings.c.id == record_id, S.rankings.c.user_id == uid, S.rankings.c.kind == kind
                )
                conn.execute(S.ranking_items.delete().where(S.ranking_items.c.ranking_id.in_(mine)))
                removed = conn.execute(S.rankings.delete().where(S.rankings.c.id.in_(mine)))
            if removed.rowcount:
                _bump(conn, S.users.c.pref_version, [uid])
        return bool(removed.rowcount)

    def record_count(self, user: str, collection_id: int | str | Collection) -> int:
        """How many records (stored pairs, rankings, feedback) `user` has in the collection; 0 for
        an unknown user. Lets a reader that extends its copy by `pairs(after=...)` notice deletions."""
        with self._read() as conn:
            coll = self._collection(conn, collection_id).id
            row = conn.execute(sa.select(S.users.c.id).where(S.users.c.name == user)).first()
            if row is None:
                return 0
            return sum(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.user_id == row.id, table.c.collection_id == coll)
                ).scalar_one()
                for table in (S.pairs, S.rankings)
            )

    def pairs(
        self,
        user: str,
        collection_id: int | str | Collection | None = None,
        query: str | None = None,
        after: tuple[int, int] | None = None,
    ) -> list[PreferencePair]:
        """Every preference pair of `user`, oldest first: stored pairs (with their id) and the
        pairs implied by rankings and feedback (id None, ranking_id set, weight 1 each).

        after: (pair id, ranking id): only pairs stored after the pair and the ranking of these
        ids (what a reader holding the earlier ones lacks, unless some were deleted since: compare
        `record_count`).
        """
        with self._read() as conn:
            params = {"uid": self._user_id(conn, user, create=False)}
            if collection_id is not None:
                params["cid"] = self._collection(conn, collection_id).id
            if query is not None:
                params["query"] = query.strip()
            if after is not None:
                params["after_pair"], params["after_ranking"] = (int(v) for v in after)
            stored, implied = _pair_selects("cid" in params, "query" in params, after is not None)
            out = [
                PreferencePair(
                    p.id,
                    user,
                    p.query,
                    p.preferred_id,
                    p.rejected_id,
                    p.weight,
                    p.source,
                    _utc(p.created),
                    p.collection_id,
                )
                for p in conn.execute(stored, params)
            ]
            out += [
                PreferencePair(
                    None,
                    user,
                    p.query,
                    p.preferred_id,
                    p.rejected_id,
                    1.0,
                    p.source,
                    _utc(p.created),
                    p.collection_id,
                    ranking_id=p.id,
                )
                for p in conn.execute(implied, params)
            ]
        return sorted(out, key=lambda p: p.created)

    def rankings(self, user: str, collection_id: int | str | Collection | None = None) -> list[Ranking]:
        """The rankings of `user`, oldest first, each best image first."""
        return [
            Ranking(
                r.id,
                r.query,
                [i for i, _ in items],
                user,
                r.collection_id,
                r.source,
                _utc(r.created),
            )
            for r, items in self._tiers(user, collection_id, "ranking")
        ]

    def feedback(self, user: str, collection_id: int | str | Collection | None = None) -> list[Feedback]:
        """The thumbs up/down feedback of `user`, oldest first."""
        return [
            Feedback(
                r.id,
                r.query,
                [i for i, tier in items if tier == 0],
                [i for i, tier in items if tier == 1],
                user,
                r.collection_id,
                r.source,
                _utc(r.created),
            )
            for r, items in self._tiers(user, collection_id, "feedback")
        ]

    def _tiers(self, user, collection_id, kind) -> list[tuple[sa.Row, list[tuple[int, int]]]]:
        with self._read() as conn:
            uid = self._user_id(conn, user, create=False)
            query = sa.select(S.rankings).where(S.rankings.c.user_id == uid, S.rankings.c.kind == kind)
            if collection_id is not None:
                query = query.where(S.rankings.c.collection_id == self._collection(conn, collection_id).id)
            heads = conn.execute(query.order_by(S.rankings.c.id)).all()
            items: dict[int, list[tuple[int, int]]] = {h.id: [] for h in heads}
            rows = conn.execute(
                sa.select(S.ranking_items.c.ranking_id, S.ranking_items.c.image_id, S.ranking_items.c.tier)
                .join(S.rankings, S.rankings.c.id == S.ranking_items.c.ranking_id)
                .where(S.rankings.c.user_id == uid, S.rankings.c.kind == kind)
                .order_by(S.ranking_items.c.ranking_id, S.ranking_items.c.position)
            )
            for rid, image_id, tier in rows:
                if rid in items:
                    items[rid].append((image_id, tier))
        return [(h, items[h.id]) for h in heads]

    def preference_version(self, user: str) -> int:
        """An opaque number that changes whenever `user`'s preferences change (a cache key).

        It mixes in the user id, which is never reused, so a deleted and re-created user
        never repeats an old version."""
        with self._read() as conn:
            uid = self._user_id(conn, user, create=False)
            count = conn.execute(sa.select(S.users.c.pref_version).where(S.users.c.id == uid)).scalar_one()
        return (uid << 32) | count

    def preference_versions(self, users: Iterable[str]) -> dict[str, int | None]:
        """`preference_version` of many users in one query; None for a user who does not exist."""
        stored = {name: normalize_user(name) for name in set(users)}
        names = sorted(set(stored.values()))
        if not names:
            return {}
        found = {}
        for chunk in _chunks(names):
            rows = self._fetch_direct(
                f"SELECT name, id, pref_version FROM users WHERE name IN ({', '.join('?' * len(chunk))})", chunk
            )
            found.update((name, (uid << 32) | count) for name, uid, count in rows)
        return {name: found.get(normal) for name, normal in stored.items()}

    def _fetch_direct(self, sql: str, params: Sequence) -> list[tuple]:
        """The rows of one SELECT ("?" placeholders) sent straight to the driver. For the checks
        made on every search: a pooled SQLAlchemy connection costs ~150 us more per call. One
        SELECT is atomic on its own."""
        conn = self._engine.raw_connection()
        try:
            cursor = conn.cursor()
            cursor.execute(sql if self._sqlite else sql.replace("?", "%s"), tuple(params))
            rows = cursor.fetchall()
            cursor.close()
            return rows
        finally:
            conn.close()


@functools.cache
def _pair_selects(by_collection: bool, by_query: bool, by_after: bool = False) -> tuple[sa.Select, sa.Select]:
    """`Store.pairs`' two SELECTs (stored pairs; pairs implied by rankings) with bound :uid, :cid,
    :query, :after_pair and :after_ranking, built once per filter combination: building them anew
    took most of its time."""
    stored = sa.select(S.pairs).where(S.pairs.c.user_id == sa.bindparam("uid")).order_by(S.pairs.c.id)
    a, b = S.ranking_items.alias("a"), S.ranking_items.alias("b")
    r = S.rankings
    implied = (
        sa.select(
            r.c.id,
            r.c.collection_id,
            r.c.query,
            r.c.source,
            r.c.created,
            a.c.image_id.label("preferred_id"),
            b.c.image_id.label("rejected_id"),
        )
        .join(a, a.c.ranking_id == r.c.id)
        .join(b, sa.and_(b.c.ranking_id == r.c.id, a.c.tier < b.c.tier))
        .where(r.c.user_id == sa.bindparam("uid"))
        .order_by(r.c.id, a.c.position, b.c.position)
    )
    if by_collection:
        stored = stored.where(S.pairs.c.collection_id == sa.bindparam("cid"))
        implied = implied.where(r.c.collection_id == sa.bindparam("cid"))
    if by_query:
        stored = stored.where(S.pairs.c.query == sa.bindparam("query"))
        implied = implied.where(r.c.query == sa.bindparam("query"))
    if by_after:
        stored = stored.where(S.pairs.c.id > sa.bindparam("after_pair"))
        implied = implied.where(r.c.id > sa.bindparam("after_ranking"))
    return stored, implied


def _check_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidPreferenceError(f"a preference needs a non-empty query text, got {query!r}")
    return check_query_text(query)


def _check_weight(weight) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidPreferenceError(f"weight must be a positive finite number, got {weight!r}")
    return value


def _check_source(source) -> str:
    if not isinstance(source, str) or not source or len(source) > 64:
        raise InvalidPreferenceError(f"source must be 1 to 64 characters, got {source!r}")
    return check_text(source, "source")
