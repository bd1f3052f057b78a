"""What ``embedlens generate`` prints under interventions: tokens per layer, what was removed, and the
prefill FLOPs (and, when timed, latency) against the untouched model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embedlens.context import ModelContext
from embedlens.interventions import Intervention, InterventionRun
from embedlens.models.base import PreparedBatch


def runs_text(values: Sequence[int]) -> str:
    """``[7, 7, 23, 23]`` -> ``"7 (layers 0-1), 23 (layers 2-3)"``."""
    parts, start = [], 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            where = f"layer {start}" if index - 1 == start else f"layers {start}-{index - 1}"
            parts.append(f"{values[start]} ({where})")
            start = index
    return ", ".join(parts)


def accounting_summary(
    context: ModelContext,
    batch: PreparedBatch,
    run: InterventionRun,
    interventions: Sequence[Intervention],
    anchors: Any = None,
    *,
    timing: bool = False,
) -> str:
    """The accounting of the first sample of ``batch`` after ``run``; no final newline.

    With ``timing`` the prefill is also run and timed, untouched and with ``interventions``
    (:func:`embedlens.bench.accounting.account`); otherwise the FLOPs are counted from the run's record.
    """
    from embedlens.bench.accounting import account
    from embedlens.bench.flops import sample_flops

    record = run.last.samples[0]
    lines = [
        f"interventions: {run.describe()}",
        f"tokens per layer: {runs_text(record.tokens_per_layer)} (untouched: {record.length})",
    ]
    if run.plan.prunes:
        lines.append(f"pruned: {len(record.pruned)} of {record.visual} visual tokens")
    lines += [f"seed of {name}: {seed}" for name, seed in record.seeds.items()]
    if record.skipped:
        skipped = ", ".join(
            f"{rows} token{'' if rows == 1 else 's'} at {where}" for where, rows in record.skipped.items()
        )
        lines.append(f"skipped updates: {skipped}")
    if timing:
        found = account(context, batch, list(interventions), measure=True, anchors=anchors)
        flops, baseline = found.flops, found.baseline
    else:
        flops, baseline = sample_flops(context.adapter, record), sample_flops(context.adapter, record, baseline=True)
    lines.append(
        f"prefill FLOPs: {flops.total / 1e9:.2f} G (untouched {baseline.total / 1e9:.2f} G, "
        f"predicted speedup {baseline.total / flops.total:.2f}x; vision {flops.vision / 1e9:.2f} G)"
    )
    if run.plan.skips:
        lines.append("note: skipped updates are computed and then zeroed, so their FLOP saving is not realised")
    if timing:
        lines.append(
            f"prefill time: {found.seconds:.3f} s (untouched {found.baseline_seconds:.3f} s, "
            f"measured speedup {found.measured_speedup:.2f}x)"
        )
    return "\n".join(lines)
