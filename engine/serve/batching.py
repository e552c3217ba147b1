"""Micro-batching of concurrent searches: requests arriving together are answered by one `search_many` call."""

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence

from engine.search import Hit, SearchRequest
from storage.errors import ClipbtError

_STOP = object()


class SearchBatcher:
    """A worker thread that answers queued searches in batches.

    The first request of a batch waits up to `window_s` for others (or until `max_batch` are
    queued), then all of them go through `search_many` together: one batched adaptation and one
    index search, each request with its own user and k. While a batch is being answered the next
    one queues up, so under load batches grow by themselves. If a batch fails with a ClipbtError,
    its requests are answered one by one, so a bad request only fails itself.
    """

    def __init__(
        self,
        search_many: Callable[[Sequence[SearchRequest]], list[list[Hit]]],
        max_batch: int = 64,
        window_s: float = 0.002,
    ):
        self._search_many = search_many
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0  # search_many calls made
        self.searches = 0  # requests answered (batches * their mean size)
        self.largest = 0  # largest batch so far

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clipbt-search-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    async def search(self, request: SearchRequest) -> list[Hit]:
        """The hits of one request, answered in whatever batch it lands in."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((request, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.window_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list) -> None:
        requests = [request for request, _, _ in batch]
        try:
            outcomes = [(hits, None) for hits in self._search_many(requests)]
            self.batches += 1
        except ClipbtError:
            outcomes = []
            for request in requests:
                try:
                    outcomes.append((self._search_many([request])[0], None))
                except Exception as exc:  # handed to the request's own coroutine, raised there
                    outcomes.append((None, exc))
                self.batches += 1
        except Exception as exc:
            outcomes = [(None, exc)] * len(batch)
        self.largest = max(self.largest, len(batch))
        self.searches += len(batch)
        for (_, loop, future), (hits, exc) in zip(batch, outcomes):
            loop.call_soon_threadsafe(_settle, future, hits, exc)


def _settle(future: asyncio.Future, hits, exc) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(hits)
