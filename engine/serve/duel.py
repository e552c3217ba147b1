"""Which pair of images to ask a user about next (`GET /api/v1/duel`): one swappable function.

Strategy: the least-sure adjacent pair, the default the duel benchmark chose
(`engine.duels`, benchmarks/bench_duels.py), here on the service's own personalised ranking: take
the user's current personalised top `depth` results, set aside images already shown in one of
their duels for this query (so every duel shows new images while there are any), and ask about
the two neighbours in that order whose BT strengths are closest, i.e. where P(a over b) is
nearest 1/2 and the ranking is least sure. A pair the user has already answered, either way
round, is never asked again.
"""

from collections.abc import Iterable, Sequence

from engine.search import Hit
from storage.errors import ClipbtError


class NoDuelError(ClipbtError, LookupError):
    """Every pair worth asking about for this query has been answered already."""


def choose_duel(hits: Sequence[Hit], answered: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The (a, b) image ids to ask about among `hits` (best first), given the pairs already answered."""
    asked = {frozenset(pair) for pair in answered}
    shown = set().union(*asked) if asked else set()
    fresh = [h for h in hits if h.id not in shown]
    for pool in (fresh, list(hits)):
        candidates = [
            (abs(a.score - b.score), a.rank, a.id, b.id)
            for a, b in zip(pool, pool[1:])
            if frozenset((a.id, b.id)) not in asked
        ]
        if candidates:
            _, _, a, b = min(candidates)
            return a, b
    raise NoDuelError(f"every pair among the top {len(hits)} results has been answered; search for something else")
