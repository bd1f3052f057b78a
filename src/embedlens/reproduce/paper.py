"""The paper's benchmark suite and published figures, as data.

The paper (REFERENCE.md §5) reports LLaVA-1.5-7B on eleven lmms-eval benchmarks in four groups and
averages each group; its ``Avg`` column is the mean of the four group averages. This module says:

* which lmms-eval tasks form each group (:data:`PAPER_SUITE`);
* which metric to read from lmms-eval's ``*_results.json`` for each task and how to bring it to 0..100
  (:class:`TaskMetric`, checked against the task yamls of lmms-eval 0.7.3);
* how many documents each task has (:data:`DOCUMENTS`, for cost estimates);
* the paper's published group figures (:data:`PUBLISHED`).

lmms-eval writes a metric as ``"<metric>,<filter>"`` (``"exact_match,none"``); :meth:`TaskMetric.score`
reads the ``none`` filter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

#: The paper's task groups, in its column order.
GROUP_NAMES: tuple[str, ...] = ("General", "OCR", "CV-centric", "Hallucination")

#: lmms-eval's filter name for tasks without a filter list.
FILTER = "none"


@dataclass(frozen=True)
class TaskMetric:
    """How one lmms-eval task's score is read and scaled to 0..100.

    Attributes:
        task: lmms-eval task name.
        metrics: Metric names in the results JSON whose values are added (MME: perception + cognition).
        scale: Factor that maps the sum to 0..100 (``100`` for 0..1 metrics, ``1`` for 0..100 ones,
            ``100 / 2800`` for MME's two scores).
        note: How the score is formed, for the table notes.
    """

    task: str
    metrics: tuple[str, ...]
    scale: float
    note: str = ""

    def score(self, results: Mapping[str, object]) -> float | None:
        """The task's 0..100 score from its ``results[task]`` entry, or None if a metric is missing or NaN."""
        total = 0.0
        for metric in self.metrics:
            value = results.get(f"{metric},{FILTER}", results.get(metric))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                return None
            total += float(value)
        return total * self.scale


@dataclass(frozen=True)
class TaskSuite:
    """Tasks in groups, each with its metric.

    Attributes:
        groups: Group name -> its tasks, in column order.
        metrics: Task name -> how to score it.
    """

    groups: dict[str, tuple[str, ...]]
    metrics: dict[str, TaskMetric] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [task for task in self.tasks if task not in self.metrics]
        if missing:
            raise ValueError(f"tasks without a metric: {', '.join(missing)}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task, group by group."""
        return tuple(task for tasks in self.groups.values() for task in tasks)

    def group_of(self, task: str) -> str:
        """The group holding ``task`` (``KeyError`` if none does)."""
        for name, tasks in self.groups.items():
            if task in tasks:
                return name
        raise KeyError(task)

    def restricted(self, tasks: tuple[str, ...]) -> TaskSuite:
        """The same suite keeping only ``tasks`` (groups left empty are kept, empty, for the table)."""
        chosen = set(tasks)
        return TaskSuite(
            groups={name: tuple(t for t in group if t in chosen) for name, group in self.groups.items()},
            metrics={t: m for t, m in self.metrics.items() if t in chosen},
        )


_PCT = "0..1 in lmms-eval, x100"
_MME_NOTE = (
    "MME: (perception + cognition) / 2800 x 100 (perception's 10 subtasks and cognition's 4 score up to 200 "
    "each); the paper does not publish how it folds MME into a 0..100 average"
)

#: Every task's metric (lmms-eval 0.7.3 task yamls and aggregation functions).
PAPER_METRICS: dict[str, TaskMetric] = {
    m.task: m
    for m in (
        TaskMetric("mme", ("mme_perception_score", "mme_cognition_score"), 100.0 / 2800.0, _MME_NOTE),
        TaskMetric("gqa", ("exact_match",), 100.0, _PCT),
        TaskMetric("mmstar", ("average",), 100.0, "mean over MMStar's six categories, " + _PCT),
        TaskMetric(
            "mmbench_en_dev",
            ("gpt_eval_score",),
            1.0,
            "already 0..100; lmms-eval asks an OpenAI model to extract answers it cannot match itself",
        ),
        TaskMetric("textvqa_val", ("exact_match",), 100.0, "VQA accuracy, " + _PCT),
        TaskMetric("ocrbench", ("ocrbench_accuracy",), 100.0, "final score / 1000, x100"),
        TaskMetric("docvqa_val", ("anls",), 100.0, "ANLS, " + _PCT),
        TaskMetric("refcoco+_bbox_rec_val", ("refcoco_ACC@0.5",), 100.0, "box accuracy at IoU 0.5, " + _PCT),
        TaskMetric("refcoco_bbox_rec_testA", ("refcoco_ACC@0.5",), 100.0, "box accuracy at IoU 0.5, " + _PCT),
        TaskMetric("refcoco_bbox_rec_testB", ("refcoco_ACC@0.5",), 100.0, "box accuracy at IoU 0.5, " + _PCT),
        TaskMetric("pope", ("pope_accuracy",), 100.0, _PCT),
        TaskMetric(
            "hallusion_bench_image",
            ("aAcc",),
            1.0,
            "answer accuracy, already 0..100; lmms-eval grades answers with an OpenAI model",
        ),
    )
}

#: The paper's suite: General, OCR, CV-centric (referring-expression grounding), Hallucination.
PAPER_SUITE = TaskSuite(
    groups={
        "General": ("mme", "gqa", "mmstar", "mmbench_en_dev"),
        "OCR": ("textvqa_val", "ocrbench", "docvqa_val"),
        "CV-centric": ("refcoco+_bbox_rec_val", "refcoco_bbox_rec_testA", "refcoco_bbox_rec_testB"),
        "Hallucination": ("pope", "hallusion_bench_image"),
    },
    metrics=PAPER_METRICS,
)


@dataclass(frozen=True)
class DocumentCount:
    """How many documents lmms-eval evaluates for a task, and how sure we are.

    Attributes:
        count: Documents (after any ``process_docs`` expansion).
        source: Where the number comes from.
        verified: Whether the number was checked against a dataset card or documentation here.
    """

    count: int
    source: str
    verified: bool


#: Documents per task, for GPU-hour estimates.
DOCUMENTS: dict[str, DocumentCount] = {
    "mme": DocumentCount(2374, "MME benchmark size as commonly reported", False),
    "gqa": DocumentCount(12578, "GQA testdev-balanced questions as commonly reported", False),
    "mmstar": DocumentCount(1500, "MMStar val (the benchmark's size)", False),
    "mmbench_en_dev": DocumentCount(4329, "MMBench-en dev rows as commonly reported", False),
    "textvqa_val": DocumentCount(5000, "TextVQA validation questions", False),
    "ocrbench": DocumentCount(1000, "OCRBench's 1000 questions", False),
    "docvqa_val": DocumentCount(5349, "DocVQA validation questions as commonly reported", False),
    # lmms-eval's refcoco_bbox_rec_preprocess_dataset makes one document per referring expression; the
    # hub cards list 3805 / 1975 / 1810 objects (rows) for these splits, with about 2.8 expressions each.
    "refcoco+_bbox_rec_val": DocumentCount(
        10758, "RefCOCO+ val expressions (3805 object rows on the lmms-lab card, one document per expression)", False
    ),
    "refcoco_bbox_rec_testA": DocumentCount(
        5657, "RefCOCO testA expressions (1975 object rows on the lmms-lab card, one document per expression)", False
    ),
    "refcoco_bbox_rec_testB": DocumentCount(
        5095, "RefCOCO testB expressions (1810 object rows on the lmms-lab card, one document per expression)", False
    ),
    "pope": DocumentCount(9000, "POPE test: three 3000-question splits", False),
    "hallusion_bench_image": DocumentCount(951, "HallusionBench image split (evalscope's data statistics)", True),
}


def documents(task: str, limit: int | None = None) -> int | None:
    """Documents lmms-eval evaluates for ``task`` under ``--limit`` (None when the task's size is unknown)."""
    known = DOCUMENTS.get(task)
    if known is None:
        return limit
    return min(known.count, limit) if limit is not None else known.count


#: The paper's published figures (REFERENCE.md §5, LLaVA-1.5-7B): row key -> group -> score, plus "Avg".
PUBLISHED: dict[str, dict[str, float]] = {
    "original": {"General": 58.7, "OCR": 36.9, "CV-centric": 54.0, "Hallucination": 61.1, "Avg": 52.7},
    "-llm_sink": {"General": 58.6, "OCR": 37.0, "CV-centric": 54.4, "Hallucination": 61.3, "Avg": 52.7},
    "-vit_sink": {"General": 58.7, "OCR": 37.2, "CV-centric": 53.8, "Hallucination": 61.1, "Avg": 52.8},
    "-sinks": {"General": 58.6, "OCR": 37.2, "CV-centric": 54.1, "Hallucination": 61.3, "Avg": 52.8},
    "-sink+dead": {"General": 58.7, "OCR": 37.1, "CV-centric": 57.7, "Hallucination": 61.2, "Avg": 53.7},
    "random": {"General": 57.2, "OCR": 34.3, "CV-centric": 48.5, "Hallucination": 60.2, "Avg": 50.1},
}

#: The model the published figures are for.
PUBLISHED_MODEL = "LLaVA-1.5-7B"


def llava15_7b_config() -> Any:
    """The paper's model, LLaVA-1.5-7B, as a ``transformers`` config built from its published sizes (CLIP
    ViT-L/14 at 336 px: 24 layers, width 1024; LLaMA-7B: 32 layers, hidden 4096, MLP 11008, 32 heads; llava-hf's
    32064-row vocabulary; 576 image tokens, feature layer -2, ``default`` selection). Enough to plan and cost
    the experiment set on the meta device where the hub's config cannot be downloaded; no weights. The sizes
    live in ``embedlens/assets/llava15_7b_config.json``."""
    from transformers import LlavaConfig

    text = (resources.files("embedlens") / "assets" / "llava15_7b_config.json").read_text(encoding="utf-8")
    return LlavaConfig.from_dict(json.loads(text))
