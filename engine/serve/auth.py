"""Who is calling: API tokens (`Authorization: Bearer`), web sessions (cookie, CSRF-checked), and the login/logout routes."""

import hashlib
import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from engine.serve.state import ServeState, get_state

SESSION_COOKIE = "clipbt_session"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def csrf_token(session: str) -> str:
    """The CSRF token of a web session: derived from its secret, so it is stored nowhere and a
    page from another site, which cannot read the HttpOnly cookie, cannot know it."""
    return hashlib.sha256(b"clipbt-csrf:" + session.encode()).hexdigest()[:32]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def check_same_origin(request: Request) -> None:
    """403 unless the request's Origin (or, without one, its Referer) is this server itself."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        raise HTTPException(403, "cross-site check failed: a cookie-authenticated change needs an Origin header")
    parts = urlsplit(source)
    mine = urlsplit(str(request.base_url))
    if (parts.scheme, parts.netloc) != (mine.scheme, mine.netloc):
        raise HTTPException(
            403, f"cross-site request refused: origin {parts.scheme}://{parts.netloc} is not this server"
        )


async def current_user(request: Request, state: Annotated[ServeState, Depends(get_state)]) -> str:
    """The account name of the caller (the preference user everything is done for); 401 if none.

    A bearer token is checked against the stored hashes; a session cookie against live sessions,
    and for state-changing methods also against the Origin and the X-CSRF-Token header. Run on
    the event loop: the check is one indexed SELECT (tens of microseconds), cheaper than a hop to
    a worker thread for every request.
    """
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("malformed Authorization header: expected 'Bearer TOKEN'")
        name = state.store.token_user(token.strip())
        if name is None:
            raise _unauthorized("invalid or revoked API token: create one with `clipbt tokens create NAME`")
        return name
    session = request.cookies.get(SESSION_COOKIE)
    if not session:
        raise _unauthorized("not logged in: send 'Authorization: Bearer TOKEN' or log in")
    name = state.store.session_user(session)
    if name is None:
        raise _unauthorized("session expired or logged out: log in again")
    if request.method not in _SAFE_METHODS:
        check_same_origin(request)
        if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), csrf_token(session)):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header (GET /api/v1/me gives it)")
    return name


User = Annotated[str, Depends(current_user)]
State = Annotated[ServeState, Depends(get_state)]


class Login(BaseModel):
    """A web login."""

    name: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


class Me(BaseModel):
    """The caller; `csrf` is the token a web page sends as X-CSRF-Token (null with a bearer token)."""

    user: str
    csrf: str | None = None


router = APIRouter(prefix="/api/v1", tags=["auth"])


@router.post("/login", response_model=Me)
def login(body: Login, request: Request, response: Response, state: State) -> Me:
    """Check a password and start a web session (an HttpOnly, SameSite=Lax cookie)."""
    if "origin" in request.headers or "referer" in request.headers:
        check_same_origin(request)  # no login CSRF; a non-browser client sends neither header
    client = request.client.host if request.client else "unknown"
    keys = (f"name:{body.name}", f"addr:{client}")
    wait = state.limiter.retry_after(keys)
    if wait > 0:
        raise HTTPException(
            429,
            f"too many failed logins for {body.name!r}: try again in {int(wait) + 1} s",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    if not state.store.check_password(body.name, body.password):
        state.limiter.failed(keys)
        raise _unauthorized(f"wrong name or password for {body.name!r}")
    session = state.store.create_session(body.name, state.config.session_lifetime_s)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=int(state.config.session_lifetime_s),
        httponly=True,
        samesite="lax",
        secure=state.config.https_only,
        path="/",
    )
    return Me(user=body.name, csrf=csrf_token(session))


@router.post("/logout", status_code=204)
def logout(request: Request, response: Response, user: User, state: State) -> None:
    """End the web session."""
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        state.store.end_session(session)
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.get("/me", response_model=Me)
def me(request: Request, user: User) -> Me:
    """Who the caller is, with the CSRF token of their web session."""
    session = request.cookies.get(SESSION_COOKIE)
    bearer = "authorization" in request.headers
    return Me(user=user, csrf=None if bearer or not session else csrf_token(session))
