"""Which visual tokens an intervention acts on, per sample: groups, explicit indices, matched random draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embedlens.errors import InputError
from embedlens.interventions.spec import Prune, Skip, check_group
from embedlens.models.base import VisualSpan
from embedlens.taxonomy.groups import expand


@dataclass
class SampleTokens:
    """One sample's visual grid tokens, as interventions address them.

    Attributes:
        positions: Sequence position of every grid token, all images of the sample in order, ``[n]``.
        cells: Each token's cell index within its image (row-major), ``[n]``.
        cells_per_image: Grid size (``rows * cols``) of the image each token belongs to, ``[n]``.
        extra: Positions of visual tokens outside the grid (e.g. a CLS token), ``[e]``.
        labels: Each token's group after precedence, or None when no target names a group, ``[n]``.
        targets: Cells of the sample's ``"target"`` group (per image), or None when not given.
    """

    positions: torch.Tensor
    cells: torch.Tensor
    cells_per_image: torch.Tensor
    extra: torch.Tensor
    labels: np.ndarray | None = None
    targets: tuple[int, ...] | None = None

    @classmethod
    def from_spans(cls, spans: Sequence[VisualSpan]) -> SampleTokens:
        """Collect the grid tokens of one sample's spans."""
        empty = torch.zeros(0, dtype=torch.long)
        if not spans:
            return cls(empty, empty, empty, empty)
        return cls(
            positions=torch.cat([span.positions for span in spans]).long(),
            cells=torch.cat([torch.arange(span.num_tokens) for span in spans]),
            cells_per_image=torch.cat([torch.full((span.num_tokens,), span.num_tokens) for span in spans]),
            extra=torch.cat([span.extra_positions for span in spans]).long(),
        )

    @property
    def num_tokens(self) -> int:
        """Number of grid tokens ``n``."""
        return int(self.positions.numel())


def target_mask(item: Prune | Skip, tokens: SampleTokens) -> torch.Tensor:
    """Bool ``[n]``: the grid tokens that ``item``'s group or indices name in this sample."""
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
        if tokens.labels is None:
            raise AssertionError("group labels were not computed")
        chosen |= torch.from_numpy(np.isin(tokens.labels, labelled)).reshape(n)
    return chosen


#: Labels of the rule that a group name stands for (names not listed stand for themselves).


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
    tokens; an empty target removes nothing.
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
