"""Per-token diagnostics that explain a token's group, from one forward pass.

Always computed (cheap):

* ``vision_norm``: L2 norm of the token's vision-tower feature, i.e. the projector's *input* (ViT sinks
  are the high-norm "register" patches);
* ``projected_norm``: L2 norm of the projector output (layer 0, the decoder's input);
* ``anchor_cosine``: cosine between the layer-0 vector and the input-embedding row of the anchor that
  decided the token's group (NaN for alive tokens).

On request:

* ``cross_layer_cosine`` (``cross_layer=l``): cosine between the token's layer-0 vector and its residual
  stream at layer ``l`` (how much the LLM changes it; dead tokens stay near 1);
* ``cross_image_cosine`` (``cross_image=True``, :func:`diagnose` with a list of two or more images): cosine
  between the token's layer-0 vector and the mean layer-0 vector of the tokens of the *same group* at
  the *same grid cell* (of the same view) in the *other* images of the batch (cross-image consistency: image-independent
  tokens such as sinks and dead tokens score about 1, alive tokens lower). NaN when no other image of
  the batch has a token of that group at that cell (always, for a single image);
* ``text_attention`` / ``text_attention_share`` (``attention_layers=[...]``): the attention the token
  receives from the text that follows the image. For each chosen decoder layer the weights are
  averaged over heads; ``text_attention`` is the mean, over those layers and over the text query
  positions after the image, of the weight a query gives this visual key, and ``text_attention_share``
  is its fraction of the sum over the image's grid tokens. Needs eager attention: the language
  model is switched to it for this forward only and switched back afterwards (also on errors).

All similarities and norms are computed in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from embedlens.capture import run_captured
from embedlens.errors import EmbedLensError, InputError
from embedlens.inputs import Images, Texts, one_or_many
from embedlens.models.base import ModelAdapter, VisualSpan
from embedlens.taxonomy.classify import AnchorsLike, rule_settings
from embedlens.taxonomy.rule import classify_ids

if TYPE_CHECKING:
    from embedlens.context import ModelContext

EAGER = "eager"


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float64.

    Args:
        a, b: Vectors, shape ``[n, d]`` each.

    Returns:
        Shape ``[n]``; 0 where either vector is zero.
    """
    a, b = a.double(), b.double()
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    dot = (a * b).sum(dim=-1)
    return torch.where(denominator > 0, dot / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


# --------------------------------------------------------------------------- eager attention
def _attention_config(adapter: ModelAdapter) -> tuple[Any, str | None]:
    """The config the decoder's attention reads its implementation from, and its sub-config key."""
    config = adapter.model.config
    target = getattr(adapter.attention(0), "config", None) or config
    for key in getattr(config, "sub_configs", None) or {}:
        if getattr(config, key, None) is target:
            return target, key
    return target, None


def attention_implementation(adapter: ModelAdapter) -> str | None:
    """The attention implementation the LLM's decoder layers use now (``"sdpa"``, ``"eager"``, ...)."""
    return _attention_config(adapter)[0]._attn_implementation


def _set_attention(adapter: ModelAdapter, implementation: str | None, key: str | None) -> None:
    adapter.model.set_attn_implementation({key: implementation} if key is not None else implementation)


@contextlib.contextmanager
def eager_attention(adapter: ModelAdapter) -> Iterator[None]:
    """Run the block with the language model on eager attention (which returns attention weights).

    Only the decoder's implementation changes (the vision tower keeps its own); the previous value is
    restored when the block ends, also on exceptions. A model already on eager is left alone.
    """
    config, key = _attention_config(adapter)
    previous = config._attn_implementation
    if previous == EAGER:
        yield
        return
    _set_attention(adapter, EAGER, key)
    try:
        yield
    finally:
        _set_attention(adapter, previous, key)


# --------------------------------------------------------------------------- attention received
def _text_queries(
    input_ids: torch.Tensor, mask: torch.Tensor | None, spans: Sequence[VisualSpan], image_id: int
) -> torch.Tensor:
    """Positions of the text tokens after the image's spans (every view; valid, not image tokens), ``[q]``."""
    positions = torch.arange(input_ids.shape[0])
    last = int(torch.cat([torch.cat([span.positions, span.extra_positions]) for span in spans]).max())
    keep = (positions > last) & (input_ids.cpu() != image_id)
    if mask is not None:
        keep &= mask.cpu().bool()
    return positions[keep]


class _AttentionReceived:
    """Forward hooks on attention modules that reduce eager weights ``[B, H, T, T]`` on the fly to the
    mean weight text queries give each visual key, summed over the hooked layers."""

    def __init__(self, queries: list[torch.Tensor], keys: list[torch.Tensor]) -> None:
        self.queries = queries
        self.keys = keys
        self.total = [torch.zeros(k.numel(), dtype=torch.float64) for k in keys]
        self.layers_seen = 0

    def hook(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if weights is None:
            raise EmbedLensError("the attention module returned no weights; eager attention is required")
        for sample, (queries, keys) in enumerate(zip(self.queries, self.keys, strict=True)):
            if queries.numel() == 0:
                continue
            mean_heads = weights[sample].detach().double().mean(dim=0)  # [T, T]
            device = mean_heads.device
            block = mean_heads.index_select(0, queries.to(device)).index_select(1, keys.to(device))
            self.total[sample] += block.mean(dim=0).cpu()
        self.layers_seen += 1

    def result(self, sample: int) -> torch.Tensor:
        """Mean over layers of the received attention for ``sample``'s grid tokens, shape ``[n]``."""
        if self.queries[sample].numel() == 0 or self.layers_seen == 0:
            return torch.full_like(self.total[sample], float("nan"))
        return self.total[sample] / self.layers_seen


def resolve_attention_layers(layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Decoder layer indices (0-based, ``0 .. L-1``; negative from the end), sorted and unique."""
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise InputError("give at least one attention layer")
    out = []
    for layer in chosen:
        resolved = layer + num_layers if layer < 0 else layer
        if not 0 <= resolved < num_layers:
            raise InputError(
                f"attention layer {layer} is out of range: decoder layers are "
                f"0..{num_layers - 1} (or -{num_layers}..-1)"
            )
        out.append(resolved)
    return sorted(set(out))


# --------------------------------------------------------------------------- diagnostics
def diagnose(
    session: ModelContext,
    image: Images,
    prompt: Texts = None,
    *,
    raw_prompt: Texts = None,
    anchors: AnchorsLike = None,
    top_k: int | None = None,
    precedence: Sequence[str] | None = None,
    cross_layer: int | None = None,
    attention_layers: int | Sequence[int] | None = None,
    cross_image: bool = False,
) -> pd.DataFrame | list[pd.DataFrame]:
    """Per-token diagnostics (see the module docs for the columns), for one image or several in one forward.

    Args:
        session: The loaded model.
        image: Path or PIL image, or a list of them (see :mod:`embedlens.inputs`).
        prompt: The user's question (one per image, or one for all), or None for the default.
        raw_prompt: Alternatively the model's full text with the image placeholder, used verbatim.
        anchors: :class:`~embedlens.taxonomy.anchors.Anchors`, an anchors JSON path, or None (built-in).
        top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``).
        precedence: Group order for tokens matching several groups.
        cross_layer: Also compare layer 0 with this layer (``0 .. L``, negative from the end).
        attention_layers: Also measure attention received from text in these decoder layers
            (0-based ``0 .. L-1``, negative from the end); switches to eager attention for the forward.
        cross_image: Also add ``cross_image_cosine``: the cosine between a token's layer-0 vector and the
            mean layer-0 vector of the tokens that have the same group at the same grid cell ``(row, col)`` in
            the *other* images of the list (NaN where there are none, e.g. for a single image). See
            :func:`cross_image_cosine`.

    Returns:
        For each image, one row per grid token of every view of the image, indexed by token ``index``
        (grid order), with columns ``row``, ``col``, ``group``, ``anchor_id``, ``vision_norm``,
        ``projected_norm``, ``anchor_cosine`` and, when asked, ``cross_layer_cosine``,
        ``cross_image_cosine``, ``text_attention``, ``text_attention_share`` (its share over all views'
        grid tokens). With several views (see :mod:`embedlens.views`) the index is ``(view, index)``,
        views in sequence order, and ``frame.attrs["views"]`` names them. Extra visual tokens (CLS,
        newline slots) are never rows. ``frame.attrs`` records ``cross_layer``, ``attention_layers`` and
        ``cross_image``, and ``vision_norm`` (why that column is NaN) when the projector does not map
        vision tokens one to one. One frame for one image, a list of frames for a list.
    """
    given = one_or_many(image, prompt, raw_prompt)
    images, prompts, raw_prompts = given.images, given.prompts, given.raw_prompts
    if not isinstance(cross_image, bool):
        raise InputError(f"cross_image must be True or False, got {cross_image!r}")
    adapter = session.adapter
    order, chosen, k = rule_settings(session, anchors, top_k, precedence)
    other = adapter.check_layer(cross_layer) if cross_layer is not None else None
    attn = resolve_attention_layers(attention_layers, adapter.num_layers) if attention_layers is not None else []
    batch = session.prepare(images, prompts, raw_prompts=raw_prompts)
    spans = batch.spans  # per sample, one span per view of its image
    if any(not sample_spans for sample_spans in spans):
        raise InputError("every image must have visual tokens to diagnose")
    grid_positions = [torch.cat([span.positions for span in sample_spans]) for sample_spans in spans]

    layers = {0} | ({other} if other is not None else set()) | ({attn[-1] + 1} if attn else set())
    mask = batch.inputs.get("attention_mask")
    input_ids = batch.inputs["input_ids"]
    received = _AttentionReceived(
        queries=[
            _text_queries(input_ids[s], None if mask is None else mask[s], span, adapter.image_token_id)
            for s, span in enumerate(spans)
        ],
        keys=grid_positions,
    )
    with contextlib.ExitStack() as stack:
        if attn:
            stack.enter_context(eager_attention(adapter))
            for layer in attn:
                handle = adapter.attention(layer).register_forward_hook(received.hook)
                stack.callback(handle.remove)
        captured = run_captured(adapter, batch.inputs, sorted(layers), vision_features=True)

    lens = session.lens("embedding")
    table = adapter.input_embeddings.weight
    device = captured.hidden[0].device
    firsts = [captured.hidden[0][s, where.to(device)] for s, where in enumerate(grid_positions)]
    classifications = [classify_ids(lens.top_k(first, k).ids, chosen, top_k=k, precedence=order) for first in firsts]
    cells = [_cells(sample_spans) for sample_spans in spans]  # per sample: view, index, row, col, each [n]
    across = (
        cross_image_cosine(
            firsts,
            [c.group for c in classifications],
            [cell[2] for cell in cells],
            [cell[3] for cell in cells],
            views=[cell[0] for cell in cells],
        )
        if cross_image
        else None
    )
    frames = []
    for sample, sample_spans in enumerate(spans):
        positions = grid_positions[sample].to(device)
        first, classification = firsts[sample], classifications[sample]  # first: [n, d]
        view, index, rows, cols = cells[sample]
        vision, why = vision_norms(adapter, captured.vision_features, sample_spans)
        columns: dict[str, Any] = {
            "row": rows,
            "col": cols,
            "group": classification.group,
            "anchor_id": pd.array(classification.anchor_id, dtype="Int64"),
            "vision_norm": vision,
            "projected_norm": first.double().norm(dim=-1).cpu().numpy(),
            "anchor_cosine": _anchor_cosine(first, table, classification.anchor_id),
        }
        if other is not None:
            later = captured.hidden[other][sample, positions]
            columns["cross_layer_cosine"] = cosine(first, later).cpu().numpy()
        if across is not None:
            columns["cross_image_cosine"] = across[sample]
        if attn:
            values = received.result(sample)
            columns["text_attention"] = values.numpy()
            columns["text_attention_share"] = (values / values.sum()).numpy()
        if len(sample_spans) == 1:
            at = pd.RangeIndex(len(index), name="index")
        else:
            at = pd.MultiIndex.from_arrays([view, index], names=["view", "index"])
        frame = pd.DataFrame(columns, index=at)
        frame.attrs.update({"cross_layer": other, "attention_layers": attn, "cross_image": cross_image})
        if len(sample_spans) > 1:
            frame.attrs["views"] = [span.view for span in sample_spans]
        if why is not None:
            frame.attrs["vision_norm"] = why
        frames.append(frame)
    return given.unwrap(frames)


def cross_image_cosine(
    vectors: Sequence[torch.Tensor],
    groups: Sequence[np.ndarray],
    rows: Sequence[np.ndarray],
    cols: Sequence[np.ndarray],
    *,
    views: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Cross-image consistency of every token of a batch of images (float64).

    A token's score is the cosine between its vector and the mean vector of the tokens with the same
    group at the same grid cell ``(row, col)`` of the same view in the *other* images (each image has
    one token per cell of each view).

    Args:
        vectors: Per image, its tokens' layer-0 vectors, shape ``[n_i, d]`` (one device for all).
        groups: Per image, its tokens' groups, string array ``[n_i]``.
        rows, cols: Per image, its tokens' grid coordinates within their view, integer arrays ``[n_i]`` each.
        views: Per image, each token's view (index), integer array ``[n_i]``; None: one view.

    Returns:
        Per image, float64 array ``[n_i]``; NaN where no other image has a token of that group at that cell.
    """
    if not vectors:
        return []
    if views is None:
        views = [np.zeros(len(image_groups), dtype=np.int64) for image_groups in groups]
    keys: dict[tuple[int, int, int, str], int] = {}
    slots = [
        keys.setdefault((int(v), int(r), int(c), str(g)), len(keys))
        for image_groups, image_rows, image_cols, image_views in zip(groups, rows, cols, views, strict=True)
        for g, r, c, v in zip(image_groups, image_rows, image_cols, image_views, strict=True)
    ]
    flat = torch.cat([v.detach() for v in vectors]).double()  # [N, d]
    slot = torch.tensor(slots, dtype=torch.long, device=flat.device)  # [N]
    sums = torch.zeros(len(keys), flat.shape[1], dtype=torch.float64, device=flat.device).index_add_(0, slot, flat)
    counts = torch.bincount(slot, minlength=len(keys))[slot]  # [N]: images with this (cell, group)
    others = (sums[slot] - flat) / (counts - 1).clamp_min(1).unsqueeze(1).double()
    scores = torch.where(counts > 1, cosine(flat, others), float("nan")).cpu().numpy()
    return list(np.split(scores, np.cumsum([int(v.shape[0]) for v in vectors])[:-1]))


def _cells(spans: Sequence[VisualSpan]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each grid token's view, index within its view, row and column (views laid end to end), ``[n]`` each."""
    parts = [(span.rows_cols(), span.num_tokens) for span in spans]
    view = np.concatenate([np.full(count, v, dtype=np.int64) for v, (_, count) in enumerate(parts)])
    index = np.concatenate([np.arange(count, dtype=np.int64) for _, count in parts])
    rows = np.concatenate([r.numpy() for (r, _), _ in parts])
    cols = np.concatenate([c.numpy() for (_, c), _ in parts])
    return view, index, rows, cols


def vision_norms(
    adapter: ModelAdapter, features: torch.Tensor | None, spans: Sequence[VisualSpan]
) -> tuple[np.ndarray, str | None]:
    """The L2 norm of the vision features behind each grid token (the adapter's
    :meth:`~embedlens.models.base.ModelAdapter.vision_token_features`), ``[n]`` with the views laid end to
    end, and None; or NaN and the reason when the family cannot say which features stand behind a token.
    """
    if features is None:
        raise EmbedLensError("the projector's input was not captured")
    out = []
    for span in spans:
        try:
            vectors = adapter.vision_token_features(features, span)  # [rows * cols, d_vision]
        except EmbedLensError as exc:
            return np.full(sum(span.num_tokens for span in spans), np.nan), str(exc)
        out.append(vectors.double().norm(dim=-1).cpu().numpy())
    return (np.concatenate(out) if out else np.zeros(0)), None


def _anchor_cosine(vectors: torch.Tensor, table: torch.Tensor, anchor_ids: list[int | None]) -> np.ndarray:
    """Cosine of each vector ``[n, d]`` with its anchor's embedding row; NaN where there is none."""
    out = np.full(len(anchor_ids), np.nan)
    matched = [i for i, a in enumerate(anchor_ids) if a is not None]
    if matched:
        index = torch.tensor(matched, device=vectors.device)
        rows = torch.tensor([anchor_ids[i] for i in matched], device=table.device)
        values = cosine(vectors.index_select(0, index), table.detach().index_select(0, rows).to(vectors.device))
        out[matched] = values.cpu().numpy()
    return out
