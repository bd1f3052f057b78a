"""Position ids under pruning: one form for 1-D positions and for multi-plane (M-RoPE) positions.

Inside the engine every position tensor has a leading *plane* axis, ``[P, B, L]``: ``P = 1`` for the usual
1-D positions (``[B, L]`` as the model gives them), ``P = 3`` for Qwen's M-RoPE (temporal, height, width),
and ``P = 4`` when ``generate`` hands the language model a plain text plane in front of the three M-RoPE
planes (``transformers``' convention for these models). :func:`to_planes` and :func:`from_planes` convert.

Policies (:class:`~embedlens.interventions.Prune` ``positions=``):

* ``"keep"``: every kept token keeps its original position in every plane; decoding continues the
  unpruned numbering.
* ``"reindex"``: the kept tokens are renumbered without gaps. Walking one sample's kept tokens in sequence
  order with a cursor starting at 0, a text token gets the cursor in every plane (the cursor then moves on
  by one); the kept tokens of one image get ``cursor + r``, where ``r`` is, in each plane separately, the
  dense rank of the token's original value among the image's kept tokens (so rows, columns and frames
  left empty by the pruning close up), and the cursor moves to one past the largest value given. For 1-D
  positions an image's tokens are numbered one after the other, so this is the familiar renumbering
  ``0, 1, ..., n_kept - 1``; for M-RoPE it keeps each image's spatial layout and lets the text after it
  continue right after its (possibly smaller) extent, as ``get_rope_index`` would for that extent. A
  plain text plane (``P = 4``) is renumbered as 1-D positions. Decoding continues from the cursor: a
  decode step's position is shifted, per plane and row, by (the original next position - the cursor).
"""

from __future__ import annotations

import itertools

import torch

#: Leading planes of a ``[4, B, L]`` position tensor: one plain text plane, then the M-RoPE planes.
TEXT_AND_ROPE = 4


def to_planes(position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The positions the language model was given as ``[P, B, L]`` (``0 .. L-1`` when none were given)."""
    if position_ids is None:
        return torch.arange(length, device=device).expand(1, batch, length)
    if position_ids.dim() == 2:
        return position_ids.to(device).expand(batch, length)[None]
    if position_ids.dim() == 3:
        return position_ids.to(device).expand(position_ids.shape[0], batch, length)
    raise ValueError(f"position ids of shape {tuple(position_ids.shape)} are neither [B, L] nor [P, B, L]")


def from_planes(positions: torch.Tensor, planar: bool) -> torch.Tensor:
    """``[P, B, T]`` back to the form the model used: ``[B, T]`` unless it gave planes (``planar``)."""
    return positions if planar else positions[0]


def next_positions(original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each plane's next position after a row's real tokens (largest + 1): ``[P, B, L]`` -> ``[P, B]``."""
    real = torch.where(mask[None], original, torch.full_like(original, -1))
    return real.max(dim=2).values + 1


def _dense_rank(values: torch.Tensor) -> torch.Tensor:
    """Per plane, each value's rank among the distinct values of its plane: ``[P, n]`` -> ``[P, n]``."""
    return torch.stack([torch.unique(plane, return_inverse=True)[1] for plane in values])


def _reindex_row(
    original: torch.Tensor, kept: torch.Tensor, segment: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: new positions of its kept tokens (``[P, n_kept]``, in column order) and the next position.

    Args:
        original: ``[P, L]``.
        kept: ``[L]`` bool.
        segment: ``[L]``: the image each visual column belongs to, -1 for text.
    """
    columns = torch.nonzero(kept).flatten()
    planes = original.shape[0]
    new = torch.zeros(planes, columns.numel(), dtype=original.dtype, device=original.device)
    if columns.numel() == 0:
        return new, original.new_zeros(())
    owner = segment[columns]
    # runs of consecutive kept columns with the same owner (a run of text, or one image's kept tokens)
    starts = torch.ones(columns.numel(), dtype=torch.bool, device=columns.device)
    starts[1:] = owner[1:] != owner[:-1]
    bounds = [*torch.nonzero(starts).flatten().tolist(), columns.numel()]
    cursor = 0
    for start, stop in itertools.pairwise(bounds):
        if int(owner[start]) < 0:
            new[:, start:stop] = cursor + torch.arange(stop - start, device=new.device)
            cursor += stop - start
            continue
        ranks = _dense_rank(original[:, columns[start:stop]])
        new[:, start:stop] = cursor + ranks
        cursor = int(new[:, start:stop].max()) + 1
    return new, original.new_tensor(cursor)


def _reindex(original: torch.Tensor, kept: torch.Tensor, segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reindexed ``[P, B, L]`` positions (unchanged at unkept columns) and each plane's next position ``[P, B]``."""
    positions = original.clone()
    following = torch.zeros(original.shape[:2], dtype=original.dtype, device=original.device)
    for row in range(original.shape[1]):
        new, cursor = _reindex_row(original[:, row], kept[row], segment[row])
        positions[:, row, kept[row]] = new
        following[:, row] = cursor
    return positions, following


def prefill_positions(
    original: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor, segment: torch.Tensor | None, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``[P, B, L]`` columns at prefill, and each plane's decode shift ``[P, B]``.

    Args:
        original: The positions the model was given (or ``0..L-1``), ``[P, B, L]``.
        mask: Real (non-padding) tokens, ``[B, L]`` bool.
        kept: Real tokens that are not pruned, ``[B, L]`` bool.
        segment: The image each visual column belongs to (-1 for text), ``[B, L]`` long; needed to renumber
            several planes (``"reindex"`` with M-RoPE), else may be None.
        policy: ``"keep"`` or ``"reindex"`` (see the module docstring).
    """
    shift = torch.zeros(original.shape[:2], dtype=original.dtype, device=original.device)
    if policy != "reindex":
        return original, shift
    groups = [slice(0, 1), slice(1, None)] if original.shape[0] == TEXT_AND_ROPE else [slice(None)]
    positions = original.clone()
    for group in groups:
        part = original[group]
        if part.shape[0] == 1:
            # a 1-D plane: every kept token is one step, images included
            renumbered = torch.where(kept, kept.long().cumsum(dim=1) - 1, part[0])[None]
            following = kept.sum(dim=1)[None]
        else:
            if segment is None:
                raise ValueError("renumbering planes of positions needs the image of every visual column")
            renumbered, following = _reindex(part, kept, segment.to(original.device))
        positions[group] = renumbered
        shift[group] = next_positions(part, mask) - following
    return positions, shift
