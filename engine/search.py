"""The query path: encode the text, adapt it with the user's BT pairs, search FAISS, rank the candidates; one request or a batch."""

import dataclasses
import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.bt import AdaptConfig, MapConfig, PairSet, adapt_many, logistic, map_adapt_many
from engine.preferences import check_has_collection, record_feedback, record_pair, record_ranking
from engine.ranking import RankConfig, rank_candidates
from storage import Collection, Image, Store
from storage.errors import ClipbtError, EmptyCollectionError
from storage.limits import LIMITS, check_adaptation, check_query_text

SCOPES = ("query-kernel", "all")


class SearchInputError(ClipbtError, ValueError):
    """A search request is malformed: k < 1, no query, a query vector of the wrong size or not finite."""


@dataclass(frozen=True)
class SearchConfig:
    """How a query is personalised, how deep FAISS is searched, and what is cached."""

    method: str = (
        "map"  # "map": posterior mode under a prior centred on the query (`map`); "bt": the paper's steps (`adapt`)
    )
    adapt: AdaptConfig = (
        AdaptConfig()
    )  # BT adaptation (eqs. 3-4) of method "bt"; its beta then scales ranking strengths
    map: MapConfig = MapConfig()  # MAP adaptation of method "map"; its beta then scales ranking strengths
    rank: RankConfig = RankConfig()  # how direct comparisons among candidates move them
    scope: str = "query-kernel"  # which pairs count: kernel-weighted by query similarity, or "all" equally
    # (query-kernel is the default by measurement: benchmarks/bench_scope.py, results/scope.json)
    bandwidth: float = 0.1  # kernel width tau of "query-kernel": weight exp(-(1 - cos) / tau)
    oversample: int = 2  # FAISS returns max(oversample * k, k + min_extra) candidates to rank
    min_extra: int = 16  # ... so a direct comparison can lift an image from below the top k
    device: str | None = None  # torch device of the adaptation step ("cuda"); None: numpy on the CPU (`bt.adapt_many`)
    text_cache_size: int = 1024  # query texts whose embedding is kept (LRU)
    query_cache_size: int = 4096  # adapted queries kept (LRU), keyed by (user, preference version, query)
    user_cache_size: int = 1024  # users whose pairs (embedding differences and Gram matrix) are kept (LRU)
    path_cache_size: int = 100_000  # image paths kept for results (LRU)

    @property
    def beta(self) -> float:
        """The BT inverse temperature of the adapted query's strengths beta * s(x', y)."""
        return self.map.beta if self.method == "map" else self.adapt.beta

    def __post_init__(self):
        check_adaptation(self.adapt.lr, self.adapt.steps, self.adapt.beta)
        if self.method not in ("map", "bt"):
            raise SearchInputError(f"method must be 'map' or 'bt', got {self.method!r}")
        if self.scope not in SCOPES:
            raise SearchInputError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not math.isfinite(self.bandwidth) or self.bandwidth <= 0:
            raise SearchInputError(f"bandwidth must be a finite number > 0, got {self.bandwidth}")
        if self.oversample < 1 or self.min_extra < 0:
            raise SearchInputError(
                f"oversample must be >= 1 and min_extra >= 0, got {self.oversample} and {self.min_extra}"
            )
        for name in ("text_cache_size", "query_cache_size", "user_cache_size", "path_cache_size"):
            if getattr(self, name) < 1:
                raise SearchInputError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SearchRequest:
    """One query: text (encoded, cached) or a vector, for a user or nobody."""

    query: str | None = None  # the query text; names the query for the kernel and the caches
    user: str | None = None  # whose preferences apply; None, or a user without pairs: the plain query
    k: int = 10  # how many images to return
    vector: np.ndarray | None = field(default=None, compare=False)  # (d,) used instead of encoding `query`


@dataclass(frozen=True)
class Hit:
    """One ranked image."""

    id: int
    path: str
    rank: int  # 1 = best
    score: float  # BT strength: beta * s(x', y) adjusted by the user's direct comparisons
    similarity: float  # s(x', y) with the adapted query x' (eq. 1)
    p_next: float | None  # P(this image beats the next one) (eq. 2); None for the last

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "id": self.id,
            "path": self.path,
            "score": self.score,
            "similarity": self.similarity,
            "p_next": self.p_next,
        }


def candidate_count(k: int, config: SearchConfig) -> int:
    """How many FAISS neighbours are ranked to return k: max(oversample * k, k + min_extra)."""
    return max(config.oversample * k, k + config.min_extra)


def pair_weights(
    query: np.ndarray, texts: np.ndarray, text_of_pair: np.ndarray, base: np.ndarray, scope: str, bandwidth: float
) -> np.ndarray:
    """Weight of each of a user's pairs for one query.

    query: (d,) query embedding; texts: (T, d) unit embeddings of the distinct texts the pairs were
    recorded under; text_of_pair: (P,) each pair's row in `texts`; base: (P,) the pairs' own
    weights. "all": base. "query-kernel": base times exp(-(1 - cos(query, pair's text)) / bandwidth),
    1 for the same text and decaying with distance.
    """
    if scope == "all":
        return base
    cos = texts @ query / np.sqrt(query @ query)  # texts are unit rows
    return base * np.exp(-(1.0 - cos[text_of_pair]) / bandwidth)


def effective_weights(weights: np.ndarray) -> np.ndarray:
    """Rescale one query's pair weights so that the mean gradient of eq. 4 over its P pairs (as
    `adapt_many` takes it) becomes sum_i w_i g_i / max(sum_i w_i, 1): pairs of this very query
    (weight 1) count fully, distant ones barely, and weights below one pair in total do not get
    inflated to one."""
    return weights * (len(weights) / max(float(weights.sum()), 1.0))


class _LRU:
    """A dict that keeps its `size` most recently used keys; safe to share between threads."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, key, default=None):
        with self._lock:
            return self._items.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def drop(self, matches) -> None:
        """Remove every key for which `matches(key)` is true."""
        with self._lock:
            for key in [k for k in self._items if matches(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        with self._lock:
            return iter(list(self._items))


@dataclass(frozen=True)
class _UserPairs:
    """One user's pairs in this collection at one preference version, ready for the math."""

    version: int
    preferred: np.ndarray  # (P,) image ids
    rejected: np.ndarray  # (P,) image ids
    weight: np.ndarray  # (P,) stored pair weights
    texts: tuple[str, ...]  # the distinct query texts the pairs were recorded under
    text_of_pair: np.ndarray  # (P,) each pair's index into `texts`
    pair_set: PairSet  # differences and Gram matrix of the pairs' embeddings, for `adapt_many`
    last: tuple[int, int] = (0, 0)  # the largest pair id and ranking id read: `Store.pairs(after=...)`
    records: int = 0  # stored records (pairs, rankings, feedback) these pairs come from


class Engine:
    """Joins a store, an encoder and a vector index into the query path of one collection.

    The encoder and the index are loaded on first use, once, and shared by every thread that uses
    the engine: its caches are bounded and locked, and a new index is loaded only when the
    collection's images have changed (by one thread, while the others wait for it).
    """

    def __init__(
        self, store: Store, collection: Collection, encoder=None, index=None, config: SearchConfig = SearchConfig()
    ):
        self.store = store
        self.collection = collection
        self.config = config
        self._encoder = encoder
        self._index = index
        self._index_given = index is not None  # a caller's index is theirs to keep current
        self._index_version: int | None = None  # the collection's content version when the index was loaded
        self._texts = _LRU(config.text_cache_size)  # text -> (d,) float32 embedding
        self._adapted = _LRU(config.query_cache_size)  # (user, version, query key, settings) -> (x', w)
        self._pairs = _LRU(config.user_cache_size)  # user -> _UserPairs of their latest seen version
        self._pair_texts = _LRU(config.user_cache_size)  # user -> (version, (T, d) embeddings of its pair texts)
        self._paths = _LRU(config.path_cache_size)  # image id -> uri, filled as hits are returned
        self._load_lock = threading.Lock()  # one thread loads the encoder or a new index at a time
        self.index_loads = 0  # how many times an index was loaded (or rebuilt)
        self.index_updates = 0  # how many times the loaded index was caught up with added or deleted images

    @classmethod
    def open(
        cls, store: Store, collection: str = "default", config: SearchConfig = SearchConfig(), encoder=None
    ) -> "Engine":
        """The engine of a stored collection; EmptyCollectionError when the store has none yet."""
        check_has_collection(store)
        return cls(store, store.collection(collection), encoder=encoder, config=config)

    # -- lazily loaded parts -----------------------------------------------------------------

    @property
    def encoder(self):
        """The collection's encoder, loaded on first use."""
        if self._encoder is None:
            with self._load_lock:
                if self._encoder is None:
                    self._encoder = _load_encoder(self.collection)
        return self._encoder

    @property
    def index(self):
        """The collection's vector index (`indexer.vectors.VectorIndex`), loaded on first use and
        caught up once images have been added or deleted since (by any process: one cheap SELECT
        notices): the new images are added to a copy of the loaded index, or, when that does not
        fit (`indexer.vectors.collection.catch_up`), the index is opened again."""
        if self._index_given:
            return self._index
        version = self.store.content_version(self.collection.id)
        if self._index is None or version != self._index_version:
            with self._load_lock:
                if self._index is None or version != self._index_version:
                    from indexer.vectors.collection import catch_up, open_index

                    index = None if self._index is None else catch_up(self.store, self.collection, self._index)
                    if index is None:
                        index = open_index(self.store, self.collection)
                        self.index_loads += 1
                    else:
                        self.index_updates += 1
                    self._index, self._index_version = index, version
        return self._index

    # -- query embeddings --------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings (n, d) float32, each text encoded once per engine (LRU cache)."""
        found = {text: self._texts.get(text) for text in texts}  # held here: a batch may outgrow the cache
        missing = [text for text, vector in found.items() if vector is None]
        if missing:
            for text, vector in zip(missing, self.encoder.encode_text(missing)):
                found[text] = np.asarray(vector, dtype=np.float32)
                self._texts.put(text, found[text])
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.collection.dim), np.float32)

    def _query_vectors(self, requests: Sequence[SearchRequest]) -> np.ndarray:
        d = self.collection.dim
        texts = [r.query for r in requests if r.vector is None]
        encoded = iter(self.encode(texts))
        rows = []
        for r in requests:
            if r.vector is None:
                rows.append(next(encoded))
                continue
            try:  # float64: a float32 vector whose norm overflows float32 (1e38 per value) still has a direction
                v = np.asarray(r.vector, dtype=np.float64).reshape(-1) if np.ndim(r.vector) else None
            except (TypeError, ValueError):
                raise SearchInputError(f"query vector must hold numbers, got {np.asarray(r.vector).dtype}") from None
            if v is None or v.shape != (d,):
                shape = np.shape(r.vector)
                raise SearchInputError(
                    f"query vector has shape {shape}, but collection {self.collection.name!r} has dimension {d}"
                )
            bad = np.flatnonzero(~np.isfinite(v.astype(np.float32)))
            if bad.size:
                raise SearchInputError(f"query vector[{bad[0]}] is {v[bad[0]]}: a query vector must be finite")
            norm = float(np.linalg.norm(v))
            if norm == 0:
                raise SearchInputError("query vector is all zeros: it has no direction to search")
            rows.append((v / norm).astype(np.float32))
        return np.stack(rows)

    # -- the user's pairs --------------------------------------------------------------------

    def _user_pairs(self, user: str, version: int) -> _UserPairs:
        """The user's pairs at `version`: the cached ones extended by the pairs recorded since,
        the most recent `LIMITS.user_max_pairs` kept. Read anew when the user was deleted and
        re-created (another id, the high bits of the version) or some records were deleted (the
        stored count is not the cached one plus the new ones)."""
        cached = self._pairs.get(user)
        if cached is not None and cached.version == version:
            return cached
        self.forget(user)
        base = cached if cached is not None and cached.version >> 32 == version >> 32 else None
        pairs = self.store.pairs(user, self.collection.id, after=base.last if base is not None else None)
        records = len({p.id for p in pairs if p.id is not None}) + len({p.ranking_id for p in pairs if p.ranking_id})
        stored = self.store.record_count(user, self.collection.id)
        if base is not None and base.records + records != stored:
            base = None
            pairs = self.store.pairs(user, self.collection.id)
            records = len({p.id for p in pairs if p.id is not None}) + len(
                {p.ranking_id for p in pairs if p.ranking_id}
            )
        ids = sorted({i for p in pairs for i in (p.preferred_id, p.rejected_id)})
        found, vectors = (
            self.store.embeddings(self.collection.id, ids, include_deleted=True)
            if ids
            else (np.zeros(0, np.int64), np.zeros((0, self.collection.dim), np.float32))
        )
        row = {int(i): j for j, i in enumerate(found)}
        texts = tuple(dict.fromkeys([*(base.texts if base is not None else ()), *(p.query for p in pairs)]))
        text_index = {text: j for j, text in enumerate(texts)}
        preferred = np.array([p.preferred_id for p in pairs], dtype=np.int64)
        rejected = np.array([p.rejected_id for p in pairs], dtype=np.int64)
        new = _UserPairs(
            version=version,
            preferred=preferred,
            rejected=rejected,
            weight=np.array([p.weight for p in pairs], dtype=np.float64),
            texts=texts,
            text_of_pair=np.array([text_index[p.query] for p in pairs], dtype=np.int64),
            pair_set=PairSet.of(
                vectors[[row[i] for i in preferred.tolist()]], vectors[[row[i] for i in rejected.tolist()]]
            ),
            last=(
                max([p.id for p in pairs if p.id is not None], default=0),
                max([p.ranking_id for p in pairs if p.ranking_id is not None], default=0),
            ),
            records=(base.records if base is not None else 0) + records,
        )
        data = (
            _append_pairs(base, new, LIMITS.user_max_pairs)
            if base is not None
            else _keep_recent(new, LIMITS.user_max_pairs)
        )
        self._pairs.put(user, data)
        return data

    def _pair_text_vectors(self, user: str, pairs: _UserPairs) -> np.ndarray:
        """Unit embeddings (T, d) of the distinct texts the user's pairs were recorded under, kept per version."""
        cached = self._pair_texts.get(user)
        if cached is None or cached[0] != pairs.version:
            vectors = self.encode(pairs.texts)
            cached = (pairs.version, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
            self._pair_texts.put(user, cached)
        return cached[1]

    def forget(self, user: str) -> None:
        """Drop the cached adapted queries of `user` (after they record a preference); their
        cached pairs are kept and extended by the new ones on the next search (`_user_pairs`)."""
        self._pair_texts.pop(user, None)
        self._adapted.drop(lambda key: key[0] == user)

    def _personalise(self, requests: Sequence[SearchRequest], queries: np.ndarray, config: SearchConfig):
        """Adapted queries (B, d) and, per request, (its user's pairs or None, their weights)."""
        adapted = queries.copy()
        context: list[tuple[_UserPairs | None, np.ndarray | None]] = [(None, None)] * len(requests)
        todo: list[int] = []  # requests to adapt now (not cached)
        keys = []
        versions = self.store.preference_versions(r.user for r in requests if r.user is not None)
        for i, r in enumerate(requests):
            version = None if r.user is None else versions[r.user]  # None: no user, or an unknown one
            if version is None:
                continue
            pairs = self._user_pairs(r.user, version)
            if not len(pairs.weight):
                continue
            query_key = r.query if r.vector is None else "vector:" + hashlib.sha1(queries[i].tobytes()).hexdigest()
            key = (r.user, version, query_key, config.method, config.adapt, config.map, config.scope, config.bandwidth)
            hit = self._adapted.get(key)
            if hit is not None:
                adapted[i], weights = hit
                context[i] = (pairs, weights)
                continue
            weights = (
                pairs.weight
                if config.scope == "all"
                else pair_weights(
                    queries[i],
                    self._pair_text_vectors(r.user, pairs),
                    pairs.text_of_pair,
                    pairs.weight,
                    config.scope,
                    config.bandwidth,
                )
            )
            context[i] = (pairs, weights)
            todo.append(i)
            keys.append(key)
        if todo and config.method == "map":
            m = config.map
            adapted[todo] = map_adapt_many(
                queries[todo],
                [context[i][0].pair_set for i in todo],
                [context[i][1] for i in todo],
                m.prior_precision,
                m.beta,
                m.steps,
                m.tol,
            )
        elif todo:
            a = config.adapt
            adapted[todo] = adapt_many(
                queries[todo],
                [context[i][0].pair_set for i in todo],
                [effective_weights(context[i][1]) for i in todo],
                a.lr,
                a.steps,
                a.beta,
                a.normalize,
                device=config.device,
            )
        for i, key in zip(todo, keys):
            self._adapted.put(key, (adapted[i].copy(), context[i][1]))
        return adapted, context

    # -- preferences -------------------------------------------------------------------------

    def image(self, ref: int | str) -> Image:
        """A live image of the collection by id or path; UnknownImageError naming `ref` if none."""
        return self.store.find_image(self.collection.id, ref)

    def prefer(self, user: str, query: str, preferred: int | str, rejected: int | str) -> int:
        """Record that `user` preferred one image over another for `query` (user created if new)."""
        pair = record_pair(self.store, self.collection.id, user, query, preferred, rejected)
        self.forget(user)
        return pair

    def rank(self, user: str, query: str, images: Sequence[int | str]) -> int:
        """Record `user`'s full ranking of images for `query`, best first."""
        ranking = record_ranking(self.store, self.collection.id, user, query, images)
        self.forget(user)
        return ranking

    def feedback(self, user: str, query: str, good: Sequence[int | str], bad: Sequence[int | str]) -> int:
        """Record thumbs up (`good`) and down (`bad`) for `query`; it counts as every good over every bad."""
        record = record_feedback(self.store, self.collection.id, user, query, good, bad)
        self.forget(user)
        return record

    def compare(
        self, user: str | None, query: str, a: int | str, b: int | str, config: SearchConfig | None = None
    ) -> float:
        """P(a beats b) for `user` and `query`: the reward-model use of the paper (section 3.1).

        Strengths are beta * s(x', y) with the user's adapted query (eq. 2), moved by the user's
        direct comparisons of a and b as in `search`; with none it is exactly
        sigmoid(t beta (s(x', y_a) - s(x', y_b))), t the ranking's calibrated temperature.
        """
        config = config or self.config
        if not isinstance(query, str) or not query.strip():
            raise SearchInputError(f"a comparison needs query text, got {query!r}")
        ids = np.array([self.image(a).id, self.image(b).id], dtype=np.int64)
        if ids[0] == ids[1]:
            raise SearchInputError(f"compare needs two different images, got image {ids[0]} twice ({a!r} and {b!r})")
        request = SearchRequest(query, user)
        adapted, context = self._personalise([request], self._query_vectors([request]), config)
        _, vectors = self.store.embeddings(self.collection.id, ids)
        similarity = vectors @ adapted[0]
        if ids[0] > ids[1]:  # embeddings come back in id order
            similarity = similarity[::-1]
        winners, losers, weights = _direct_comparisons(ids[None], context)[0]
        ranking = rank_candidates(similarity, config.beta, winners, losers, weights, config.rank)
        theta = np.empty(2)
        theta[ranking.order] = ranking.strength
        return float(logistic(config.rank.temperature * (theta[0] - theta[1])))

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        query: str | None = None,
        user: str | None = None,
        k: int = 10,
        vector=None,
        config: SearchConfig | None = None,
    ) -> list[Hit]:
        """The k best images for one query, personalised for `user` (see `search_many`)."""
        return self.search_many([SearchRequest(query, user, k, vector)], config)[0]

    def search_many(self, requests: Sequence[SearchRequest], config: SearchConfig | None = None) -> list[list[Hit]]:
        """Answer many requests with one batched adaptation and one FAISS call.

        Per request: the query embedding (text encoded once, or the given vector normalised);
        x' = BT adaptation on the user's pairs in this collection, weighted
        by scope (`pair_weights`); FAISS returns `candidate_count(k)` neighbours by s(x', y)
        (deleted images excluded); `rank_candidates` orders them with the user's direct
        comparisons among them, and the best k are returned.
        """
        config = config or self.config
        if not requests:
            return []
        for r in requests:
            if isinstance(r.k, bool) or not isinstance(r.k, int | np.integer) or r.k < 1:
                raise SearchInputError(f"k must be a whole number >= 1, got {r.k!r}")
            if r.k > LIMITS.k_max:
                raise SearchInputError(f"k must be at most {LIMITS.k_max}, got {r.k}")
            if r.vector is None and (not isinstance(r.query, str) or not r.query.strip()):
                raise SearchInputError(f"a search needs query text or a vector, got query {r.query!r}")
            if isinstance(r.query, str):
                check_query_text(r.query)
        queries = self._query_vectors(requests)
        adapted, context = self._personalise(requests, queries, config)
        depth = max(candidate_count(r.k, config) for r in requests)
        scores, ids = self.index.search(np.ascontiguousarray(adapted, dtype=np.float32), depth)
        if ids[0, 0] < 0:  # not even one live image
            raise EmptyCollectionError(
                f"collection {self.collection.name!r} has no images: add some with `clipbt index PATH`"
            )
        found = (ids >= 0).sum(axis=1)
        for r, n in zip(requests, found.tolist()):
            if n < r.k and r.k > (live := len(self.index)):  # counted only when the index came up short
                raise SearchInputError(
                    f"k is {r.k}, but collection {self.collection.name!r} has {live} images: ask for at most {live}"
                )
        wanted = np.array([candidate_count(r.k, config) for r in requests])
        candidates = np.where(np.arange(depth) < wanted[:, None], ids, -1)  # -1: not a candidate
        comparisons = _direct_comparisons(candidates, context)
        return [self._rank(r, scores[i], candidates[i], comparisons[i], config) for i, r in enumerate(requests)]

    def _rank(self, request: SearchRequest, scores: np.ndarray, ids: np.ndarray, comparisons, config) -> list[Hit]:
        keep = ids >= 0  # a prefix: FAISS pads missing results at the end
        ids, scores = ids[keep], scores[keep]
        winners, losers, weights = comparisons
        ranking = rank_candidates(scores, config.beta, winners, losers, weights, config.rank)
        top = ranking.order[: request.k]
        paths = self._uris(ids[top])
        return [
            Hit(
                id=int(ids[j]),
                path=paths[n],
                rank=n + 1,
                score=float(ranking.strength[n]),
                similarity=float(scores[j]),
                p_next=None if math.isnan(ranking.p_next[n]) else float(ranking.p_next[n]),
            )
            for n, j in enumerate(top)
        ]

    def _uris(self, ids: np.ndarray) -> list[str]:
        found = {int(i): self._paths.get(int(i)) for i in ids}
        missing = [i for i, uri in found.items() if uri is None]
        if missing:
            for i, uri in self.store.uris(missing).items():
                found[i] = uri
                self._paths.put(i, uri)
        return [found[int(i)] for i in ids]


def _keep_recent(pairs: _UserPairs, cap: int) -> _UserPairs:
    """`pairs` with only its `cap` most recent pairs (the last rows), texts renumbered."""
    if len(pairs.weight) <= cap:
        return pairs
    keep = slice(len(pairs.weight) - cap, None)
    used, text_of_pair = np.unique(pairs.text_of_pair[keep], return_inverse=True)
    gram = pairs.pair_set.gram
    return dataclasses.replace(
        pairs,
        preferred=pairs.preferred[keep],
        rejected=pairs.rejected[keep],
        weight=pairs.weight[keep],
        texts=tuple(pairs.texts[j] for j in used.tolist()),
        text_of_pair=text_of_pair.astype(np.int64),
        pair_set=PairSet(pairs.pair_set.diffs[keep], None if gram is None else gram[keep, keep]),
    )


def _append_pairs(old: _UserPairs, new: _UserPairs, cap: int) -> _UserPairs:
    """`old` followed by `new` (whose texts extend old's), then `_keep_recent`: the state a full
    reload would give, at the cost of the new rows only. The Gram matrix D D^T grows by the
    blocks D_old D_new^T and D_new D_new^T (`PairSet` keeps none once P > d)."""
    if not len(new.weight):
        return dataclasses.replace(old, version=new.version, texts=new.texts, records=new.records)
    diffs = np.concatenate([old.pair_set.diffs, new.pair_set.diffs])
    gram = None
    if diffs.shape[0] <= diffs.shape[1]:
        if old.pair_set.gram is None and len(old.weight):
            gram = diffs.astype(np.float64) @ diffs.astype(np.float64).T
        else:
            a = old.pair_set.diffs.astype(np.float64)
            b = new.pair_set.diffs.astype(np.float64)
            cross = a @ b.T
            gram = np.block([[old.pair_set.gram if len(old.weight) else np.zeros((0, 0)), cross], [cross.T, b @ b.T]])
    joined = _UserPairs(
        version=new.version,
        preferred=np.concatenate([old.preferred, new.preferred]),
        rejected=np.concatenate([old.rejected, new.rejected]),
        weight=np.concatenate([old.weight, new.weight]),
        texts=new.texts,
        text_of_pair=np.concatenate([old.text_of_pair, new.text_of_pair]),
        pair_set=PairSet(diffs, gram),
        last=(max(old.last[0], new.last[0]), max(old.last[1], new.last[1])),
        records=new.records,
    )
    return _keep_recent(joined, cap)


def _direct_comparisons(candidates: np.ndarray, context) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per request, (winners, losers, weights) of its user's pairs whose two images are both among
    its candidates, as column indices into its row of `candidates` (B, c) image ids (-1: none).

    One sorted lookup for the whole batch: (request, image) pairs become keys
    row * span + image id + 1, unique per request, with a missing candidate at offset 0, which no
    pair's image has.
    """
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64), None)
    found = [none] * len(candidates)
    rows = [i for i, (pairs, _) in enumerate(context) if pairs is not None]
    if not rows or candidates.size == 0:
        return found
    preferred = np.concatenate([context[i][0].preferred for i in rows])
    rejected = np.concatenate([context[i][0].rejected for i in rows])
    weights = np.concatenate([context[i][1] for i in rows])
    owner = np.repeat(np.arange(len(rows)), [len(context[i][1]) for i in rows])
    span = int(max(candidates.max(), preferred.max(), rejected.max())) + 2
    keys = (np.arange(len(rows))[:, None] * span + candidates[rows] + 1).ravel()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]

    def column(images: np.ndarray) -> np.ndarray:
        wanted = owner * span + images + 1
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        return np.where(keys[at] == wanted, order[at] % candidates.shape[1], -1)

    win, lose = column(preferred), column(rejected)
    both = (win >= 0) & (lose >= 0) & (weights > 0)
    for k in np.unique(owner[both]).tolist():
        mine = both & (owner == k)
        found[rows[k]] = (win[mine], lose[mine], weights[mine])
    return found


def _load_encoder(collection: Collection):
    """The encoder that embedded `collection`, found from its recorded model identity."""
    from indexer.encoder import BUNDLED, SHIPPED_MODEL, Encoder, TextEncoder
    from indexer.errors import ModelUnavailableError

    if collection.model == SHIPPED_MODEL:
        encoder = TextEncoder()  # numpy: a search with the shipped model imports no torch
    elif collection.pretrained == BUNDLED:
        encoder = Encoder.load(collection.model)
    elif collection.pretrained.startswith("sha256:"):
        path = collection.checkpoint_path
        if path is None or not os.path.isfile(path):
            where = f"is no longer at {path}, where it was last read" if path else "has no recorded path"
            raise ModelUnavailableError(
                f"collection {collection.name!r} was embedded by {collection.model} with a checkpoint file "
                f"({collection.pretrained}) that {where}; record where it is now with `clipbt index "
                f"FOLDER --collection {collection.name} --model {collection.model} --pretrained CHECKPOINT` "
                "(unchanged images are not embedded again)"
            )
        encoder = Encoder.load(collection.model, path)  # a changed file fails the identity check below
    else:
        encoder = Encoder.load(collection.model, collection.pretrained)
    collection.check_model(
        encoder.model_name,
        encoder.pretrained,
        encoder.dim,
        "the model found is another one: it cannot search this collection",
    )
    return encoder
