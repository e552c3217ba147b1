"""The consistency checks of the Store: what a crash or a bug could have left behind."""

import sqlalchemy as sa

from storage import _schema as S
from storage.records import (
    ConsistencyReport,
)


class ConsistencyMixin:
    """`check_consistency`."""

    def check_consistency(self) -> ConsistencyReport:
        """Look for anything a crash or a bug could have left behind: SQLite page damage,
        orphan rows, images without (or with malformed) embeddings, preferences that mix
        collections, rankings with too few images."""
        report = ConsistencyReport()
        problems = report.problems
        img, emb, col = S.images, S.embeddings, S.collections
        with self._read() as conn:
            if self._sqlite:
                damage = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                if damage != ["ok"]:
                    problems.append(f"SQLite integrity_check: {'; '.join(damage[:5])}")
                orphans = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if orphans:
                    problems.append(f"{len(orphans)} rows reference missing rows, e.g. {tuple(orphans[0])}")
            for table in (col, img, emb, S.users, S.pairs, S.rankings, S.ranking_items):
                report.counts[table.name] = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()

            def ids_where(query, what):
                found = conn.execute(query.limit(10)).scalars().all()
                if found:
                    problems.append(f"{what}, e.g. {found}")

            ids_where(
                sa.select(img.c.id).outerjoin(emb, emb.c.image_id == img.c.id).where(emb.c.image_id.is_(None)),
                "images without an embedding",
            )
            itemsize = sa.case((col.c.embedding_dtype == "float16", 2), else_=4)
            ids_where(
                sa.select(img.c.id)
                .join(emb, emb.c.image_id == img.c.id)
                .join(col, col.c.id == img.c.collection_id)
                .where(sa.func.length(emb.c.data) != col.c.dim * itemsize),
                "embeddings of the wrong size",
            )
            pref, rej = img.alias("pref"), img.alias("rej")
            ids_where(
                sa.select(S.pairs.c.id)
                .join(pref, pref.c.id == S.pairs.c.preferred_id)
                .join(rej, rej.c.id == S.pairs.c.rejected_id)
                .where(
                    sa.or_(
                        pref.c.collection_id != S.pairs.c.collection_id,
                        rej.c.collection_id != S.pairs.c.collection_id,
                    )
                ),
                "pairs comparing images of another collection",
            )
            ids_where(
                sa.select(S.rankings.c.id)
                .join(S.ranking_items, S.ranking_items.c.ranking_id == S.rankings.c.id)
                .join(img, img.c.id == S.ranking_items.c.image_id)
                .where(img.c.collection_id != S.rankings.c.collection_id)
                .distinct(),
                "rankings holding images of another collection",
            )
            n_items = (
                sa.select(sa.func.count()).where(S.ranking_items.c.ranking_id == S.rankings.c.id).scalar_subquery()
            )
            ids_where(
                sa.select(S.rankings.c.id).where(n_items < sa.case((S.rankings.c.kind == "ranking", 2), else_=1)),
                "rankings or feedback with too few images",
            )
        return report
