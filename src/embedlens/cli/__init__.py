"""The ``embedlens`` command line: one module per group of commands, shared option types in
:mod:`embedlens.cli.options`, the app and its error handling in :mod:`embedlens.cli.app`.

User errors (bad paths, unreadable images, unsupported models, out-of-range layers, file-system
errors, ...) end with one line on stderr and exit code 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

# Each module registers its commands; ``--help`` lists them in this order.
# isort: off
from embedlens.cli import probe  # noqa: F401
from embedlens.cli import datasets, evaluation, report, reproduce, train  # noqa: F401

# isort: on
from embedlens.cli.app import app, main, run
from embedlens.cli.options import DEFAULT_MODEL, parse_layer_list

__all__ = ["DEFAULT_MODEL", "app", "main", "parse_layer_list", "run"]
