"""Roll lmms-eval result folders up into the paper's table.

Each finished run folder (``runs/<name>/``) holds ``run.json`` (its row, task group, seed and tasks, written
by the runner), ``done.json`` (written last, atomically) and lmms-eval's output under ``lmms/``: lmms-eval
0.7.3 writes ``<output_path>/<model name>/<date>_results.json``, whose ``"results"`` maps each task to
``{"<metric>,<filter>": value, ...}``. This module reads those, scales each task's metric to 0..100
(:mod:`embedlens.reproduce.paper`), averages tasks per group and groups into ``Avg`` (the paper's
column), puts seeded rows as mean ± sd over seeds, and writes ``paper_table.md`` and ``paper_table.json``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedlens.files import atomic_write_text
from embedlens.reproduce.paper import PUBLISHED, PUBLISHED_MODEL, TaskSuite

RUN_FILE = "run.json"
DONE_FILE = "done.json"
TABLE_MD = "paper_table.md"
TABLE_JSON = "paper_table.json"
AVG = "Avg"
BASELINE = "original"
MISSING = "—"


def read_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Task -> metrics from the newest ``*_results.json`` under ``folder`` (empty if there is none).

    lmms-eval names the file by the run's start time, so the newest sorts last by name.
    """
    found = sorted(folder.rglob("*_results.json"), key=lambda p: (p.name, str(p)))
    if not found:
        return {}
    try:
        data = json.loads(found[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    results = data.get("results") if isinstance(data, dict) else None
    return {str(k): v for k, v in results.items() if isinstance(v, dict)} if isinstance(results, dict) else {}


@dataclass(frozen=True)
class FinishedRun:
    """A run folder whose ``done.json`` exists.

    Attributes:
        name: Folder name.
        row: Table row key.
        interventions: Its setting in the notation.
        seed: Random-control seed, or None.
        scores: Task -> 0..100 score (tasks whose metric is missing are left out).
    """

    name: str
    row: str
    interventions: str
    seed: int | None
    scores: dict[str, float]


def finished_runs(out: Path, suite: TaskSuite) -> list[FinishedRun]:
    """Every finished lmms-eval run under ``out/runs``, scored with ``suite``'s metrics."""
    found = []
    for folder in sorted((out / "runs").glob("*")):
        record_file, done_file = folder / RUN_FILE, folder / DONE_FILE
        if not (record_file.is_file() and done_file.is_file()):
            continue
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("kind") != "lmms":
            continue
        results = read_results(folder)
        scores = {}
        for task in record.get("tasks", []):
            metric = suite.metrics.get(task)
            value = metric.score(results.get(task, {})) if metric is not None else None
            if value is not None:
                scores[task] = value
        found.append(
            FinishedRun(
                name=folder.name,
                row=str(record.get("row", "")),
                interventions=str(record.get("interventions", "")),
                seed=record.get("seed"),
                scores=scores,
            )
        )
    return found


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def _averages(scores: dict[str, float], suite: TaskSuite) -> dict[str, tuple[float | None, int]]:
    """Group -> (mean over its present tasks, tasks present); ``Avg`` -> (mean over present groups, groups)."""
    out: dict[str, tuple[float | None, int]] = {}
    for group, tasks in suite.groups.items():
        present = [scores[t] for t in tasks if t in scores]
        out[group] = (_mean(present), len(present))
    groups = [value for value, _ in out.values() if value is not None]
    out[AVG] = (_mean(groups), len(groups))
    return out


def rollup(
    out: Path, suite: TaskSuite, rows: Sequence[tuple[str, str]], *, model: str = "", profile: str = ""
) -> dict[str, Any]:
    """The paper's table as JSON-ready data.

    Args:
        out: The reproduce output folder.
        suite: Tasks, groups and metrics.
        rows: ``(row key, label)`` in table order; rows with no finished run still appear, empty.
        model, profile: For the title.
    """
    by_row: dict[str, list[FinishedRun]] = defaultdict(list)
    for run in finished_runs(out, suite):
        by_row[run.row].append(run)
    columns = [*suite.groups, AVG]
    table_rows = []
    for key, label in rows:
        runs = by_row.get(key, [])
        per_seed: dict[int | None, dict[str, float]] = defaultdict(dict)
        for run in runs:
            per_seed[run.seed].update(run.scores)
        seeds = sorted((s for s in per_seed if s is not None), key=int)
        averages = [_averages(per_seed[s], suite) for s in (seeds or list(per_seed))]
        cells = {}
        for column in columns:
            values = [a[column][0] for a in averages if a[column][0] is not None]
            counts = [a[column][1] for a in averages]
            cells[column] = {
                "mean": _mean(values),
                "sd": float(statistics.stdev(values)) if len(values) > 1 else None,
                "n": len(values),
                "held": max(counts) if counts else 0,
                "of": len(suite.groups[column]) if column != AVG else len(suite.groups),
                "paper": PUBLISHED.get(key, {}).get(column),
            }
        tasks = {}
        for task in suite.tasks:
            values = [per_seed[s][task] for s in per_seed if task in per_seed[s]]
            tasks[task] = {"mean": _mean(values), "sd": float(statistics.stdev(values)) if len(values) > 1 else None}
        interventions = sorted({run.interventions for run in runs})
        table_rows.append(
            {
                "row": key,
                "label": label,
                "interventions": interventions,
                "seeds": seeds,
                "runs": len(runs),
                "columns": cells,
                "tasks": tasks,
            }
        )
    base = next((r for r in table_rows if r["row"] == BASELINE), None)
    for row in table_rows:
        for column, cell in row["columns"].items():
            reference = base["columns"][column]["mean"] if base is not None else None
            cell["delta"] = cell["mean"] - reference if cell["mean"] is not None and reference is not None else None
    return {
        "model": model,
        "profile": profile,
        "columns": columns,
        "groups": {name: list(tasks) for name, tasks in suite.groups.items()},
        "metrics": {
            task: {"metrics": list(m.metrics), "scale": m.scale, "note": m.note} for task, m in suite.metrics.items()
        },
        "published_model": PUBLISHED_MODEL,
        "rows": table_rows,
        "notes": notes(),
    }


def notes() -> list[str]:
    """How the table's numbers are made, and where they differ from the reference's."""
    return [
        "Scores are 0..100. A group average is the mean of its tasks' scores; Avg is the mean of the group "
        "averages (the paper's Avg column). A cell over fewer tasks or groups than the paper's says so as [k/N].",
        "MME: (perception + cognition) / 2800 x 100. The paper does not publish how it folds MME's two scores into "
        "a 0..100 average; this choice can move General against the paper's figure.",
        "Seeded rows (the random control) are mean ± sample sd over seeds; deltas are against 'original'.",
        "Group targets follow the reference's membership rule (match=member: every token whose top-3 nearest "
        "input-embedding ids hold the group's anchor, whatever else they hold), not the labels with precedence.",
        "Pruned tokens keep their original RoPE positions (gaps remain; decoding continues the unpruned "
        "numbering), as in the reference.",
        "MMBench-en dev and HallusionBench use an OpenAI model in lmms-eval's scoring (answer extraction, "
        "grading); without an API key their scores are missing or differ.",
        f"The paper's figures are for {PUBLISHED_MODEL} in the reference implementation (original LLaVA code, "
        "its lmms-eval fork).",
    ]


def _number(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return MISSING
    text = f"{cell['mean']:.1f}" + (f" ± {cell['sd']:.1f}" if cell["sd"] is not None else "")
    if cell["held"] < cell["of"]:
        text += f" [{cell['held']}/{cell['of']}]"
    if cell.get("delta") is not None:
        text += f" ({cell['delta']:+.1f})"
    return text


def _task_cell(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return MISSING
    return f"{cell['mean']:.1f}" + (f" ± {cell['sd']:.1f}" if cell["sd"] is not None else "")


def render_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: groups with deltas and the paper's figures, then per-task scores, then notes."""
    title = f"# Paper table: {table['model'] or 'model'}" + (
        f" (profile {table['profile']})" if table["profile"] else ""
    )
    columns = table["columns"]
    lines = [
        title,
        "",
        f"Ours (delta vs original) | the paper's figure for {table['published_model']} where published. "
        f"{MISSING} = no finished run.",
        "",
        "| setting | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in table["rows"]:
        label = row["label"] + (f" ({len(row['seeds'])} seeds)" if row["seeds"] else "")
        cells = []
        for column in columns:
            cell = row["columns"][column]
            paper = f" \\| {cell['paper']:.1f}" if cell["paper"] is not None else ""
            cells.append(_number(cell) + paper)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tasks = [task for group in table["groups"].values() for task in group]
    lines += ["", "## Per task", "", "| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in table["rows"]:
        values = [_task_cell(row["tasks"][task]) for task in tasks]
        lines.append(f"| {row['label']} | " + " | ".join(values) + " |")
    lines += ["", "## Metrics", ""]
    lines += [f"- {task}: {', '.join(m['metrics'])} — {m['note']}" for task, m in table["metrics"].items()]
    lines += ["", "## Notes", "", *(f"- {note}" for note in table["notes"]), ""]
    return "\n".join(lines)


def write_table(
    out: Path, suite: TaskSuite, rows: Sequence[tuple[str, str]], *, model: str = "", profile: str = ""
) -> tuple[Path, Path]:
    """Roll up ``out`` and write ``paper_table.md`` and ``paper_table.json`` there (atomically)."""
    table = rollup(out, suite, rows, model=model, profile=profile)
    md, data = out / TABLE_MD, out / TABLE_JSON
    atomic_write_text(data, json.dumps(table, ensure_ascii=False, indent=1))
    atomic_write_text(md, render_markdown(table))
    return md, data
