"""The configuration of the HTTP service: one frozen dataclass, with the bounds every request is held to."""

from dataclasses import dataclass, field
from pathlib import Path

from engine.search import SearchConfig


@dataclass(frozen=True)
class ServeConfig:
    """What `create_app` needs; `clipbt serve` fills it from its options."""

    home: Path | None = None  # data home (None: $CLIPBT_HOME, else ~/.local/share/clipbt)
    db: str | None = None  # database URL (None: the SQLite file in the data home)
    collection: str = "default"  # the collection searched
    https_only: bool = False  # session cookie marked Secure (set when served behind TLS)
    session_lifetime_s: float = 7 * 86400  # how long a web login lasts
    max_k: int = 100  # largest k a search may ask for
    max_query_chars: int = 500  # longest query text
    max_items: int = 100  # most images in one ranking or feedback
    max_body_bytes: int = 64 * 1024  # larger request bodies are refused with 413
    batch_size: int = 64  # most searches answered by one search_many
    batch_window_s: float = 0.002  # how long the first search of a batch waits for company
    login_failures: int = 5  # failed logins allowed per account name and per client address ...
    login_window_s: float = 300.0  # ... within this many seconds; more get 429
    thumbnail_size: int = 256  # longest side of a thumbnail, pixels
    duel_depth: int = 20  # the duel pair is chosen among this many of the user's top results
    search: SearchConfig = field(default_factory=SearchConfig)  # adaptation and ranking settings
