"""The data home: where clipbt keeps its database, embeddings and indexes."""

import os
from pathlib import Path

ENV_VAR = "CLIPBT_HOME"


def data_home(home: str | os.PathLike | None = None) -> Path:
    """Return the data home: `home` if given, else $CLIPBT_HOME, else $XDG_DATA_HOME/clipbt
    (that is, ~/.local/share/clipbt). The folder is created if missing."""
    if home is None:
        home = os.environ.get(ENV_VAR) or Path(
            os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        ) / "clipbt"
    path = Path(home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
