"""ExactIndex: exact inner-product search as one matrix product and top-k (torch, CPU and CUDA), a proven low-precision candidate pass, and the rule choosing it over FAISS.

How a search runs (queries Q float32 (B, d), k results each):

1. Candidate pass. The stored rows X are held once more in a low precision, their "sketch": int8
   codes packed for fbgemm on a CPU (`precision="int8"`), float16 on CUDA (`"float16"`). The
   sketch product S~ = Q^ X^T is taken chunk by chunk (`chunk_rows` rows at a time, so a search
   never holds more than a (B, chunk_rows) block of scores), deleted rows are masked to -inf, the
   running k-th best lower bound L (below) per query is kept, and every row of the chunk whose
   upper bound reaches it is collected from the chunk's top max(4k, 128) sketch scores: a superset
   of the final candidates, pruned after the last chunk; where that top ends above the final L,
   the chunk is scored again for that query and all its candidates taken.
2. Selection. With e_c the bound on |S~ - Q X^T| over chunk c (derived below, from the chunk's
   own R and N), every row's true score lies in [S~ - e_c, S~ + e_c]. Let L be the k-th best
   lower bound S~_j - e_c(j). A row is a candidate when its upper bound S~_i + e_c(i) >= L; with
   one e for all rows this is "S~_i within 2e of the k-th best S~". Proof: k rows have true
   scores >= L; a row with S~_i + e_c(i) < L has a true score < L, strictly below those k rows,
   so it is in no top-k, ties included.
3. Rescoring. The candidates' rows, stored exactly (float16 when that is lossless, as for the
   store's float16 embeddings, else float32; float32 always below `sketch_from_rows` rows), are scored in float32 against the float32 query and
   the top-k of those is returned: it equals the float32 top-k, ties allowed.
4. Fallback. A query of a block of B queries with more than
       min(`candidate_limit`, max(4k, rows / 256 + rows / (9 B)))
   candidates takes the float32 product over all rows instead, and `fallbacks` in describe()
   counts it. Past that count, rescoring candidates one by one (gathering each row) costs more
   than the product: measured on a 2-core AVX2 CPU, rescoring a candidate cost about as much as
   256 rows of a batched product, plus widening float16 rows to float32 for the product, a cost
   shared by the block, about as much as rescoring rows / 9 candidates. The queries falling back
   from all blocks of a search share one float32 pass, which on a CPU widens float16 rows
   `FLOAT32_ROWS` at a time. `precision="float32"` does that for all, and so does every search of
   a collection under `sketch_from_rows` rows (not counted).

The error bound e (per query; norms are Euclidean, u32 = 2^-24 the unit roundoff of float32):
write the query actually used as q (float32 values taken as exact reals), a stored row as x, and
their low-precision forms q^, x^. For real arithmetic
    |q.x - q^.x^| = |q.(x - x^) + (q - q^).x^| <= |q| |x - x^| + |q - q^| |x^|     (Cauchy-Schwarz)
           <= |q| R + r_q N,
where R = max |x - x^| and N = max |x^| over the rows of one chunk (so e is per chunk, e_c),
both computed in float64 when the chunk is built, and r_q = |q - q^| in float64 per query. The computed product adds its own rounding:

  int8 (CPU, fbgemm). Each row is scaled by w = max|x|/127 (float32) and rounded to codes c in
  [-127, 127], x^ = c w. Each query is first multiplied by a positive constant (63/64)/max|q|,
  which scales its scores and leaves their order alone, and rounded to q^ = m/64, m integer in
  [-63, 63]; 2^-6 is exact in binary so fbgemm's own quantisation of q^ (zero point 64) recovers m
  exactly, and 1 <= m + 64 <= 127 keeps every pair of AVX2's u8 x s8 products <= 2 * 127 * 127 =
  32258 < 2^15, so the int16 pair sums never saturate (checked at first use by `int8_available`).
  The int32 accumulation of m.c is then exact (|m.c| <= 63 * 127 * d < 2^31 for d < 268,000),
  and the dequantisation (acc to float32, 2^-6 * w, one product) rounds at most three times:
      e_int8 = |q| R + r_q N + 4 u32 |q^| N.
  (R ~ w sqrt(d / 12) is a few 0.01 for unit vectors of d = 512; the bound is rigorous,
  not the typical error.)

  float16 (CUDA; also runs on a CPU, for the tests). x^ = fl16(x), q^ = fl16(q): R and r_q as
  above (R = 0 when the rows are float16 already). Each product of two float16 numbers is exact
  in float32, and the sum accumulates in float32; allowing
  for accumulators that truncate instead of rounding, take u' = 2 u32 = 2^-23, so that a sum of
  d products errs by at most gamma_d sum |q^_i x^_i| <= gamma_d |q^| N with gamma_d = d u' /
  (1 - d u') (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1); the float16 output then rounds once more,
  relatively by 2^-11, or absolutely by 2^-25 in the subnormal range:
      e_fp16 = |q| R + r_q N + gamma_d |q^| N + 2^-11 (1 + gamma_d) |q^| N + 2^-25,
  and infinite (every row a candidate, so the query falls back) when |q^| N >= 2^15, where a
  float16 score could overflow.
  This needs cuBLAS to reduce in float32, so building a CUDA index sets
  torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False; a search that
  finds it switched back on takes the float32 fallback (counted).

Both bounds are multiplied by 1 + 2^-20 to cover the float64 arithmetic that computed R, N, r_q.
The comparisons with S~ - e and S~ + e are made in float32, so e is then enlarged by
4 u32 (|q^| N + e): more than the three roundings involved (e to float32, the sum, the
difference), each at most u32 (|q^| N + e), can take away.
"""

import hashlib
import json
import math
import os
import threading
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from indexer.vectors.base import VectorIndex
from indexer.vectors.faiss import write_atomic
from storage.errors import InvalidIndexError

PRECISIONS = ("auto", "int8", "float16", "float32")
FORMAT = 1  # version of the files `save` writes
U32 = 2.0**-24  # unit roundoff of float32
_SAFETY = 1.0 + 2.0**-20  # covers the float64 arithmetic of R, N and r_q
_Q_STEP = 2.0**-6  # grid of int8 queries: q^ = m / 64, |m| <= 63
_MANIFEST = "manifest.json"


CPU_QUERY_BLOCK = 64
FLOAT32_ROWS = 8192  # rows per slice of the float32 product on a CPU: buffers the allocator reuses


@dataclass(frozen=True)
class ExactConfig:
    """How an ExactIndex stores and searches; every field has a default that suits a CPU or a GPU."""

    device: str = "cpu"  # torch device of the stored rows: "cpu", "cuda", "cuda:1"
    precision: str = (
        "auto"  # candidate pass: "int8" (CPU fbgemm), "float16" (CUDA), "float32" (none); "auto" picks per device
    )
    chunk_rows: int = 65536  # rows per chunk: a search holds at most a (B, chunk_rows) block of scores
    sketch_from_rows: int = (
        50_000  # smaller collections skip the candidate pass: its loose window would take too many candidates
    )
    candidate_limit: int = (
        4096  # most candidates rescored per query (and at most max(4k, rows/64)); beyond, the float32 product
    )
    query_block: int | None = None  # queries searched together; None: 64 on a CPU, where a larger product
    # gets no cheaper per query and its score block only larger (benchmarks/bench_exact.py, by_batch_ms),
    # the whole batch on CUDA


def resolve_precision(precision: str, device: str) -> str:
    """The candidate pass `precision` means on `device`: "auto" is int8 on a CPU whose fbgemm passes `int8_available`, float16 on CUDA, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "float16" if cuda else ("int8" if int8_available() else "float32")
    if precision == "int8" and (cuda or not int8_available()):
        raise ValueError(
            f"precision 'int8' needs a CPU with torch's fbgemm int8 kernels (device {device!r}); use 'auto'"
        )
    return precision


@lru_cache(maxsize=1)
def int8_available() -> bool:
    """Whether torch's fbgemm int8 product is present and exact at the extremes the int8 pass uses (no int16 saturation)."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        for d in (77, 512):
            codes = torch.full((4, d), 127, dtype=torch.int8)
            codes[1], codes[2, ::2] = -127, -127
            query = torch.full((3, d), 63 * _Q_STEP)
            query[1], query[2, 1::3] = -63 * _Q_STEP, -63 * _Q_STEP
            got = _int8_product(query, _int8_pack(codes, torch.ones(4)))
            want = (query.double() / _Q_STEP) @ codes.double().T * _Q_STEP
            if not torch.equal(got.double(), want):
                return False
    except (RuntimeError, AttributeError):
        return False
    return True


def _int8_pack(codes: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 `codes` (m, d) with per-row float32 `scale` (m,)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # quantized tensors are deprecated; fbgemm's int8 GEMM still takes them
        weight = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(len(codes), dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(weight, None)


def _int8_product(q_hat: torch.Tensor, packed) -> torch.Tensor:
    """(B, m) float32: q^ (values m/64, |m| <= 63) times the packed codes, dequantised."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q_hat, _Q_STEP, 64, packed)


def int8_error_bound(q_norm, q_resid, q_hat_norm, resid: float, norm: float):
    """e_int8 = (|q| R + r_q N + 4 u32 |q^| N)(1 + 2^-20): the most an int8 sketch score errs (module docstring)."""
    return (q_norm * resid + q_resid * norm + 4 * U32 * q_hat_norm * norm) * _SAFETY


def float16_error_bound(q_norm, q_resid, q_hat_norm, resid: float, norm: float, dim: int):
    """e_fp16 = (|q| R + r_q N + gamma_d |q^| N + 2^-11 (1 + gamma_d) |q^| N + 2^-25)(1 + 2^-20), gamma_d = d 2^-23 / (1 - d 2^-23) (module docstring)."""
    unit = 2.0**-23
    if dim * unit >= 1:
        raise ValueError(f"dimension {dim} is too large for the float16 bound (needs d < 2^23)")
    gamma = dim * unit / (1 - dim * unit)
    bound = (
        q_norm * resid
        + q_resid * norm
        + gamma * q_hat_norm * norm
        + 2.0**-11 * (1 + gamma) * q_hat_norm * norm
        + 2.0**-25
    ) * _SAFETY
    return torch.where(q_hat_norm * norm < 2.0**15, bound, math.inf)  # past that a float16 score may overflow


def sketch_rows(rows: torch.Tensor, precision: str, block: int = 4096):
    """The candidate-pass form of exact `rows` (m, d): (sketch, R, N) with R = max |x - x^| and N = max |x^| in float64."""
    if precision == "float32":
        return None, 0.0, 0.0
    x = rows.float()
    if precision == "int8":
        amax = x.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        sketch = _int8_pack(codes, scale)
    else:
        sketch = rows if rows.dtype == torch.float16 else rows.half()
    resid = norm = 0.0
    for start in range(0, len(x), block):  # float64 in blocks: exact products c w, bounded memory
        part = x[start : start + block].double()
        if precision == "int8":
            x_hat = codes[start : start + block].double() * scale[start : start + block].double()[:, None]
        else:
            x_hat = sketch[start : start + block].double()
        resid = max(resid, float((part - x_hat).norm(dim=1).max()))
        norm = max(norm, float(x_hat.norm(dim=1).max()))
    return sketch, resid, norm


def _queries_for(precision: str, queries: torch.Tensor):
    """(q, q^, |q|, r_q, |q^|) per query: the query as the pass sees it (int8: rescaled by a positive constant), its low-precision form, and float64 norms."""
    if precision == "int8":
        amax = queries.abs().amax(1, keepdim=True).double()
        q = queries.double() * torch.where(amax > 0, (63 / 64) / amax, torch.ones_like(amax))
        q_hat = torch.round(q / _Q_STEP).clamp_(-63, 63) * _Q_STEP
        q_low = q_hat.float()
    else:
        q, q_low = queries.double(), queries.half()
        q_hat = q_low.double()
    return q_low, q.norm(dim=1), (q - q_hat).norm(dim=1), q_hat.norm(dim=1)


@dataclass(frozen=True)
class _Chunk:
    """Up to chunk_rows stored rows; never changed once published (add and remove publish new ones)."""

    ids: np.ndarray  # int64 (m,), dead rows included
    rows: torch.Tensor  # (m, d) exact: float16 when lossless, else float32 (float32 always without a pass)
    alive: torch.Tensor | None  # bool (m,), None when every row is live
    live: int  # rows alive
    sketch: object  # packed int8 codes, float16 rows, or None
    resid: float  # R: max |x - x^| over the chunk
    norm: float  # N: max |x^| over the chunk


@dataclass(frozen=True)
class _Snapshot:
    """What one search reads: the chunks, their first rows' positions, and all ids in row order."""

    chunks: tuple
    starts: np.ndarray  # int64 (chunks + 1,): row offset of each chunk, then the total
    ids: np.ndarray  # int64 (rows,) concatenated chunk ids
    live_ids: np.ndarray  # int64 ascending


def _snapshot(chunks) -> _Snapshot:
    chunks = tuple(chunk for chunk in chunks if len(chunk.ids))
    starts = np.concatenate([[0], np.cumsum([len(c.ids) for c in chunks])]).astype(np.int64)
    ids = np.concatenate([c.ids for c in chunks]) if chunks else np.zeros(0, np.int64)
    live = [c.ids if c.alive is None else c.ids[c.alive.cpu().numpy()] for c in chunks]
    live_ids = np.sort(np.concatenate(live)) if live else np.zeros(0, np.int64)
    return _Snapshot(chunks, starts, ids, live_ids)


class ExactIndex(VectorIndex):
    """Exact top-k by inner product over unit vectors, held in memory on one torch device; safe to search from many threads.

    Build: `ExactIndex(dim, ExactConfig(device=...))` then `add(ids, vectors)`, or `ExactIndex.load(directory)`.
    Searches read an immutable snapshot; add and remove take a lock, build new chunks and publish a new snapshot.
    """

    exact = True

    def __init__(self, dim: int, config: ExactConfig = ExactConfig()):
        if dim < 1:
            raise ValueError(f"dimension {dim} must be positive")
        if min(config.chunk_rows, config.candidate_limit, 1 if config.query_block is None else config.query_block) < 1:
            raise ValueError(f"chunk_rows, candidate_limit and query_block must be positive, got {config}")
        self.dim = dim
        self.device = torch.device(config.device)
        self.precision = resolve_precision(config.precision, config.device)
        self.config = replace(config, precision=self.precision)
        self.kind = f"exact:{self.precision}" + ("+float32" if self.precision != "float32" else "")
        if self.device.type == "cuda" and self.precision == "float16":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        self._lock = threading.Lock()  # serialises add and remove; searches never take it
        self._save_lock = threading.Lock()  # one save at a time: they share the manifest's temp file
        self._counter_lock = threading.Lock()
        self._fallbacks = 0
        self._snap = _snapshot(())

    # ---- building ----

    def _chunk(self, ids: np.ndarray, rows32: torch.Tensor, alive: torch.Tensor | None, total: int) -> _Chunk:
        """A chunk holding float32 `rows32` (m, d) on the device, stored float16 where that loses nothing and the
        index, of `total` rows, is large enough for the candidate pass (smaller ones take the float32 product every search)."""
        rows = rows32
        if self.precision != "float32" and total >= self.config.sketch_from_rows:
            half = rows32.half()
            if torch.equal(half.float(), rows32):
                rows = half
        if alive is not None and bool(alive.all()):
            alive = None
        sketch, resid, norm = sketch_rows(rows, self.precision)
        live = len(ids) if alive is None else int(alive.sum())
        return _Chunk(ids, rows, alive, live, sketch, resid, norm)

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"{what} have shape {vectors.shape}, this index holds dimension {self.dim}: pass ({what[0]}, {self.dim})"
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = self._check_vectors(vectors, "vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape != (len(vectors),):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors: pass one id per vector")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity: pass finite unit vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids repeat within this batch: pass each id once")
        if not len(ids):
            return
        with self._lock:
            snap = self._snap
            present = ids[np.isin(ids, snap.live_ids)]
            if present.size:
                raise ValueError(f"ids already in the index: {present[:5].tolist()}: remove them first")
            chunks = list(snap.chunks)
            total = int(snap.starts[-1]) + len(ids)
            new_rows = torch.from_numpy(vectors.copy() if self.device.type == "cpu" else vectors).to(
                self.device
            )  # never the caller's memory
            size = self.config.chunk_rows
            if chunks and len(chunks[-1].ids) < size:
                last = chunks.pop()
                room = size - len(last.ids)
                alive = (
                    None
                    if last.alive is None
                    else torch.cat([last.alive, torch.ones(min(room, len(ids)), dtype=torch.bool, device=self.device)])
                )
                chunks.append(
                    self._chunk(
                        np.concatenate([last.ids, ids[:room]]),
                        torch.cat([last.rows.float(), new_rows[:room]]),
                        alive,
                        total,
                    )
                )
                ids, new_rows = ids[room:], new_rows[room:]
            for start in range(0, len(ids), size):
                chunks.append(
                    self._chunk(ids[start : start + size], new_rows[start : start + size].contiguous(), None, total)
                )
            self._snap = _snapshot(chunks)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        removed = 0
        with self._lock:
            chunks = []
            for chunk in self._snap.chunks:
                alive = np.ones(len(chunk.ids), bool) if chunk.alive is None else chunk.alive.cpu().numpy()
                hit = np.isin(chunk.ids, ids) & alive
                if not hit.any():
                    chunks.append(chunk)
                    continue
                removed += int(hit.sum())
                alive = alive & ~hit
                if not alive.any():
                    continue
                if alive.sum() * 2 < len(alive):  # mostly dead: rebuild from the live rows
                    keep = torch.from_numpy(np.flatnonzero(alive)).to(self.device)
                    chunks.append(
                        self._chunk(chunk.ids[alive], chunk.rows.float()[keep], None, int(self._snap.starts[-1]))
                    )
                else:
                    chunks.append(replace(chunk, alive=torch.from_numpy(alive).to(self.device), live=int(alive.sum())))
            self._snap = _snapshot(chunks)
        return removed

    def ids(self) -> np.ndarray:
        return self._snap.live_ids.copy()

    def __len__(self) -> int:
        return int(self._snap.live_ids.size)

    # ---- searching ----

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check_vectors(queries, "queries")
        if k < 1:
            raise ValueError(f"k = {k}: ask for at least one result")
        snap = self._snap  # one snapshot for every block: concurrent adds and removes are seen by all or none
        batch = len(queries)
        scores = np.full((batch, k), -np.inf, np.float32)
        found = np.full((batch, k), -1, np.int64)
        if not batch or not snap.live_ids.size:
            return scores, found
        block = self.config.query_block or (batch if self.device.type == "cuda" else CPU_QUERY_BLOCK)
        q = torch.from_numpy(queries).to(self.device)
        with torch.inference_mode():
            exact_rows = torch.arange(batch, device=self.device)
            sketched = (
                self.precision != "float32"
                and snap.starts[-1] >= self.config.sketch_from_rows
                and not self._reduced_reduction_on()
            )
            if sketched:
                left = []
                for at in range(0, batch, block):
                    top, pos, rest = self._search_sketch(snap, q[at : at + block], k)
                    scores[at : at + len(top), : top.shape[1]] = top.cpu().numpy()
                    found[at : at + len(top), : top.shape[1]] = _ids_at(snap, pos.cpu().numpy())
                    left.append(rest + at)
                exact_rows = torch.cat(left)
            if len(exact_rows):  # one float32 pass for the queries of every block that fell back
                top, pos = self._search_float32(snap, q[exact_rows], k, block)
                chosen = exact_rows.cpu().numpy()
                scores[chosen, : top.shape[1]] = top.cpu().numpy()
                found[chosen, : top.shape[1]] = _ids_at(snap, pos.cpu().numpy())
                if sketched:
                    with self._counter_lock:
                        self._fallbacks += len(chosen)
        return scores, found

    def _reduced_reduction_on(self) -> bool:
        return self.device.type == "cuda" and torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction

    def _sketch_scores(self, chunk: _Chunk, q_low: torch.Tensor) -> torch.Tensor:
        """(B, m) float32 sketch scores of one chunk, deleted rows at -inf."""
        if self.precision == "int8":
            s = _int8_product(q_low, chunk.sketch)
        else:
            s = (q_low @ chunk.sketch.T).float()
        if chunk.alive is not None:
            s.masked_fill_(~chunk.alive, -math.inf)
        return s

    def _bound(self, chunk: _Chunk, q_norm, q_resid, q_hat_norm) -> torch.Tensor:
        """(B,) float32 e_c: the most a sketch score of this chunk errs, per query, with room for float32 comparisons."""
        if self.precision == "int8":
            e = int8_error_bound(q_norm, q_resid, q_hat_norm, chunk.resid, chunk.norm)
        else:
            e = float16_error_bound(q_norm, q_resid, q_hat_norm, chunk.resid, chunk.norm, self.dim)
        return (e + 4 * U32 * (q_hat_norm * chunk.norm + e)).float()

    def _search_sketch(self, snap: _Snapshot, q: torch.Tensor, k: int):
        """Steps 1-3 of the module docstring: (scores (B, k'), row positions (B, k'), queries left for the float32 product)."""
        q_low, q_norm, q_resid, q_hat_norm = _queries_for(self.precision, q)
        total = int(snap.starts[-1])
        limit = min(self.config.candidate_limit, max(4 * k, total // 256 + total // (9 * len(q))))  # step 4
        width = max(
            4 * k, 128
        )  # sketch results taken per chunk by top-k; a query with more candidates in a chunk is scored again
        low = None  # (B, <= k) the best lower bounds S~ - e found so far
        found_q, found_p, found_u, found_c = (
            [],
            [],
            [],
            [],
        )  # candidates: query, row position, upper bound S~ + e, chunk
        bounds, edges = [], []  # per chunk (B,): e, and the upper bound of the best row its top-k left out
        for c, (chunk, start) in enumerate(zip(snap.chunks, snap.starts)):
            e = self._bound(chunk, q_norm, q_resid, q_hat_norm)
            s = self._sketch_scores(chunk, q_low)
            v, i = s.topk(min(width, s.shape[1]), dim=1)
            lows = v[:, :k] - e[:, None]
            low = (
                lows
                if low is None
                else torch.cat([low, lows], 1).topk(min(k, low.shape[1] + lows.shape[1]), dim=1).values
            )
            qi, slot = (v >= _at_least(_kth(low, k) - e)[:, None]).nonzero(as_tuple=True)
            found_q.append(qi)
            found_p.append(i[qi, slot] + int(start))
            found_u.append(v[qi, slot] + e[qi])
            found_c.append(torch.full_like(qi, c))
            bounds.append(e)
            edges.append(v[:, -1] + e if v.shape[1] < s.shape[1] else torch.full_like(e, -math.inf))
        qi, pos, upper, chunk_of = torch.cat(found_q), torch.cat(found_p), torch.cat(found_u), torch.cat(found_c)
        least = _kth(low, k)
        rescan = torch.stack(edges) >= least  # (chunks, B): the chunk's top-k may have cut candidates off
        fallback = torch.zeros(len(q), dtype=torch.bool, device=self.device)
        if bool(rescan.any()):  # take every candidate of those chunks for those queries, replacing the top-k ones
            keep = ~rescan[chunk_of, qi]
            more = [(qi[keep], pos[keep], upper[keep])]
            counts = torch.zeros(len(q), dtype=torch.long, device=self.device)
            for c in rescan.any(1).nonzero(as_tuple=True)[0].tolist():
                rows = rescan[c].nonzero(as_tuple=True)[0]
                s = self._sketch_scores(snap.chunks[c], q_low[rows]) + bounds[c][rows, None]
                hit_q, col = (s >= _at_least(least[rows])[:, None]).nonzero(as_tuple=True)
                counts[rows] += torch.bincount(hit_q, minlength=len(rows))
                fallback |= counts > limit  # stop collecting for these at once: memory stays bounded
                ok = ~fallback[rows[hit_q]]
                more.append((rows[hit_q[ok]], col[ok] + int(snap.starts[c]), s[hit_q[ok], col[ok]]))
            qi, pos, upper = (torch.cat(parts) for parts in zip(*more))
        keep = upper >= least[qi]
        qi, pos = qi[keep], pos[keep]
        fallback |= torch.bincount(qi, minlength=len(q)) > limit
        keep = ~fallback[qi]
        top, where = self._rescore(snap, q, qi[keep], pos[keep], min(k, low.shape[1]))
        return top, where, fallback.nonzero(as_tuple=True)[0]

    def _rescore(self, snap: _Snapshot, q: torch.Tensor, cand_q: torch.Tensor, cand_p: torch.Tensor, k: int):
        """The float32 top-k among candidate (query, row position) pairs: (scores (B, k), positions (B, k)), -inf / -1 padded."""
        batch = len(q)
        exact = torch.empty(len(cand_p), dtype=torch.float32, device=self.device)
        chunk_of = torch.from_numpy(np.searchsorted(snap.starts, cand_p.cpu().numpy(), side="right") - 1).to(
            self.device
        )
        for c in torch.unique(chunk_of).tolist():
            here = (chunk_of == c).nonzero(as_tuple=True)[0]
            rows = snap.chunks[c].rows.index_select(0, cand_p[here] - int(snap.starts[c])).float()
            exact[here] = torch.linalg.vecdot(rows, q.index_select(0, cand_q[here]))
        order = torch.argsort(cand_q, stable=True)
        cand_q, cand_p, exact = cand_q[order], cand_p[order], exact[order]
        counts = torch.bincount(cand_q, minlength=batch)
        width = max(int(counts.max()) if len(counts) else 0, k)
        slot = (
            cand_q * width + torch.arange(len(cand_q), device=self.device) - (torch.cumsum(counts, 0) - counts)[cand_q]
        )
        dense = torch.full((batch * width,), -math.inf, device=self.device)
        where = torch.full((batch * width,), -1, dtype=torch.long, device=self.device)
        dense[slot], where[slot] = exact, cand_p
        top, j = dense.view(batch, width).topk(k, dim=1)
        return top, where.view(batch, width).gather(1, j)

    def _search_float32(self, snap: _Snapshot, q: torch.Tensor, k: int, block: int):
        """The plain float32 product over every chunk, merged top-k: (scores (B, k'), positions (B, k')).

        On a CPU rows are read `FLOAT32_ROWS` at a time (a float16 chunk widened to float32 slice
        by slice, in buffers small enough for the allocator to reuse rather than page-fault a whole
        widened chunk per search), a chunk at a time on CUDA; queries `block` at a time."""
        run_s = run_p = None
        for chunk, start in zip(snap.chunks, snap.starts):
            step = FLOAT32_ROWS if self.device.type == "cpu" else len(chunk.ids)
            for at in range(0, len(chunk.ids), step):
                rows = chunk.rows[at : at + step].float()
                parts = []
                for first in range(0, len(q), block):
                    s = q[first : first + block] @ rows.T
                    if chunk.alive is not None:
                        s.masked_fill_(~chunk.alive[at : at + step], -math.inf)
                    parts.append(s.topk(min(k, s.shape[1]), dim=1))
                v = torch.cat([p.values for p in parts])
                i = torch.cat([p.indices for p in parts]) + int(start) + at
                if run_s is not None:
                    v, j = torch.cat([run_s, v], 1).topk(min(k, run_s.shape[1] + v.shape[1]), dim=1)
                    i = torch.cat([run_p, i], 1).gather(1, j)
                run_s, run_p = v, i
        return run_s, torch.where(torch.isfinite(run_s), run_p, -1)

    # ---- describing and persisting ----

    def describe(self) -> dict:
        snap = self._snap
        return {
            "kind": self.kind,
            "dim": self.dim,
            "count": int(snap.live_ids.size),
            "device": str(self.device),
            **{key: value for key, value in asdict(self.config).items() if key != "device"},
            "chunks": len(snap.chunks),
            "rows": int(snap.starts[-1]),
            "stored": sorted({str(c.rows.dtype).removeprefix("torch.") for c in snap.chunks}),
            "fallbacks": self._fallbacks,
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
        }

    def save(self, directory: Path) -> dict:
        """Write the live rows and ids under fresh names (temp file, fsync, rename), then the manifest the same way, then drop the old files."""
        with self._save_lock:
            return self._save(Path(directory))

    def _save(self, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        snap = self._snap
        ids, rows = [], []
        for chunk in snap.chunks:
            if chunk.alive is None:
                ids.append(chunk.ids)
                rows.append(chunk.rows.cpu())
            else:
                ids.append(chunk.ids[chunk.alive.cpu().numpy()])
                rows.append(chunk.rows[chunk.alive].cpu())
        dtype = torch.float16 if all(r.dtype == torch.float16 for r in rows) and rows else torch.float32
        ids_np = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        rows_np = (torch.cat([r.to(dtype) for r in rows]) if rows else torch.zeros((0, self.dim), dtype=dtype)).numpy()
        token = uuid.uuid4().hex[:12]
        files = {
            "ids": _write_npy(directory / f"ids-{token}.npy", ids_np),
            "rows": _write_npy(directory / f"rows-{token}.npy", rows_np),
        }
        config = asdict(self.config)
        del config["device"]
        manifest = {
            "format": FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "count": int(ids_np.size),
            "config": config,
            "files": files,
        }
        write_atomic(directory / _MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        for path in directory.iterdir():
            if (
                path.name != _MANIFEST
                and path.name not in {f["name"] for f in files.values()}
                and path.name.startswith(("ids-", "rows-", ".tmp-"))
            ):
                path.unlink(missing_ok=True)
        return manifest

    @classmethod
    def load(cls, directory: Path, device: str | None = None) -> "ExactIndex":
        """The index `save` left in `directory`, on `device` (default: the CPU); InvalidIndexError naming the file when it cannot."""
        directory = Path(directory)
        path = directory / _MANIFEST
        try:
            manifest = json.loads(path.read_text())
            files, dim, count = manifest["files"], int(manifest["dim"]), int(manifest["count"])
            config = ExactConfig(
                device=device or "cpu",
                **{key: value for key, value in manifest["config"].items() if key in ExactConfig.__dataclass_fields__},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidIndexError(f"cannot read the exact index manifest {path}: {exc}; rebuild the index") from None
        if manifest.get("format") != FORMAT:
            raise InvalidIndexError(
                f"{path} has format {manifest.get('format')!r}, this clipbt reads {FORMAT}: rebuild the index"
            )
        if config.precision not in ("auto", "float32") and resolve_precision("auto", config.device) != config.precision:
            config = replace(config, precision="auto")  # saved on other hardware: pick this machine's pass
        ids = _read_npy(directory, files.get("ids"), np.int64, (count,))
        rows = _read_npy(directory, files.get("rows"), None, (count, dim))
        index = cls(dim, config)
        index.add(ids, rows.astype(np.float32))
        return index


def _kth(best: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) the k-th column of `best` (B, <= k), -inf where it has fewer than k columns."""
    if best.shape[1] < k:
        return torch.full((len(best),), -math.inf, device=best.device)
    return best[:, k - 1]


def _at_least(threshold: torch.Tensor) -> torch.Tensor:
    """`threshold` raised to the least finite float32, so that masked (-inf) scores never pass it."""
    return torch.clamp(threshold, min=torch.finfo(torch.float32).min)


def _ids_at(snap: _Snapshot, positions: np.ndarray) -> np.ndarray:
    """Image ids at row `positions`, -1 where the position is -1."""
    return np.where(positions >= 0, snap.ids[np.maximum(positions, 0)], -1)


def _write_npy(path: Path, array: np.ndarray) -> dict:
    """Save `array` as .npy atomically; its manifest entry: name, bytes, sha256."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    write_atomic(path, data)
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_npy(directory: Path, entry: dict | None, dtype, shape: tuple) -> np.ndarray:
    """The array a manifest entry names, checked for size, hash, dtype and shape; InvalidIndexError naming the file otherwise."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise InvalidIndexError(
            f"{directory / _MANIFEST} lists no file where one is needed ({entry!r}): rebuild the index"
        )
    path = directory / entry["name"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidIndexError(f"cannot read {path}: {exc}; rebuild the index") from None
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise InvalidIndexError(
            f"{path} is corrupt ({len(data)} bytes, hash differs from the manifest): rebuild the index"
        )
    import io

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise InvalidIndexError(f"{path} is not a numpy array ({exc}): rebuild the index") from None
    if array.shape != shape or (dtype is not None and array.dtype != dtype) or array.dtype.kind not in "fi":
        raise InvalidIndexError(
            f"{path} holds {array.dtype} {array.shape}, the manifest wants {shape}: rebuild the index"
        )
    return array


_threads_lock = threading.Lock()
_threads_set: int | None = None


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (the pool the int8 and float32 kernels run on) once per process: `threads`, else every core.

    Later calls change nothing and return the count in force, so concurrent searches never fight
    over it; searches themselves never set it.
    """
    global _threads_set
    with _threads_lock:
        if _threads_set is None:
            torch.set_num_threads(max(1, threads or os.cpu_count() or 1))
            _threads_set = torch.get_num_threads()
        return _threads_set


def choose_flat_backend(n: int, dim: int, device: str = "cpu") -> tuple[str, str]:
    """("exact" or "faiss", why) for a flat collection of n vectors of dimension `dim` on `device`: what `clipbt info` reports.

    The rule, from benchmarks/bench_exact.py and benchmarks/bench_query.py --index-type exact, which
    time both side by side on the same data (results in benchmarks/results/exact_cpu.json and
    query_cpu_exact.json): on CUDA, ExactIndex (a float16 candidate pass). On a CPU, FAISS's
    IndexFlatIP stays the default: with fbgemm's int8 pass ExactIndex answered one query 3.7-3.9x
    faster and batches of 1 to 256 at least as fast on clustered data, but on isotropic data
    (random unit vectors) the int8 error window admits so many candidates that a batch of 256
    falls back to torch's float32 product, slower than FAISS's on that CPU: 4x slower in all. It
    is there for collections like the first (`--index-type exact`), and FAISS when torch has no
    int8 kernel at all. `n` and `dim` are taken so that a measured crossover can be added without
    changing callers.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return "exact", "CUDA: float16 candidate pass, float32 rescoring (ExactIndex)"
    if kind == "cpu" and int8_available():
        return (
            "faiss",
            "CPU: FAISS IndexFlatIP; --index-type exact (int8 candidate pass, float32 rescoring) answers one query "
            "several times faster on clustered embeddings but batches slower on isotropic ones",
        )
    return (
        "faiss",
        f"no int8 kernel on {device} (quantized engine {torch.backends.quantized.engine}): FAISS IndexFlatIP",
    )
