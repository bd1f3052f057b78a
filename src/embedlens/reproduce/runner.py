"""Run the planned experiment set: resumable, one subprocess per run, then the paper's table.

Layout of the output folder::

    OUT/plan.json            assumptions and every planned run (rewritten each time)
    OUT/commands.sh          every command of the plan, in order, with what became of it
    OUT/stats/               the stats stage (``embedlens stats`` resumes there by itself)
    OUT/runs/<name>/run.json the run's record (row, group, seed, tasks, command)
    OUT/runs/<name>/log.txt  its stdout and stderr
    OUT/runs/<name>/lmms/    lmms-eval's output
    OUT/runs/<name>/done.json  written last, atomically: the run is finished
    OUT/paper_table.md/.json the roll-up

A rerun skips every run whose ``done.json`` holds the same command, and refuses a folder whose finished
run was made with another command (choose another ``--out``). An unfinished run's lmms-eval output is
removed before it starts again, so a folder never holds two results of one run.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedlens.errors import EmbedLensError, InputError
from embedlens.files import atomic_write_text
from embedlens.reproduce.costs import CostModel, Shares
from embedlens.reproduce.plan import (
    BEST,
    INJECT_GROUPS,
    PlannedRun,
    PlanOptions,
    assumptions,
    build_plan,
    paper_rows,
    run_dir,
)
from embedlens.reproduce.table import DONE_FILE, RUN_FILE, finished_runs, write_table

PLAN_FILE = "plan.json"
COMMANDS_FILE = "commands.sh"
LOG_FILE = "log.txt"
STATS_SUMMARY = Path("stats") / "summary.json"


@dataclass
class Outcome:
    """What a call of :func:`run_all` did.

    Attributes:
        ran: Runs started and finished now.
        skipped: Runs finished earlier.
        failed: Runs whose command failed (name -> log file).
        pending: Runs that could not run yet.
        table: The Markdown and JSON tables written.
    """

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, Path] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    table: tuple[Path, Path] | None = None


def current_shares(out: Path) -> Shares:
    """Measured shares if the stats stage has finished in ``out``, else the paper's."""
    summary = out / STATS_SUMMARY
    return Shares.from_stats(summary) if summary.is_file() else Shares.paper()


def best_layer(out: Path, options: PlanOptions) -> int | None:
    """The injection layer with the best injection-group average (ties: the lowest), once every sweep run
    and the baseline (layer 0) have finished for those groups; None before."""
    wanted = [f"inject@{k}" for k in options.inject_layers if k > 0]
    groups = [g for g in INJECT_GROUPS if options.suite.groups.get(g)]
    tasks = [t for g in groups for t in options.suite.groups[g]]
    if not wanted or not tasks:
        return None
    scores: dict[int, list[float]] = {}
    for run in finished_runs(out, options.suite):
        if run.row in (*wanted, "original") and any(t in run.scores for t in tasks):
            layer = 0 if run.row == "original" else int(run.row.split("@")[1])
            scores.setdefault(layer, []).extend(run.scores[t] for t in tasks if t in run.scores)
    needed = {0, *(k for k in options.inject_layers if k > 0)}
    if not needed <= set(scores):
        return None
    return max(sorted(needed), key=lambda k: sum(scores[k]) / len(scores[k]))


def table_rows(runs: list[PlannedRun], options: PlanOptions) -> list[tuple[str, str]]:
    """``(row key, label)`` of the planned rows, in table order (the best-k row names its layer)."""
    planned = {run.row: run for run in runs if run.kind == "lmms"}
    rows = []
    for row in paper_rows(options.inject_layers):
        if row.key in planned:
            label = row.label
            if BEST in row.key and not planned[row.key].pending:
                label = f"norm x0.01, inject at layer {planned[row.key].interventions.split('@')[1].split(',')[0]}"
            rows.append((row.key, label))
    return rows


def plan_now(options: PlanOptions, cost: CostModel) -> list[PlannedRun]:
    """The plan as the output folder stands: measured shares and the sweep's best layer where known."""
    return build_plan(options, cost, current_shares(options.out), best_layer=best_layer(options.out, options))


def write_plan(options: PlanOptions, cost: CostModel, runs: list[PlannedRun]) -> Path:
    """Write ``plan.json`` (assumptions and runs), atomically."""
    data = {
        "assumptions": assumptions(options, cost, current_shares(options.out)),
        "runs": [run.to_dict() for run in runs],
    }
    target = options.out / PLAN_FILE
    atomic_write_text(target, json.dumps(data, ensure_ascii=False, indent=1, default=str))
    return target


def _status(run: PlannedRun, out: Path) -> str:
    """``"done"`` (finished with this command), ``"pending"`` or ``"todo"``; refuses a foreign finished run."""
    if run.pending:
        return "pending"
    done = run_dir(out, run.name) / DONE_FILE
    if not done.is_file():
        return "todo"
    try:
        stored = json.loads(done.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError):
        stored = None
    if stored != run.command:
        raise InputError(
            f"{out} holds a finished run {run.name} made with another command; choose another --out "
            f"(or delete {run_dir(out, run.name)} to redo it)"
        )
    return "done"


def write_commands(out: Path, runs: list[PlannedRun], status: Mapping[str, str]) -> Path:
    """Write ``commands.sh``: every planned command in order, each under a comment saying what became of it."""
    lines = ["#!/bin/sh", "# Commands of `embedlens reproduce`, in order; each line's comment says its state.", ""]
    for run in runs:
        state = status.get(run.name, "planned")
        lines.append(f"# {run.name}: {state}" + (f" ({run.pending})" if run.pending else ""))
        lines.append(("# " if run.pending else "") + run.shell())
        lines.append("")
    target = out / COMMANDS_FILE
    atomic_write_text(target, "\n".join(lines))
    return target


def _execute(run: PlannedRun, out: Path, env: Mapping[str, str] | None) -> tuple[int, float]:
    """Run one command with its output in the run's log; (exit status, seconds)."""
    folder = run_dir(out, run.name)
    if run.kind == "lmms" and (folder / "lmms").exists():
        shutil.rmtree(folder / "lmms")  # an unfinished earlier attempt
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RUN_FILE, json.dumps(run.to_dict(), ensure_ascii=False, indent=1, default=str))
    started = time.perf_counter()
    with open(folder / LOG_FILE, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(run.command)}\n")
        log.flush()
        try:
            done = subprocess.run(
                run.command, stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ), check=False
            )
        except OSError as exc:
            log.write(f"cannot start: {exc}\n")
            return 127, time.perf_counter() - started
    return done.returncode, time.perf_counter() - started


def _finish(run: PlannedRun, out: Path, seconds: float) -> str | None:
    """Write ``done.json`` if the run left what it should; otherwise say what is missing."""
    folder = run_dir(out, run.name)
    if run.kind == "lmms" and not list((folder / "lmms").rglob("*_results.json")):
        return "lmms-eval wrote no *_results.json"
    if run.kind == "stats" and not (out / STATS_SUMMARY).is_file():
        return f"the stats stage wrote no {STATS_SUMMARY}"
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data: dict[str, Any] = {"command": run.command, "seconds": round(seconds, 3), "finished": finished}
    atomic_write_text(folder / DONE_FILE, json.dumps(data, ensure_ascii=False, indent=1))
    return None


def run_all(
    options: PlanOptions,
    cost: CostModel,
    *,
    echo: Callable[[str], None] = lambda line: None,
    env: Mapping[str, str] | None = None,
) -> Outcome:
    """Run every planned run not finished yet, in order, then write the paper's table.

    The plan is rebuilt after the stats stage (measured shares) and before the run that needs the
    injection sweep's best layer. A failed run is reported and the others go on.

    Args:
        options: What to run.
        cost: The model's cost model (FLOPs in the plan).
        echo: Receives one line per run started, skipped, finished or failed.
        env: Environment of the subprocesses (default: this process's).

    Raises:
        InputError: ``--out`` holds finished runs made with other commands.
        EmbedLensError: Some runs failed (after the table is written).
    """
    options.out.mkdir(parents=True, exist_ok=True)
    runs = plan_now(options, cost)
    names = {"done": "finished earlier", "todo": "not run yet", "pending": "pending"}
    status = {run.name: names[_status(run, options.out)] for run in runs}
    write_plan(options, cost, runs)
    write_commands(options.out, runs, status)
    outcome = Outcome()
    index = 0
    while index < len(runs):
        run = runs[index]
        total = len(runs)
        if run.pending:
            runs = plan_now(options, cost)  # the sweep may have finished since the plan was made
            run = next((r for r in runs if r.name == run.name), None)
            if run is None:  # best layer 0: the row is the plain scale row
                continue
            if run.pending:
                echo(f"[{index + 1}/{total}] pending {run.name}: {run.pending}")
                outcome.pending.append(run.name)
                index += 1
                continue
        state = _status(run, options.out)
        if state == "done":
            echo(f"[{index + 1}/{total}] done earlier: {run.name}")
            outcome.skipped.append(run.name)
            status[run.name] = "finished earlier"
            index += 1
            continue
        what = "group shares" if run.kind == "stats" else f"{run.interventions or 'baseline'} on {','.join(run.tasks)}"
        echo(f"[{index + 1}/{total}] start {run.name}: {what}")
        status[run.name] = "started"
        write_commands(options.out, runs, status)
        code, seconds = _execute(run, options.out, env)
        problem = f"exit status {code}" if code != 0 else _finish(run, options.out, seconds)
        log = run_dir(options.out, run.name) / LOG_FILE
        if problem is None:
            echo(f"[{index + 1}/{total}] finished {run.name} in {seconds:.1f} s")
            outcome.ran.append(run.name)
            status[run.name] = f"finished in {seconds:.1f} s"
            if run.kind == "stats":  # measured shares change the predicted FLOPs of every later run
                runs = plan_now(options, cost)
                write_plan(options, cost, runs)
        else:
            echo(f"[{index + 1}/{total}] FAILED {run.name} ({problem}); see {log}")
            outcome.failed[run.name] = log
            status[run.name] = f"failed ({problem})"
        write_commands(options.out, runs, status)
        index += 1
    write_plan(options, cost, runs)
    write_commands(options.out, runs, status)
    outcome.table = write_table(
        options.out, options.suite, table_rows(runs, options), model=options.model, profile=options.profile
    )
    if outcome.failed:
        names = ", ".join(outcome.failed)
        raise EmbedLensError(f"{len(outcome.failed)} run(s) failed: {names}; the logs are in their run folders")
    return outcome
