"""Numeric helpers every package shares: the one check of embedding arrays, and the one logistic function."""

import numpy as np

from storage.errors import ClipbtError, InvalidRecordError


def check_vectors(
    array,
    name: str,
    dim: int | None = None,
    error: type[ClipbtError] = InvalidRecordError,
    nonzero: bool = True,
    what: str = "embeddings",
) -> np.ndarray:
    """`array` as a float32 (n, d) array, or `error` naming the first bad value.

    Checks: two dimensions (d == `dim` when given); every value finite (one reduction in the
    common case, the culprit located only when the sum is not finite); with `nonzero`, no
    all-zero row (it has no direction).
    """
    a = np.asarray(array)
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise error(f"{name} must have shape {want}, got {a.shape}")
    if a.dtype.kind not in "fiu":
        raise error(f"{name} must hold numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32) if a.dtype != np.float64 else a
    if a.size and not np.isfinite(a.sum(dtype=np.float64)):
        bad = np.argwhere(~np.isfinite(a))
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise error(f"{name}[{i}, {j}] is {a[i, j]}: {what} must be finite")
        raise error(f"{name} overflows: its values are too large to be {what}")
    if nonzero and a.size:
        zero = ~a.any(axis=1)
        if zero.any():
            raise error(f"{name}[{int(np.flatnonzero(zero)[0])}] is a zero vector: {what} must be non-zero")
    return a.astype(np.float32, copy=False)


def logistic(z):
    """sigmoid(z) = 1 / (1 + exp(-z)) in numpy, without overflow for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))
