"""Login rate limiting and the request-body size limit."""

import threading
import time
from collections import OrderedDict, deque

from starlette.types import ASGIApp, Receive, Scope, Send


class LoginLimiter:
    """At most `failures` failed logins per key (an account name, a client address) in `window_s`.

    In memory, per process; keys are kept for at most `max_keys` (the oldest forgotten first), so
    a flood of made-up names cannot grow it without bound.
    """

    def __init__(self, failures: int = 5, window_s: float = 300.0, max_keys: int = 10_000, clock=time.monotonic):
        self.failures, self.window_s, self.max_keys, self._clock = failures, window_s, max_keys, clock
        self._seen: OrderedDict[str, deque] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, keys) -> float:
        """Seconds until one more attempt is allowed for all `keys` (0: allowed now)."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._seen.get(key)
                if times is None:
                    continue
                while times and times[0] <= now - self.window_s:
                    times.popleft()
                if len(times) >= self.failures:
                    wait = max(wait, times[0] + self.window_s - now)
        return wait

    def failed(self, keys) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                self._seen.setdefault(key, deque()).append(now)
                self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or streamed) gets 413, JSON error."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"error": "request body larger than {self.max_bytes} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class SecurityHeaders:
    """ASGI middleware adding to every response: no framing, no sniffing, scripts and images from this
    server only (headers the response already sets are kept). Plain ASGI rather than an `http`
    middleware function, which runs each request in a task group of its own."""

    HEADERS = (
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
    )

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
