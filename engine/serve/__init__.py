"""`clipbt serve`: the HTTP API and web page over one shared Clipbt (create_app, ServeConfig)."""

import os

# OpenMP threads that finish a parallel region spin for a while before sleeping. In the service the
# event loop and the clients need the same cores, so FAISS's spinning threads slowed each batched
# search several-fold (benchmarks/bench_serve.py). OpenMP reads this once, when FAISS or torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.serve.app import create_app  # noqa: E402
from engine.serve.config import ServeConfig  # noqa: E402

__all__ = ["create_app", "ServeConfig"]
