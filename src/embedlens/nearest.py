"""Exact top-k inner-product search over a fixed table: a fast low-precision shortlist, an exact re-rank.

The lenses ask, for every query vector ``q`` (a visual token), for the ``k`` rows ``e_j`` of a table
(the input embedding table, or the LM head) with the largest score ``s_j = <q', e'_j>`` where ``q'`` and
``e'_j`` are the vectors themselves (logit lens) or their unit-normalised versions (cosine, embedding
lens). "Exact" means: the same ids, in the same order, as computing every score in float64 and sorting
by (score descending, id ascending), where scores within float64 rounding of each other
(``TIE_ULPS`` = 8 units in the last place, relative 2e-15) are ties.

How: the table is rounded once to a short type (bfloat16 on CPUs with AMX/AVX512-BF16 and on GPUs,
else float32) and cached. A query block is rounded too and multiplied with it (the fast part). The
error of every approximate score is bounded rigorously from quantities we know exactly:

    |s~ - s| <= |q| |de_j| + |dq| |e_j| + |dq| |de_j|      (input rounding; Cauchy-Schwarz)
              + 2 gamma_d (|q| + |dq|)(|e_j| + |de_j|)      (float32 accumulation of exact products)
              + u_out |s~| / (1 - u_out)                     (rounding of the result to the short type)

with ``dq = round(q) - q``, ``de_j = round(e_j) - e_j`` (their norms are computed in float64) and
``gamma_d = d u32 / (1 - d u32)``. Using the table-wide maxima of ``|e_j|`` and ``|de_j|`` gives one
margin ``m`` per query. Then, per query:

1. the ``k + 96`` rows with the best approximate scores are taken, best first (a top-k per slice of
   ``shortlist_rows`` table rows, over the columns of its best column groups when the slice is wide
   (:func:`_slice_top`), then one over the slices' winners);
2. stage 1 re-scores in float64 the rows whose approximate score is within about one margin of the k-th
   best approximate score; the k-th best of those exact scores is a floor under the true k-th best;
3. stage 2: any row whose approximate score is below ``floor - m`` cannot be in the top-k; the other rows
   of the shortlist are re-scored too (rarely any), and a query whose candidates reach past the
   shortlist is scanned in full;
4. all exactly scored rows are sorted with ties broken by lower id.

Memory: the cache holds the short table (``V * d * 2`` bytes in bfloat16) plus three float64 vectors of
length ``V``. Queries are processed in blocks sized so that one block's approximate scores fit in
``chunk_bytes`` (default 64 MiB); a search adds at most ``chunk_bytes`` for them, ``block * d * 18``
bytes for the block's float64 copy, rounded copy and rounding residual, and ``rerank_rows * d * 14``
bytes for the rows being re-ranked (half, single and double precision), whatever the number of queries
(:attr:`ExactSearch.search_memory_bound`: 197 MiB at 32000 x 4096). Buffers up to ``chunk_bytes / 2``
are kept between searches and reused (:class:`~embedlens.nearest_rerank._Workspace`), since fresh large
buffers page-fault anew. The float64 re-rank and the selection are in :mod:`embedlens.nearest_rerank`.
"""

from __future__ import annotations

import math
import threading

import torch

from embedlens.dtypes import fast_dtype
from embedlens.nearest_rerank import TIE_ULPS as TIE_ULPS
from embedlens.nearest_rerank import TopK, _ExactRerank, _Workspace

_U32 = 2.0**-24
#: Rows beyond k, ranked by approximate score, kept as the shortlist for exact scoring. A query whose
#: candidates run past them costs a rescan (a whole pass over the short table when it has several
#: slices), while a wider shortlist costs little (one top-k per slice): in the Qwen2.5-VL-shaped
#: benchmark (151665 x 3584, bfloat16) 28% of the queries had more than k + 32 candidates, the most 83.
_SHORTLIST_EXTRA = 96
#: Unit roundoff (round to nearest) of each short type.
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


class ExactSearch(_ExactRerank):
    """Exact top-k rows of a table by inner product or cosine similarity.

    Args:
        table: The rows to search, shape ``[V, d]``, any float dtype; kept by reference (not copied).
        normalize: Score by cosine similarity (both sides unit-normalised) instead of inner product.
            Rows or queries of zero norm score 0 against everything.
        bias: Optional per-row bias added to inner-product scores, shape ``[V]`` (LM heads with bias).
        allowed: Optional sorted ids of the rows that may be returned (others are excluded).
        short_dtype: Type of the shortlist matmul; ``None`` picks :func:`~embedlens.dtypes.fast_dtype`.
        chunk_bytes: Bound on the memory of one block of approximate scores (sets the query block size).
        rerank_rows: Rows gathered at once for the float64 re-rank.
        shortlist_rows: Table rows multiplied at once for the shortlist (each slice's scores are reduced
            to their top rows while still in cache).
    """

    def __init__(
        self,
        table: torch.Tensor,
        *,
        normalize: bool,
        bias: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        short_dtype: torch.dtype | None = None,
        chunk_bytes: int = 64 * 2**20,
        rerank_rows: int = 2048,
        shortlist_rows: int = 65536,
    ) -> None:
        if table.ndim != 2:
            raise ValueError(f"table must be [V, d], got shape {tuple(table.shape)}")
        if normalize and bias is not None:
            raise ValueError("a bias makes no sense with cosine similarity")
        self.table = table
        self.normalize = normalize
        self.device = table.device
        self.short_dtype = short_dtype or fast_dtype(table.device)
        self.chunk_bytes = chunk_bytes
        self.rerank_rows = rerank_rows
        self.shortlist_rows = shortlist_rows
        self._workspace = _Workspace(table.device, max(chunk_bytes // 2, 1))
        self._lock = threading.Lock()  # the workspace is shared by calls: one search at a time
        if allowed is None:
            allowed = torch.arange(table.shape[0], device=table.device)
        self.allowed = allowed.to(table.device, torch.long)
        if self.allowed.numel() > 1 and not bool((self.allowed[1:] > self.allowed[:-1]).all()):
            raise ValueError("allowed ids must be sorted and unique")
        # Sorted, unique and ending at numel - 1 (from 0): the leading rows (a table larger than its
        # tokenizer), where a searchable row's index is its id and needs no lookup.
        n_allowed = self.allowed.numel()
        self._all_rows = n_allowed == 0 or (int(self.allowed[0]) == 0 and int(self.allowed[-1]) == n_allowed - 1)
        self.bias64 = None if bias is None else bias.detach().to(table.device, torch.float64)[self.allowed]
        self._prepare()

    @property
    def size(self) -> int:
        """Number of searchable rows."""
        return int(self.allowed.numel())

    def _prepare(self) -> None:
        """Build the short table and the per-row quantities of the error bound (chunked over rows)."""
        n_rows, dim = self.allowed.numel(), self.table.shape[1]
        self.dim = dim
        self.short = torch.empty(n_rows, dim, dtype=self.short_dtype, device=self.device)
        self.scale64 = torch.empty(n_rows, dtype=torch.float64, device=self.device)
        max_norm, max_residual = 0.0, 0.0
        step = max(1, (64 * 2**20) // (dim * 8))
        for start in range(0, n_rows, step):
            ids = self.allowed[start : start + step]
            table = self.table.detach()
            part = table[start : start + len(ids)] if self._all_rows else table[ids]
            rows = part.to(torch.float64)
            scale = self._scale(rows)
            exact = rows * scale[:, None]
            short = exact.to(self.short_dtype)
            residual = (short.to(torch.float64) - exact).norm(dim=1)
            self.short[start : start + step] = short
            self.scale64[start : start + step] = scale
            max_norm = max(max_norm, float(exact.norm(dim=1).max()) if len(ids) else 0.0)
            max_residual = max(max_residual, float(residual.max()) if len(ids) else 0.0)
        self.max_norm = max_norm
        self.max_residual = max_residual
        self.bias_residual = 0.0
        if self.bias64 is not None:
            self.bias32 = self.bias64.to(torch.float32)
            self.bias_residual = float((self.bias32.double() - self.bias64).abs().max())

    def _scale(self, rows64: torch.Tensor) -> torch.Tensor:
        """Per-row factor applied before scoring: 1/|row| for cosine (0 for zero rows), else 1."""
        if not self.normalize:
            return torch.ones(rows64.shape[0], dtype=torch.float64, device=rows64.device)
        return _inverse(rows64.norm(dim=1))

    @property
    def block_queries(self) -> int:
        """Queries searched at once: as many as keep one block's approximate scores within ``chunk_bytes``."""
        per_query = min(self.size, self.shortlist_rows) * (self.short.element_size() + 4 + 1)
        return max(1, self.chunk_bytes // per_query)

    @property
    def search_memory_bound(self) -> int:
        """Bytes a search may add to the cache at most, whatever the number of queries (see the module doc)."""
        return self.chunk_bytes + self.block_queries * self.dim * 18 + self.rerank_rows * self.dim * 14

    def search(self, queries: torch.Tensor, k: int) -> TopK:
        """Exact top-``k`` rows for each query.

        Args:
            queries: Shape ``[n, d]``, any float dtype and device (moved to the table's device).
            k: Number of rows per query, ``1 <= k <= size``.

        Returns:
            :class:`TopK` with ``ids`` and ``scores`` of shape ``[n, k]``.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be between 1 and {self.size}, got {k}")
        block = self.block_queries
        ids, scores, counts = [], [], []
        for start in range(0, queries.shape[0], block):
            with self._lock:
                result = self._search_block(queries[start : start + block], k)
            ids.append(result.ids)
            scores.append(result.scores)
            counts.append(result.candidates)
        if not ids:
            empty = torch.zeros(0, k, dtype=torch.long, device=self.device)
            return TopK(empty, empty.double(), torch.zeros(0, dtype=torch.long, device=self.device))
        return TopK(torch.cat(ids), torch.cat(scores), torch.cat(counts))

    def _search_block(self, queries: torch.Tensor, k: int) -> TopK:
        shape = tuple(queries.shape)
        q64 = self._workspace.get("q64", shape, torch.float64).copy_(queries.detach())
        raw_norm = q64.norm(dim=1)
        if not bool(torch.isfinite(raw_norm).all()) and not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN or infinite values")  # a finite norm means finite values
        if self.normalize:
            q64.mul_(_inverse(raw_norm)[:, None])
            q_norm = q64.norm(dim=1)
        else:
            q_norm = raw_norm
        q_short = self._workspace.get("q_short", shape, self.short_dtype).copy_(q64)
        residual = self._workspace.get("q_residual", shape, torch.float64).copy_(q_short).sub_(q64)
        q_residual = residual.norm(dim=1)

        margin = self._input_margin(q_norm, q_residual)
        u_out = 0.0 if self.short_dtype == torch.float32 else _UNIT_ROUNDOFF[self.short_dtype]
        # The best approximate rows, best first. Every row that can be in the exact top-k is almost always
        # among them; a query whose candidates run past them is scanned in full (``_rows_beyond``).
        width = min(self.size, k + _SHORTLIST_EXTRA)
        values, top, largest, approx = self._shortlist(q_short, width)
        if self.bias64 is not None:
            # The bias is added in float32 after the rounded product: bound that step with the row maximum.
            largest = largest + float(self.bias64.abs().max())
            margin = margin + u_out * largest / (1 - u_out) + self.bias_residual + _U32 * largest
            u_out = 0.0
        n = queries.shape[0]
        # Stage 1: the rows down to one margin below the k-th approximate score, scored exactly. The k-th
        # best of those exact scores is a floor under the true k-th best score.
        guess = _candidate_cutoff(values[:, k - 1].double(), margin, u_out)
        scored = _prefix_length(values, guess).clamp_min(k)
        exact = torch.full((n, width), -math.inf, dtype=torch.float64, device=self.device)
        self._score_prefixes(q64, top, torch.zeros_like(scored), scored, exact)
        stage1 = torch.arange(width, device=self.device)[None, :] < scored[:, None]
        floor = torch.topk(self._finish(exact, top).masked_fill(~stage1, -math.inf), k, dim=1).values[:, -1]
        # Stage 2: every row whose approximate score reaches the cutoff below the floor may be in the top-k.
        needed = _prefix_length(values, _candidate_cutoff(floor, margin, u_out))
        self._score_prefixes(q64, top, scored, needed, exact)
        keep = torch.arange(width, device=self.device)[None, :] < torch.maximum(scored, needed)[:, None]
        rows = torch.arange(n, device=self.device)[:, None].expand(n, width)[keep]
        cols, scores = top[keep], exact[keep]
        overflow = torch.nonzero((needed == width) & (width < self.size)).flatten().tolist()
        if overflow:
            extra_rows, extra_cols = self._rows_beyond(q_short, approx, top, floor, margin, u_out, overflow)
            extra = torch.cat([self._scores_of(q64[r], extra_cols[extra_rows == r]) for r in overflow])
            order = torch.argsort(torch.cat([rows, extra_rows]), stable=True)
            rows = torch.cat([rows, extra_rows])[order]
            cols = torch.cat([cols, extra_cols])[order]
            scores = torch.cat([scores, extra])[order]
        return self._select(rows, cols, self._finish(scores, cols), n, k)

    def _approx(self, q_short: torch.Tensor, first: int, last: int, *, scratch: bool = False) -> torch.Tensor:
        """Approximate scores of queries ``q_short`` (shape ``[n, d]``) against searchable rows
        ``first:last``: shape ``[n, last - first]``, in the short dtype, or float32 with a bias.

        With ``scratch`` the product is written to a workspace buffer, valid until the next call.
        """
        shape = (q_short.shape[0], last - first)
        out = self._workspace.get("approx", shape, self.short_dtype) if scratch else None
        scores = torch.mm(q_short, self.short[first:last].T, out=out)
        if self.bias64 is not None:
            scores = scores.to(torch.float32) + self.bias32[first:last]
        return scores

    def _shortlist(
        self, q_short: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The ``width`` best rows per query by approximate score, best first.

        The table is multiplied in slices of ``shortlist_rows`` rows, each reduced to its own top
        ``width`` (:func:`_slice_top`) while it is still in cache, then the slices' winners are merged.

        Returns:
            ``values`` and ``ids`` of shape ``[n, width]`` (sorted descending), the largest absolute
            approximate score per query (float64, shape ``[n]``; used by the bias bound), and all the
            approximate scores (``[n, V]``) when the table fits in one slice, else ``None``.
        """
        values, ids, largest = [], [], []
        for first in range(0, self.size, self.shortlist_rows):
            last = min(first + self.shortlist_rows, self.size)
            scores = self._approx(q_short, first, last, scratch=True)
            best_values, best_columns = _slice_top(scores, min(width, last - first))
            values.append(best_values)
            ids.append(best_columns + first)
            if self.bias64 is not None:
                largest.append(scores.abs().amax(dim=1))
        merged = torch.topk(torch.cat(values, dim=1), width, dim=1, sorted=True)
        top = torch.gather(torch.cat(ids, dim=1), 1, merged.indices)
        peak = torch.stack(largest).amax(dim=0).double() if largest else merged.values.new_zeros(0).double()
        whole = scores if self.size <= self.shortlist_rows else None
        return merged.values, top, peak, whole

    def _finish(self, raw: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scores from raw inner products (any shape) of searchable rows ``cols`` (the same shape):
        times the row's scale (cosine), plus its bias."""
        scores = raw * self.scale64[cols]
        return scores if self.bias64 is None else scores + self.bias64[cols]

    def _rows_beyond(
        self,
        q_short: torch.Tensor,
        approx: torch.Tensor | None,
        top: torch.Tensor,
        floor: torch.Tensor,
        margin: torch.Tensor,
        u_out: float,
        queries: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (query, row) pairs outside ``top`` whose approximate score reaches the cutoff.

        For the listed queries only; returned as two flat tensors, query-ascending.
        """
        pick = torch.tensor(queries, device=self.device)
        # The queries' approximate scores again: kept from the shortlist, or computed anew for them alone.
        lines = approx[pick] if approx is not None else self._approx(q_short[pick], 0, self.size)
        lines.scatter_(1, top[pick], -math.inf)  # already scored
        cutoff = _candidate_cutoff(floor[pick], margin[pick], u_out)
        where, cols = torch.nonzero(lines >= _round_down(cutoff, lines.dtype)[:, None], as_tuple=True)
        return pick[where], cols

    def _input_margin(self, q_norm: torch.Tensor, q_residual: torch.Tensor) -> torch.Tensor:
        """Bound (float64, per query) on the error from rounding the inputs and accumulating in float32."""
        table_norm, table_residual = self.max_norm, self.max_residual
        gamma = self.dim * _U32 / (1 - self.dim * _U32)
        rounding = q_norm * table_residual + q_residual * table_norm + q_residual * table_residual
        accumulation = 2.0 * gamma * (q_norm + q_residual) * (table_norm + table_residual)
        return rounding + accumulation + 1e-12


def _slice_top(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` largest entries of each row of ``scores`` (shape ``[n, m]``), in no order: their
    values and column indices, each of shape ``[n, width]``.

    A wide slice is first cut into ``g`` (about ``sqrt(m / width)``) interleaved groups of columns
    ``c, c + s, c + 2 s, ...`` (``s = m // g``), whose maxima are the elementwise maximum of ``g``
    contiguous blocks; only the columns of the ``width`` groups with the largest maxima (and the
    ``m - g s`` columns left over) are ranked, which costs less than a top-k over all ``m`` columns.
    Exact: a column outside the chosen groups is at most its group's maximum, hence at most the smallest
    chosen maximum, and the chosen groups hold ``width`` distinct columns at least that large; so the
    kept values are the row's ``width`` largest and every column left out scores at most the smallest.
    """
    n, m = scores.shape
    groups = int(math.sqrt(m / max(width, 1)))
    if groups < 4:
        best = torch.topk(scores, width, dim=1, sorted=False)
        return best.values, best.indices
    stride = m // groups
    maxima = scores[:, : groups * stride].unflatten(1, (groups, stride)).amax(dim=1)
    chosen = torch.topk(maxima, width, dim=1, sorted=False).indices
    offsets = stride * torch.arange(groups, device=scores.device)
    columns = (chosen[:, :, None] + offsets).flatten(1)
    left_over = torch.arange(groups * stride, m, device=scores.device).expand(n, -1)
    columns = torch.cat([columns, left_over], dim=1)
    best = torch.topk(torch.gather(scores, 1, columns), width, dim=1, sorted=False)
    return best.values, torch.gather(columns, 1, best.indices)


def _candidate_cutoff(floor: torch.Tensor, margin: torch.Tensor, u_out: float) -> torch.Tensor:
    """Lowest approximate score that can still belong to the exact top-k (float64, per query).

    An approximate score ``a`` bounds the exact one within ``a -/+ (margin + u |a| / (1 - u))``, and the
    upper bound increases with ``a``. ``floor`` is a lower bound of the exact k-th best score (the
    smallest exact score among k rows), so a row can be in the top-k only if ``upper(a) >= floor``,
    i.e. ``a >= cutoff``, solved here for either sign of ``a``.
    """
    slack = floor - margin
    return torch.where(slack >= 0, slack * (1 - u_out), slack * (1 - u_out) / (1 - 2 * u_out))


def _round_down(cutoff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``cutoff`` in ``dtype``, one step lower, so that rounding it never drops a candidate."""
    rounded = cutoff.to(dtype)
    return torch.nextafter(rounded, torch.full_like(rounded, -math.inf))


def _prefix_length(values: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` (sorted descending, shape ``[n, w]``), how many reach ``cutoff`` (shape ``[n]``)."""
    return (values >= _round_down(cutoff, values.dtype)[:, None]).sum(dim=1)


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms``, with 0 for zero norms (zero vectors score 0 against everything)."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
