"""The plain dataclasses the store takes and returns."""

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Collection:
    """A named set of images embedded by one model."""

    id: int
    name: str
    model: str  # open_clip architecture, e.g. "ViT-B-32"
    pretrained: str  # open_clip pretrained tag, or "sha256:<64 hex>" of a checkpoint file
    dim: int  # embedding dimension
    embedding_dtype: str = "float16"  # how embeddings are stored: "float16" or "float32"
    checkpoint_path: str | None = None  # where the "sha256:" checkpoint file was last read from
    vector_backend: str | None = None  # None: index files in the data home; "milvus": a Milvus collection
    vector_uri: str | None = None  # the Milvus URI (a milvus-lite path or http(s)://host:port), no credential
    vector_index_type: str | None = None  # the Milvus index type name (flat, hnsw, ivf, GPU_...)

    def check_model(self, model: str, pretrained: str, dim: int, fix: str) -> None:
        """CollectionMismatchError, naming both models and `fix`, unless this collection was embedded by (model, pretrained, dim)."""
        from storage.errors import CollectionMismatchError

        if (self.model, self.pretrained, self.dim) != (model, pretrained, dim):
            raise CollectionMismatchError(
                f"collection {self.name!r} holds embeddings of {self.model}/{self.pretrained} "
                f"(dim {self.dim}), not {model}/{pretrained} (dim {dim}); {fix}"
            )


@dataclass(frozen=True)
class ImageRecord:
    """An image to add: what the indexer knows about one file."""

    uri: str  # absolute path or URL; unique among the live images of a collection
    sha256: str  # 64 lowercase hex digits of the file content
    width: int
    height: int
    caption: str | None = None
    metadata: dict | None = None  # any JSON-serialisable dict


@dataclass(frozen=True)
class Image:
    """A stored image row."""

    id: int  # also its FAISS id
    collection_id: int
    uri: str
    sha256: str
    width: int
    height: int
    caption: str | None
    metadata: dict | None
    added: datetime  # UTC
    deleted: bool


@dataclass(frozen=True)
class PreferencePair:
    """`preferred_id` was preferred over `rejected_id` for `query`: stored, or implied."""

    id: int | None  # the pair's row id; None when implied by a ranking or feedback
    user: str
    query: str
    preferred_id: int
    rejected_id: int
    weight: float
    source: str  # "pair", "ranking", "feedback", or what the caller passed
    created: datetime  # UTC
    collection_id: int
    ranking_id: int | None = None  # the ranking or feedback that implies this pair


@dataclass(frozen=True)
class Ranking:
    """A full ranking of two or more images for one query, best first (for Plackett-Luce)."""

    id: int
    query: str
    image_ids: list[int]
    user: str
    collection_id: int
    source: str
    created: datetime  # UTC


@dataclass(frozen=True)
class Feedback:
    """Thumbs up / thumbs down on images for one query; implies every good over every bad."""

    id: int
    query: str
    good_ids: list[int]
    bad_ids: list[int]
    user: str
    collection_id: int
    source: str
    created: datetime  # UTC


@dataclass
class ConsistencyReport:
    """What `Store.check_consistency` found; `ok` when `problems` is empty."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # rows per table

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return "store consistent: " + ", ".join(f"{n} {t}" for t, n in self.counts.items())
        return "store inconsistent:\n" + "\n".join(f"  - {p}" for p in self.problems)


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference to import (`Store.import_preferences`), its images already resolved to ids."""

    kind: str  # "pair", "ranking" or "feedback"
    user: str
    collection_id: int
    query: str
    items: tuple[tuple[int, int], ...]  # (image id, tier): pair ((preferred, 0), (rejected, 1));
    # ranking: tier = position; feedback: 0 good, 1 bad
    source: str
    weight: float = 1.0  # pairs only
    created: datetime | None = None  # kept when given (part of the record's identity), else now
