"""Typed errors of clipbt: every deliberate failure is a ClipbtError whose message names the bad value."""


class ClipbtError(Exception):
    """Base of every error clipbt raises on purpose; the CLI prints it as `Error: <message>`.

    `public`, when given, is the message for a remote caller (the HTTP service): the same value
    named, without what only the machine's owner may see, such as file paths on the server.
    """

    def __init__(self, message: str = "", *, public: str | None = None):
        super().__init__(message)
        self.public = public

    @property
    def public_message(self) -> str:
        return self.public if self.public is not None else str(self)


class StoreError(ClipbtError):
    """The store cannot be opened or used: unreachable database, unsupported URL."""


class SchemaVersionError(StoreError):
    """The store was written by a newer clipbt whose schema this version cannot read."""


class StoreCorruptError(StoreError):
    """Stored data contradicts itself in a way that cannot be repaired by rebuilding."""


class UnknownCollectionError(ClipbtError, LookupError):
    """No collection has this name or id."""


class EmptyCollectionError(ClipbtError, LookupError):
    """The store has no collection yet, or the collection no live image to search."""


class CollectionExistsError(ClipbtError, ValueError):
    """A collection with this name already exists."""


class CollectionMismatchError(ClipbtError, ValueError):
    """An existing collection was made with another model, checkpoint or dimension."""


class UnknownImageError(ClipbtError, LookupError):
    """No live image has this id or uri."""


class ForeignImageError(ClipbtError, ValueError):
    """The image exists but belongs to another collection than the one asked for."""


class DuplicateImageError(ClipbtError, ValueError):
    """A live image with this uri is already in the collection."""


class InvalidRecordError(ClipbtError, ValueError):
    """An image record or embedding array is malformed."""


class UnknownUserError(ClipbtError, LookupError):
    """No user has this name."""


class InvalidUserError(ClipbtError, ValueError):
    """A user name is empty or too long."""


class InvalidPreferenceError(ClipbtError, ValueError):
    """A pair, ranking or feedback is malformed: same image twice, empty query, bad weight."""


class InvalidIndexError(ClipbtError, ValueError):
    """A FAISS index handed to the vector store cannot be saved as the collection's index."""


class DiskFullError(StoreError):
    """The disk holding the database or the index files is full; nothing of the write was kept."""


def disk_full_error(exc: BaseException, where) -> "DiskFullError | None":
    """A DiskFullError naming `where` when `exc` is the operating system's or a database's
    "no space left" (ENOSPC, SQLITE_FULL, PostgreSQL's disk_full); else None."""
    import errno

    text = str(getattr(exc, "orig", None) or exc)
    full = (
        getattr(exc, "errno", None) == errno.ENOSPC
        or getattr(getattr(exc, "orig", None), "sqlite_errorname", None) == "SQLITE_FULL"
        or getattr(getattr(exc, "orig", None), "sqlstate", None) == "53100"
        or "No space left on device" in text
        or "database or disk is full" in text
    )
    if not full:
        return None
    return DiskFullError(
        f"no space left on {where}: free some space and run the command again "
        f"(the unfinished write was discarded; what was stored before is intact)"
    )


class AccountExistsError(ClipbtError, ValueError):
    """A `clipbt serve` account with this name already exists."""


class UnknownAccountError(ClipbtError, LookupError):
    """No `clipbt serve` account (or no such token of it) has this name or id."""
