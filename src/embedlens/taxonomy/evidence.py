"""The evidence of anchor discovery: its thresholds, the per-token figures and the verdict they give.

:class:`DiscoveryConfig` holds the thresholds and layers; :func:`_sample_figures` measures, for one
sample's visual tokens, the figures that tell ViT sinks, LLM sinks and dead tokens apart (named in
``_FIGURES``); :func:`_judge` turns a candidate's mean figures into a group and a reason. The figures and
the rule are described in :mod:`embedlens.taxonomy.discover`, which runs the discovery.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from embedlens.capture import Captured
from embedlens.checks import FINITE, FRACTION, INTEGER, POSITIVE_INT, check_fields, option
from embedlens.errors import InputError
from embedlens.models.base import ModelAdapter, VisualSpan
from embedlens.taxonomy.diagnostics import cosine, vision_norms

_TINY = torch.finfo(torch.float64).tiny
#: Per-token figures, averaged per vocabulary id over its hitting tokens.
_FIGURES = ("norm_ratio", "bos_cosine", "massive_ratio", "cross_layer_cosine")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DiscoveryConfig:
    """Thresholds and layers of anchor discovery (see :mod:`embedlens.taxonomy.discover` for each figure).

    Attributes:
        top_k: Nearest ids per visual token, as in the rule the anchors will serve (paper: 3).
        min_image_fraction: A candidate must hit at least this fraction of the images (default 0.5).
        min_images: ... and at least this many images (default 2; independence needs two).
        min_independence: Mean cross-image cosine of the per-image mean vectors below which a
            candidate is image-dependent and rejected (default 0.9).
        vit_norm_ratio: Vision-feature norm over the image's median norm from which a candidate's
            tokens are ViT sinks (default 3.0).
        sink_layer: Layer whose hidden states show LLM sinks (default 2: after the 2nd decoder layer,
            whose MLP makes them in LLaVA-1.5); clipped to ``1 .. L``.
        llm_bos_cosine: Cosine with the first position's hidden state from which the tokens are LLM
            sinks (default 0.6).
        llm_massive_ratio: Massive-activation ratio (vs the image's other visual tokens) from which
            the tokens are LLM sinks (default 10.0).
        cross_layer: Layer compared with layer 0 for dead tokens (``1 .. L``, negative from the end),
            or None for the middle layer ``L // 2`` (at least 1).
        dead_cross_cosine: Cross-layer cosine from which a recurring, image-independent, non-sink
            candidate is dead (default 0.9).
        follower_overlap: Fraction of a candidate's hitting tokens that must also hit a stronger id of
            its group for it to be dropped as that id's follower (default 0.9).
    """

    top_k: int = option(3, POSITIVE_INT)
    min_image_fraction: float = option(0.5, FRACTION)
    min_images: int = option(2, POSITIVE_INT)
    min_independence: float = option(0.9, FINITE)
    vit_norm_ratio: float = option(3.0, FINITE)
    sink_layer: int = option(2, POSITIVE_INT)
    llm_bos_cosine: float = option(0.6, FINITE)
    llm_massive_ratio: float = option(10.0, FINITE)
    cross_layer: int | None = option(None, INTEGER)
    dead_cross_cosine: float = option(0.9, FINITE)
    follower_overlap: float = option(0.9, FRACTION)

    def __post_init__(self) -> None:
        check_fields(self)

    def layers(self, num_layers: int) -> tuple[int, int]:
        """``(sink_layer, cross_layer)`` resolved for a model of ``num_layers`` decoder layers, each in ``1 .. L``."""
        sink = min(max(self.sink_layer, 1), num_layers)
        if self.cross_layer is None:
            return sink, max(num_layers // 2, 1)
        cross = self.cross_layer + num_layers + 1 if self.cross_layer < 0 else self.cross_layer
        if not 1 <= cross <= num_layers:
            raise InputError(
                f"cross_layer {self.cross_layer} is out of range: use 1..{num_layers} (or -{num_layers}..-1)"
            )
        return sink, cross

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


# --------------------------------------------------------------------------- per-batch figures
def _first_valid(mask: torch.Tensor | None, sample: int) -> int:
    """The first non-padding position of ``sample`` (batches are left-padded)."""
    if mask is None:
        return 0
    valid = torch.nonzero(mask[sample]).flatten()
    return int(valid[0]) if valid.numel() else 0


def _peak_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """``max |dim| / median |dim|`` of each vector ``[n, d]`` in float64, shape ``[n]``."""
    magnitude = hidden.double().abs()
    return magnitude.max(dim=1).values / magnitude.median(dim=1).values.clamp_min(_TINY)


def _relative(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[n]`` divided by their median."""
    return values / values.median().clamp_min(_TINY)


def _sample_figures(
    adapter: ModelAdapter,
    captured: Captured,
    sample: int,
    spans: list[VisualSpan],
    first_position: int,
    sink: int,
    cross: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sample's layer-0 visual vectors ``[n, d]`` and per-token figures (float64, shape ``[n]`` each)."""
    device = captured.hidden[0].device
    positions = torch.cat([span.positions for span in spans]).to(device)
    first = captured.hidden[0][sample, positions]
    at_sink = captured.hidden[sink][sample, positions]
    reference = captured.hidden[sink][sample, first_position].unsqueeze(0).expand_as(at_sink)
    norms, _ = vision_norms(adapter, captured.vision_features, spans)  # every view; NaN when the family can't say
    figures = {
        "norm_ratio": _relative(torch.from_numpy(norms)).to(device),
        "bos_cosine": cosine(at_sink, reference),
        "massive_ratio": _relative(_peak_ratio(at_sink)),
        "cross_layer_cosine": cosine(first, captured.hidden[cross][sample, positions]),
    }
    return first, figures


# --------------------------------------------------------------------------- verdict
def _judge(figures: dict[str, float], config: DiscoveryConfig, sink: int, cross: int) -> tuple[str | None, str]:
    """The group a candidate's figures point to, and why (or why none)."""
    independence = figures["independence"]
    if not independence >= config.min_independence:  # NaN included
        return None, f"image-dependent: independence {independence:.3f} < {config.min_independence}"
    if figures["norm_ratio"] >= config.vit_norm_ratio:
        return "vit_sink", (
            f"vision-feature norm {figures['norm_ratio']:.2f}x the image median (>= {config.vit_norm_ratio})"
        )
    bos, massive = figures["bos_cosine"], figures["massive_ratio"]
    signs = []
    if bos >= config.llm_bos_cosine:
        signs.append(f"cosine {bos:.3f} with the first position (>= {config.llm_bos_cosine})")
    if massive >= config.llm_massive_ratio:
        signs.append(f"massive activation {massive:.2f}x (>= {config.llm_massive_ratio})")
    if signs:
        return "llm_sink", f"at layer {sink}: " + " and ".join(signs)
    value = figures["cross_layer_cosine"]
    if value >= config.dead_cross_cosine:
        return "dead", f"not a sink; cosine {value:.3f} between layers 0 and {cross} (>= {config.dead_cross_cosine})"
    return None, f"not a sink and changes across layers: cosine {value:.3f} between layers 0 and {cross}"
