"""How the kept tokens are laid out for each decoder layer: slots, masks and positions (pure tensors).

The decoder layers are split into *phases*, ranges of layers that see the same tokens (they change at
an Inject or an Exit). Each phase lays its tokens out left-padded in slots: ``columns[b, j]`` is the
original sequence column held by slot ``j`` of row ``b`` (-1 for padding). :func:`build_layout` is the
phase-building half of a prefill (the other half, choosing the tokens, is
:mod:`embedlens.interventions.select`); the rest moves the residual stream between phases and makes
the masks and positions of the decode steps.

Positions (``[P, B, T]`` inside, see :mod:`embedlens.interventions.positions`): ``"keep"`` gives every
kept token its original position and decoding continues the unpruned numbering; ``"reindex"`` numbers
each sample's kept tokens without gaps and shifts every decode step's position accordingly.

Masks. When the language model builds its own mask from a 2-D one, each phase after the first gets a
causal mask over its slots. When it is handed ready 4-D masks (Gemma 3: one per attention kind, with
the image block bidirectional), every phase's masks are those masks read at its slots' columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from embedlens.interventions.planning import Plan
from embedlens.interventions.positions import next_positions, prefill_positions, to_planes


@dataclass
class Phase:
    """A range of decoder layers that all see the same tokens (at prefill).

    Attributes:
        first: First decoder layer of the range.
        stop: One past the last.
        columns: Original sequence column of each slot, -1 for padding, ``[B, T]``.
        valid: Slots holding a token, ``[B, T]``.
        position_ids: Positions of the slots (0 in padding slots), ``[P, B, T]``.
        masks: The 4-D attention masks of these layers at prefill, by mask key (see
            :meth:`~embedlens.models.base.ModelAdapter.mask_key`); empty for the base phase unless the
            language model was handed ready 4-D masks.
        position_embeddings: What the decoder layers get for these positions, by mask key (filled
            lazily by the layer hooks).
    """

    first: int
    stop: int
    columns: torch.Tensor
    valid: torch.Tensor
    position_ids: torch.Tensor
    masks: dict[str | None, torch.Tensor] = field(default_factory=dict)
    position_embeddings: dict[str | None, Any] = field(default_factory=dict)


@dataclass
class Layout:
    """Everything the hooks share between the prefill and the decode steps of one sequence.

    Attributes:
        length: Columns ``L`` of the untouched (padded) sequence.
        phases: The phases, in layer order.
        phase_of_layer: Index into ``phases`` of each decoder layer.
        shift: Per plane and row, what to subtract from a decode step's position (0 under ``"keep"``),
            ``[P, B]``.
        following: Per plane and row, the untouched sequence's next position, ``[P, B]``.
        embeds: The layer-0 inputs after Scale, ``[B, L, d]`` (injected tokens come from here).
        changed: Whether the base phase differs from the untouched sequence.
        skip_rows: Rows zeroed at each skipped ``(layer, part)``, in that layer's slots, ``[B, T]``.
        additions: What the decoder stack adds after decoder layer ``i`` (DeepStack), ``[B, L, d]`` at
            the original columns; applied by the engine at the tokens present.
        decoded: Decode steps run so far.
        in_prefill: True until the first decode step.
        tail: Real tokens among those generated so far and this step's, ``[B, decoded + steps]`` bool.
        decode_masks: The current decode step's 4-D mask of each phase after the first.
    """

    length: int
    phases: list[Phase]
    phase_of_layer: list[int]
    shift: torch.Tensor
    following: torch.Tensor
    embeds: torch.Tensor
    changed: bool
    skip_rows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    additions: dict[int, torch.Tensor] = field(default_factory=dict)
    decoded: int = 0
    in_prefill: bool = True
    tail: torch.Tensor | None = None
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


def build_layout(
    checked: Plan,
    mask: torch.Tensor,
    pruned: torch.Tensor,
    visual: torch.Tensor,
    original: torch.Tensor,
    embeds: torch.Tensor,
    segment: torch.Tensor | None,
) -> Layout:
    """The phases of one prefill: which tokens each layer range holds, in which slots, at which positions.

    Args:
        checked: The plan.
        mask: Real (non-padding) tokens, ``[B, L]`` bool.
        pruned: Tokens removed before layer 0, ``[B, L]`` bool.
        visual: Visual tokens, ``[B, L]`` bool.
        original: Positions the model was given, ``[P, B, L]``.
        embeds: Layer-0 inputs after Scale, ``[B, L, d]``.
        segment: The image each visual column belongs to (-1 for text), ``[B, L]``; needed only to
            renumber planes of positions (``"reindex"`` with M-RoPE).
    """
    length = mask.shape[1]
    kept = mask & ~pruned
    positions, shift = prefill_positions(original, mask, kept, segment, checked.positions)
    phases: list[Phase] = []
    for first, stop in itertools.pairwise(phase_bounds(checked)):
        present = kept if checked.visual_present(first) else kept & ~visual
        columns = left_pad(present)
        valid = columns >= 0
        index = columns.clamp(min=0).expand(positions.shape[0], *columns.shape)
        phase_positions = torch.where(valid[None], positions.gather(2, index), 0)
        phases.append(Phase(first=first, stop=stop, columns=columns, valid=valid, position_ids=phase_positions))
    untouched = torch.where(mask, torch.arange(length, device=mask.device), -1)
    base = phases[0].columns
    changed = base.shape != untouched.shape or not bool((base == untouched).all())
    phase_of_layer = [
        next(i for i, p in enumerate(phases) if p.first <= layer < p.stop) for layer in range(checked.num_layers)
    ]
    return Layout(
        length=length,
        phases=phases,
        phase_of_layer=phase_of_layer,
        shift=shift,
        following=next_positions(original, mask),
        embeds=embeds,
        changed=changed,
    )


def _allowed(full: torch.Tensor) -> torch.Tensor:
    """A 4-D mask ``[B, 1, q, kv]`` (boolean, or additive with the dtype's minimum) as allowed-booleans."""
    if full.dtype == torch.bool:
        return full
    return full > torch.finfo(full.dtype).min / 2


def slot_mask(
    columns: torch.Tensor,
    valid: torch.Tensor,
    full: torch.Tensor | None,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The prefill mask ``[B, 1, T, T]`` of one phase's slots.

    With ``full`` (a 4-D mask over the untouched sequence, ``[B, 1, L, L]``) it is ``full`` read at the
    slots' columns, in ``full``'s own form (boolean or additive); without it, causal over the columns in
    the form ``implementation`` expects. Padding slots see nothing but themselves (no empty rows).
    """
    index = columns.clamp(min=0)
    if full is None:
        allowed = valid[:, None, :] & (columns[:, None, :] <= columns[:, :, None])
    else:
        source = _allowed(full)[:, 0].to(columns.device)
        rows = source.gather(1, index[:, :, None].expand(-1, -1, source.shape[2]))
        allowed = rows.gather(2, index[:, None, :].expand(-1, index.shape[1], -1)) & valid[:, None, :]
        implementation = "sdpa" if full.dtype == torch.bool else "eager"
        dtype = full.dtype if full.dtype != torch.bool else dtype
    eye = torch.eye(columns.shape[1], dtype=torch.bool, device=columns.device)
    allowed = allowed | (eye & ~valid[:, :, None])
    return attention_mask(allowed[:, None], implementation, dtype)


def prepare_phase_masks(
    layout: Layout,
    implementation: str,
    dtype: torch.dtype,
    full: dict[str | None, torch.Tensor | None],
) -> None:
    """Prefill masks of the phases after the first (and of the base phase when the language model was
    handed ready 4-D masks, which must then be read at the base phase's columns).

    Args:
        layout: The prefill's layout (its phases get ``masks``).
        implementation: The attention implementation (``"sdpa"`` or ``"eager"``).
        dtype: Dtype of an additive (eager) mask.
        full: The 4-D masks the language model was given, by mask key (``{None: None}`` when it builds
            its own from a 2-D mask).
    """
    handed = any(value is not None for value in full.values())
    for index, phase in enumerate(layout.phases):
        if index == 0 and not (handed and layout.changed):
            continue
        phase.masks = {
            key: slot_mask(phase.columns, phase.valid, value, implementation, dtype) for key, value in full.items()
        }


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


def decode_tail(layout: Layout, given_mask: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> None:
    """Record which of the tokens generated so far (and this step's ``steps``) are real, from ``generate``'s
    2-D mask over the untouched sequence (``layout.tail``, ``[B, decoded + steps]``)."""
    if given_mask is not None and given_mask.dim() == 2:
        layout.tail = given_mask[:, layout.length :].to(device=device, dtype=torch.bool)
    else:
        layout.tail = torch.ones(batch, layout.decoded + steps, dtype=torch.bool, device=device)


def compact_mask(layout: Layout) -> torch.Tensor:
    """The 2-D mask of what the base phase's cache holds plus the generated tokens, ``[B, T + decoded + steps]``."""
    assert layout.tail is not None
    return torch.cat([layout.phases[0].valid.to(layout.tail.device), layout.tail], dim=1).long()


def decode_step(
    layout: Layout,
    given_positions: torch.Tensor | None,
    steps: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The decoder stack's positions ``[P, B, steps]`` for ``steps`` new tokens, and each later phase's mask.

    Maps ``generate``'s positions (which count the untouched sequence) onto the kept numbering; where none
    are given, continues each plane from the untouched sequence's next position. Returns None when the
    base phase is the untouched sequence (the model's own positions stand); sets ``layout.decode_masks``
    and advances ``layout.decoded``. Needs ``layout.tail`` (:func:`decode_tail`).
    """
    tail = layout.tail
    assert tail is not None
    batch = tail.shape[0]
    positions = None
    if layout.changed:
        if given_positions is not None:
            planes = to_planes(given_positions, batch, steps, device)
        else:
            step = layout.decoded + torch.arange(steps, device=device)
            planes = layout.following.to(device)[:, :, None] + step
        positions = planes - layout.shift.to(device)[:, :, None]
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
    return positions
