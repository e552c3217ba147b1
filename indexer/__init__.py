"""Indexing: the CLIP encoder, safe image decoding, the ingestion pipeline, FAISS indexes, clip-retrieval import/export."""

import importlib

_EXPORTS = {  # module -> the names imported from it on first use (the encoder and pipeline load torch)
    "indexer.embeddings_io": ("ImportReport", "export_embeddings", "import_embeddings"),
    "indexer.encoder": ("Encoder",),
    "indexer.errors": (
        "EmbeddingsFormatError",
        "FaissUnavailableError",
        "IndexTypeError",
        "ModelUnavailableError",
        "PathNotFoundError",
    ),
    "indexer.faiss_index": ("build_index", "require_faiss", "search"),
    "indexer.images": ("Skip",),
    "indexer.pipeline": ("IndexOptions", "IndexReport", "SearchIndex", "index_paths", "open_index"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    """Import a public name from its module when it is first asked for (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value
