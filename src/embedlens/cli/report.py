"""``embedlens report RUN_DIR [RUN_DIR ...] --out report.html``, and ``--report`` on the other commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedlens.cli.app import app
from embedlens.cli.options import ReportOpt as ReportOpt  # re-exported: ``--report`` is declared in options
from embedlens.errors import InputError


def write_run_report(out: Path | None) -> Path:
    """Write ``out/report.html`` for the run in ``out``; the path written.

    Raises:
        InputError: When no output folder was given.
    """
    from embedlens.report import write_report

    if out is None:
        raise InputError("--report writes OUT/report.html: give --out")
    return write_report([out], out / "report.html").path


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
