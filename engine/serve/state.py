"""What the app holds while it runs (built in its lifespan) and the dependency that hands it to routes."""

from dataclasses import dataclass

from fastapi import Request

from engine.api import Clipbt
from engine.search import Engine
from engine.serve.batching import SearchBatcher
from engine.serve.config import ServeConfig
from engine.serve.limits import LoginLimiter
from engine.serve.thumbnails import Thumbnails


@dataclass
class ServeState:
    """The shared library handle, the collection's engine and the service's helpers."""

    config: ServeConfig
    clip: Clipbt
    engine: Engine
    batcher: SearchBatcher
    limiter: LoginLimiter
    thumbnails: Thumbnails

    @property
    def store(self):
        return self.clip.store


def get_state(request: Request) -> ServeState:
    """The running app's state (a dependency: tests may override it)."""
    return request.app.state.serve
