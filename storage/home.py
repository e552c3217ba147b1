"""The data home: where clipbt keeps its database, embeddings and indexes."""

import os
from pathlib import Path

ENV_VAR = "CLIPBT_HOME"


def data_home(home: str | os.PathLike | None = None) -> Path:
    """Return the data home: `home` if given, else $CLIPBT_HOME, else $XDG_DATA_HOME/clipbt
    (that is, ~/.local/share/clipbt). The folder is created if missing, readable by its owner
    only (0700): it holds every user's preferences."""
    if home is None:
        home = (
            os.environ.get(ENV_VAR)
            or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "clipbt"
        )
    path = Path(home).expanduser()
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is reduced by the umask, never raised; this is exact
    return path


def create_private_file(path: Path) -> None:
    """Create an empty file readable and writable by its owner only (0600), unless it exists.
    SQLite gives its -wal and -shm files the mode of the database file."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    os.chmod(path, 0o600)
