"""`clipbt serve`: the HTTP API and web page over one shared Clipbt (create_app, ServeConfig)."""

from engine.serve.app import create_app
from engine.serve.config import ServeConfig

__all__ = ["create_app", "ServeConfig"]
