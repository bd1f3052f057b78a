"""The streaming tally of anchor discovery: running sums per vocabulary id over every visual token read.

Only sums are kept (counts, per-figure sums, one ``d``-vector per id ever hit, and counts of the id pairs
that share a token's top-k), never the tokens of all images; :mod:`embedlens.taxonomy.discover` turns
them into candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embedlens.taxonomy.evidence import _FIGURES


@dataclass
class _Tally:
    """Running sums per vocabulary id over every visual token read so far (see :meth:`add`)."""

    vocab_rows: int
    dim: int
    images: int = 0
    tokens: int = 0
    images_hit: np.ndarray = field(init=False)
    tokens_hit: np.ndarray = field(init=False)
    nearest_hit: np.ndarray = field(init=False)
    sums: dict[str, np.ndarray] = field(init=False)
    #: Id -> row of ``unit_sum`` (-1: never hit).
    row_of: np.ndarray = field(init=False)
    #: Per hit id, the sum over images of the unit per-image mean layer-0 vector, ``[rows, d]`` float32.
    unit_sum: torch.Tensor = field(init=False)
    used_rows: int = 0
    #: Sorted keys ``a * V + b`` (``a < b``) of id pairs sharing a token's top-k, and their token counts.
    pair_keys: np.ndarray = field(init=False)
    pair_counts: np.ndarray = field(init=False)
    pending: list[np.ndarray] = field(default_factory=list)
    pending_size: int = 0

    def __post_init__(self) -> None:
        size = self.vocab_rows
        self.images_hit = np.zeros(size, dtype=np.int64)
        self.tokens_hit = np.zeros(size, dtype=np.int64)
        self.nearest_hit = np.zeros(size, dtype=np.int64)
        self.sums = {name: np.zeros(size, dtype=np.float64) for name in _FIGURES}
        self.row_of = np.full(size, -1, dtype=np.int64)
        self.unit_sum = torch.zeros(0, self.dim, dtype=torch.float32)
        self.pair_keys = np.zeros(0, dtype=np.int64)
        self.pair_counts = np.zeros(0, dtype=np.int64)

    def add(
        self,
        num_images: int,
        ids: torch.Tensor,
        image_of: torch.Tensor,
        first: torch.Tensor,
        figures: dict[str, np.ndarray],
    ) -> None:
        """Count one batch of images.

        Args:
            num_images: Images in the batch.
            ids: Top-k ids per token, best first, shape ``[n, k]`` (int64).
            image_of: Image of each token within the batch (``0 .. num_images - 1``), shape ``[n]``.
            first: Layer-0 vectors, shape ``[n, d]`` (any device and dtype).
            figures: Per-token figures named as in ``_FIGURES``, float64 arrays of shape ``[n]``.
        """
        ids = ids.detach().cpu().long()
        image_of = image_of.detach().cpu().long()
        n, k = ids.shape
        size = self.vocab_rows
        flat = ids.reshape(-1).numpy()  # [n * k], token-major
        token_of = np.repeat(np.arange(n), k)
        self.tokens += n
        self.images += num_images
        self.tokens_hit += np.bincount(flat, minlength=size)
        self.nearest_hit += np.bincount(ids[:, 0].numpy(), minlength=size)
        for name in _FIGURES:
            self.sums[name] += np.bincount(flat, weights=figures[name][token_of], minlength=size)

        # per (image, id): the mean layer-0 vector of the hitting tokens, as a unit vector
        keys = (image_of.unsqueeze(1) * size + ids).reshape(-1)  # [n * k]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        inverse = inverse.view(n, k).to(first.device)
        vectors = first.detach().float()
        means = torch.zeros(unique_keys.numel(), vectors.shape[1], dtype=torch.float32, device=vectors.device)
        for rank in range(k):
            means.index_add_(0, inverse[:, rank], vectors)
        units = means / means.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        pair_ids = unique_keys % size
        self.images_hit += np.bincount(pair_ids.numpy(), minlength=size)
        hit_ids, back = torch.unique(pair_ids, return_inverse=True)
        per_id = torch.zeros(hit_ids.numel(), units.shape[1], dtype=torch.float32, device=units.device)
        per_id.index_add_(0, back.to(units.device), units)
        rows = torch.from_numpy(self._rows(hit_ids.numpy()))  # may grow unit_sum: before reading it
        self.unit_sum.index_add_(0, rows, per_id.cpu())

        # id pairs sharing a token's top-k (to spot followers)
        for a in range(k):
            for b in range(a + 1, k):
                low = torch.minimum(ids[:, a], ids[:, b])
                high = torch.maximum(ids[:, a], ids[:, b])
                self.pending.append((low * size + high).numpy())
                self.pending_size += n
        if self.pending_size > max(1_000_000, self.pair_keys.size):
            self._compact()

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``unit_sum`` for ``ids``, allocating rows for ids never hit before."""
        new = ids[self.row_of[ids] < 0]
        if new.size:
            self.row_of[new] = np.arange(self.used_rows, self.used_rows + new.size)
            self.used_rows += new.size
            if self.used_rows > self.unit_sum.shape[0]:
                capacity = max(self.used_rows, self.unit_sum.shape[0] * 3 // 2, 256)
                grown = torch.zeros(capacity, self.dim, dtype=torch.float32)
                grown[: self.unit_sum.shape[0]] = self.unit_sum
                self.unit_sum = grown
        return self.row_of[ids]

    def _compact(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.pair_keys, *self.pending])
        counts = np.concatenate([self.pair_counts, *(np.ones(len(p), dtype=np.int64) for p in self.pending)])
        self.pair_keys, inverse = np.unique(keys, return_inverse=True)
        self.pair_counts = np.bincount(inverse, weights=counts, minlength=self.pair_keys.size).astype(np.int64)
        self.pending, self.pending_size = [], 0

    def shared_tokens(self, a: int, b: int) -> int:
        """Tokens whose top-k holds both ids ``a`` and ``b``."""
        self._compact()
        key = min(a, b) * self.vocab_rows + max(a, b)
        where = int(np.searchsorted(self.pair_keys, key))
        return int(self.pair_counts[where]) if where < self.pair_keys.size and self.pair_keys[where] == key else 0

    def independence(self, token_id: int) -> float:
        """Mean cosine over pairs of images between the id's per-image mean vectors (NaN below 2 images)."""
        count = int(self.images_hit[token_id])
        if count < 2:
            return float("nan")
        total = self.unit_sum[int(self.row_of[token_id])].double()
        value = (float(total @ total) - count) / (count * (count - 1))
        return min(max(value, -1.0), 1.0)
