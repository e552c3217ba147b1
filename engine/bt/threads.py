"""Thread counts around the small products of the BT math: numpy's BLAS set to one thread once per process; torch on one thread for a block."""

import functools
import threading
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

# torch's thread count is process-wide: the lock keeps one thread's limit-and-restore from
# interleaving with another's (which could leave the limit in place for good).
_torch_threads_lock = threading.Lock()


@contextmanager
def one_torch_thread():
    """Run a block with torch on one CPU thread: the BT steps are many small tensor operations,
    where more threads cost more than they save and compete with FAISS's own threads."""
    import torch

    with _torch_threads_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@functools.cache
def numpy_blas_on_one_thread() -> None:
    """Set numpy's own BLAS (not FAISS's or torch's) to one thread, once for the process.

    The span form's products are small, and a threaded OpenBLAS keeps its threads spinning for a
    while after each call, starving FAISS's: on 2 cores a plain 100k query took 39 ms instead of
    17 right after one threaded (50, 512) Gram product (benchmarks/bench_query.py setup). Set once
    rather than limited and restored around each call, so concurrent searches share no lock.
    """
    controller = ThreadpoolController()
    numpy_blas = [pool for pool in controller.lib_controllers if pool.prefix == "libscipy_openblas"]
    for pool in numpy_blas or controller.select(user_api="blas").lib_controllers[:1]:
        pool.set_num_threads(1)
