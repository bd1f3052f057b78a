"""What interventions did: one record per sample and prefill, and the handle ``intervene`` yields.

These are plain data, read by FLOP accounting (:mod:`embedlens.bench.flops`), evaluations and the
CLI; they import nothing from the hook engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from embedlens.errors import InputError
from embedlens.interventions.notation import describe
from embedlens.interventions.planning import Plan
from embedlens.interventions.spec import Intervention


@dataclass
class SampleRecord:
    """What the interventions did to one sample at one prefill.

    Attributes:
        sample_id: The sample's id (the batch row unless ``sample_ids`` were given); seeds derive from it.
        length: Tokens in the untouched sequence (padding excluded).
        visual: Visual tokens in the untouched sequence.
        groups: Count of each group among the grid tokens (labels after precedence), when a group was
            targeted.
        pruned: Grid cells removed before layer 0 (cell indices, all images of the sample in order).
        pruned_positions: Sequence positions removed before layer 0.
        seeds: Seed of each ``matched_random`` Prune, keyed by its notation.
        tokens_per_layer: Tokens entering each decoder layer (``num_layers`` entries).
        skipped: Tokens whose update each skipped sublayer zeroes, keyed by ``"n"`` / ``"n.5"``.
        skipped_visible: For each skipped attention sublayer (``"n"``), ``(rows, keys)``: the rows
            skipped and the sum of the keys each would have attended to (for FLOP accounting).
        images: Images in the sample.
        grid_tokens: Grid tokens of the sample (every view of every image).
        vision_passes: Tokens of each vision-tower pass behind the sample's images (for FLOP accounting).
    """

    sample_id: int
    length: int
    visual: int
    groups: dict[str, int] | None = None
    pruned: list[int] = field(default_factory=list)
    pruned_positions: list[int] = field(default_factory=list)
    seeds: dict[str, int] = field(default_factory=dict)
    tokens_per_layer: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_visible: dict[str, tuple[int, int]] = field(default_factory=dict)
    images: int = 0
    grid_tokens: int = 0
    vision_passes: list[int] = field(default_factory=list)


@dataclass
class PrefillRecord:
    """One prefill under interventions.

    Attributes:
        samples: One record per batch row.
        output_positions: For each row, the original sequence position of every row of the model's
            output (left padding is -1), shape ``[B, T_out]`` -- logits and last hidden states follow
            this layout when tokens were removed.
    """

    samples: list[SampleRecord]
    output_positions: torch.Tensor


class InterventionRun:
    """The handle ``intervene`` yields: the checked plan and a record of every prefill it saw.

    Attributes:
        plan: The checked :class:`~embedlens.interventions.Plan`.
        interventions: The interventions, in the order given.
        records: One :class:`PrefillRecord` per prefill, oldest first.
    """

    def __init__(self, checked: Plan, items: Sequence[Intervention] | None = None) -> None:
        self.plan = checked
        self.interventions = list(checked.items if items is None else items)
        self.records: list[PrefillRecord] = []

    @property
    def last(self) -> PrefillRecord:
        """The most recent prefill's record."""
        if not self.records:
            raise InputError("no forward pass has run under these interventions yet")
        return self.records[-1]

    def describe(self) -> str:
        """The interventions in the text notation (``"none"`` when there are none)."""
        return " ".join(describe(item) for item in self.interventions) or "none"
