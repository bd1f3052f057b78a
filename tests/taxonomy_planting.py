"""Planting known behaviour into a tiny LLaVA for the taxonomy tests.

On random weights nothing a lens shows is meaningful, so the tests decide what each visual token is:
the projector is replaced so that chosen patches become exact rows of the input embedding table (the
"anchors"), a patch becomes a mix of two anchor rows (an overlap), and every other patch is a random
vector orthogonal to all anchor rows (so no anchor can be among its nearest rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import embedlens
from embedlens.taxonomy import Anchors

#: Tiny model: 4 x 4 grid, vocabulary of 1000 (ids 0..3 and 999 are special, 4..259 bytes).
NUM_TOKENS = 16
#: Which planted patch is which: patch 0 -> ViT-sink anchor row, 5 -> LLM-sink row, 9 -> dead row.
PLANTED = {"vit_sink": 0, "llm_sink": 5, "dead": 9}
#: Patch 12 is the normalised sum of the ViT-sink and LLM-sink rows (matches both groups).
OVERLAP_PATCH = 12


class PlantedProjector(nn.Module):
    """Replaces the projector: visual token ``i`` of every image becomes ``rows[i]`` (shape ``[n, d]``)."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.rows.unsqueeze(0).expand(features.shape[0], -1, -1).to(features.dtype)


def unit_rows(table: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` scaled to unit length, float64 (zero rows stay zero)."""
    t = table.detach().double()
    norms = t.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, t / norms.clamp_min(1e-300), torch.zeros_like(t))


def pick_anchor_ids(table: torch.Tensor, first: int = 500) -> tuple[int, int, int]:
    """Three ordinary rows with pairwise negative cosine, so that none is among another's nearest rows."""
    unit = unit_rows(table)
    chosen = [first]
    for candidate in range(first + 1, table.shape[0] - 1):
        if all(float(unit[candidate] @ unit[c]) < -0.05 for c in chosen):
            chosen.append(candidate)
        if len(chosen) == 3:
            return chosen[0], chosen[1], chosen[2]
    raise AssertionError("no three anti-aligned rows found")


def top_ids(vectors: torch.Tensor, table: torch.Tensor, k: int) -> np.ndarray:
    """Float64 brute-force top-k ids by cosine (ties: lower id first), shape ``[n, k]``."""
    scores = (unit_rows(vectors) @ unit_rows(table).T).numpy()
    ids = np.arange(scores.shape[1])
    return np.array([np.lexsort((ids, -row))[:k] for row in scores])


def planted_rows(table: torch.Tensor, anchor_ids: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """The ``[16, d]`` projector outputs: anchor rows at :data:`PLANTED`, a two-anchor mix at
    :data:`OVERLAP_PATCH`, and random vectors orthogonal to every anchor row elsewhere."""
    a, b, c = anchor_ids
    t = table.detach().double()
    basis, _ = torch.linalg.qr(t[[a, b, c]].T)  # [d, 3], orthonormal span of the anchor rows
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(NUM_TOKENS, t.shape[1], generator=g, dtype=torch.float64)
    rows = rows - (rows @ basis) @ basis.T
    for name, patch in PLANTED.items():
        rows[patch] = t[anchor_ids[list(PLANTED).index(name)]]
    unit = unit_rows(t)
    rows[OVERLAP_PATCH] = (unit[a] + unit[b]) / (unit[a] + unit[b]).norm()
    return rows.float()


def plant(session: embedlens.Session, seed: int = 0) -> tuple[Anchors, torch.Tensor]:
    """Plant the taxonomy into ``session`` (a private tiny model); return its anchors and the planted rows."""
    adapter = session.adapter
    table = adapter.input_embeddings.weight
    anchor_ids = pick_anchor_ids(table)
    rows = planted_rows(table, anchor_ids, seed)
    session.model.model.multi_modal_projector = PlantedProjector(rows)
    groups = {name: (anchor_ids[i],) for i, name in enumerate(PLANTED)}
    anchors = Anchors.for_tokenizer(groups, adapter.tokenizer, model="planted-tiny")
    return anchors, rows


def expected_groups() -> list[str]:
    """The group each of the 16 planted patches must get (vit_sink wins the overlap patch)."""
    groups = ["alive"] * NUM_TOKENS
    for name, patch in PLANTED.items():
        groups[patch] = name
    groups[OVERLAP_PATCH] = "vit_sink"
    return groups
