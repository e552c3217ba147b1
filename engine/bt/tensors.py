"""Conversion of numpy arrays and torch tensors for the BT math, and the checks every public function runs once at its boundary."""

import numpy as np
import torch

from engine.bt.common import AdaptationInputError


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f":
            a = a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(a))
    raise AdaptationInputError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")


def _like(result: torch.Tensor, template):
    """Return `result` as the kind (numpy or torch) of `template`."""
    if isinstance(template, np.ndarray):
        return result.detach().cpu().numpy()
    return result


def _check_finite(t: torch.Tensor, name: str) -> None:
    # A NaN or inf anywhere makes the sum non-finite: one fast reduction in the common case
    # (torch.isfinite over the whole array is several times slower). Only a non-finite sum, from
    # a bad value or an overflow of finite ones, pays for locating the culprit.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    bad = torch.nonzero(~torch.isfinite(t))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        where = f"[{index[0]}]" if len(index) == 1 else f"[{', '.join(map(str, index))}]"
        raise AdaptationInputError(f"{name}{where} is {t[index].item()}: embeddings must be finite")


def _check_nonzero_rows(t: torch.Tensor, name: str) -> None:
    """Rows must be non-zero (call after _check_finite)."""
    zero = torch.linalg.vector_norm(t, dim=-1) == 0
    if t.numel() == 0 or not bool(zero.any()):
        return
    row = tuple(int(i) for i in torch.nonzero(zero)[0])
    raise AdaptationInputError(
        f"{name}[{', '.join(map(str, row))}] is a zero vector: image embeddings must be non-zero"
    )


def _check_query(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 1:
        raise AdaptationInputError(f"{name} must be one vector of shape (d,), got shape {tuple(x.shape)}")
    _check_finite(x, name)


def _check_images(y: torch.Tensor, d: int, name: str) -> None:
    if y.ndim != 2 or y.shape[1] != d:
        raise AdaptationInputError(f"{name} must have shape (N, {d}) to match the query, got {tuple(y.shape)}")
    _check_finite(y, name)
    _check_nonzero_rows(y, name)


def _aligned_pairs(preferred, rejected, like: torch.Tensor):
    """Convert and validate the two sides of the pairs to the dtype and device of `like`."""
    d = like.shape[-1]
    p = _as_tensor(preferred, "preferred").to(like)
    r = _as_tensor(rejected, "rejected").to(like)
    _check_images(p, d, "preferred")
    _check_images(r, d, "rejected")
    if p.shape[0] != r.shape[0]:
        raise AdaptationInputError(
            f"preferred has {p.shape[0]} rows but rejected has {r.shape[0]}: pairs must be aligned"
        )
    return p, r


def _check_pairs(x, preferred, rejected):
    """Convert and validate a query and its pairs; returns tensors in x's dtype and device."""
    xt = _as_tensor(x, "x")
    _check_query(xt)
    return (xt, *_aligned_pairs(preferred, rejected, xt))


def _check_weights(weights, n: int, like: torch.Tensor) -> torch.Tensor | None:
    if weights is None:
        return None
    w = _as_tensor(weights, "weights").to(like)
    if w.shape != (n,):
        raise AdaptationInputError(f"weights must have shape ({n},), one per pair, got {tuple(w.shape)}")
    _check_finite(w, "weights")
    if bool((w < 0).any()):
        i = int(torch.nonzero(w < 0)[0, 0])
        raise AdaptationInputError(f"weights[{i}] is {w[i].item()}: pair weights must be >= 0")
    return w
