"""A probe result with sink / dead / alive labels: pandas, JSON and files like :class:`ProbeResult`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedlens.errors import InputError
from embedlens.result import RESULT_JSON, ProbeResult, SavedResult, read_result_json
from embedlens.taxonomy.anchors import Anchors
from embedlens.taxonomy.groups import GROUPS, LETTERS
from embedlens.taxonomy.rule import Classification, classify_ids


@dataclass
class ClassifiedResult(SavedResult):
    """One image's visual tokens, what the lens shows for each, and each token's group.

    Attributes:
        probe: The embedding-lens result the rule was applied to (its ``top_ids`` hold the rule's top-k).
        classification: Per-token groups, memberships and counts.
        anchors: The anchors used.
    """

    probe: ProbeResult
    classification: Classification
    anchors: Anchors

    def __len__(self) -> int:
        return len(self.probe)

    @property
    def group(self) -> np.ndarray:
        """Each token's group, string array of shape ``[n]`` (the probe's token order)."""
        return self.classification.group

    def part(self, view: int) -> ClassifiedResult:
        """View ``view``'s tokens alone, with their labels (see :meth:`ProbeResult.part`)."""
        info = self.probe.views[view]
        s = slice(info.start, info.stop)
        found = self.classification
        classification = replace(
            found,
            group=found.group[s],
            members=found.members[s],
            anchor_id=found.anchor_id[s],
            anchor_rank=found.anchor_rank[s],
        )
        return ClassifiedResult(probe=self.probe.part(view), classification=classification, anchors=self.anchors)

    @property
    def counts(self) -> dict[str, int]:
        """Tokens per group after precedence; sums to ``n``."""
        return self.classification.counts

    @property
    def overlaps(self) -> dict[str, int]:
        """Tokens matching both groups of each pair (before precedence)."""
        return self.classification.overlaps

    def rule_dict(self) -> dict[str, Any]:
        """The rule that produced the labels: top-k, precedence, anchor ids, their model and vocabulary."""
        return {
            "top_k": self.classification.top_k,
            "precedence": list(self.classification.precedence),
            "anchors": {name: list(ids) for name, ids in self.anchors.groups.items()},
            "anchors_model": self.anchors.model,
            "vocab_hash": self.anchors.vocab_hash,
        }

    def to_pandas(self) -> pd.DataFrame:
        """The probe's table plus ``group``, ``anchor_id`` (nullable) and ``is_<group>`` membership columns."""
        frame = self.probe.to_pandas()
        frame["group"] = self.group
        frame["anchor_id"] = pd.array(self.classification.anchor_id, dtype="Int64")
        for name in GROUPS:
            frame[f"is_{name}"] = self.classification.member(name)
        return frame

    def to_dict(self, provenance: bool = True) -> dict[str, Any]:
        """The probe's JSON object plus ``"group"`` and ``"anchor_id"`` on every token, ``"counts"`` per
        group, ``"overlaps"`` per pair and ``"rule"``; with ``provenance`` also the full ``"anchors"``."""
        out = self.probe.to_dict(provenance=provenance)
        for token, group, anchor_id in zip(out["tokens"], self.group, self.classification.anchor_id, strict=True):
            token["group"] = str(group)
            token["anchor_id"] = anchor_id
        out["counts"] = self.counts
        out["overlaps"] = self.overlaps
        out["rule"] = self.rule_dict()
        if provenance:
            out["anchors"] = self.anchors.to_dict()
        return out

    def summary(self, tokenizer: Any = None) -> str:
        """A person's view (what ``embedlens classify`` prints): the rule, the anchors, counts and shares
        per group, overlaps and a letter map of the grid. With ``tokenizer`` the anchor ids are shown
        with their pieces. No final newline."""
        probe, classification, anchors = self.probe, self.classification, self.anchors
        total = len(self)
        size = len(tokenizer) if tokenizer is not None else 0
        described = []
        for name, ids in anchors.groups.items():
            if tokenizer is None:
                shown = ", ".join(str(i) for i in ids)
            else:
                pieces = [repr(tokenizer.convert_ids_to_tokens(i)) if i < size else f"<row {i}>" for i in ids]
                shown = ", ".join(f"{i} {p}" for i, p in zip(ids, pieces, strict=True))
            described.append(f"{name} " + (shown or "-"))
        lines = [
            f"model    {probe.provenance.model}",
            f"image    {probe.image}",
            f"prompt   {probe.prompt!r}",
            f"rule     any of the top-{classification.top_k} nearest input-embedding ids (layer {probe.layer}) "
            f"is an anchor; precedence {' > '.join(classification.precedence)}",
            f"anchors  {' | '.join(described)}  (for {anchors.model}, vocabulary {anchors.vocab_hash[:8]})",
            f"grid     {probe.grid_line()}",
            "",
            f"  {'group':<9} {'tokens':>7}  {'share':>6}",
        ]
        for name, count in classification.counts.items():
            lines.append(f"  {name:<9} {count:>7}  {(count / total if total else 0.0):>6.1%}")
        pairs = ", ".join(f"{pair} {count}" for pair, count in classification.overlaps.items())
        lines += [f"overlaps {pairs} ({classification.n_overlapping} tokens match 2+ groups)", ""]
        lines.append("map (S = ViT sink, L = LLM sink, D = dead, . = alive)")
        letters = [LETTERS[str(g)] for g in classification.group]
        for view in probe.views:
            cols = view.grid[1]
            mine = letters[view.start : view.stop]
            if len(probe.views) > 1:
                lines.append(f"  view {view.name} ({view.grid[0]} x {cols})")
            lines += ["  " + " ".join(mine[r * cols : (r + 1) * cols]) for r in range(-(-len(mine) // max(cols, 1)))]
        return "\n".join(lines)

    @classmethod
    def load(cls, directory: str | Path) -> ClassifiedResult:
        """Read a result written by :meth:`save`; the labels are recomputed from the stored ids and anchors."""
        directory = Path(directory)
        data = read_result_json(directory)
        if "anchors" not in data or "rule" not in data:
            raise InputError(f"{directory / RESULT_JSON} is not a classification result (no anchors or rule)")
        probe = ProbeResult.load(directory)
        anchors = Anchors.from_dict(data["anchors"])
        rule = data["rule"]
        classification = classify_ids(probe.top_ids, anchors, top_k=rule["top_k"], precedence=rule["precedence"])
        return cls(probe=probe, classification=classification, anchors=anchors)
