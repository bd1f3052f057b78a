"""Layer alignment, the measuring half: text hidden states of reference passages, and the additive
totals of one batch of images (see :mod:`embedlens.analysis.alignment` for what is measured)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedlens.capture import run_captured
from embedlens.context import DEFAULT_PROMPT
from embedlens.datasets import DatasetItem
from embedlens.errors import InputError
from embedlens.files import atomic_path
from embedlens.taxonomy.groups import VISUAL_GROUPS

if TYPE_CHECKING:
    from embedlens.analysis.alignment import AlignOptions
    from embedlens.context import ModelContext

EPS = 1e-12


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
                units[layer].append((vectors / length.clamp_min(EPS)[:, None]).cpu())
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
class BatchContext:
    """What every batch needs: the model, the text reference, the rule and the word table."""

    session: ModelContext
    reference: TextReference
    reference_unit: torch.Tensor  # reference.unit on the model's device, moved there once
    rule: tuple[tuple[str, ...], Any, int] | None
    words: torch.Tensor
    lens_layers: tuple[int, ...]
    options: AlignOptions


def _labels(context: BatchContext, layer0: torch.Tensor) -> np.ndarray:
    """Group index (into :data:`VISUAL_GROUPS`) of each layer-0 visual token, ``[n]``."""
    if context.rule is None:
        return np.zeros(layer0.shape[0], dtype=np.int64)  # "visual" only
    from embedlens.taxonomy.rule import classify_ids

    order, anchors, k = context.rule
    ids = context.session.lens("embedding", vocab_limit=anchors.base_vocab_size).top_k(layer0, k).ids
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


def batch_totals(context: BatchContext, items: Sequence[DatasetItem], images: list[Any]) -> Totals:
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
        unit = per_layer / norms.clamp_min(EPS)[..., None]
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
        totals.log_norm0 = np.concatenate([totals.log_norm0, np.log(norms[0].double().clamp_min(EPS).cpu().numpy())])
        totals.log_norm0_group = np.concatenate([totals.log_norm0_group, labels])
        text_states = torch.stack([hidden[layer][row, text].float() for layer in range(layers)])  # [L1, m, d]
        text_norms = text_states.norm(dim=-1)
        text_unit = text_states / text_norms.clamp_min(EPS)[..., None]
        totals.prompt_count += int(text.sum())
        totals.prompt_norm += text_norms.double().sum(dim=1).cpu().numpy()
        totals.prompt_sq += (text_norms.double() ** 2).sum(dim=1).cpu().numpy()
        if text_unit.shape[1]:
            own_layer = torch.bmm(text_unit, reference.transpose(1, 2)).max(dim=2).values  # [L1, m]
            totals.prompt_best_cos += own_layer.double().sum(dim=1).cpu().numpy()
        totals.prompt_unit += text_unit.double().sum(dim=1).cpu().numpy()
        totals.prompt_log_norm = np.concatenate(
            [totals.prompt_log_norm, np.log(text_norms.double().clamp_min(EPS).cpu().numpy())], axis=1
        )
    return totals
