"""Benchmarks and analyses: ``embedlens make-patchbench``, ``eval``, ``align`` and ``inject-sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from embedlens.cli.app import app
from embedlens.cli.datasets import warn_malformed
from embedlens.cli.options import (
    DEFAULT_MODEL,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    AnchorsOpt,
    DatasetArg,
    DatasetPromptOpt,
    EvalArgs,
    ImageBatchOpt,
    ModelArgs,
    ModelOpt,
    ProgressOpt,
    RevisionOpt,
    RuleTopKOpt,
    RunArgs,
    eval_options,
    model_options,
    out_dir_option,
    parse_layer_list,
    quiet_transformers,
    run_options,
)
from embedlens.errors import InputError

if TYPE_CHECKING:
    from embedlens.bench.vqa import QuestionSet
ResumingOutOpt = Annotated[Path, out_dir_option("Result directory (resumes the run it holds, if the settings match).")]


@app.command(name="make-patchbench")
def make_patchbench(
    out: Annotated[Path, out_dir_option("Directory for images/, items.jsonl, control.jsonl and meta.json.")],
    model: ModelOpt = DEFAULT_MODEL,
    per_category: Annotated[int, typer.Option(parser=POSITIVE_INT, help="Items per category.")] = 200,
    categories: Annotated[
        str, typer.Option(help="Comma-separated: object, colour, count, ocr.")
    ] = "object,colour,count,ocr",
    seed: Annotated[int, typer.Option(help="Everything depends only on (seed, category, index).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the benchmark --out already holds.")] = False,
    progress: ProgressOpt = True,
    revision: RevisionOpt = None,
) -> None:
    """Generate the patch-compression benchmark for a model: each target inside exactly one visual token's cell.

    Only the model's processor and config are read (no weights). Every placement is verified by preparing
    the image with and without the target: in every view, only the target cells' pixels may change.
    """
    from embedlens.bench.patchbench import generate_benchmark
    from embedlens.bench.patchgeom import processor_adapter
    from embedlens.models.registry import load_config, load_processor, resolve

    chosen = tuple(part.strip() for part in categories.split(",") if part.strip())
    quiet_transformers()
    resolved = resolve(model, revision)
    config = load_config(resolved)
    adapter = processor_adapter(config, load_processor(resolved), source=resolved.name)
    meta = generate_benchmark(
        out,
        adapter,
        per_category=per_category,
        categories=chosen,
        seed=seed,
        model=model,
        progress=progress,
        overwrite=overwrite,
    )
    geometry = meta["geometry"]
    views = ", ".join(geometry["views"])
    typer.echo(
        f"wrote {meta['items']} items ({', '.join(f'{k} {v}' for k, v in meta['counts'].items())}) for a "
        f"{geometry['rows']}x{geometry['cols']} grid of {geometry['patch']} px patches (one visual token each; views: "
        f"{views}) to {out}"
    )
    typer.echo(f"evaluate: embedlens eval {out} --out RESULTS --model {model} [--preset paper-pruning]")


def _read_question_sets(paths: list[Path]) -> list[QuestionSet]:
    """Each question file or bench folder, warning once per file about lines that could not be used."""
    from embedlens.bench.vqa import read_questions

    sets = [read_questions(path) for path in paths]
    for questions in sets:
        warn_malformed(questions.source, questions.skipped)
    return sets


@app.command(name="eval")
@model_options
@run_options
@eval_options
def eval_(
    models: ModelArgs,
    dataset: Annotated[
        Path, typer.Argument(help="JSONL of {image, question, answers, type, category}, or a make-patchbench folder.")
    ],
    out: ResumingOutOpt,
    intervention: Annotated[
        list[str],
        typer.Option(
            help="A setting to compare with the baseline, repeatable: interventions separated by spaces "
            "or ';', e.g. 'prune:dead' or 'prune:sink inject@8'."
        ),
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    preset: Annotated[str | None, typer.Option(help="Named settings: paper-pruning.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds of the preset's random control, comma-separated.")] = "0,1,2,3,4",
    *,
    evals: EvalArgs,
    runs: RunArgs,
) -> None:
    """Evaluate the baseline and intervention settings side by side, in one run and code path; resumable."""
    from embedlens.bench.runner import parse_setting, render_markdown, run_eval
    from embedlens.bench.runner import preset as preset_settings

    settings = [parse_setting(text) for text in intervention]
    if preset is not None:
        try:
            seed_list = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise InputError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        settings = preset_settings(preset, seed_list) + settings
    options = evals.options()
    [questions] = _read_question_sets([dataset])
    from embedlens.runs import process_device

    checked = [setting.interventions for setting in settings]
    session = models.load(settings=checked, device=process_device(models.device))
    table = run_eval(session, questions, settings, out, options=options, restart=runs.restart, progress=runs.progress)
    if table is None:  # every process but the first, which merges and writes the tables
        return
    typer.echo(render_markdown(table), nl=False)
    typer.echo(f"wrote {out / 'items.parquet'}, {out / 'table.md'} and {out / 'table.json'}")
    runs.echo_report(out)


@app.command()
@model_options
@run_options
def align(
    models: ModelArgs,
    dataset: DatasetArg,
    out: ResumingOutOpt,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    lens_top_k: Annotated[int, typer.Option(parser=POSITIVE_INT, help="Lens neighbours read for readability.")] = 5,
    lens_layers: Annotated[
        str, typer.Option(help="Layers whose readability is measured: all, or e.g. 0,8,16 or 0-30:2.")
    ] = "all",
    text: Annotated[
        Path | None, typer.Option(help="Reference passages, one per line (default: the packaged sentences).")
    ] = None,
    prompt: DatasetPromptOpt = None,
    batch_size: ImageBatchOpt = 4,
    *,
    runs: RunArgs,
) -> None:
    """Where visual tokens belong in the LLM: norms, alignment to text states and readability per layer."""
    from embedlens.analysis.alignment import AlignOptions, run_align
    from embedlens.datasets import open_dataset
    from embedlens.runs import is_main, process_device

    options = AlignOptions(
        prompt=prompt,
        anchors=str(anchors) if anchors is not None else None,
        rule_top_k=top_k,
        lens_top_k=lens_top_k,
        lens_layers=parse_layer_list(lens_layers, "--lens-layers"),
        text=str(text) if text is not None else None,
        batch_size=batch_size,
    )
    data = open_dataset(dataset, exclude=[out])
    session = models.load(device=process_device(models.device))
    data = data.without_placeholder(session.adapter.image_placeholder)
    if is_main():
        warn_malformed(dataset, data.malformed)
    result = run_align(session, data, out, options=options, restart=runs.restart, progress=runs.progress)
    if result is None:  # every process but the first, which merges and writes the tables
        return
    typer.echo((out / "table.md").read_text(encoding="utf-8"), nl=False)
    if result.unreadable:
        typer.echo(f"skipped {len(result.unreadable)} unreadable image(s), first: {result.unreadable[0]}")
    typer.echo(f"wrote {out}/layers.parquet, summary.json, table.md, norms.png, alignment.png, readability.png")
    runs.echo_report(out)


@app.command("inject-sweep")
@model_options
@run_options
@eval_options
def inject_sweep(
    models: ModelArgs,
    datasets: Annotated[
        list[Path],
        typer.Argument(help="One or more JSONL question files or make-patchbench folders, each evaluated in full."),
    ],
    out: Annotated[Path, out_dir_option("Result directory (resumes the evaluations it holds).")],
    layers: Annotated[str, typer.Option(help="Injection layers: all, or e.g. 0,4,8 or 0-28:4.")] = "all",
    skip_until: Annotated[
        int | None,
        typer.Option(help="Comparison row: skip visual attention+MLP in layers below this (default: half; 0: none)."),
    ] = None,
    scales: Annotated[str, typer.Option(help="Norm-scaling experiment: comma-separated scales ('' for none).")] = (
        "0.01,0.1,1"
    ),
    best_layer: Annotated[
        int | None, typer.Option(help="Injection layer of the scaling experiment (default: the sweep's best).")
    ] = None,
    timing_items: Annotated[
        int, typer.Option(parser=NON_NEGATIVE_INT, help="Questions whose prefill is timed per setting (0: none).")
    ] = 4,
    timing_repeats: Annotated[
        int, typer.Option(parser=NON_NEGATIVE_INT, help="Timed rounds per question and setting (median).")
    ] = 3,
    *,
    evals: EvalArgs,
    runs: RunArgs,
) -> None:
    """Accuracy, FLOPs and prefill time for every injection layer, with the baseline; then norm scaling."""
    from embedlens.analysis.sweep import SweepOptions, run_inject_sweep

    try:
        scale_list = tuple(float(part) for part in scales.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--scales must be comma-separated numbers, got {scales!r}") from None
    options = SweepOptions(
        layers=parse_layer_list(layers, "--layers"),
        skip_until=skip_until,
        scales=scale_list,
        best_layer=best_layer,
        timing_items=timing_items,
        timing_repeats=timing_repeats,
        eval=evals.options(),
    )
    if options.scales and options.best_layer is None and options.layers is not None and max(options.layers) == 0:
        typer.echo(
            f"embedlens: warning: --layers {layers} has no injection layer above 0, so the norm-scaling "
            "experiment is skipped (pass --best-layer N to run it)",
            err=True,
        )
    question_sets = _read_question_sets(datasets)
    session = models.load()
    result = run_inject_sweep(
        session, question_sets, out, options=options, restart=runs.restart, progress=runs.progress
    )
    typer.echo((out / "sweep.md").read_text(encoding="utf-8"), nl=False)
    if result.scaling_rows:
        typer.echo("")
        typer.echo((out / "scaling.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(
        f"wrote {out}/sweep.parquet, sweep.md, sweep.json, sweep.png" + (", scaling.md" if result.scaling_rows else "")
    )
    runs.echo_report(out)
