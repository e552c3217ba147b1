"""Indexing: the CLIP encoder, safe image decoding, the ingestion pipeline, FAISS indexes, clip-retrieval import/export."""

from indexer.embeddings_io import ImportReport, export_embeddings, import_embeddings
from indexer.encoder import Encoder
from indexer.errors import (
    EmbeddingsFormatError,
    FaissUnavailableError,
    IndexTypeError,
    ModelUnavailableError,
    PathNotFoundError,
)
from indexer.faiss_index import build_index, require_faiss, search
from indexer.images import Skip
from indexer.pipeline import IndexOptions, IndexReport, SearchIndex, index_paths, open_index

__all__ = [
    "EmbeddingsFormatError",
    "Encoder",
    "FaissUnavailableError",
    "ImportReport",
    "IndexOptions",
    "IndexReport",
    "IndexTypeError",
    "ModelUnavailableError",
    "PathNotFoundError",
    "SearchIndex",
    "Skip",
    "build_index",
    "export_embeddings",
    "import_embeddings",
    "index_paths",
    "open_index",
    "require_faiss",
    "search",
]
