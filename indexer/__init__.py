"""Indexing: the CLIP encoder, safe image decoding, the ingestion pipeline, vector indexes (indexer.vectors), clip-retrieval import/export."""

import lazy_loader

# The public names, each imported from its module on first use (the encoder and the pipeline load torch).
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "embeddings_io": ("ImportReport", "export_embeddings", "import_embeddings"),
        "encoder": ("Encoder",),
        "errors": (
            "EmbeddingsFormatError",
            "FaissUnavailableError",
            "IndexTypeError",
            "ModelUnavailableError",
            "PathNotFoundError",
            "RayClusterError",
            "RayUnavailableError",
        ),
        "images": ("Skip",),
        "pipeline": ("IndexOptions", "IndexReport", "index_paths"),
        "vectors.base": ("VectorIndex",),
        "vectors.collection": ("open_index",),
        "ray_executor": ("RayIndexReport", "RayOptions", "index_paths_ray"),  # imports ray only when a run starts
    },
)
