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

1. the ``k + 32`` rows with the best approximate scores are taken, best first (one ``topk``);
2. stage 1 re-scores in float64 the rows whose approximate score is within about one margin of the k-th
   best approximate score; the k-th best of those exact scores is a floor under the true k-th best;
3. stage 2: any row whose approximate score is below ``floor - m`` cannot be in the top-k; the other rows
   of the shortlist are re-scored too (rarely any), and a query whose candidates reach past the
   shortlist is scanned in full;
4. all exactly scored rows are sorted with ties broken by lower id.

Memory: the cache holds the short table (``V * d * 2`` bytes in bfloat16) plus three float64 vectors of
length ``V``. A search adds at most ``chunk_bytes`` for score blocks (default 256 MiB; queries are
processed in blocks sized to fit) plus ``rerank_rows * d * 8`` bytes for the float64 re-rank (default
2048 rows: 64 MiB at ``d = 4096``), whatever the number of queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_U32 = 2.0**-24
_EPS64 = 2.0**-52
#: Scores closer than this many float64 units in the last place (relative) are ties.
TIE_ULPS = 8
#: Rows beyond k, ranked by approximate score, kept as the shortlist for exact scoring.
_SHORTLIST_EXTRA = 32
#: Unit roundoff (round to nearest) of each short type.
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@dataclass(frozen=True)
class TopK:
    """Result of a search.

    Attributes:
        ids: Table row ids, shape ``[n, k]``, best first (ties: lower id first).
        scores: Their exact scores (float64), shape ``[n, k]``.
        candidates: Number of rows re-scored exactly per query, shape ``[n]`` (diagnostic).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    candidates: torch.Tensor


def default_short_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix units make it fast (CUDA, CPUs with AMX or AVX512-BF16), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        cpu = torch.cpu
        fast = (
            getattr(cpu, "_is_amx_tile_supported", lambda: False)()
            or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


class ExactSearch:
    """Exact top-k rows of a table by inner product or cosine similarity.

    Args:
        table: The rows to search, shape ``[V, d]``, any float dtype; kept by reference (not copied).
        normalize: Score by cosine similarity (both sides unit-normalised) instead of inner product.
            Rows or queries of zero norm score 0 against everything.
        bias: Optional per-row bias added to inner-product scores, shape ``[V]`` (LM heads with bias).
        allowed: Optional sorted ids of the rows that may be returned (others are excluded).
        short_dtype: Type of the shortlist matmul; ``None`` picks :func:`default_short_dtype`.
        chunk_bytes: Bound on the memory of one block of approximate scores.
        rerank_rows: Rows gathered at once for the float64 re-rank.
    """

    def __init__(
        self,
        table: torch.Tensor,
        *,
        normalize: bool,
        bias: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        short_dtype: torch.dtype | None = None,
        chunk_bytes: int = 256 * 2**20,
        rerank_rows: int = 2048,
    ) -> None:
        if table.ndim != 2:
            raise ValueError(f"table must be [V, d], got shape {tuple(table.shape)}")
        if normalize and bias is not None:
            raise ValueError("a bias makes no sense with cosine similarity")
        self.table = table
        self.normalize = normalize
        self.device = table.device
        self.short_dtype = short_dtype or default_short_dtype(table.device)
        self.chunk_bytes = chunk_bytes
        self.rerank_rows = rerank_rows
        self._all_rows = allowed is None
        if allowed is None:
            allowed = torch.arange(table.shape[0], device=table.device)
        self.allowed = allowed.to(table.device, torch.long)
        if self.allowed.numel() > 1 and not bool((self.allowed[1:] > self.allowed[:-1]).all()):
            raise ValueError("allowed ids must be sorted and unique")
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
            rows = self.table.detach()[ids].to(torch.float64)
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
        per_query = self.size * (self.short.element_size() + 4 + 1)
        block = max(1, self.chunk_bytes // per_query)
        ids, scores, counts = [], [], []
        for start in range(0, queries.shape[0], block):
            result = self._search_block(queries[start : start + block], k)
            ids.append(result.ids)
            scores.append(result.scores)
            counts.append(result.candidates)
        if not ids:
            empty = torch.zeros(0, k, dtype=torch.long, device=self.device)
            return TopK(empty, empty.double(), torch.zeros(0, dtype=torch.long, device=self.device))
        return TopK(torch.cat(ids), torch.cat(scores), torch.cat(counts))

    def _search_block(self, queries: torch.Tensor, k: int) -> TopK:
        q64 = queries.detach().to(self.device, torch.float64)
        raw_norm = q64.norm(dim=1)
        if not bool(torch.isfinite(raw_norm).all()) and not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN or infinite values")  # a finite norm means finite values
        if self.normalize:
            q64 = q64 * _inverse(raw_norm)[:, None]
            q_norm = q64.norm(dim=1)
        else:
            q_norm = raw_norm
        q_short = q64.to(self.short_dtype)
        q_residual = (q_short.to(torch.float64) - q64).norm(dim=1)

        approx = q_short @ self.short.T  # [n, V] in the short dtype
        margin = self._input_margin(q_norm, q_residual)
        u_out = 0.0 if self.short_dtype == torch.float32 else _UNIT_ROUNDOFF[self.short_dtype]
        if self.bias64 is not None:
            # The bias is added in float32 after the rounded product: bound that step with the row maximum.
            approx = approx.to(torch.float32) + self.bias32
            largest = approx.abs().amax(dim=1).double() + float(self.bias64.abs().max())
            margin = margin + u_out * largest / (1 - u_out) + self.bias_residual + _U32 * largest
            u_out = 0.0
        n = queries.shape[0]
        # The best approximate rows, best first. Every row that can be in the exact top-k is almost always
        # among them; a query whose candidates run past them is scanned in full (``_scan_beyond``).
        width = min(self.size, k + _SHORTLIST_EXTRA)
        values, top = torch.topk(approx, width, dim=1, sorted=True)
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
            extra_rows, extra_cols = self._rows_beyond(approx, top, floor, margin, u_out, overflow)
            extra = torch.cat([self._exact_scores(q64[r], extra_cols[extra_rows == r]) for r in overflow])
            order = torch.argsort(torch.cat([rows, extra_rows]), stable=True)
            rows = torch.cat([rows, extra_rows])[order]
            cols = torch.cat([cols, extra_cols])[order]
            scores = torch.cat([scores, extra])[order]
        return self._select(rows, cols, self._finish(scores, cols), n, k)

    def _finish(self, raw: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scores from raw inner products (any shape) of searchable rows ``cols`` (the same shape):
        times the row's scale (cosine), plus its bias."""
        scores = raw * self.scale64[cols]
        return scores if self.bias64 is None else scores + self.bias64[cols]

    def _rows_beyond(
        self,
        approx: torch.Tensor,
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
        lines = approx[pick]
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

    def _score_prefixes(
        self, q64: torch.Tensor, top: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Fill ``out[i, start[i]:stop[i]]`` with the exact scores of rows ``top[i, start[i]:stop[i]]``.

        ``top`` and ``out`` have shape ``[n, width]``; ``start`` and ``stop`` shape ``[n]``. The scores
        are unscaled (see :meth:`_exact_scores`). One small gather and matrix-vector product per query:
        small gathers stay in cache, which makes their float64 conversion far cheaper than one large batch.
        """
        spans = zip(q64.unbind(0), top.unbind(0), out.unbind(0), start.tolist(), stop.tolist(), strict=True)
        for query, ids, line, first, last in spans:
            for offset in range(first, last, self.rerank_rows):
                end = min(offset + self.rerank_rows, last)
                line[offset:end] = self._exact_scores(query, ids[offset:end])

    def _exact_scores(self, query64: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Float64 inner products of one query (shape ``[d]``) with searchable rows ``cols`` (shape ``[m]``).

        Unscaled: the caller multiplies by ``scale64[cols]`` (cosine) and adds the bias.
        """
        rows = self.table.detach().index_select(0, cols if self._all_rows else self.allowed[cols])
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.to(torch.float32)  # exact, and two vectorised conversions beat one slow one
        return torch.mv(rows.to(torch.float64), query64)

    def _select(self, rows: torch.Tensor, cols: torch.Tensor, exact: torch.Tensor, n: int, k: int) -> TopK:
        """Per query, the k best candidates by (score desc, id asc). Candidates arrive id-ascending.

        Scores that differ only by float64 rounding (``TIE_ULPS`` units in the last place) count as equal, so
        rows that are exact ties in real numbers (e.g. a row and a scaled copy under cosine) come out
        lower id first even when their computed scores differ in the last bits.
        """
        counts = torch.bincount(rows, minlength=n)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel(), device=self.device) - starts[rows]
        padded = torch.full((n, width), -math.inf, dtype=torch.float64, device=self.device)
        padded_ids = torch.full((n, width), self.size, dtype=torch.long, device=self.device)
        padded[rows, slot] = exact
        padded_ids[rows, slot] = cols
        order = torch.sort(padded, dim=1, descending=True, stable=True).indices
        scores = torch.gather(padded, 1, order)
        ids = torch.gather(padded_ids, 1, order)
        # Group runs of (numerically) equal scores, then order each group by id.
        gap = scores[:, :-1] - scores[:, 1:]
        tolerance = TIE_ULPS * _EPS64 * scores[:, :-1].abs().clamp_min(1.0)
        first = torch.zeros((n, 1), dtype=torch.bool, device=self.device)
        new_group = torch.cat([first, ~(gap <= tolerance)], dim=1)
        group = torch.cumsum(new_group.long(), dim=1)
        regroup = torch.argsort(group * (self.size + 1) + ids, dim=1, stable=True)[:, :k]
        top_ids = self.allowed[torch.gather(ids, 1, regroup)]
        return TopK(top_ids, torch.gather(scores, 1, regroup), counts)


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
