"""The ``embedlens reproduce`` command: plan, run and tabulate the paper's experiment set for a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedlens.cli.app import app
from embedlens.cli.options import POSITIVE_FLOAT, POSITIVE_INT, AnchorsOpt
from embedlens.errors import InputError
from embedlens.reproduce.paper import PAPER_SUITE
from embedlens.reproduce.plan import STAGES, THROUGHPUT, PlanOptions


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; one clear error for anything else."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            values.append(int(part))
        except ValueError:
            raise InputError(f"{option} takes comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise InputError(f"{option} takes non-negative integers, got {text!r}")
    return tuple(dict.fromkeys(values))


def parse_tasks(text: str) -> tuple[str, ...]:
    """``all``, or comma-separated task and group names (``General,pope``) -> the paper's task names."""
    if text.strip().lower() == "all":
        return PAPER_SUITE.tasks
    chosen: list[str] = []
    groups = {name.lower(): tasks for name, tasks in PAPER_SUITE.groups.items()}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part in PAPER_SUITE.metrics:
            chosen.append(part)
        elif part.lower() in groups:
            chosen.extend(groups[part.lower()])
        else:
            raise InputError(
                f"unknown task {part!r}; use all, a group ({', '.join(PAPER_SUITE.groups)}) or a task: "
                + ", ".join(PAPER_SUITE.tasks)
            )
    if not chosen:
        raise InputError("--tasks names no task")
    return tuple(dict.fromkeys(chosen))


@app.command()
def reproduce(
    model_arg: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="Built-in name, directory or hub id (or --model).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Built-in name, directory or hub id.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Image folder for the stats stage (group shares); none: the paper's shares.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder (a rerun skips finished runs).")] = Path("reproduce"),
    profile: Annotated[str, typer.Option(help="EmbedLens profile the model runs under.")] = "paper",
    tasks: Annotated[str, typer.Option(help="all, or comma-separated groups / lmms-eval tasks.")] = "all",
    experiments: Annotated[str, typer.Option(help=f"Stages to run: all, or some of {', '.join(STAGES)}.")] = "all",
    seeds: Annotated[str, typer.Option(help="Seeds of the random control, comma-separated.")] = "0,1,2",
    inject_layers: Annotated[str, typer.Option(help="Layers of the injection sweep, comma-separated.")] = (
        "0,2,4,8,12,16"
    ),
    anchors: AnchorsOpt = None,
    limit: Annotated[
        int | None, typer.Option(parser=POSITIVE_INT, help="Documents per task (lmms-eval --limit), for a smoke run.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and its cost; load no weights.")] = False,
    num_processes: Annotated[
        int,
        typer.Option(parser=POSITIVE_INT, help="Processes (GPUs) per run; above 1 runs go through accelerate launch."),
    ] = 1,
    batch_size: Annotated[int, typer.Option(parser=POSITIVE_INT, help="Questions per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ... (one-process runs).")] = "auto",
    include_path: Annotated[Path | None, typer.Option(help="Extra lmms-eval task folder (--include_path).")] = None,
    text_tokens: Annotated[
        int, typer.Option(parser=POSITIVE_INT, help="Nominal text tokens per sample for the FLOPs.")
    ] = 64,
    throughput: Annotated[
        float, typer.Option(parser=POSITIVE_FLOAT, help="Sustained TFLOP/s the GPU-hour estimate assumes.")
    ] = (THROUGHPUT / 1e12),
) -> None:
    """Run the paper's experiment set through lmms-eval and write its table (paper_table.md / .json).

    Stages: group shares on --images (stats), the baseline, pruning sinks, pruning dead tokens with the
    matched random control over --seeds, LLM-sink sublayer skipping, and the injection sweep with the
    norm experiment on the CV-centric tasks. Each run writes its own folder under --out and a done-marker;
    a rerun skips finished runs. --dry-run prints every run with its predicted prefill FLOPs and command.
    """
    from embedlens.profiles import get_profile
    from embedlens.reproduce.costs import cost_model
    from embedlens.reproduce.plan import render
    from embedlens.reproduce.runner import current_shares, plan_now, run_all

    if model_arg is not None and model is not None and model_arg != model:
        raise InputError(f"two models given: {model_arg!r} and --model {model!r}")
    name = model_arg or model
    if name is None:
        raise InputError("name a model: embedlens reproduce MODEL (e.g. llava-hf/llava-1.5-7b-hf)")
    get_profile(profile)  # refuse an unknown profile before anything runs
    stages = STAGES
    if experiments.strip().lower() != "all":
        stages = tuple(dict.fromkeys(p.strip() for p in experiments.split(",") if p.strip()))
    if images is not None and not images.is_dir():
        raise InputError(f"--images {images} is not a folder")
    if anchors is not None and not anchors.is_file():
        raise InputError(f"--anchors {anchors} is not a file")
    if include_path is not None and not include_path.is_dir():
        raise InputError(f"--include-path {include_path} is not a folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if throughput <= 0:
        raise InputError(f"--throughput must be positive, got {throughput}")
    options = PlanOptions(
        model=name,
        out=out,
        profile=profile,
        suite=PAPER_SUITE.restricted(parse_tasks(tasks)),
        stages=stages,
        seeds=parse_ints(seeds, "--seeds"),
        inject_layers=parse_ints(inject_layers, "--inject-layers"),
        images=images,
        anchors=anchors.resolve() if anchors is not None else None,
        limit=limit,
        num_processes=num_processes,
        batch_size=batch_size,
        device=device,
        include_path=include_path.resolve() if include_path is not None else None,
        throughput=throughput * 1e12,
    )
    cost = cost_model(name, text_tokens=text_tokens, prefix_tokens=min(35, text_tokens))
    if dry_run:
        typer.echo(render(plan_now(options, cost), options, cost, current_shares(out)))
        return
    outcome = run_all(options, cost, echo=lambda line: typer.echo(line, err=True))
    if outcome.table is not None:
        for path in outcome.table:
            typer.echo(f"wrote {path}")
    if outcome.pending:
        typer.echo(f"pending (rerun to finish): {', '.join(outcome.pending)}")
