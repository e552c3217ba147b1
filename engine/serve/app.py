"""The app factory: routers, the lifespan that loads the shared Clipbt once, and the one error translation."""

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.api import Clipbt
from engine.serve import auth, images, preferences, search
from engine.serve.batching import SearchBatcher
from engine.serve.config import ServeConfig
from engine.serve.limits import BodyLimit, LoginLimiter, SecurityHeaders
from engine.serve.state import ServeState
from engine.serve.thumbnails import Thumbnails
from storage.errors import ClipbtError, ForeignImageError
from storage.home import data_home

STATIC = Path(__file__).parent / "static"


def open_state(config: ServeConfig) -> ServeState:
    """Open the store, load the collection's engine (index and encoder) and start the batcher."""
    clip = Clipbt.open(config.home, config.db, config.search)
    try:
        engine = clip.engine(config.collection)
        _ = engine.index, engine.encoder  # loaded now, not by the first request
        batcher = SearchBatcher(engine.search_many, config.batch_size, config.batch_window_s)
        thumbs = Thumbnails(
            clip.store, data_home(config.home) / "thumbnails" / clip.store.store_id[:12], config.thumbnail_size
        )
    except BaseException:
        clip.close()
        raise
    batcher.start()
    return ServeState(config, clip, engine, batcher, LoginLimiter(config.login_failures, config.login_window_s), thumbs)


def close_state(state: ServeState) -> None:
    state.batcher.stop()
    state.clip.close()


def create_app(config: ServeConfig = ServeConfig()) -> FastAPI:
    """The clipbt HTTP service for `config`: JSON API under /api/v1, the web page at /."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serve = open_state(config)
        try:
            yield
        finally:
            close_state(app.state.serve)

    app = FastAPI(
        title="clipbt",
        version="1",
        lifespan=lifespan,
        description="Personalised CLIP image search: search, record preferences, see what you taught it.",
    )
    for router in (auth.router, search.router, preferences.router, images.router):
        app.include_router(router)
    app.add_exception_handler(ClipbtError, _library_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(SecurityHeaders)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """200 while the service is up (no authentication)."""
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _library_error(request: Request, exc: ClipbtError) -> JSONResponse:
    """A library error: 404 when it is about something named in the URL path that does not exist,
    else 400 (the query or body was wrong). The message names the bad value."""
    missing = isinstance(exc, LookupError | ForeignImageError)
    return _error(404 if missing and request.path_params else 400, exc.public_message)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request that does not fit its Pydantic model: 422 naming the field and the value given."""
    messages = []
    for error in exc.errors():
        loc = (
            error["loc"][1:]
            if error["loc"] and error["loc"][0] in ("body", "query", "path", "header")
            else error["loc"]
        )
        where = ".".join(str(part) for part in loc)
        if error["type"] == "json_invalid":
            messages.append(f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}")
        elif error["type"] == "missing":
            messages.append(f"{where} is required")
        else:
            messages.append(f"{where}: {error['msg'].lower()}, got {error.get('input')!r}")
    return _error(422, "; ".join(messages))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
