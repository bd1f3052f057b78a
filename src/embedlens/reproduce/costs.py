"""Predicted prefill FLOPs of the paper's settings, from a model's config alone (no weights).

The model is built on PyTorch's ``meta`` device (shapes, no storage), so
:mod:`embedlens.bench.flops` can count its layers exactly as it does for a loaded model. A sample is a
nominal prompt: ``text_tokens`` text tokens, ``prefix_tokens`` of them before the image (LLaVA-1.5's
vicuna_v1 system sentence puts the image at position 35 in the reference), and one image's visual tokens.
How many visual tokens each group holds comes from :class:`Shares`: the paper's figures until a stats
run has measured them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedlens.bench.flops import TextDims, layer_flops, vision_flops
from embedlens.errors import InputError
from embedlens.interventions import Exit, Inject, Intervention, Prune, Skip
from embedlens.taxonomy.groups import ALIVE, GROUPS, expand


@dataclass(frozen=True)
class Shares:
    """Share of an image's visual tokens in each group (they sum to 1).

    Attributes:
        vit_sink, llm_sink, dead, alive: The shares.
        source: Where they come from (for the plan's notes).
    """

    vit_sink: float
    llm_sink: float
    dead: float
    alive: float
    source: str

    @classmethod
    def paper(cls) -> Shares:
        """The paper's figures for LLaVA-1.5-7B: about 60% alive, 10% sink (split evenly), 30% dead."""
        return cls(0.05, 0.05, 0.30, 0.60, "the paper's figures (alive 60%, sinks 10% split evenly, dead 30%)")

    @classmethod
    def from_stats(cls, summary: Path) -> Shares:
        """The token fractions an ``embedlens stats`` run measured (its ``summary.json``)."""
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            groups = data["groups"]
            values = {name: float(groups[name]["fraction"]) for name in (*GROUPS, ALIVE)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{summary} is not a readable stats summary ({exc})") from exc
        used = data.get("images", {}).get("used", "?")
        return cls(**values, source=f"measured by the stats stage ({summary}, {used} images)")

    def of(self, group: str) -> float:
        """Share of a group expression (``"sink+dead"``: the sum; ``"visual"``: 1). Overlaps are ignored."""
        total = 0.0
        for part in group.split("+"):
            for name in expand(part.strip()):
                total += 1.0 if name == "visual" else float(getattr(self, name, 0.0))
        return min(total, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready shares."""
        return {
            "vit_sink": self.vit_sink,
            "llm_sink": self.llm_sink,
            "dead": self.dead,
            "alive": self.alive,
            "source": self.source,
        }


@dataclass(frozen=True)
class CostModel:
    """What prefill FLOPs depend on, read from a model's config.

    Attributes:
        dims: Decoder sizes.
        vision: Vision tower + projector FLOPs per image.
        visual_tokens: Visual tokens per image in the LLM's input.
        text_tokens: Nominal text tokens per sample.
        prefix_tokens: Nominal text tokens before the image.
    """

    dims: TextDims
    vision: float
    visual_tokens: int
    text_tokens: int = 64
    prefix_tokens: int = 35

    @property
    def length(self) -> int:
        """Tokens of a whole nominal sample."""
        return self.text_tokens + self.visual_tokens

    def sample_flops(self, interventions: Sequence[Intervention], shares: Shares) -> float:
        """Prefill FLOPs of one nominal sample under ``interventions`` (vision + decoder + LM head)."""
        visual = self.visual_tokens
        removed = 0.0
        for item in interventions:
            if isinstance(item, Prune):
                share = shares.of(item.group) if item.group else len(item.indices or ()) / visual
                if item.select == "complement":
                    share = 1.0 - share
                elif item.select == "matched_random":
                    share = min(share, 1.0 - share)
                removed = max(removed, share * visual)  # prunes of one setting unite; counted as the largest
        kept = visual - removed
        inject = next((i.layer for i in interventions if isinstance(i, Inject)), 0)
        exit_ = next((i.layer for i in interventions if isinstance(i, Exit)), self.dims.layers)
        attn_rows: dict[int, float] = {}
        mlp_rows: dict[int, float] = {}
        for item in interventions:
            if isinstance(item, Skip):
                rows = (shares.of(item.group) if item.group else len(item.indices or ()) / visual) * kept
                for layer, part in item.sublayers:
                    (attn_rows if part == "attn" else mlp_rows)[layer] = rows
        # A skipped visual row would have attended to the prefix and, on average, half the image before it.
        reach = self.prefix_tokens + (kept + 1) / 2
        total = 0.0
        for layer in range(self.dims.layers):
            present = inject <= layer < exit_
            tokens = round(self.text_tokens + (kept if present else 0))
            rows = attn_rows.get(layer, 0.0) if present else 0.0
            mlp = mlp_rows.get(layer, 0.0) if present else 0.0
            total += layer_flops(self.dims, tokens, (round(rows), round(rows * reach)), round(mlp))
        return total + 2.0 * self.dims.hidden * self.dims.vocab + self.vision

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "layers": self.dims.layers,
            "hidden": self.dims.hidden,
            "vocab": self.dims.vocab,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "prefix_tokens": self.prefix_tokens,
            "vision_gflops_per_image": self.vision / 1e9,
        }


def cost_model(
    model: str,
    *,
    revision: str | None = None,
    text_tokens: int = 64,
    prefix_tokens: int = 35,
    config: Any = None,
) -> CostModel:
    """The :class:`CostModel` of ``model`` (built-in name, directory or hub id), from its config alone.

    The model is instantiated on the ``meta`` device: no weights are read or allocated.

    Raises:
        UnsupportedModelError: The config cannot be loaded or the family has no adapter.
        InputError: Nominal lengths that make no sense.
    """
    import embedlens.models  # noqa: F401  (registers the adapters)
    from embedlens.models.llava import extra_image_tokens
    from embedlens.models.registry import adapter_class_for, load_config, resolve

    if text_tokens < 1 or not 0 <= prefix_tokens <= text_tokens:
        raise InputError(f"nominal text tokens must be positive and hold the prefix ({prefix_tokens} of {text_tokens})")
    config = config if config is not None else load_config(resolve(model, revision))
    adapter_cls = adapter_class_for(config)
    with torch.device("meta"):
        network = adapter_cls.model_class()(config)
    adapter = adapter_cls(network, None, source=model)
    extra = extra_image_tokens(getattr(config, "vision_feature_select_strategy", "default"))
    # ``image_seq_length``: the image tokens the processor puts in the text (the processor may resize to
    # another size than the vision config's pre-training ``image_size``, as embedlens-mini does).
    visual = int(getattr(config, "image_seq_length", 0) or 0)
    if visual <= extra:
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        visual = side * side + extra
    grid = visual - extra
    return CostModel(
        dims=TextDims.of(adapter),
        vision=vision_flops(adapter, [grid + adapter.class_tokens], grid),
        visual_tokens=visual,
        text_tokens=text_tokens,
        prefix_tokens=prefix_tokens,
    )
