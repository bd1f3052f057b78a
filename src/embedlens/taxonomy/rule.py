"""The paper's sink / dead / alive rule on lens top-k ids.

A visual token joins a group when ANY of its ``k`` nearest input-embedding ids (``k`` = the anchors'
``top_k``, 3 in the paper) is one of that group's anchor ids. There is no threshold and no special-token
filter, as in the paper. A token can match several groups: its membership in each is kept (and the
overlaps counted), and its single ``group`` label follows an explicit precedence (by default
``vit_sink > llm_sink > dead``). Tokens that match no group are ``alive``.

The ids come from :class:`embedlens.lens.EmbeddingLens`, which is exact (float64 order, ties broken by
lower id), so the reference code's fp16 top-3 flips cannot happen here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from embedlens.errors import InputError
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.groups import ALIVE, GROUPS


@dataclass(frozen=True)
class Classification:
    """Group labels of ``n`` visual tokens.

    Attributes:
        group: Each token's group after precedence (``"vit_sink"``, ``"llm_sink"``, ``"dead"`` or
            ``"alive"``), string array of shape ``[n]``.
        members: Membership before precedence (overlaps kept), bool array of shape ``[n, 3]``; column
            ``g`` is group ``GROUPS[g]`` (``vit_sink``, ``llm_sink``, ``dead``).
        anchor_id: The anchor id that decided each token's group (the best-ranked id of the winning
            group's anchors among the token's top-k), or None for alive tokens; ``n`` entries.
        anchor_rank: Rank (0 = nearest) of ``anchor_id`` in the token's top-k, or None; ``n`` entries.
        top_k: Number of nearest ids the rule looked at.
        precedence: Group order used to pick one label when a token matches several.
    """

    group: np.ndarray
    members: np.ndarray
    anchor_id: list[int | None]
    anchor_rank: list[int | None]
    top_k: int
    precedence: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.group.shape[0])

    def member(self, name: str) -> np.ndarray:
        """Bool array ``[n]``: tokens matching group ``name`` (before precedence)."""
        if name not in GROUPS:
            raise InputError(f"unknown group {name!r}; groups are {list(GROUPS)}")
        return self.members[:, GROUPS.index(name)]

    @property
    def counts(self) -> dict[str, int]:
        """Tokens per group after precedence (``vit_sink``, ``llm_sink``, ``dead``, ``alive``); sums to ``n``."""
        return {name: int(np.count_nonzero(self.group == name)) for name in (*GROUPS, ALIVE)}

    @property
    def matches(self) -> dict[str, int]:
        """Tokens matching each group before precedence (a token may count in several)."""
        return {name: int(self.members[:, g].sum()) for g, name in enumerate(GROUPS)}

    @property
    def overlaps(self) -> dict[str, int]:
        """Tokens matching both groups of each pair, keyed ``"a+b"`` (e.g. ``"vit_sink+llm_sink"``)."""
        out = {}
        for a, b in combinations(range(len(GROUPS)), 2):
            out[f"{GROUPS[a]}+{GROUPS[b]}"] = int(np.count_nonzero(self.members[:, a] & self.members[:, b]))
        return out

    @property
    def n_overlapping(self) -> int:
        """Tokens matching two or more groups."""
        return int(np.count_nonzero(self.members.sum(axis=1) >= 2))


def check_precedence(precedence: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a precedence order: a permutation of :data:`GROUPS` (None = the default order)."""
    if precedence is None:
        return GROUPS
    order = tuple(precedence)
    if sorted(order) != sorted(GROUPS):
        raise InputError(f"precedence must order exactly the groups {list(GROUPS)}, got {list(order)}")
    return order


def classify_ids(
    top_ids: np.ndarray | torch.Tensor,
    anchors: Anchors,
    *,
    top_k: int | None = None,
    precedence: Sequence[str] | None = None,
) -> Classification:
    """Apply the paper's rule to lens top-k ids.

    Args:
        top_ids: Nearest ids per token, best first, shape ``[n, k']`` with ``k' >= k``.
        anchors: Anchor ids per group.
        top_k: Ids per token the rule looks at (default: ``anchors.top_k``).
        precedence: Order deciding the label of a token matching several groups (default:
            ``vit_sink``, ``llm_sink``, ``dead``).

    Returns:
        The :class:`Classification` of the ``n`` tokens.
    """
    order = check_precedence(precedence)
    k = anchors.top_k if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InputError(f"top-k must be a positive integer, got {k!r}")
    ids = top_ids.detach().cpu().numpy() if isinstance(top_ids, torch.Tensor) else np.asarray(top_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"top ids must be an integer array of shape [n, k], got {ids.dtype} {ids.shape}")
    if ids.shape[1] < k:
        raise InputError(f"the rule needs each token's top-{k} ids, but only {ids.shape[1]} are given")
    ids = ids[:, :k]
    n = ids.shape[0]
    hits = {name: np.isin(ids, np.asarray(anchors.groups.get(name, ()), dtype=ids.dtype)) for name in GROUPS}
    members = np.stack([hits[name].any(axis=1) for name in GROUPS], axis=1).reshape(n, len(GROUPS))
    group = np.full(n, ALIVE, dtype=f"<U{max(len(name) for name in (*GROUPS, ALIVE))}")
    anchor_id: list[int | None] = [None] * n
    anchor_rank: list[int | None] = [None] * n
    decided = np.zeros(n, dtype=bool)
    for name in order:
        winners = hits[name].any(axis=1) & ~decided
        group[winners] = name
        for i in np.flatnonzero(winners):
            rank = int(np.argmax(hits[name][i]))
            anchor_rank[i] = rank
            anchor_id[i] = int(ids[i, rank])
        decided |= winners
    return Classification(
        group=group, members=members, anchor_id=anchor_id, anchor_rank=anchor_rank, top_k=k, precedence=order
    )
