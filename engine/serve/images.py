"""The images resource: thumbnails by image id (never by path)."""

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from engine.serve.auth import State, User
from engine.serve.thumbnails import MEDIA_TYPE

router = APIRouter(prefix="/api/v1", tags=["images"])
THUMBNAIL = "/images/{image_id}/thumbnail"


def thumbnail_path(request: Request, image_id: int) -> str:
    """The URL path of an image's thumbnail (the `thumbnail` route below, formatted without a route lookup)."""
    return f"{request.scope.get('root_path', '')}{router.prefix}{THUMBNAIL.format(image_id=image_id)}"


@router.get(
    THUMBNAIL,
    name="thumbnail",
    response_class=Response,
    responses={200: {"content": {MEDIA_TYPE: {}}}, 404: {"description": "no such image in the collection"}},
)
async def thumbnail(user: User, state: State, image_id: Annotated[int, Path(ge=0)]) -> Response:
    """A JPEG thumbnail of a live image of the served collection; a placeholder when it has no file."""
    data = await run_in_threadpool(_thumbnail, state, image_id)
    return Response(data, media_type=MEDIA_TYPE, headers={"Cache-Control": "private, max-age=86400"})


def _thumbnail(state, image_id: int) -> bytes:
    state.engine.image(image_id)  # UnknownImageError (404) unless live in this collection
    return state.thumbnails.get(image_id)
