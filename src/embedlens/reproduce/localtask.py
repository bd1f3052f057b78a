"""An offline lmms-eval task for smoke runs of ``embedlens reproduce`` (no hub data needed).

:func:`write_local_task` writes ``docs.jsonl``, one task YAML per name and the task's ``utils.py`` into a
folder; pass the folder as ``--include-path`` (or :class:`~embedlens.reproduce.plan.PlanOptions`'s
``include_path``) and the task names in a :class:`~embedlens.reproduce.paper.TaskSuite`. Each document asks
one question about one image; the metric is case-insensitive exact match of the stripped answer.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


def write_local_task(
    folder: str | Path, rows: Sequence[Mapping[str, str]], names: Sequence[str] = ("tinyrep",), max_new_tokens: int = 3
) -> Path:
    """Write a local lmms-eval task over ``rows`` into ``folder``; the folder.

    Args:
        folder: Where the task files go (created if missing).
        rows: One document each: ``{"image": PATH, "question": TEXT, "answer": TEXT}``.
        names: Task names; each gets its own YAML over the same documents (e.g. one per task group).
        max_new_tokens: Longest answer the task asks for.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows), encoding="utf-8")
    for name in names:
        yaml = f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {docs}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: question
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {max_new_tokens}
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """
        (folder / f"{name}.yaml").write_text(textwrap.dedent(yaml), encoding="utf-8")
    (folder / "utils.py").write_text(_UTILS, encoding="utf-8")
    return folder
