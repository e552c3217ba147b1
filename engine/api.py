"""The library API that the CLI and the HTTP service call: open a store, get the shared engine of a collection, search, record preferences, compare, describe."""

import threading
from collections.abc import Sequence
from pathlib import Path

from engine.preferences import check_has_collection
from engine.search import Engine, Hit, SearchConfig, SearchRequest
from storage import Store


class Clipbt:
    """One store and the shared engines of its collections: what a process works through.

    Safe to share between threads: each collection gets one Engine (one loaded index, one
    encoder, bounded caches), made on first use.

        with Clipbt.open() as clip:
            hits = clip.search("a red circle", user="ann", k=5)
            clip.prefer("ann", "a red circle", hits[1].id, hits[0].id)
    """

    def __init__(self, store: Store, config: SearchConfig = SearchConfig()):
        self.store = store
        self.config = config
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, home: str | Path | None = None, db: str | None = None, config: SearchConfig = SearchConfig()
    ) -> "Clipbt":
        """The store at database URL `db`, else the SQLite file in the data home `home`."""
        return cls(Store.open(db, home=home), config)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Clipbt":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def engine(self, collection: str = "default") -> Engine:
        """The shared engine of a collection; EmptyCollectionError when nothing was indexed yet."""
        with self._lock:
            engine = self._engines.get(collection)
            if engine is None:
                engine = self._engines[collection] = Engine.open(self.store, collection, self.config)
            return engine

    def search(
        self,
        query: str | None = None,
        user: str | None = None,
        k: int = 10,
        collection: str = "default",
        vector=None,
        config: SearchConfig | None = None,
    ) -> list[Hit]:
        """The k best images for `query` (or a query `vector`), personalised for `user`."""
        return self.engine(collection).search(query, user, k, vector, config)

    def search_many(
        self, requests: Sequence[SearchRequest], collection: str = "default", config: SearchConfig | None = None
    ) -> list[list[Hit]]:
        """Many searches answered by one batched adaptation and one index search."""
        return self.engine(collection).search_many(requests, config)

    def prefer(
        self, user: str, query: str, preferred: int | str, rejected: int | str, collection: str = "default"
    ) -> int:
        """Record that `user` preferred one image (id or path) over another for `query`."""
        return self.engine(collection).prefer(user, query, preferred, rejected)

    def rank(self, user: str, query: str, images: Sequence[int | str], collection: str = "default") -> int:
        """Record `user`'s ranking of images for `query`, best first."""
        return self.engine(collection).rank(user, query, images)

    def feedback(
        self, user: str, query: str, good: Sequence[int | str], bad: Sequence[int | str], collection: str = "default"
    ) -> int:
        """Record thumbs up and down for `query`: every good image over every bad one."""
        return self.engine(collection).feedback(user, query, good, bad)

    def compare(self, user: str | None, query: str, a: int | str, b: int | str, collection: str = "default") -> float:
        """P(a over b) for `user` and `query`."""
        return self.engine(collection).compare(user, query, a, b)

    def info(self, collection: str = "default") -> dict:
        """What `clipbt info` shows: the collection, its model, counts, index type, where the vectors
        live (backend, with the Milvus URI) and devices."""
        from indexer.vectors.collection import IndexFiles

        check_has_collection(self.store)
        store = self.store
        coll = store.collection(collection)
        users = store.users()
        saved = IndexFiles(store, coll).identity() or {}
        images = len(store.image_ids(coll.id))
        return {
            "collection": coll.name,
            "model": coll.model,
            "pretrained": coll.pretrained,
            "dim": coll.dim,
            "images": images,
            "deleted": len(store.deleted_ids(coll.id)),
            "users": len(users),
            "pairs": sum(len(store.pairs(u, coll.id)) for u in users),
            "index_type": saved.get("index_type", "none (built on first search)"),
            "backend": "faiss (index files in the data home)",
            "flat_search": _flat_choice(images, coll.dim),
            "device": _devices(),
        } | (
            {"index_type": coll.vector_index_type, "backend": f"milvus at {coll.vector_uri}"}
            if coll.vector_backend == "milvus"
            else {}
        )


def _flat_choice(n: int, dim: int) -> str:
    """Which exact search suits this machine (`indexer.vectors.exact.choose_flat_backend`), and why."""
    import torch

    from indexer.vectors.exact import choose_flat_backend

    backend, reason = choose_flat_backend(n, dim, "cuda" if torch.cuda.is_available() else "cpu")
    return f"{backend}: {reason}"


def _devices() -> str:
    """Where the encoder and the index run: "cpu, faiss on cpu", "cuda, faiss on gpu", ..."""
    import torch

    from indexer.errors import FaissUnavailableError
    from indexer.vectors.faiss import require_faiss

    try:
        faiss = require_faiss()
        index = f"faiss on {'gpu' if hasattr(faiss, 'get_num_gpus') and faiss.get_num_gpus() else 'cpu'}"
    except FaissUnavailableError:
        index = "faiss not installed"
    return f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {index}"
