"""Greedy generation of a prepared batch under interventions (the service evaluations call)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embedlens.errors import InputError
from embedlens.interventions.apply import intervene
from embedlens.interventions.planning import Plan
from embedlens.interventions.records import InterventionRun
from embedlens.interventions.spec import Intervention
from embedlens.models.base import PreparedBatch

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors


def check_context(context: ModelContext, batch: PreparedBatch, max_new_tokens: int) -> None:
    """Refuse a prompt (its visual tokens included) that, with ``max_new_tokens`` more, overflows the model's
    context (``max_position_embeddings`` of its text config, when it declares one).

    Raises:
        InputError: Naming both lengths and the limit.
    """
    from embedlens.models.registry import context_length

    limit = context_length(context.adapter.model.config)
    length = int(batch.inputs["input_ids"].shape[-1])
    if limit is not None and length + max_new_tokens > limit:
        raise InputError(
            f"the prompt takes {length} tokens (image included) and --max-new-tokens {max_new_tokens} more, "
            f"but the model's context holds {limit}"
        )


def generate_batch(
    context: ModelContext,
    batch: PreparedBatch,
    *,
    max_new_tokens: int = 32,
    interventions: Plan | Sequence[Intervention] = (),
    anchors: Anchors | str | Path | None = None,
    sample_ids: Sequence[int] | None = None,
    targets: Sequence[Sequence[int]] | None = None,
) -> tuple[list[str], InterventionRun]:
    """Greedy answers for a prepared batch, and the record of what the interventions did.

    Batches are left-padded with the attention mask and position ids following it, so a sample's
    answer does not depend on its neighbours (up to the rounding of batched kernels).

    Args:
        context: The loaded model.
        batch: Inputs from :meth:`~embedlens.context.ModelContext.prepare`.
        max_new_tokens: Longest answer, in tokens.
        interventions: A :class:`~embedlens.interventions.Plan` checked for this model, or Prune / Skip /
            Inject / Exit / Scale objects (checked once), applied while generating.
        anchors: Anchors for group targets (default: the model's built-in anchors).
        sample_ids: Passed to :func:`~embedlens.interventions.intervene` (seeds derive from them).
        targets: Passed to :func:`~embedlens.interventions.intervene` (the ``"target"`` group).

    Returns:
        One stripped answer per sample, and the :class:`InterventionRun` record.
    """
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    with (
        intervene(context, interventions, anchors=anchors, sample_ids=sample_ids, targets=targets) as run,
        torch.inference_mode(),
    ):
        output = context.adapter.model.generate(
            **batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1
        )
    new_tokens = output[:, batch.inputs["input_ids"].shape[1] :]
    texts = context.adapter.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.strip() for text in texts], run
