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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from embedlens.analysis.align_measures import (
    BatchContext,
    TextReference,
    Totals,
    reference_passages,
    text_reference,
)
from embedlens.analysis.align_measures import batch_totals as _batch_totals
from embedlens.analysis.align_tables import layer_rows, render_markdown, summarise, wasserstein_1d
from embedlens.analysis.words import word_table
from embedlens.checks import POSITIVE_INT, check_fields, option
from embedlens.datasets import Dataset, DatasetItem
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.runs import Commit, RunDir, load_readable, refuse_placeholder, resolved, run_share
from embedlens.taxonomy.groups import ALIVE, TEXT_GROUPS, VISUAL_GROUPS

if TYPE_CHECKING:
    from embedlens.context import ModelContext

__all__ = [
    "TEXT_GROUPS",
    "VISUAL_GROUPS",
    "AlignOptions",
    "AlignResult",
    "TextReference",
    "Totals",
    "layer_rows",
    "reference_passages",
    "render_markdown",
    "run_align",
    "summarise",
    "text_reference",
    "wasserstein_1d",
]

ALIGN_FORMAT = "embedlens-align"
#: Layout of the committed parts; a run with parts of another layout is refused (pass --restart).
#: Version 3: each batch's record also lists the images it covers (``items``).
PARTS_VERSION = 3
LAYERS_FILE = "layers.parquet"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
PLOTS = ("norms.png", "alignment.png", "readability.png")


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
    rule_top_k: int | None = option(None, POSITIVE_INT)
    lens_top_k: int = option(5, POSITIVE_INT)
    lens_layers: tuple[int, ...] | None = None
    text: str | None = None
    batch_size: int = option(4, POSITIVE_INT)

    def __post_init__(self) -> None:
        check_fields(self)


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
        **session.model_identity,
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
        context = BatchContext(session, reference, unit_on_device, rule, words, lens_layers, options)
        compute = partial(_commit_batch, context)
        size = options.batch_size
        run_share(run, dataset.items, compute, batch_size=size, keys=_covered, desc="align", progress=progress)
        return run.finish(lambda: _merge(session, dataset, run, context))


def _covered(record: dict[str, Any]) -> list[int]:
    """The images a part's record covers (its batch, readable or not)."""
    return [int(index) for index in record["items"]]


def _commit_batch(context: BatchContext, batch: Sequence[DatasetItem]) -> Commit:
    """The totals of one batch's readable images (``.npz``) and the batch's record: its first index, the
    images counted, the unreadable ones (``key: why``) and every index it covers (``items``)."""
    readable, skipped = load_readable(batch)
    record = {
        "first": batch[0].index,
        "images": len(readable),
        "unreadable": [f"{item.key}: {why}" for item, why in skipped],
        "items": [item.index for item in batch],
    }
    name = f"b{batch[0].index:07d}"
    if not readable:
        return Commit(name, [record], size=len(batch))
    totals = _batch_totals(context, [item for item, _ in readable], [image for _, image in readable])
    return Commit(name, [record], data=totals.save, suffix=".npz", size=len(batch))


def _merge(session: ModelContext, dataset: Dataset, run: RunDir, context: BatchContext) -> AlignResult:
    layers = session.num_layers + 1
    totals = Totals.zeros(layers, int(context.reference.unit.shape[-1]))
    owners = run.claimed(_covered)
    missing = [item.key for item in dataset.items if item.index not in owners]
    if missing:
        raise InputError(f"{len(missing)} of {len(dataset)} images are not done yet; run the same command again")
    unreadable: list[str] = []
    for part in run.committed():
        (record,) = part.records
        mine = [owners[index].marker == part.marker for index in _covered(record)]
        if not any(mine):
            continue  # every image of this part was committed earlier by another part
        if not all(mine):
            raise InputError(f"{run.out} holds overlapping align parts; pass --restart to start over")
        unreadable += record["unreadable"]
        if record["images"]:
            totals.add(Totals.load(part.data(".npz")))
    out = run.out
    if totals.images == 0:
        raise InputError(f"none of the {len(dataset)} images could be read; first problem: {unreadable[0]}")
    rows = layer_rows(totals, context.reference, context.lens_layers)
    groups = summarise(rows)
    focus = ALIVE if ALIVE in groups else "visual"
    summary = {
        "format": ALIGN_FORMAT,
        **session.model_identity,
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
    from embedlens.pictures.plots import plot_alignment

    plot_alignment(rows, summary, out)
    return AlignResult(out=out, summary=summary, rows=rows, unreadable=unreadable)
