"""Which visual tokens an intervention acts on, per sample: groups, explicit indices, matched random draws.

:func:`select_tokens` is the token-selection half of a prefill: for every sample it decides which
tokens are visual, which the Prunes remove and which rows each Skip zeroes, and starts the sample's
:class:`~embedlens.interventions.records.SampleRecord`. The other half, laying the kept tokens out for
each decoder layer, is :mod:`embedlens.interventions.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedlens.errors import InputError
from embedlens.interventions.notation import describe
from embedlens.interventions.planning import Plan
from embedlens.interventions.records import SampleRecord
from embedlens.interventions.spec import Prune, Skip, check_group
from embedlens.models.base import VisualSpan
from embedlens.taxonomy.groups import ALIVE, GROUPS, expand

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors


@dataclass
class SampleTokens:
    """One sample's visual grid tokens, as interventions address them.

    Attributes:
        positions: Sequence position of every grid token, all images of the sample in order, ``[n]``.
        cells: Each token's cell index within its image (row-major), ``[n]``.
        cells_per_image: Grid size (``rows * cols``) of the image each token belongs to, ``[n]``.
        extra: Positions of visual tokens outside the grid (e.g. a CLS token), ``[e]``.
        labels: Each token's group after precedence, or None when no target names a group, ``[n]``.
        members: Each token's membership of the anchored groups (columns in the order of
            :data:`~embedlens.taxonomy.groups.GROUPS`, overlaps kept), or None, ``[n, 3]`` bool.
        targets: Cells of the sample's ``"target"`` group (per image), or None when not given.
        images: Images in the sample.
        grid_tokens: Grid tokens of the sample, every view of every image.
        vision_passes: Tokens of each vision-tower pass behind the sample's images.
    """

    positions: torch.Tensor
    cells: torch.Tensor
    cells_per_image: torch.Tensor
    extra: torch.Tensor
    labels: np.ndarray | None = None
    members: np.ndarray | None = None
    targets: tuple[int, ...] | None = None
    images: int = 0
    grid_tokens: int = 0
    vision_passes: list[int] = field(default_factory=list)

    @classmethod
    def from_spans(cls, spans: Sequence[VisualSpan], vision_passes: Sequence[int] = ()) -> SampleTokens:
        """Collect the grid tokens of one sample's spans (``vision_passes``: the tower passes behind them)."""
        empty = torch.zeros(0, dtype=torch.long)
        if not spans:
            return cls(empty, empty, empty, empty)
        return cls(
            positions=torch.cat([span.positions for span in spans]).long(),
            cells=torch.cat([torch.arange(span.num_tokens) for span in spans]),
            cells_per_image=torch.cat([torch.full((span.num_tokens,), span.num_tokens) for span in spans]),
            extra=torch.cat([span.extra_positions for span in spans]).long(),
            images=len({span.image for span in spans}),
            grid_tokens=sum(span.num_tokens for span in spans),
            vision_passes=list(vision_passes),
        )

    @property
    def num_tokens(self) -> int:
        """Number of grid tokens ``n``."""
        return int(self.positions.numel())


def target_mask(item: Prune | Skip, tokens: SampleTokens) -> torch.Tensor:
    """Bool ``[n]``: the grid tokens that ``item``'s group or indices name in this sample.

    Anchored groups are read by label (after precedence) or by membership, as ``item.match`` says.
    """
    n = tokens.num_tokens
    if item.indices is not None:
        return _cells(tokens, item.indices)
    names = check_group(item.group or "")
    if "visual" in names:
        return torch.ones(n, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool)
    if "target" in names:
        if tokens.targets is None:
            raise InputError("the group 'target' needs each sample's target cells (e.g. a benchmark's target_patches)")
        chosen |= _cells(tokens, tokens.targets)
    labelled = [label for name in names if name != "target" for label in expand(name)]
    if labelled:
        if tokens.labels is None or tokens.members is None:
            raise AssertionError("group labels were not computed")
        if item.match == "member":
            members = tokens.members.reshape(n, len(GROUPS))
            hit = members[:, [GROUPS.index(name) for name in labelled if name in GROUPS]].any(axis=1)
            if ALIVE in labelled:
                hit |= ~members.any(axis=1)
        else:
            hit = np.isin(tokens.labels, labelled)
        chosen |= torch.from_numpy(np.asarray(hit, dtype=bool)).reshape(n)
    return chosen


def _cells(tokens: SampleTokens, cells: Sequence[int]) -> torch.Tensor:
    """Bool ``[n]`` of the tokens at grid ``cells`` (of every image), with a range check."""
    wanted = torch.tensor(list(cells), dtype=torch.long)
    if tokens.num_tokens and wanted.numel() and int(wanted.max()) >= int(tokens.cells_per_image.min()):
        raise InputError(
            f"token index {int(wanted.max())} is out of range for a grid of {int(tokens.cells_per_image.min())} cells"
        )
    if wanted.numel() and int(wanted.min()) < 0:
        raise InputError(f"token index {int(wanted.min())} is negative")
    return torch.isin(tokens.cells, wanted)


def sample_seed(seed: int, sample_id: int) -> int:
    """The seed of one sample's matched random draw: a hash of the base seed and the sample's id."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, sample_id & 0xFFFFFFFF]).generate_state(1)[0])


def prune_mask(item: Prune, tokens: SampleTokens, sample_id: int) -> tuple[torch.Tensor, int | None]:
    """Bool ``[n]`` of the grid tokens ``item`` removes, and the seed used (``matched_random`` only).

    ``matched_random`` draws ``min(m, |complement|)`` tokens from the complement of the ``m`` target
    tokens (the target as ``item.match`` reads it); an empty target removes nothing.
    """
    chosen = target_mask(item, tokens)
    if item.select == "group":
        return chosen, None
    if item.select == "complement":
        return ~chosen, None
    seed = sample_seed(item.seed, sample_id)
    complement = torch.nonzero(~chosen).flatten()
    count = min(int(chosen.sum()), int(complement.numel()))
    generator = torch.Generator().manual_seed(seed)
    drawn = complement[torch.randperm(complement.numel(), generator=generator)[:count]]
    removed = torch.zeros_like(chosen)
    removed[drawn] = True
    return removed, seed


def label_tokens(
    context: ModelContext,
    embeds: torch.Tensor,
    tokens: Sequence[SampleTokens],
    rule: tuple[tuple[str, ...], Anchors, int],
) -> None:
    """Label every sample's grid tokens with the rule, on the layer-0 vectors ``embeds`` ``[B, L, d]``.

    Sets each sample's ``labels`` (after precedence) and ``members`` (overlaps kept).
    """
    from embedlens.taxonomy.rule import classify_ids

    order, chosen, k = rule
    vectors = [embeds[row, sample.positions.to(embeds.device)] for row, sample in enumerate(tokens)]
    everything = torch.cat(vectors) if vectors else embeds.new_zeros(0, embeds.shape[-1])
    if everything.shape[0] == 0:
        ids = torch.zeros(0, k, dtype=torch.long)
    else:
        ids = context.lens("embedding", vocab_limit=chosen.base_vocab_size).top_k(everything.detach(), k).ids
    found = classify_ids(ids, chosen, top_k=k, precedence=order)
    start = 0
    for sample in tokens:
        sample.labels = found.group[start : start + sample.num_tokens]
        sample.members = found.members[start : start + sample.num_tokens]
        start += sample.num_tokens


@dataclass
class Selection:
    """Which tokens of a ``[B, L]`` batch the interventions act on at one prefill.

    Attributes:
        visual: Every visual token (grid and extra), ``[B, L]`` bool (CPU).
        pruned: Tokens the Prunes remove before layer 0, ``[B, L]`` bool (CPU).
        skipped: Rows each skipped ``(layer, part)`` zeroes, ``[B, L]`` bool each (CPU).
        records: One record per row; ``tokens_per_layer`` and the skip counts are filled once the
            layout is known.
    """

    visual: torch.Tensor
    pruned: torch.Tensor
    skipped: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    records: list[SampleRecord] = field(default_factory=list)


def select_tokens(
    checked: Plan, tokens: Sequence[SampleTokens], sample_ids: Sequence[int], mask: torch.Tensor
) -> Selection:
    """Decide, for every sample, which tokens the plan's Prunes remove and its Skips zero.

    Args:
        checked: The plan.
        tokens: Each row's visual tokens (labelled when the plan targets a group).
        sample_ids: One id per row (``matched_random`` seeds derive from it).
        mask: Real (non-padding) tokens, ``[B, L]`` bool.
    """
    batch, length = mask.shape
    selection = Selection(
        visual=torch.zeros(batch, length, dtype=torch.bool), pruned=torch.zeros(batch, length, dtype=torch.bool)
    )
    for row, sample in enumerate(tokens):
        selection.visual[row, sample.positions] = True
        selection.visual[row, sample.extra] = True
        record = SampleRecord(
            sample_id=int(sample_ids[row]),
            length=int(mask[row].sum()),
            visual=int(sample.num_tokens + sample.extra.numel()),
            images=sample.images,
            grid_tokens=sample.grid_tokens,
            vision_passes=sample.vision_passes,
        )
        if sample.labels is not None:
            record.groups = {str(name): int((sample.labels == name).sum()) for name in sorted(set(sample.labels))}
        removed = torch.zeros(sample.num_tokens, dtype=torch.bool)
        for item in checked.prunes:
            chosen, seed = prune_mask(item, sample, record.sample_id)
            removed |= chosen
            if seed is not None:
                record.seeds[describe(item)] = seed
        selection.pruned[row, sample.positions[removed]] = True
        record.pruned = sample.cells[removed].tolist()
        record.pruned_positions = sample.positions[removed].tolist()
        for skip in checked.skips:
            chosen = target_mask(skip, sample)
            for pair in skip.sublayers:
                rows = selection.skipped.setdefault(pair, torch.zeros(batch, length, dtype=torch.bool))
                rows[row, sample.positions[chosen]] = True
        selection.records.append(record)
    return selection
