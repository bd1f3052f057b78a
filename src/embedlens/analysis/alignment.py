"""Layer alignment: where in the LLM do the input visual tokens belong?

The paper claims that alive visual tokens, as the projector hands them to the LLM, look like the
LLM's *intermediate* hidden states rather than its input embeddings (REFERENCE §4). This module
measures that claim, layer by layer, over a dataset:

* **Norm profiles**: the mean L2 norm of the visual tokens of each group (``vit_sink``, ``llm_sink``,
  ``dead``, ``alive``, and ``visual`` = all of them) at every layer, and of text tokens at every layer;
  the *norm-matched layer* of a group is the layer whose mean text norm is closest, on a log scale, to
  the group's mean norm at layer 0.
* **Alignment of the layer-0 visual tokens to the text distribution at layer l**, three ways:
  ``best_cos``, the mean over tokens of the best cosine to any text hidden state at ``l``;
  ``norm_w1``, the 1-D Wasserstein distance between the log-norms of the layer-0 visual tokens and of
  the text hidden states at ``l``; ``direction_distance``, the distance between the mean unit vectors
  of the two sets (0 when they point the same way on average, at most 2).
* **Readability**: the visual tokens' own hidden states at layer ``l`` read through the embedding lens
  and the logit lens: ``readable_*`` is the share whose top-1 piece is a whole word, ``word_share_*``
  the mean share of whole words among the top-k (the filter: :mod:`embedlens.analysis.words`).
* **Cross-layer change**: the mean cosine between a token's vector at layer 0 and at layer ``l``
  (near 1 for the paper's dead tokens).

Text hidden states come from text-only forward passes over reference passages (by default the
sixty sentences of ``embedlens/assets/reference_text.txt``; ``--text FILE`` for your own, one per
line), without the first position of each passage (the ``<bos>`` or first token, whose hidden state
carries the attention-sink's massive activations). The text tokens of the image prompts themselves
are profiled too (group ``prompt``), with the same exclusion, and measured against the reference *at
their own layer* (``best_cos``, ``norm_w1``, ``direction_distance`` of the prompt's layer-``l`` states
against the reference's layer-``l`` states): the text-to-text figures that tell what "aligned" looks
like for this model and reference. Layer numbering is EmbedLens' (0 = the
decoder input, ``l`` = the output of decoder layer ``l``, the last layer before the final norm).

The run streams the dataset in batches and commits each batch's totals to ``out/parts``; an
interrupted run resumes. Memory: the text hidden states, ``(L + 1) x text tokens x d`` float32
(about 110 MB for the mini model with the default passages, 900 MB for a 7B model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from embedlens.analysis.words import word_table
from embedlens.capture import run_captured
from embedlens.context import DEFAULT_PROMPT
from embedlens.datasets import Dataset, DatasetItem
from embedlens.errors import InputError
from embedlens.paths import atomic_path, atomic_write_text
from embedlens.runs import Commit, RunDir, load_readable, refuse_placeholder, resolved, run_share
from embedlens.taxonomy.groups import ALIVE, GROUPS

if TYPE_CHECKING:
    from embedlens.context import ModelContext

ALIGN_FORMAT = "embedlens-align"
#: Layout of the committed parts; a run with parts of another layout is refused (pass --restart).
#: Version 3: one record per image (``index``, ``key``, ``status``, ``reason``) beside each batch's totals.
PARTS_VERSION = 3
#: Visual groups, in table order; ``visual`` is every visual token.
VISUAL_GROUPS: tuple[str, ...] = ("visual", ALIVE, *GROUPS)
#: Rows of the layer table that describe text.
TEXT_GROUPS: tuple[str, ...] = ("text", "prompt")
LAYERS_FILE = "layers.parquet"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
PLOTS = ("norms.png", "alignment.png", "readability.png")
_EPS = 1e-12


@dataclass(frozen=True)
class AlignOptions:
    """Settings of an alignment run.

    Attributes:
        prompt: Question for images that come without one.
        anchors: Anchors JSON for the groups (None: the model's built-in anchors; if it has none, only
            the ``visual`` group is reported).
        rule_top_k: Nearest ids the rule looks at (None: the anchors').
        lens_top_k: Neighbours read for readability.
        lens_layers: Layers whose readability is measured (None: every layer); the lens is the
            expensive part of the run.
        text: File of reference passages, one per line (None: the packaged passages).
        batch_size: Images per forward pass and per committed part.
    """

    prompt: str | None = None
    anchors: str | None = None
    rule_top_k: int | None = None
    lens_top_k: int = 5
    lens_layers: tuple[int, ...] | None = None
    text: str | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("lens_top_k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- text reference
def reference_passages(path: str | Path | None) -> list[str]:
    """The reference passages: the file's non-empty lines, or the packaged sentences."""
    if path is None:
        text = (resources.files("embedlens") / "assets" / "reference_text.txt").read_text(encoding="utf-8")
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InputError(f"text file not found: {file}")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read text file {file}: {exc}") from exc
    passages = [line.strip() for line in text.splitlines() if line.strip()]
    if not passages:
        raise InputError(f"text file {path} holds no passages")
    return passages


@dataclass
class TextReference:
    """Text hidden states at every layer, from text-only passes over reference passages.

    Attributes:
        unit: Per layer, the unit vectors of the text tokens, ``[L + 1, N, d]`` float32.
        norms: Their L2 norms, ``[L + 1, N]`` float64.
        passages: How many passages were run.
    """

    unit: torch.Tensor
    norms: np.ndarray
    passages: int

    @property
    def tokens(self) -> int:
        return int(self.norms.shape[1])


def text_reference(session: ModelContext, passages: Sequence[str], *, batch_size: int = 8) -> TextReference:
    """Run ``passages`` through the language model (text only) and keep every layer's text states.

    The first position of each passage is left out (see the module docs), and so is padding.
    """
    adapter = session.adapter
    tokenizer = adapter.tokenizer
    layers = list(range(adapter.num_layers + 1))
    units: list[list[torch.Tensor]] = [[] for _ in layers]
    norms: list[list[torch.Tensor]] = [[] for _ in layers]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(passages), batch_size):
            chunk = list(passages[start : start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True)
            inputs = {k: v.to(adapter.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            mask = inputs["attention_mask"].bool()
            first = mask.long().argmax(dim=1)  # the first real position of each row
            keep = mask.clone()
            keep[torch.arange(mask.shape[0]), first] = False
            captured = run_captured(adapter, inputs, layers)
            for layer in layers:
                vectors = captured.hidden[layer][keep].float()
                length = vectors.norm(dim=-1)
                units[layer].append((vectors / length.clamp_min(_EPS)[:, None]).cpu())
                norms[layer].append(length.double().cpu())
    finally:
        tokenizer.padding_side = old_side
    unit = torch.stack([torch.cat(parts) for parts in units])
    if unit.shape[1] == 0:
        raise InputError("the reference passages have no tokens after their first")
    return TextReference(
        unit=unit, norms=torch.stack([torch.cat(parts) for parts in norms]).numpy(), passages=len(passages)
    )


# --------------------------------------------------------------------------- per-batch totals
@dataclass
class Totals:
    """Additive sums over visual tokens (per group and layer) and over prompt text tokens.

    Shapes: ``G = len(VISUAL_GROUPS)``, ``L1 = num_layers + 1``.

    Attributes:
        count: Tokens per group, ``[G]``.
        norm_sum / norm_sq: Sum of norms and of squared norms, ``[G, L1]``.
        cross_cos: Sum of cos(layer 0, layer l), ``[G, L1]``.
        best_cos: Sum of each layer-0 token's best cosine to the text states at l, ``[G, L1]``.
        unit0: Sum of the layer-0 unit vectors, ``[G, d]``.
        readable / word_share: Per lens (``[2, G, L1]``: embedding, logit): top-1 whole words, and the
            sum of whole-word shares among the top-k.
        log_norm0 / log_norm0_group: Every token's log-norm at layer 0 and its group index (``alive``
            and the rule's groups; ``visual`` is their union).
        prompt_count / prompt_norm / prompt_sq: Prompt text tokens, the sum of their norms and of their
            squared norms, ``[L1]``.
        prompt_best_cos / prompt_unit: Sum of the prompt tokens' best cosine to the reference at their
            own layer ``[L1]``, and of their unit vectors ``[L1, d]``.
        prompt_log_norm: Every prompt token's log-norm per layer, ``[L1, prompt_count]``.
        images: Images counted.
    """

    count: np.ndarray
    norm_sum: np.ndarray
    norm_sq: np.ndarray
    cross_cos: np.ndarray
    best_cos: np.ndarray
    unit0: np.ndarray
    readable: np.ndarray
    word_share: np.ndarray
    log_norm0: np.ndarray
    log_norm0_group: np.ndarray
    prompt_count: int
    prompt_norm: np.ndarray
    prompt_sq: np.ndarray
    prompt_best_cos: np.ndarray
    prompt_unit: np.ndarray
    prompt_log_norm: np.ndarray
    images: int = 0

    @classmethod
    def zeros(cls, layers: int, hidden: int) -> Totals:
        groups = len(VISUAL_GROUPS)
        return cls(
            count=np.zeros(groups),
            norm_sum=np.zeros((groups, layers)),
            norm_sq=np.zeros((groups, layers)),
            cross_cos=np.zeros((groups, layers)),
            best_cos=np.zeros((groups, layers)),
            unit0=np.zeros((groups, hidden)),
            readable=np.zeros((2, groups, layers)),
            word_share=np.zeros((2, groups, layers)),
            log_norm0=np.zeros(0),
            log_norm0_group=np.zeros(0, dtype=np.int64),
            prompt_count=0,
            prompt_norm=np.zeros(layers),
            prompt_sq=np.zeros(layers),
            prompt_best_cos=np.zeros(layers),
            prompt_unit=np.zeros((layers, hidden)),
            prompt_log_norm=np.zeros((layers, 0)),
        )

    def add(self, other: Totals) -> None:
        """Add ``other``'s sums to these."""
        for name in ("count", "norm_sum", "norm_sq", "cross_cos", "best_cos", "unit0", "readable", "word_share"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.log_norm0 = np.concatenate([self.log_norm0, other.log_norm0])
        self.log_norm0_group = np.concatenate([self.log_norm0_group, other.log_norm0_group])
        self.prompt_count += other.prompt_count
        self.prompt_norm = self.prompt_norm + other.prompt_norm
        self.prompt_sq = self.prompt_sq + other.prompt_sq
        self.prompt_best_cos = self.prompt_best_cos + other.prompt_best_cos
        self.prompt_unit = self.prompt_unit + other.prompt_unit
        self.prompt_log_norm = np.concatenate([self.prompt_log_norm, other.prompt_log_norm], axis=1)
        self.images += other.images

    def save(self, path: Path) -> None:
        """Write the totals as an ``.npz`` file (atomically)."""
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in asdict(self).items()})

    @classmethod
    def load(cls, path: Path) -> Totals:
        with np.load(path) as data:
            fields = {name: data[name] for name in data.files}
        fields["prompt_count"] = int(fields["prompt_count"])
        fields["images"] = int(fields["images"])
        return cls(**fields)


@dataclass
class _Context:
    """What every batch needs: the model, the text reference, the rule and the word table."""

    session: ModelContext
    reference: TextReference
    reference_unit: torch.Tensor  # reference.unit on the model's device, moved there once
    rule: tuple[tuple[str, ...], Any, int] | None
    words: torch.Tensor
    lens_layers: tuple[int, ...]
    options: AlignOptions


def _labels(context: _Context, layer0: torch.Tensor) -> np.ndarray:
    """Group index (into :data:`VISUAL_GROUPS`) of each layer-0 visual token, ``[n]``."""
    if context.rule is None:
        return np.zeros(layer0.shape[0], dtype=np.int64)  # "visual" only
    from embedlens.taxonomy.rule import classify_ids

    order, anchors, k = context.rule
    ids = context.session.lens("embedding").top_k(layer0, k).ids
    labels = classify_ids(ids, anchors, top_k=k, precedence=order).group
    return np.array([VISUAL_GROUPS.index(str(name)) for name in labels], dtype=np.int64)


def _group_sum(values: torch.Tensor, labels: np.ndarray, groups: int) -> np.ndarray:
    """Per group (``visual`` = all) sums over tokens of ``values`` ``[n, ...]`` -> ``[G, ...]``."""
    data = values.double().cpu().numpy()
    out = np.zeros((groups, *data.shape[1:]))
    out[0] = data.sum(axis=0)
    for index in range(1, groups):
        chosen = labels == index
        if chosen.any():
            out[index] = data[chosen].sum(axis=0)
    return out


def _batch_totals(context: _Context, items: Sequence[DatasetItem], images: list[Any]) -> Totals:
    """Totals of one batch of readable images."""
    session = context.session
    adapter = session.adapter
    layers = adapter.num_layers + 1
    default = context.options.prompt or DEFAULT_PROMPT
    batch = session.prepare(images, [item.prompt or default for item in items])
    captured = run_captured(adapter, batch.inputs, list(range(layers)))
    hidden = captured.hidden
    totals = Totals.zeros(layers, int(hidden[0].shape[-1]))
    totals.images = len(items)
    groups = len(VISUAL_GROUPS)
    mask = batch.inputs["attention_mask"].bool()
    for row, spans in enumerate(batch.spans):
        positions = torch.cat([span.positions for span in spans]).to(hidden[0].device)
        # text tokens of the prompt: real positions that are neither visual nor the first one
        text = mask[row].clone()
        text[positions] = False
        text[int(mask[row].long().argmax())] = False
        per_layer = torch.stack([hidden[layer][row, positions].float() for layer in range(layers)])  # [L1, n, d]
        norms = per_layer.norm(dim=-1)  # [L1, n]
        unit = per_layer / norms.clamp_min(_EPS)[..., None]
        labels = _labels(context, per_layer[0])
        reference = context.reference_unit  # [L1, N, d]
        best = torch.stack([(unit[0] @ reference[layer].T).max(dim=1).values for layer in range(layers)])
        cross = (unit * unit[0:1]).sum(dim=-1)  # [L1, n]
        totals.count += _group_sum(torch.ones(norms.shape[1]), labels, groups)
        totals.norm_sum += _group_sum(norms.T, labels, groups)
        totals.norm_sq += _group_sum((norms**2).T, labels, groups)
        totals.cross_cos += _group_sum(cross.T, labels, groups)
        totals.best_cos += _group_sum(best.T, labels, groups)
        totals.unit0 += _group_sum(unit[0], labels, groups)
        for lens_index, name in enumerate(("embedding", "logit")):
            lens = session.lens(name)
            top1 = torch.zeros(layers, norms.shape[1], dtype=torch.double)
            share = torch.zeros(layers, norms.shape[1], dtype=torch.double)
            for layer in context.lens_layers:
                ids = lens.top_k(per_layer[layer], context.options.lens_top_k).ids.cpu()
                whole = context.words[ids]
                top1[layer] = whole[:, 0].double()
                share[layer] = whole.double().mean(dim=1)
            totals.readable[lens_index] += _group_sum(top1.T, labels, groups)
            totals.word_share[lens_index] += _group_sum(share.T, labels, groups)
        totals.log_norm0 = np.concatenate([totals.log_norm0, np.log(norms[0].double().clamp_min(_EPS).cpu().numpy())])
        totals.log_norm0_group = np.concatenate([totals.log_norm0_group, labels])
        text_states = torch.stack([hidden[layer][row, text].float() for layer in range(layers)])  # [L1, m, d]
        text_norms = text_states.norm(dim=-1)
        text_unit = text_states / text_norms.clamp_min(_EPS)[..., None]
        totals.prompt_count += int(text.sum())
        totals.prompt_norm += text_norms.double().sum(dim=1).cpu().numpy()
        totals.prompt_sq += (text_norms.double() ** 2).sum(dim=1).cpu().numpy()
        if text_unit.shape[1]:
            own_layer = torch.bmm(text_unit, reference.transpose(1, 2)).max(dim=2).values  # [L1, m]
            totals.prompt_best_cos += own_layer.double().sum(dim=1).cpu().numpy()
        totals.prompt_unit += text_unit.double().sum(dim=1).cpu().numpy()
        totals.prompt_log_norm = np.concatenate(
            [totals.prompt_log_norm, np.log(text_norms.double().clamp_min(_EPS).cpu().numpy())], axis=1
        )
    return totals


# --------------------------------------------------------------------------- summarising
def wasserstein_1d(a: np.ndarray, b: np.ndarray, points: int = 1000) -> float:
    """1-D Wasserstein-1 distance between two samples: the mean gap between their quantiles."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    q = (np.arange(points) + 0.5) / points
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def layer_rows(totals: Totals, reference: TextReference, lens_layers: Sequence[int]) -> list[dict[str, Any]]:
    """The long layer table: one row per (group, layer), visual groups then ``text`` and ``prompt``."""
    layers = totals.norm_sum.shape[1]
    measured = np.zeros(layers, dtype=bool)
    measured[list(lens_layers)] = True
    text_log = np.log(np.maximum(reference.norms, _EPS))
    text_mean_unit = reference.unit.double().mean(dim=1).numpy()  # [L1, d]
    rows = []
    for g, group in enumerate(VISUAL_GROUPS):
        n = totals.count[g]
        if n == 0:
            continue
        mean = totals.norm_sum[g] / n
        std = np.sqrt(np.maximum(totals.norm_sq[g] / n - mean**2, 0))
        chosen = totals.log_norm0 if g == 0 else totals.log_norm0[totals.log_norm0_group == g]
        unit0 = totals.unit0[g] / n
        for layer in range(layers):
            rows.append(
                {
                    "group": group,
                    "layer": layer,
                    "tokens": int(n),
                    "norm_mean": float(mean[layer]),
                    "norm_std": float(std[layer]),
                    "cross_layer_cos": float(totals.cross_cos[g, layer] / n),
                    "best_cos": float(totals.best_cos[g, layer] / n),
                    "norm_w1": wasserstein_1d(chosen, text_log[layer]),
                    "direction_distance": float(np.linalg.norm(unit0 - text_mean_unit[layer])),
                    "readable_embedding": float(totals.readable[0, g, layer] / n) if measured[layer] else None,
                    "word_share_embedding": float(totals.word_share[0, g, layer] / n) if measured[layer] else None,
                    "readable_logit": float(totals.readable[1, g, layer] / n) if measured[layer] else None,
                    "word_share_logit": float(totals.word_share[1, g, layer] / n) if measured[layer] else None,
                }
            )
    for layer in range(layers):
        rows.append(
            {
                "group": "text",
                "layer": layer,
                "tokens": reference.tokens,
                "norm_mean": float(reference.norms[layer].mean()),
                "norm_std": float(reference.norms[layer].std()),
            }
        )
    n = totals.prompt_count
    if n:
        mean = totals.prompt_norm / n
        std = np.sqrt(np.maximum(totals.prompt_sq / n - mean**2, 0))
        for layer in range(layers):
            rows.append(
                {
                    "group": "prompt",
                    "layer": layer,
                    "tokens": int(n),
                    "norm_mean": float(mean[layer]),
                    "norm_std": float(std[layer]),
                    "best_cos": float(totals.prompt_best_cos[layer] / n),
                    "norm_w1": wasserstein_1d(totals.prompt_log_norm[layer], text_log[layer]),
                    "direction_distance": float(np.linalg.norm(totals.prompt_unit[layer] / n - text_mean_unit[layer])),
                }
            )
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per visual group: the norm-matched layer and the best-aligned layer under each measure."""
    text = {r["layer"]: r["norm_mean"] for r in rows if r["group"] == "text"}
    out: dict[str, Any] = {}
    for group in VISUAL_GROUPS:
        mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["layer"])
        if not mine:
            continue
        start = mine[0]["norm_mean"]
        gaps = {layer: abs(math.log(norm / start)) for layer, norm in text.items() if norm > 0 and start > 0}
        matched = min(gaps, key=lambda layer: (gaps[layer], layer)) if gaps else None
        out[group] = {
            "tokens": mine[0]["tokens"],
            "norm_layer0": start,
            "norm_matched_layer": matched,
            "norm_ratio_to_text_layer0": start / text[0] if text.get(0) else None,
            "best_cos_layer": max(mine, key=lambda r: (r["best_cos"], -r["layer"]))["layer"],
            "best_cos_max": max(r["best_cos"] for r in mine),
            "norm_w1_layer": min(mine, key=lambda r: (r["norm_w1"], r["layer"]))["layer"],
            "direction_distance_layer": min(mine, key=lambda r: (r["direction_distance"], r["layer"]))["layer"],
            "cross_layer_cos_last": mine[-1]["cross_layer_cos"],
        }
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_markdown(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The summary and the layer table of the focus group as markdown."""
    lines = [
        f"Alignment of visual tokens on {summary['images']} images ({summary['model']}); text reference: "
        f"{summary['text']['tokens']} tokens from {summary['text']['passages']} passages.",
        "",
        "| group | tokens | norm at layer 0 | x text norm at layer 0 | norm-matched layer | best-cos layer (max) "
        "| norm-W1 layer | direction layer | cos(layer 0, last) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, s in summary["groups"].items():
        lines.append(
            f"| {group} | {s['tokens']} | {_fmt(s['norm_layer0'])} | {_fmt(s['norm_ratio_to_text_layer0'])} | "
            f"{s['norm_matched_layer']} | {s['best_cos_layer']} ({_fmt(s['best_cos_max'])}) | {s['norm_w1_layer']} | "
            f"{s['direction_distance_layer']} | {_fmt(s['cross_layer_cos_last'])} |"
        )
    focus = summary["focus_group"]
    text = {r["layer"]: r for r in rows if r["group"] == "text"}
    prompt = {r["layer"]: r for r in rows if r["group"] == "prompt"}
    lines += [
        "",
        f"Per layer, group {focus!r} (layer-0 tokens against the text states of each layer; readability of "
        "the tokens' own states at each layer):",
        "",
        "| layer | text norm | prompt norm | visual norm | best cos | prompt's best cos | norm W1 "
        "| direction dist. | cos(0, l) | readable (emb.) | readable (logit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["group"] == focus), key=lambda r: r["layer"]):
        layer = r["layer"]
        lines.append(
            f"| {layer} | {_fmt(text[layer]['norm_mean'])} | {_fmt(prompt.get(layer, {}).get('norm_mean'))} | "
            f"{_fmt(r['norm_mean'])} | {_fmt(r['best_cos'])} | {_fmt(prompt.get(layer, {}).get('best_cos'))} | "
            f"{_fmt(r['norm_w1'])} | "
            f"{_fmt(r['direction_distance'])} | {_fmt(r['cross_layer_cos'])} | {_fmt(r['readable_embedding'])} | "
            f"{_fmt(r['readable_logit'])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run
@dataclass
class AlignResult:
    """What :func:`run_align` wrote and found.

    Attributes:
        out: The output directory.
        summary: The content of ``summary.json``.
        rows: The rows of ``layers.parquet``.
        unreadable: Images that could not be read (``key: why``).
    """

    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    unreadable: list[str] = field(default_factory=list)


def _lens_layers(options: AlignOptions, num_layers: int) -> tuple[int, ...]:
    if options.lens_layers is None:
        return tuple(range(num_layers + 1))
    chosen = sorted(set(options.lens_layers))
    bad = [layer for layer in chosen if not 0 <= layer <= num_layers]
    if bad:
        raise InputError(f"lens layers {bad} are outside 0..{num_layers}")
    return tuple(chosen)


def _rule(session: ModelContext, options: AlignOptions) -> tuple[tuple[str, ...], Any, int] | None:
    from embedlens.taxonomy.anchors import builtin_anchors
    from embedlens.taxonomy.classify import rule_settings

    if options.anchors is None and builtin_anchors(session.adapter.source) is None:
        return None  # no anchors: every visual token in one group
    return rule_settings(session, options.anchors, options.rule_top_k, None)


def run_identity(
    session: ModelContext, dataset: Dataset, options: AlignOptions, passages: Sequence[str]
) -> dict[str, Any]:
    """Everything that decides the result and the layout of the parts; a resumed run must match it."""
    return {
        "format": ALIGN_FORMAT + "-run",
        "parts_version": PARTS_VERSION,
        "model": session.adapter.source,
        "config_hash": session.config_hash,
        "dataset": str(resolved(dataset.source)),
        "items": len(dataset.items),
        "items_hash": dataset.fingerprint(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        "passages": list(passages),
    }


def run_align(
    session: ModelContext,
    dataset: Dataset,
    out: str | Path,
    *,
    options: AlignOptions | None = None,
    restart: bool = False,
    progress: bool = True,
) -> AlignResult | None:
    """Measure layer alignment over ``dataset``; resumable; writes tables, summary and plots to ``out``.

    Under several processes each takes a contiguous share and rank 0 merges (the others return None).
    Rows whose prompt holds the image placeholder are skipped and listed, before ``out`` is touched.

    Args:
        session: The loaded model.
        dataset: From :func:`embedlens.datasets.open_dataset`.
        out: Output directory.
        options: See :class:`AlignOptions`.
        restart: Discard an earlier run in ``out``.
        progress: Show a progress bar.
    """
    options = options or AlignOptions()
    run = RunDir(out, "align", (LAYERS_FILE, SUMMARY_FILE, TABLE_FILE, *PLOTS))
    run.check_target()
    lens_layers = _lens_layers(options, session.num_layers)
    passages = reference_passages(options.text)
    rule = _rule(session, options)
    refuse_placeholder(options.prompt, session.adapter.image_placeholder, "--prompt")
    dataset = dataset.without_placeholder(session.adapter.image_placeholder)
    with run.session(run_identity(session, dataset, options, passages), restart=restart, device=session.adapter.device):
        reference = text_reference(session, passages)
        rows = max(int(session.adapter.input_embeddings.weight.shape[0]), int(session.adapter.lm_head.weight.shape[0]))
        words = torch.from_numpy(word_table(session.adapter.tokenizer, rows))
        unit_on_device = reference.unit.to(session.adapter.device)
        context = _Context(session, reference, unit_on_device, rule, words, lens_layers, options)
        compute = partial(_commit_batch, context)
        run_share(
            run, dataset.items, compute, batch_size=options.batch_size, desc="align", unit="image", progress=progress
        )
        return run.finish(lambda: _merge(session, dataset, run, context))


def _index(record: dict[str, Any]) -> int:
    return int(record["index"])


def _commit_batch(context: _Context, batch: Sequence[DatasetItem]) -> Commit:
    """The totals of one batch's readable images (``.npz``) and one record per image."""
    readable, skipped = load_readable(batch)
    records = [{"index": item.index, "key": item.key, "status": "ok"} for item, _ in readable]
    records += [{"index": item.index, "key": item.key, "status": "unreadable", "reason": why} for item, why in skipped]
    records.sort(key=_index)
    name = f"b{batch[0].index:07d}"
    if not readable:
        return Commit(name, records, size=len(batch))
    totals = _batch_totals(context, [item for item, _ in readable], [image for _, image in readable])
    return Commit(name, records, data=totals.save, suffix=".npz", size=len(batch))


def _merge(session: ModelContext, dataset: Dataset, run: RunDir, context: _Context) -> AlignResult:
    layers = session.num_layers + 1
    totals = Totals.zeros(layers, int(context.reference.unit.shape[-1]))
    owners = run.claimed(_index)
    missing = [item.key for item in dataset.items if item.index not in owners]
    if missing:
        raise InputError(f"{len(missing)} of {len(dataset)} images are not done yet; run the same command again")
    unreadable: list[str] = []
    for part in run.committed():
        mine = [owners[_index(record)].marker == part.marker for record in part.records]
        if not any(mine):
            continue  # every image of this part was committed earlier by another part
        if not all(mine):
            raise InputError(f"{run.out} holds overlapping align parts; pass --restart to start over")
        unreadable += [f"{r['key']}: {r['reason']}" for r in part.records if r["status"] != "ok"]
        if any(r["status"] == "ok" for r in part.records):
            totals.add(Totals.load(part.data(".npz")))
    out = run.out
    if totals.images == 0:
        raise InputError(f"none of the {len(dataset)} images could be read; first problem: {unreadable[0]}")
    rows = layer_rows(totals, context.reference, context.lens_layers)
    groups = summarise(rows)
    focus = ALIVE if ALIVE in groups else "visual"
    summary = {
        "format": ALIGN_FORMAT,
        "model": session.adapter.source,
        "config_hash": session.config_hash,
        "dataset": str(resolved(dataset.source)),
        "images": totals.images,
        "unreadable": unreadable,
        "groups_from": "anchors" if context.rule is not None else "none (no anchors: one 'visual' group)",
        "focus_group": focus,
        "text": {"passages": context.reference.passages, "tokens": context.reference.tokens},
        "lens_layers": list(context.lens_layers),
        "lens_top_k": context.options.lens_top_k,
        "groups": groups,
    }
    with atomic_path(out / LAYERS_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1))
    atomic_write_text(out / TABLE_FILE, render_markdown(summary, rows))
    from embedlens.analysis.plots import plot_alignment

    plot_alignment(rows, summary, out)
    return AlignResult(out=out, summary=summary, rows=rows, unreadable=unreadable)
