"""``embedlens report RUN_DIR [RUN_DIR ...] --out report.html`` (``--report`` on the other commands is an
option of :mod:`embedlens.cli.options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedlens.cli.app import app


@app.command()
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Output folders of probe, classify, stats, eval, align or inject-sweep, or anchors JSON files.",
            metavar="RUN_DIR...",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="Heading of the page.")] = "EmbedLens report",
) -> None:
    """Write one self-contained, offline HTML report: patch grids with every token's top-k per layer,
    group statistics, anchors with their evidence, evaluation and sweep tables, alignment profiles."""
    from embedlens.report import write_report

    info = write_report(run_dirs, out, title=title)
    typer.echo(f"wrote {info.path} ({info.bytes / 1e6:.2f} MB; sections: {', '.join(info.sections)})")
