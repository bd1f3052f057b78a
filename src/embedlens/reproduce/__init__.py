"""``embedlens reproduce``: the paper's experiment set for a model, run through lmms-eval, as the paper's table.

* :mod:`~embedlens.reproduce.paper`: task groups, metrics, document counts, published figures;
* :mod:`~embedlens.reproduce.costs`: predicted prefill FLOPs from a model's config alone;
* :mod:`~embedlens.reproduce.plan`: the experiment set as planned runs with commands;
* :mod:`~embedlens.reproduce.runner`: resumable execution;
* :mod:`~embedlens.reproduce.table`: the roll-up into ``paper_table.md`` / ``paper_table.json``;
* the command line: :mod:`embedlens.cli.reproduce`.
"""
