"""``python -m embedlens.cli``: the same as the ``embedlens`` command."""

from embedlens.cli.app import run

run()
