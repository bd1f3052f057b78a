"""The exact half of :class:`~embedlens.nearest.ExactSearch`: float64 re-rank, tie-aware selection, scratch.

:class:`_ExactRerank` holds the search's methods that score candidate rows exactly in float64 (in small
groups of queries that stay in cache) and pick each query's top-k by (score descending, id ascending),
scores within ``TIE_ULPS`` units in the last place being ties; :class:`TopK` is what they return.
:class:`_Workspace` keeps the scratch buffers a search reuses from call to call. The shortlist, the error
bound and the search loop are in :mod:`embedlens.nearest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_EPS64 = 2.0**-52
#: Scores closer than this many float64 units in the last place (relative) are ties.
TIE_ULPS = 8
#: Float64 bytes of the rows one group of queries gathers for its exact scores (stays in cache).
_RERANK_BLOCK_BYTES = 4 * 2**20


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


class _Workspace:
    """Grow-only scratch buffers that one search object reuses from call to call.

    Large temporaries allocated afresh page-fault on first touch (on this project's 2-core machine a
    new 37 MB buffer costs about 12 ms), so the query block, its rounded copy, the approximate scores
    and the re-rank rows live in buffers that are kept and reused. A request above ``limit_bytes`` gets
    a fresh tensor instead and is not kept, so the buffers never hold more than a few times that.
    """

    def __init__(self, device: torch.device, limit_bytes: int) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` (uninitialised) backed by the buffer called ``name``.

        Buffers and their views are made outside inference mode, so that a buffer first made under
        ``torch.inference_mode()`` can still be written by a later call that runs without it.
        """
        numel = math.prod(shape)
        with torch.inference_mode(False):
            if numel * dtype.itemsize > self.limit_bytes:
                return torch.empty(shape, dtype=dtype, device=self.device)
            buffer = self._buffers.get(name)
            if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
                buffer = torch.empty(numel, dtype=dtype, device=self.device)
                self._buffers[name] = buffer
            return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class _ExactRerank:
    """Exact scoring and selection for :class:`~embedlens.nearest.ExactSearch` (a base class of it).

    Reads the search's ``table``, ``allowed``, ``_all_rows``, ``dim``, ``size``, ``device``,
    ``rerank_rows`` and ``_workspace``.
    """

    def _score_prefixes(
        self, q64: torch.Tensor, top: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Fill ``out[i, start[i]:stop[i]]`` with the exact scores of rows ``top[i, start[i]:stop[i]]``.

        ``top`` and ``out`` have shape ``[n, width]``; ``start`` and ``stop`` shape ``[n]``. The scores
        are unscaled (see :meth:`_exact_scores`). Queries are scored in small groups whose gathered rows
        fit in about ``_RERANK_BLOCK_BYTES`` of float64, so the conversion stays in cache while short
        prefixes (small ``d``, few candidates) do not pay one round of calls per query. A group scores
        the union of its queries' ranges; the extra entries are exact scores of shortlist rows too,
        equal to the bit wherever they are computed, so writing them changes nothing the caller reads.
        """
        budget = max(1, min(self.rerank_rows, _RERANK_BLOCK_BYTES // (self.dim * 8)))
        firsts, lasts = start.tolist(), stop.tolist()
        active = [i for i in range(len(firsts)) if firsts[i] < lasts[i]]
        position = 0
        while position < len(active):
            group, low, high = [active[position]], firsts[active[position]], lasts[active[position]]
            position += 1
            while position < len(active):
                i = active[position]
                wider_low, wider_high = min(low, firsts[i]), max(high, lasts[i])
                if (len(group) + 1) * (wider_high - wider_low) > budget:
                    break
                group.append(i)
                low, high = wider_low, wider_high
                position += 1
            if len(group) == 1:
                out[group[0], low:high] = self._scores_of(q64[group[0]], top[group[0], low:high])
            else:
                pick = torch.tensor(group, device=self.device)
                out[pick, low:high] = self._exact_scores(q64[pick], top[pick, low:high])

    def _scores_of(self, query64: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Unscaled exact scores of one query (``[d]``) with any number of rows ``cols`` (``[m]``), gathered
        ``rerank_rows`` at a time: shape ``[m]``."""
        parts = [
            self._exact_scores(query64[None], cols[None, first : first + self.rerank_rows])[0]
            for first in range(0, cols.numel(), self.rerank_rows)
        ]
        return torch.cat(parts) if parts else cols.new_zeros(0, dtype=torch.float64)

    def _exact_scores(self, queries64: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Float64 inner products of queries (shape ``[b, d]``) with their searchable rows ``cols``
        (shape ``[b, m]``): shape ``[b, m]``.

        Unscaled: the caller multiplies by ``scale64[cols]`` (cosine) and adds the bias.
        """
        ids = (cols if self._all_rows else self.allowed[cols]).reshape(-1)
        shape, table = (ids.numel(), self.dim), self.table.detach()
        rows = torch.index_select(table, 0, ids, out=self._workspace.get("rows", shape, table.dtype))
        if rows.dtype in (torch.float16, torch.bfloat16):
            # exact, and two vectorised conversions beat one slow one
            rows = self._workspace.get("rows32", shape, torch.float32).copy_(rows)
        rows64 = self._workspace.get("rows64", shape, torch.float64).copy_(rows).view(*cols.shape, self.dim)
        rows64.mul_(queries64[:, None, :])
        # Multiply, then reduce each row on its own: unlike a matrix-vector product, whose kernel can sum
        # a row differently with its place in the block, equal rows get bit-equal scores.
        return rows64.sum(dim=2)

    def _select(self, rows: torch.Tensor, cols: torch.Tensor, exact: torch.Tensor, n: int, k: int) -> TopK:
        """Per query, the k best candidates by (score desc, id asc). Candidates arrive id-ascending.

        Scores that differ only by float64 rounding (``TIE_ULPS`` units in the last place) count as equal, so
        rows that are exact ties in real numbers (e.g. a row and a scaled copy under cosine) come out
        lower id first, with one score, even when their computed scores differ in the last bits.
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
        # Every member of a group reports the group's best score, so that ties read as ties (a row and its
        # scaled copy can differ in the last bits after normalisation).
        positions = torch.arange(width, device=self.device).expand(n, width)
        head = torch.where(new_group, positions, torch.zeros_like(positions)).cummax(dim=1).values
        group_scores = torch.gather(scores, 1, head)
        return TopK(top_ids, torch.gather(group_scores, 1, regroup), counts)
