"""The vector-index interface every backend implements (FAISS, clipbt's exact kernel, Milvus), and the brute-force reference they are tested against."""

import abc
from pathlib import Path

import numpy as np


class VectorIndex(abc.ABC):
    """Inner-product nearest-neighbour search over unit-norm embeddings, keyed by int64 image ids.

    Every method takes and returns numpy arrays: ids int64 (n,), vectors float32 (n, d), queries
    float32 (B, d). Removed ids are never returned again, without asking the backend for deeper
    results. `search` pads missing results with score -inf and id -1.
    """

    dim: int  # embedding dimension d
    kind: str  # what it is, as `clipbt info` prints it: "faiss:flat", "exact:bfloat16+float32", "milvus:HNSW"
    exact: bool  # True: results equal a float32 brute-force top-k, ties allowed

    @abc.abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (n, d) under new ids (n,); an id already present is an error."""

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Stop returning these ids; returns how many were present."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: (scores float32 (B, k), ids int64 (B, k)), best first."""

    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """The live ids, int64 ascending."""

    @abc.abstractmethod
    def save(self, directory: Path) -> dict:
        """Persist into `directory` atomically (a killed save leaves the previous state loadable); returns the manifest."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path) -> "VectorIndex":
        """The index `save` left in `directory`; InvalidIndexError naming the file when it cannot."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-ready description: kind, dim, count, device, and the backend's own settings."""

    def __len__(self) -> int:
        return int(self.ids().size)


def brute_force_topk(
    ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference every implementation is checked against: float64 scores, stable order, (B, k) padded with -inf / -1."""
    scores = np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    found = np.asarray(ids, np.int64)[order]
    pad = k - top.shape[1]
    if pad > 0:
        top = np.hstack([top, np.full((len(top), pad), -np.inf)])
        found = np.hstack([found, np.full((len(found), pad), -1, np.int64)])
    return top, found


def check_added(ids, vectors, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`add`'s arguments as int64 ids (n,) and float32 vectors (n, dim), or ValueError naming the shapes."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must be (n, {dim}), got {vectors.shape}")
    if ids.shape != (len(vectors),):
        raise ValueError(f"need one id per vector: {ids.shape} ids for {len(vectors)} vectors")
    return ids, vectors
