"""The ``embedlens`` typer app and its entry points, which turn every failure a user can cause into one line.

* Problems with the input (:class:`~embedlens.errors.EmbedLensError`) and bad command lines (typer's
  usage errors and the option types of :mod:`embedlens.cli.options`): ``embedlens: error: ...`` on
  stderr, exit code 2.
* File-system errors (read-only or full disk, a directory where a file should go, ...): one line naming
  the path and the reason, exit code 2. Results are written atomically, so nothing is left half-written.
* Ctrl-C: ``embedlens: interrupted`` (plus how to resume, for the commands that resume), exit code 130.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from embedlens.cli.options import OUT_META_KEY, OptionValueError
from embedlens.errors import EmbedLensError

app = typer.Typer(
    name="embedlens",
    help="What do visual tokens really encode? Probe multimodal LLMs with the embedding lens.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: Commands that continue where an interrupted run stopped when they are run again.
RESUMABLE = frozenset({"stats", "eval", "align", "inject-sweep", "train-mini"})

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


@app.callback()
def _root() -> None:
    """What do visual tokens really encode? Probe multimodal LLMs with the embedding lens."""


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _usage_message(exc: typer.TyperException, command: str | None) -> str:
    """A usage error on one line, pointing at the command's help; a bad value of one of our option types
    reads ``--option must be ..., got ...``."""
    where = f"embedlens {command}" if command else "embedlens"
    param = getattr(exc, "param", None)
    opts = [opt for opt in getattr(param, "opts", None) or [] if opt.startswith("--")]
    if isinstance(exc, OptionValueError) and opts:
        text = f"{opts[0]} {exc.message}"
    else:
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        text = text.replace(": Value error, ", ": ")  # the wording of typer's validators, not ours
    return f"{_one_line(text)} (see '{where} --help')"


def describe_os_error(exc: OSError, out: Path | None = None) -> str:
    """``"<path>: <reason>"`` for a file-system error.

    The path is the destination of a failed rename (``filename2``), else the file named by the error; a
    temporary sibling (``.name.XXXX.tmp``) is reported as its directory. When the error names no file
    (some libraries drop it), the command's ``--out`` is named instead, if known.
    """
    raw = exc.filename2 if exc.filename2 is not None else exc.filename
    path: Path | None = Path(raw) if isinstance(raw, (str, Path)) else None
    if path is not None and path.name.startswith(".") and path.name.endswith(".tmp"):
        path = path.parent
    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    if path is None and out is not None:
        return f"{reason} (writing under {out})"
    return f"{path}: {reason}" if path is not None else reason


def _error(message: str) -> int:
    sys.stderr.write(f"embedlens: error: {message}\n")
    return EXIT_USER_ERROR


def _interrupted(command: str | None) -> int:
    hint = "; rerun the same command to resume" if command in RESUMABLE else ""
    sys.stderr.write(f"embedlens: interrupted{hint}\n")
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    0 on success, 2 for any user error (one line on stderr), 130 when interrupted. With no arguments
    it prints the help.
    """
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not args:
        args = ["--help"]
    group = typer.main.get_command(app)
    ctx: typer.Context | None = None
    try:
        with group.make_context("embedlens", args) as ctx:
            group.invoke(ctx)
    except typer.Exit as exc:  # --help and the like
        return int(exc.exit_code or 0)
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted(ctx.invoked_subcommand if ctx is not None else None)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        sub = getattr(exc, "ctx", None)
        command = sub.info_name if sub is not None and sub.info_name != "embedlens" else None
        return _error(_usage_message(exc, command))
    except EmbedLensError as exc:
        return _error(_one_line(str(exc)))
    except OSError as exc:
        out = ctx.meta.get(OUT_META_KEY) if ctx is not None else None
        return _error(describe_os_error(exc, out))
    return 0


def run() -> None:
    """Console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())
