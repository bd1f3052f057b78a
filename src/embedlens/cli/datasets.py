"""Over a dataset of images: ``embedlens stats`` and ``discover-anchors``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedlens.cli.app import app
from embedlens.cli.options import (
    FRACTION,
    POSITIVE_INT,
    AnchorsOpt,
    DatasetArg,
    DatasetPromptOpt,
    ImageBatchOpt,
    ModelArgs,
    ProgressOpt,
    RuleTopKOpt,
    RunArgs,
    file_path,
    model_options,
    out_dir_option,
    remember_out,
    run_options,
)
from embedlens.errors import InputError


def warn_malformed(source: object, problems: list) -> None:
    """One warning line on stderr for the lines of a dataset that could not be used."""
    from embedlens.datasets import describe_problems

    if problems:
        typer.echo(f"embedlens: warning: {source}: {describe_problems(problems)}", err=True)


@app.command()
@model_options
@run_options
def stats(
    models: ModelArgs,
    dataset: DatasetArg,
    out: Annotated[Path, out_dir_option("Result directory (resumes the run it holds, if the settings match).")],
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    prompt: DatasetPromptOpt = None,
    batch_size: ImageBatchOpt = 4,
    bootstrap: Annotated[
        int, typer.Option(parser=POSITIVE_INT, help="Bootstrap resamples of images for the intervals.")
    ] = 1000,
    *,
    runs: RunArgs,
) -> None:
    """Group fractions (with intervals), per-token Parquet and heatmaps over a dataset; resumable.

    Under `accelerate launch` or `torchrun` each process takes a contiguous share of the dataset and
    rank 0 merges the result.
    """
    from embedlens.datasets import open_dataset
    from embedlens.runs import is_main, process_device
    from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message
    from embedlens.taxonomy.printing import stats_summary
    from embedlens.taxonomy.stats import StatsOptions, run_stats

    options = StatsOptions(top_k=top_k, prompt=prompt, batch_size=batch_size, bootstrap=bootstrap)
    data = open_dataset(dataset, exclude=[out])
    chosen = Anchors.load(anchors) if anchors is not None else builtin_anchors(models.model)
    if chosen is None:
        raise InputError(no_builtin_message(models.model))
    session = models.load(device=process_device(models.device))
    # Rows whose prompt holds the model's image placeholder are known once its processor is loaded.
    data = data.without_placeholder(session.adapter.image_placeholder)
    if is_main():
        warn_malformed(dataset, data.malformed)
    summary = run_stats(
        session, data, out, anchors=chosen, options=options, restart=runs.restart, progress=runs.progress
    )
    if summary is not None:  # None on every process but the first, which merges
        typer.echo(stats_summary(summary))
        runs.echo_report(out)


@app.command("discover-anchors")
@model_options
def discover_anchors(
    models: ModelArgs,
    dataset: DatasetArg,
    out: Annotated[
        Path,
        typer.Option(
            parser=file_path, callback=remember_out, help="Anchors JSON file to write (read back by --anchors)."
        ),
    ],
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", parser=POSITIVE_INT, help="Nearest ids looked at per token.")
    ] = 3,
    min_fraction: Annotated[
        float,
        typer.Option(parser=FRACTION, help="An id must recur in at least this share of the images to be a candidate."),
    ] = 0.5,
    prompt: DatasetPromptOpt = None,
    batch_size: Annotated[int, typer.Option(parser=POSITIVE_INT, help="Images per forward pass.")] = 4,
    progress: ProgressOpt = True,
) -> None:
    """Find a model's sink and dead anchor ids over a dataset, with the evidence for each."""
    from embedlens.context import DEFAULT_PROMPT
    from embedlens.datasets import open_dataset
    from embedlens.taxonomy.discover import DiscoveryConfig
    from embedlens.taxonomy.discover import discover_anchors as discover
    from embedlens.taxonomy.printing import discovery_summary

    config = DiscoveryConfig(top_k=top_k, min_image_fraction=min_fraction)
    data = open_dataset(dataset)
    session = models.load()
    data = data.without_placeholder(session.adapter.image_placeholder)
    warn_malformed(dataset, data.malformed)
    prompts = [item.prompt or prompt or DEFAULT_PROMPT for item in data.items]
    found = discover(
        session, [item.image for item in data.items], prompts, config=config, batch_size=batch_size, progress=progress
    )
    found.anchors.save(out)
    typer.echo(discovery_summary(found, out))
