"""How the kept tokens are laid out for each decoder layer: slots, masks and positions (pure tensors).

The decoder layers are split into *phases*, ranges of layers that see the same tokens (they change at
an Inject or an Exit). Each phase lays its tokens out left-padded in slots: ``columns[b, j]`` is the
original sequence column held by slot ``j`` of row ``b`` (-1 for padding). :func:`build_layout` is the
phase-building half of a prefill (the other half, choosing the tokens, is
:mod:`embedlens.interventions.select`); the rest moves the residual stream between phases and makes
the masks and positions of the decode steps.

Positions. ``"keep"`` gives every kept token its original position and decoding continues the
unpruned numbering. ``"reindex"`` numbers each sample's kept tokens 0, 1, ..., n_kept - 1 (left
padding excluded) and decoding continues n_kept, n_kept + 1, ...: the position ``generate`` passes
for a decode step is shifted by (the original next position - n_kept) of its row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from embedlens.interventions.planning import Plan


@dataclass
class Phase:
    """A range of decoder layers that all see the same tokens (at prefill).

    Attributes:
        first: First decoder layer of the range.
        stop: One past the last.
        columns: Original sequence column of each slot, -1 for padding, ``[B, T]``.
        valid: Slots holding a token, ``[B, T]``.
        mask: The 4-D attention mask of these layers at prefill, or None for the base phase.
        position_ids: Positions of the slots (0 in padding slots), ``[B, T]``.
        position_embeddings: What the decoder layers get for these positions (None for the base phase).
    """

    first: int
    stop: int
    columns: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    position_embeddings: Any = None


@dataclass
class Layout:
    """Everything the hooks share between the prefill and the decode steps of one sequence.

    Attributes:
        length: Columns ``L`` of the untouched (padded) sequence.
        phases: The phases, in layer order.
        phase_of_layer: Index into ``phases`` of each decoder layer.
        shift: Per row, what to subtract from a decode step's position (0 under ``"keep"``), ``[B]``.
        embeds: The layer-0 inputs after Scale, ``[B, L, d]`` (injected tokens come from here).
        changed: Whether the base phase differs from the untouched sequence.
        skip_rows: Rows zeroed at each skipped ``(layer, part)``, in that layer's slots, ``[B, T]``.
        decoded: Decode steps run so far.
        in_prefill: True until the first decode step.
        decode_masks: The current decode step's 4-D mask of each phase after the first.
    """

    length: int
    phases: list[Phase]
    phase_of_layer: list[int]
    shift: torch.Tensor
    embeds: torch.Tensor
    changed: bool
    skip_rows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    decoded: int = 0
    in_prefill: bool = True
    decode_masks: dict[int, torch.Tensor] = field(default_factory=dict)


def attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``[B, 1, q, kv]`` allowed-matrix in the form the attention implementation expects."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def left_pad(keep: torch.Tensor) -> torch.Tensor:
    """Columns of the kept entries of each row, left-padded with -1: ``[B, L]`` bool -> ``[B, T]`` long."""
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.shape[0] else 0
    columns = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    for row in range(keep.shape[0]):
        found = torch.nonzero(keep[row]).flatten()
        if found.numel():
            columns[row, width - found.numel() :] = found
    return columns


def gather_rows(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``values[b, columns[b, j]]`` with zeros where ``columns`` is -1: ``[B, L, ...]`` -> ``[B, T, ...]``."""
    index = columns.clamp(min=0)
    shape = index.shape + values.shape[2:]
    gathered = values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    valid = (columns >= 0).view(*columns.shape, *([1] * (values.dim() - 2)))
    return torch.where(valid, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


def phase_bounds(checked: Plan) -> list[int]:
    """Layers where the set of tokens changes, with 0 and ``num_layers``: ``[0, ..., num_layers]``."""
    inner = {b for b in (checked.inject, checked.exit) if 0 < b < checked.num_layers}
    bounds = [0]
    for bound in sorted(inner):
        if checked.visual_present(bound) != checked.visual_present(bound - 1):
            bounds.append(bound)
    return [*bounds, checked.num_layers]


def prefill_positions(
    original: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``[B, L]`` columns at prefill, and each row's decode shift ``[B]``.

    Args:
        original: The positions the model was given (or ``0..L-1``), ``[B, L]``.
        mask: Real (non-padding) tokens, ``[B, L]`` bool.
        kept: Real tokens that are not pruned, ``[B, L]`` bool.
        policy: ``"keep"`` or ``"reindex"`` (see the module docstring).
    """
    if policy != "reindex":
        return original, torch.zeros(original.shape[0], dtype=torch.long, device=original.device)
    renumbered = kept.long().cumsum(dim=1) - 1
    positions = torch.where(kept, renumbered, original)
    following = torch.where(mask, original, torch.full_like(original, -1)).max(dim=1).values + 1
    return positions, following - kept.sum(dim=1)


def build_layout(
    checked: Plan,
    mask: torch.Tensor,
    pruned: torch.Tensor,
    visual: torch.Tensor,
    original: torch.Tensor,
    embeds: torch.Tensor,
) -> Layout:
    """The phases of one prefill: which tokens each layer range holds, in which slots, at which positions.

    Args:
        checked: The plan.
        mask: Real (non-padding) tokens, ``[B, L]`` bool.
        pruned: Tokens removed before layer 0, ``[B, L]`` bool.
        visual: Visual tokens, ``[B, L]`` bool.
        original: Positions the model was given, ``[B, L]``.
        embeds: Layer-0 inputs after Scale, ``[B, L, d]``.
    """
    length = mask.shape[1]
    kept = mask & ~pruned
    positions, shift = prefill_positions(original, mask, kept, checked.positions)
    phases: list[Phase] = []
    for first, stop in itertools.pairwise(phase_bounds(checked)):
        present = kept if checked.visual_present(first) else kept & ~visual
        columns = left_pad(present)
        valid = columns >= 0
        phase_positions = torch.where(valid, positions.gather(1, columns.clamp(min=0)), 0)
        phases.append(Phase(first=first, stop=stop, columns=columns, valid=valid, position_ids=phase_positions))
    untouched = torch.where(mask, torch.arange(length, device=mask.device), -1)
    base = phases[0].columns
    changed = base.shape != untouched.shape or not bool((base == untouched).all())
    phase_of_layer = [
        next(i for i, p in enumerate(phases) if p.first <= layer < p.stop) for layer in range(checked.num_layers)
    ]
    return Layout(
        length=length, phases=phases, phase_of_layer=phase_of_layer, shift=shift, embeds=embeds, changed=changed
    )


def prepare_phase_masks(
    layout: Layout, implementation: str, dtype: torch.dtype, rotary: Callable[[torch.Tensor, torch.Tensor], Any]
) -> None:
    """Prefill masks and rotary embeddings of the phases after the first.

    Args:
        layout: The prefill's layout (its phases get ``mask`` and ``position_embeddings``).
        implementation: The attention implementation (``"sdpa"`` or ``"eager"``).
        dtype: Dtype of an additive (eager) mask.
        rotary: ``rotary(like, position_ids)`` -> the decoder layers' position embeddings.
    """
    for phase in layout.phases[1:]:
        columns, valid = phase.columns, phase.valid
        allowed = valid[:, None, :] & (columns[:, None, :] <= columns[:, :, None])
        eye = torch.eye(columns.shape[1], dtype=torch.bool, device=columns.device)
        allowed = allowed | (eye & ~valid[:, :, None])
        phase.mask = attention_mask(allowed[:, None], implementation, dtype)
        like = layout.embeds.new_zeros(columns.shape[0], columns.shape[1], 1)
        phase.position_embeddings = rotary(like, phase.position_ids)


def skip_rows_in_slots(layout: Layout, skipped: dict[tuple[int, str], torch.Tensor]) -> None:
    """Move each skipped sublayer's ``[B, L]`` rows into its layer's slots (``layout.skip_rows``)."""
    for pair, rows in skipped.items():
        phase = layout.phases[layout.phase_of_layer[pair[0]]]
        rows = rows.to(phase.columns.device)
        layout.skip_rows[pair] = rows.gather(1, phase.columns.clamp(min=0)) & phase.valid


def relayout(hidden: torch.Tensor, before: Phase, after: Phase, layout: Layout) -> torch.Tensor:
    """Move the residual stream ``[B, T, d]`` from one phase's slots to the next's; newcomers are the
    (scaled) visual embeddings."""
    device = hidden.device
    old_columns, old_valid = before.columns.to(device), before.valid.to(device)
    new_columns, new_valid = after.columns.to(device), after.valid.to(device)
    # slot_of[b, c] = slot of original column c in the old layout (-1 if absent); padding slots write
    # into a spare last column so they never collide with a real column.
    slot_of = torch.full((hidden.shape[0], layout.length + 1), -1, dtype=torch.long, device=device)
    slots = torch.arange(old_columns.shape[1], device=device).expand_as(old_columns)
    slot_of.scatter_(1, torch.where(old_valid, old_columns, layout.length), torch.where(old_valid, slots, -1))
    source = torch.where(new_valid, slot_of.gather(1, new_columns.clamp(min=0)), -1)
    carried = gather_rows(hidden, source)
    inserted = gather_rows(layout.embeds.to(device, hidden.dtype), new_columns)
    return torch.where((source >= 0)[..., None], carried, inserted)


def decode_step(
    layout: Layout,
    given_mask: torch.Tensor | None,
    given_positions: torch.Tensor | None,
    batch: int,
    steps: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The decoder stack's mask and positions for ``steps`` new tokens, and each later phase's mask.

    Maps ``generate``'s 2-D mask and positions (which count the untouched sequence) onto what the
    caches hold. Returns ``(attention_mask, position_ids)`` to hand the decoder stack, both None when
    the base phase is the untouched sequence; sets ``layout.decode_masks`` and advances
    ``layout.decoded``.
    """
    if given_mask is not None and given_mask.dim() == 2:
        tail = given_mask[:, layout.length :].to(device=device, dtype=torch.bool)
    else:
        tail = torch.ones(batch, layout.decoded + steps, dtype=torch.bool, device=device)
    base = layout.phases[0]
    stack_mask = positions = None
    if layout.changed:
        stack_mask = torch.cat([base.valid.to(device), tail], dim=1).long()
        positions = given_positions
        if positions is None:
            positions = (layout.length + layout.decoded + torch.arange(steps, device=device)).expand(batch, steps)
        positions = positions - layout.shift[:, None].to(positions.device)
    layout.decode_masks = {}
    if len(layout.phases) > 1:
        query = layout.decoded + torch.arange(steps, device=device)
        causal = torch.arange(tail.shape[1], device=device)[None, :] <= query[:, None]
        recent = tail[:, None, :] & causal[None]
        for index, phase in enumerate(layout.phases[1:], start=1):
            prefix = phase.valid[:, None, :].to(device).expand(batch, steps, phase.valid.shape[1])
            allowed = torch.cat([prefix, recent], dim=2)[:, None]
            layout.decode_masks[index] = attention_mask(allowed, implementation, dtype)
    layout.decoded += steps
    return stack_mask, positions
