"""Theoretical prefill FLOPs of a LLaVA-style model, with and without interventions.

Counted per sample (one multiply-add = 2 FLOPs), for the prefill of a prompt of ``n_l`` tokens entering
decoder layer ``l``:

* decoder layer ``l``: the Q/K/V/O projections (``2 n_l d (d_q + 2 d_kv) + 2 n_l d_q d``), causal
  attention scores and the weighted sum (``4 h_d H * n_l (n_l + 1) / 2``), the gated MLP
  (``6 n_l d d_ff``); a Skip removes the skipped rows' Q/O projection and attention rows (attention
  skip) or their MLP (MLP skip) -- their keys and values are still needed by the other tokens;
* the LM head on the last token only (what ``generate`` computes at prefill);
* the vision tower (every linear layer on every patch token plus attention) and the projector, once
  per image; these do not change under interventions.

Norms, activations, rotary embeddings and softmax are left out (a small, constant share). These are
the model's arithmetic, not this implementation's: the hooks still compute a skipped row and zero it,
so Skip's saving shows in FLOPs but not in measured time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from embedlens.interventions.records import SampleRecord
from embedlens.models.base import ModelAdapter


@dataclass(frozen=True)
class TextDims:
    """The decoder sizes FLOPs depend on, read from the language model's config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, adapter: ModelAdapter) -> TextDims:
        """Read the sizes of ``adapter``'s language model."""
        config: Any = adapter.language_model.config
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            hidden=int(config.hidden_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            ffn=int(config.intermediate_size),
            vocab=int(adapter.lm_head.weight.shape[0]),
            layers=adapter.num_layers,
        )


@dataclass
class FlopCount:
    """Prefill FLOPs of one sample.

    Attributes:
        layers: FLOPs of each decoder layer, ``num_layers`` entries.
        vision: Vision tower + projector FLOPs.
        head: LM-head FLOPs (last token).
        tokens_per_layer: Tokens entering each decoder layer.
    """

    layers: list[float]
    vision: float
    head: float
    tokens_per_layer: list[int] = field(default_factory=list)

    @property
    def llm(self) -> float:
        """FLOPs of the decoder layers and the LM head."""
        return float(sum(self.layers)) + self.head

    @property
    def total(self) -> float:
        """Everything: vision, decoder layers and LM head."""
        return self.llm + self.vision

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (GFLOPs)."""
        return {
            "total_gflops": self.total / 1e9,
            "llm_gflops": self.llm / 1e9,
            "vision_gflops": self.vision / 1e9,
            "tokens_per_layer": list(self.tokens_per_layer),
        }


def _linear_flops_per_token(module: nn.Module) -> float:
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def _vision_size(config: Any, *names: str) -> int:
    """The first of ``names`` the vision config sets (families name their sizes differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value[-1] if isinstance(value, (list, tuple)) else value)
    return 0


def vision_flops(adapter: ModelAdapter, passes: Sequence[int], grid_tokens: int) -> float:
    """Vision tower + projector FLOPs of one sample's images.

    Every linear layer of the tower runs on every token of each pass (patches and any class token);
    attention adds ``4 * tokens^2 * width`` per layer and pass; the patch embedding is a linear map of
    each patch; the projector runs once per grid token.

    Args:
        adapter: The model.
        passes: Tokens of each tower pass (see :meth:`~embedlens.models.base.ModelAdapter.vision_passes`).
        grid_tokens: Grid tokens the projector produces, all views together.
    """
    tower = adapter.vision_tower
    config: Any = getattr(tower, "config", None)
    width = _vision_size(config, "hidden_size", "embed_dim")
    depth = _vision_size(config, "num_hidden_layers", "depth")
    patch = _vision_size(config, "patch_size")
    channels = _vision_size(config, "num_channels", "in_channels", "in_chans") or 3
    frames = _vision_size(config, "temporal_patch_size") or 1
    per_token = _linear_flops_per_token(tower)
    total = 0.0
    for tokens in passes:
        total += tokens * per_token + depth * 4.0 * tokens * tokens * width
        total += 2.0 * (tokens - adapter.class_tokens) * channels * frames * patch * patch * width
    return total + grid_tokens * _linear_flops_per_token(adapter.projector)


def layer_flops(dims: TextDims, tokens: int, skipped_attn: tuple[int, int] = (0, 0), skipped_mlp: int = 0) -> float:
    """FLOPs of one decoder layer at prefill.

    Args:
        dims: Decoder sizes.
        tokens: Tokens entering the layer ``n``.
        skipped_attn: ``(rows, visible)``: rows whose attention update is skipped and the sum of the keys
            each of them would have attended to.
        skipped_mlp: Rows whose MLP update is skipped.
    """
    q_dim, kv_dim = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    rows, visible = skipped_attn
    query_rows = tokens - rows
    projections = 2.0 * dims.hidden * (query_rows * 2 * q_dim + tokens * 2 * kv_dim)
    pairs = tokens * (tokens + 1) / 2 - visible
    attention = 4.0 * q_dim * pairs
    mlp = 6.0 * (tokens - skipped_mlp) * dims.hidden * dims.ffn
    return projections + attention + mlp


def sample_flops(adapter: ModelAdapter, record: SampleRecord, *, baseline: bool = False) -> FlopCount:
    """Prefill FLOPs of one sample as an intervention record describes it.

    Args:
        adapter: The model.
        record: The sample's :class:`~embedlens.interventions.SampleRecord`.
        baseline: Count the untouched model instead (every layer sees all ``record.length`` tokens).
    """
    dims = TextDims.of(adapter)
    tokens = [record.length] * dims.layers if baseline else list(record.tokens_per_layer)
    layers = []
    for layer, count in enumerate(tokens):
        attn = (0, 0) if baseline else record.skipped_visible.get(str(layer), (0, 0))
        mlp = 0 if baseline else record.skipped.get(f"{layer}.5", 0)
        layers.append(layer_flops(dims, count, attn, mlp))
    vision = vision_flops(adapter, record.vision_passes, record.grid_tokens) if record.images else 0.0
    return FlopCount(layers=layers, vision=vision, head=2.0 * dims.hidden * dims.vocab, tokens_per_layer=tokens)
