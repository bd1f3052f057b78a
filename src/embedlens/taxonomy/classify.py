"""Classify images' visual tokens as ViT sink, LLM sink, dead or alive with a loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embedlens.errors import InputError
from embedlens.images import ImageLike
from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message
from embedlens.taxonomy.result import ClassifiedResult
from embedlens.taxonomy.rule import check_precedence, classify_ids

if TYPE_CHECKING:
    from embedlens.context import ModelContext

AnchorsLike = Anchors | str | Path | None


def resolve_anchors(session: ModelContext, anchors: AnchorsLike = None) -> Anchors:
    """The anchors to use with ``session``'s model, checked against its vocabulary and embedding table.

    Args:
        session: The loaded model.
        anchors: An :class:`Anchors`, the path of an anchors JSON file, or None for the model's built-in
            anchors.

    Raises:
        InputError: No built-in anchors for the model, an unreadable anchors file, or anchors made for
            another vocabulary.
    """
    if anchors is None:
        found = builtin_anchors(session.adapter.source)
        if found is None:
            raise InputError(no_builtin_message(session.adapter.source))
        anchors = found
    elif not isinstance(anchors, Anchors):
        anchors = Anchors.load(anchors)
    anchors.check_vocabulary(session.adapter.tokenizer, int(session.adapter.input_embeddings.weight.shape[0]))
    return anchors


def rule_settings(
    session: ModelContext, anchors: AnchorsLike, top_k: int | None, precedence: Sequence[str] | None
) -> tuple[tuple[str, ...], Anchors, int]:
    """The checked precedence, anchors and top-k of one application of the rule.

    Raises:
        InputError: An unknown group in ``precedence``, unusable anchors, or a top-k that is not a
            positive integer.
    """
    order = check_precedence(precedence)
    chosen = resolve_anchors(session, anchors)
    k = chosen.top_k if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InputError(f"top-k must be a positive integer, got {k!r}")
    return order, chosen, k


def classify_batch(
    session: ModelContext,
    images: Sequence[ImageLike],
    prompts: Sequence[str] | None = None,
    *,
    raw_prompts: Sequence[str] | None = None,
    anchors: AnchorsLike = None,
    top_k: int | None = None,
    layer: int = 0,
    precedence: Sequence[str] | None = None,
) -> list[ClassifiedResult]:
    """Label every visual token of several images, in one forward pass, with the paper's rule.

    See :mod:`embedlens.taxonomy.rule`; :meth:`embedlens.session.Session.classify` is the one-or-many form.

    Args:
        session: The loaded model.
        images: One path or PIL image per sample.
        prompts: One question per sample (placed through the chat template), or None for the default.
        raw_prompts: Alternatively the model's full text per sample, with the image placeholder.
        anchors: :class:`Anchors`, an anchors JSON path, or None for the model's built-in anchors.
        top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``).
        layer: Layer whose vectors are read (0 = projector output, the paper's choice).
        precedence: Group order for tokens matching several groups (default vit_sink > llm_sink > dead).
    """
    order, chosen, k = rule_settings(session, anchors, top_k, precedence)
    # Anchors belong to a base vocabulary when they declare one: ids appended after it (llava-hf's <image>,
    # <pad>, padding rows near the mean embedding) must not push the anchors out of a token's top-k.
    probes = session.probe_batch(
        images,
        prompts,
        raw_prompts=raw_prompts,
        layer=layer,
        top_k=k,
        lens="embedding",
        vocab_limit=chosen.base_vocab_size,
    )
    return [
        ClassifiedResult(
            probe=probe,
            classification=classify_ids(probe.top_ids, chosen, top_k=k, precedence=order),
            anchors=chosen,
        )
        for probe in probes
    ]
