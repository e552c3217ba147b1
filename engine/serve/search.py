"""The search resource: personalised search (micro-batched), the next duel pair, and P(a over b)."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from engine.search import Hit, SearchInputError, SearchRequest
from engine.serve.auth import State, User
from engine.serve.duel import choose_duel
from engine.serve.images import thumbnail_path
from storage.errors import UnknownUserError

router = APIRouter(prefix="/api/v1", tags=["search"])

Text = Annotated[str, Query(min_length=1, max_length=500, description="the query text")]


class Result(BaseModel):
    """One ranked image."""

    id: int
    rank: int  # 1 = best
    score: float  # BT strength for the caller
    similarity: float  # s(x', y) with the caller's adapted query (eq. 1)
    p_next: float | None  # P(this image over the next one) (eq. 2); null for the last
    thumbnail: str  # URL of the image's thumbnail on this server


class Results(BaseModel):
    results: list[Result]


class Duel(BaseModel):
    """The next pair of images worth asking the caller about."""

    a: int
    b: int


class Probability(BaseModel):
    p: float  # P(a over b) for the caller


class Stats(BaseModel):
    """How the service has batched searches since it started (the same for every caller)."""

    searches: int  # search and duel requests answered
    batches: int  # batched searches (search_many calls) that answered them
    largest_batch: int


def _result(hit: Hit, request: Request) -> Result:
    return Result(
        id=hit.id,
        rank=hit.rank,
        score=hit.score,
        similarity=hit.similarity,
        p_next=hit.p_next,
        thumbnail=thumbnail_path(request, hit.id),
    )


def _check(text: str, k: int, state) -> str:
    if not text.strip():
        raise SearchInputError(f"a search needs query text, got q={text!r}")
    if len(text) > state.config.max_query_chars:
        raise SearchInputError(f"q is {len(text)} characters, more than the limit of {state.config.max_query_chars}")
    if not 1 <= k <= state.config.max_k:
        raise SearchInputError(f"k must be between 1 and {state.config.max_k}, got {k}")
    return text


@router.get("/search", response_model=Results)
async def search(request: Request, user: User, state: State, q: Text, k: int = 10) -> Results:
    """The caller's k best images for q, answered together with concurrent searches."""
    hits = await state.batcher.search(SearchRequest(_check(q, k, state), user, k))
    return Results(results=[_result(hit, request) for hit in hits])


@router.get("/duel", response_model=Duel)
async def duel(user: User, state: State, q: Text) -> Duel:
    """The next pair to ask the caller about for q (strategy: `engine.serve.duel`)."""
    text = _check(q, state.config.duel_depth, state)
    hits = await state.batcher.search(SearchRequest(text, user, state.config.duel_depth))
    a, b = choose_duel(hits, await run_in_threadpool(_answered, state, user, text))
    return Duel(a=a, b=b)


@router.get("/compare", response_model=Probability)
def compare(user: User, state: State, q: Text, a: int, b: int) -> Probability:
    """P(a over b) for the caller and q."""
    return Probability(p=state.engine.compare(user, _check(q, 1, state), a, b))


def _answered(state, user: str, text: str) -> list[tuple[int, int]]:
    """The pairs the user has recorded for this query (implied ones included)."""
    try:
        return [(p.preferred_id, p.rejected_id) for p in state.store.pairs(user, state.engine.collection.id, text)]
    except UnknownUserError:
        return []


@router.get("/stats", response_model=Stats)
def stats(user: User, state: State) -> Stats:
    """Searches answered and the batches they were answered in, since the service started."""
    batcher = state.batcher
    return Stats(searches=batcher.searches, batches=batcher.batches, largest_batch=batcher.largest)
