"""The preferences resource: record pairs, rankings and thumbs feedback; list and delete the caller's own; delete the caller."""

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import BaseModel, Field

from engine.serve.auth import SESSION_COOKIE, State, User
from storage.errors import UnknownUserError

router = APIRouter(prefix="/api/v1", tags=["preferences"])

QueryText = Annotated[str, Field(min_length=1, max_length=500)]
ImageId = Annotated[int, Field(ge=0)]
Images = Annotated[list[ImageId], Field(max_length=100)]
_RECORD_ID = re.compile(r"(pair|ranking|feedback)-([0-9]{1,18})")


class Pair(BaseModel):
    query: QueryText
    preferred: ImageId
    rejected: ImageId


class RankingIn(BaseModel):
    query: QueryText
    images: Annotated[list[ImageId], Field(min_length=2, max_length=100)]  # best first


class FeedbackIn(BaseModel):
    query: QueryText
    good: Images = []
    bad: Images = []


class Created(BaseModel):
    id: str  # e.g. "pair-12": what DELETE /api/v1/preferences/{id} takes


class Record(BaseModel):
    """One of the caller's preference records."""

    id: str
    kind: Literal["pair", "ranking", "feedback"]
    query: str
    created: datetime
    preferred: int | None = None  # pair
    rejected: int | None = None  # pair
    images: list[int] | None = None  # ranking, best first
    good: list[int] | None = None  # feedback
    bad: list[int] | None = None  # feedback


class Records(BaseModel):
    preferences: list[Record]  # newest first


class Deleted(BaseModel):
    user: str
    pairs: int
    rankings: int
    feedback: int


@router.post("/preferences", status_code=201, response_model=Created)
def add_pair(body: Pair, user: User, state: State) -> Created:
    """Record that the caller preferred one image over another for a query."""
    return Created(id=f"pair-{state.engine.prefer(user, body.query, body.preferred, body.rejected)}")


@router.post("/rankings", status_code=201, response_model=Created)
def add_ranking(body: RankingIn, user: User, state: State) -> Created:
    """Record the caller's ranking of images for a query, best first."""
    return Created(id=f"ranking-{state.engine.rank(user, body.query, body.images)}")


@router.post("/feedback", status_code=201, response_model=Created)
def add_feedback(body: FeedbackIn, user: User, state: State) -> Created:
    """Record thumbs up (good) and down (bad) for a query."""
    return Created(id=f"feedback-{state.engine.feedback(user, body.query, body.good, body.bad)}")


@router.get("/preferences", response_model=Records, response_model_exclude_none=True)
def list_preferences(user: User, state: State) -> Records:
    """The caller's own preference records in the served collection, newest first."""
    store, collection = state.store, state.engine.collection.id
    try:
        records = [
            Record(
                id=f"pair-{p.id}",
                kind="pair",
                query=p.query,
                created=p.created,
                preferred=p.preferred_id,
                rejected=p.rejected_id,
            )
            for p in store.pairs(user, collection)
            if p.id is not None
        ]
        records += [
            Record(id=f"ranking-{r.id}", kind="ranking", query=r.query, created=r.created, images=r.image_ids)
            for r in store.rankings(user, collection)
        ]
        records += [
            Record(
                id=f"feedback-{f.id}", kind="feedback", query=f.query, created=f.created, good=f.good_ids, bad=f.bad_ids
            )
            for f in store.feedback(user, collection)
        ]
    except UnknownUserError:
        records = []
    return Records(preferences=sorted(records, key=lambda r: r.created, reverse=True))


@router.delete("/preferences/{record_id}", status_code=204)
def delete_preference(
    user: User, state: State, record_id: Annotated[str, Path(max_length=40, description="e.g. pair-12")]
) -> None:
    """Remove one of the caller's own records; 404 for anything else, including another user's."""
    match = _RECORD_ID.fullmatch(record_id)
    if match is None:
        raise HTTPException(404, f"no preference {record_id!r}: ids look like pair-12, ranking-3 or feedback-4")
    if not state.store.delete_preference(user, match[1], int(match[2])):
        raise HTTPException(404, f"you have no preference {record_id!r}")
    state.engine.forget(user)


@router.delete("/me", response_model=Deleted)
def delete_me(user: User, state: State, response: Response) -> Deleted:
    """Remove every trace of the caller: preferences, account, tokens and sessions."""
    removed = state.store.delete_user(user)
    state.engine.forget(user)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return Deleted(user=user, pairs=removed["pairs"], rankings=removed["rankings"], feedback=removed["feedback"])
