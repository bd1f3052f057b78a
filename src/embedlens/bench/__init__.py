"""Benchmarks and evaluation: question sets, the patch-compression benchmark, the evaluation runner,
FLOP and latency accounting, and the lmms-eval plugin.

* :mod:`~embedlens.bench.vqa`: question sets (JSONL rows of image, question, answers, type) and their metrics.
* :mod:`~embedlens.bench.patchbench`: the generated patch-compression benchmark (``make-patchbench``).
* :mod:`~embedlens.bench.runner`: evaluation with interventions side by side, resumable (``eval``).
* :mod:`~embedlens.bench.flops` and :mod:`~embedlens.bench.accounting`: theoretical prefill FLOPs and
  measured prefill latency of a setting against the baseline.
* :mod:`~embedlens.bench.lmms_model` and :mod:`~embedlens.bench.lmms_plugin`: the ``embedlens`` model for
  lmms-eval, registered through the ``embedlens.bench.lmms_plugin:manifest`` entry point.
"""
