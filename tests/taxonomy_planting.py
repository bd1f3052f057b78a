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


# --------------------------------------------------------------------------- anchor discovery
#: Which patch of every image plays which part in the discovery tests (4 x 4 grid).
DISCOVERY_PATCHES = {
    "vit_sink": 0,  # its anchor row in every image, and a vision feature 50 x the usual norm
    "llm_bos": 5,  # its anchor row; at the sink layer, the first position's hidden state
    "llm_massive": 6,  # its anchor row; at the sink layer, one dimension 100 x the token's largest
    "dead": 9,  # its anchor row, kept unchanged up to the sink layer
    "changing": 10,  # its row in every image, left to the (random) decoder, which changes it
    "image_dependent": 11,  # nearest to its row in every image, but mixed with image-specific noise
    "rare": 3,  # its row only in the images numbered in ``rare_images``; image noise elsewhere
}
#: Vision-feature scale of the ViT-sink patch.
VIT_BOOST = 50.0


def distinct_rows(table: torch.Tensor, count: int, first: int = 500, k: int = 3) -> list[int]:
    """``count`` ordinary rows none of which is among another's ``k + 1`` nearest rows (nor shares one)."""
    chosen: list[int] = []
    taken: set[int] = set()
    for candidate in range(first, table.shape[0] - 1):
        near = set(top_ids(table[candidate : candidate + 1], table, k + 1)[0].tolist())
        if candidate not in taken and not near & taken:
            chosen.append(candidate)
            taken |= near
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"no {count} well-separated rows found")


class DiscoveryProjector(nn.Module):
    """Replaces the projector: chosen patches become chosen embedding rows, the rest image noise.

    Every output row that is not planted is ``features @ W`` (so it differs from image to image)
    with the span of ``avoid`` (the planted rows and their nearest rows) removed, so that no planted
    id nor its neighbours can be among a noise token's nearest rows. Images are numbered in the order
    the projector sees them (``seen``), which is the order discovery reads them.
    """

    def __init__(
        self,
        table: torch.Tensor,
        rows: dict[int, int],
        mixed: tuple[int, int],
        rare: tuple[int, int],
        rare_images: set[int],
        avoid: list[int],
        vision_dim: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        t = table.detach().double()
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(t[avoid].T)  # [d, m], orthonormal span of the rows to avoid
        self.register_buffer("table", t)
        self.register_buffer("basis", basis)
        self.register_buffer("weight", torch.randn(vision_dim, t.shape[1], generator=g, dtype=torch.float64))
        self.rows = dict(rows)  # patch -> id (exact row in every image)
        self.mixed = mixed  # (patch, id): 0.75 * unit row + 0.66 * unit image noise
        self.rare = rare  # (patch, id): exact row only in ``rare_images``
        self.rare_images = set(rare_images)
        self.seen = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        noise = features.double() @ self.weight  # [N, 16, d]
        noise = noise - (noise @ self.basis) @ self.basis.T
        noise = 0.15 * noise / noise.norm(dim=-1, keepdim=True)
        out = noise.clone()
        for patch, token_id in self.rows.items():
            out[:, patch] = self.table[token_id]
        patch, token_id = self.mixed
        row = self.table[token_id]
        out[:, patch] = 0.15 * (
            0.75 * row / row.norm() + 0.66 * noise[:, patch] / noise[:, patch].norm(dim=-1, keepdim=True)
        )
        patch, token_id = self.rare
        for image in range(features.shape[0]):
            if self.seen + image in self.rare_images:
                out[image, patch] = self.table[token_id]
        self.seen += features.shape[0]
        return out.to(features.dtype)


class DiscoveryPlant:
    """Plants anchors for discovery into ``session`` (a private tiny model).

    * the projector becomes a :class:`DiscoveryProjector` (see :data:`DISCOVERY_PATCHES`);
    * a pre-hook on it scales the ViT-sink patch's vision feature by :data:`VIT_BOOST` (the projector's
      input, which discovery reads as the vision-tower feature);
    * a hook on the output of decoder layer ``layer - 1`` (hidden-state layer ``layer``) copies the
      first position's hidden state into the ``llm_bos`` token, puts a massive value in one dimension
      of the ``llm_massive`` token and sets the ``dead`` token back to its layer-0 row.

    Attributes:
        ids: Part name (keys of :data:`DISCOVERY_PATCHES`) -> planted vocabulary id.
    """

    def __init__(self, session: embedlens.Session, layer: int = 2, rare_images: set[int] | None = None) -> None:
        adapter = session.adapter
        table = adapter.input_embeddings.weight.detach().cpu()
        chosen = distinct_rows(table, len(DISCOVERY_PATCHES))
        self.ids = dict(zip(DISCOVERY_PATCHES, chosen, strict=True))
        self.table = table
        self.image_token_id = adapter.image_token_id
        avoid = sorted({int(i) for c in chosen for i in top_ids(table[c : c + 1], table, 4)[0]})
        patches = DISCOVERY_PATCHES
        exact = ("vit_sink", "llm_bos", "llm_massive", "dead", "changing")
        self.projector = DiscoveryProjector(
            table,
            rows={patches[name]: self.ids[name] for name in exact},
            mixed=(patches["image_dependent"], self.ids["image_dependent"]),
            rare=(patches["rare"], self.ids["rare"]),
            rare_images={0, 1} if rare_images is None else rare_images,
            avoid=avoid,
            vision_dim=int(session.model.config.vision_config.hidden_size),
        )
        session.model.model.multi_modal_projector = self.projector
        self.projector.register_forward_pre_hook(self._boost)
        self._positions: list[torch.Tensor] = []
        self._first: list[int] = []
        session.model.register_forward_pre_hook(self._record, with_kwargs=True)
        adapter.decoder_layers[layer - 1].register_forward_hook(self._plant_layer)

    @property
    def planted(self) -> dict[str, tuple[int, ...]]:
        """The anchors discovery must find, per group, in the order discovery ranks them."""
        return {
            "vit_sink": (self.ids["vit_sink"],),
            "llm_sink": tuple(sorted((self.ids["llm_bos"], self.ids["llm_massive"]))),  # tied: lower id first
            "dead": (self.ids["dead"],),
        }

    def _boost(self, _module: nn.Module, args: tuple) -> tuple:
        features = args[0].clone()
        features[:, DISCOVERY_PATCHES["vit_sink"]] *= VIT_BOOST
        return (features, *args[1:])

    def _record(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        self._positions = [torch.nonzero(row == self.image_token_id).flatten() for row in input_ids]
        self._first = [0] * len(input_ids) if mask is None else [int(torch.nonzero(m).flatten()[0]) for m in mask]

    def _plant_layer(self, _module: nn.Module, _args: tuple, output: object) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        for sample, positions in enumerate(self._positions):
            bos = positions[DISCOVERY_PATCHES["llm_bos"]]
            hidden[sample, bos] = hidden[sample, self._first[sample]]
            massive = positions[DISCOVERY_PATCHES["llm_massive"]]
            hidden[sample, massive, 7] = 100 * hidden[sample, massive].abs().max()
            dead = positions[DISCOVERY_PATCHES["dead"]]
            hidden[sample, dead] = self.table[self.ids["dead"]].to(hidden.device, hidden.dtype)
