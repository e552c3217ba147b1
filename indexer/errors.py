"""Typed errors of the indexer: each names the offending value and what to do instead."""

from storage.errors import ClipbtError


class ModelUnavailableError(ClipbtError):
    """The requested CLIP model or its weights cannot be had (unknown name, tag, file, or no network/cache)."""


class FaissUnavailableError(ClipbtError):
    """The `faiss` module cannot be imported."""


class IndexTypeError(ClipbtError):
    """An index type is neither a known name nor a valid FAISS factory string."""


class PathNotFoundError(ClipbtError):
    """A path given to index does not exist."""


class EmbeddingsFormatError(ClipbtError):
    """A precomputed-embeddings folder does not follow the clip-retrieval layout or does not fit the collection."""


class RayUnavailableError(ClipbtError):
    """The Ray executor was asked for but `ray[data]` is not installed."""


class RayClusterError(ClipbtError):
    """The Ray cluster cannot run the job: it cannot be reached, lacks the GPUs asked for, or a run already holds the staging folder."""


class MilvusError(ClipbtError):
    """A Milvus server or milvus-lite file cannot be reached or used: bad URI, unreachable server, missing client."""
