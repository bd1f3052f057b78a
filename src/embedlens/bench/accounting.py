"""What interventions cost and save: FLOPs and tokens per layer, with measured prefill latency beside them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from embedlens.bench.flops import FlopCount, sample_flops
from embedlens.errors import InputError
from embedlens.interventions import Intervention, describe, intervene
from embedlens.interventions.records import InterventionRun
from embedlens.models.base import PreparedBatch

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors


@dataclass
class Accounting:
    """Prefill cost of one sample under a set of interventions, against the untouched model.

    Attributes:
        interventions: The interventions, in the text notation ("none" when empty).
        flops: FLOPs under the interventions.
        baseline: FLOPs of the untouched model on the same input.
        seconds: Measured prefill latency under the interventions (median), or None if not measured.
        baseline_seconds: Measured prefill latency of the untouched model (median), or None.
    """

    interventions: str
    flops: FlopCount
    baseline: FlopCount
    seconds: float | None = None
    baseline_seconds: float | None = None

    @property
    def predicted_speedup(self) -> float:
        """Baseline FLOPs / FLOPs under the interventions."""
        return self.baseline.total / self.flops.total

    @property
    def measured_speedup(self) -> float | None:
        """Baseline latency / latency under the interventions, when both were measured."""
        if self.seconds is None or self.baseline_seconds is None:
            return None
        return self.baseline_seconds / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "interventions": self.interventions,
            "flops": self.flops.to_dict(),
            "baseline_flops": self.baseline.to_dict(),
            "predicted_speedup": self.predicted_speedup,
            "prefill_seconds": self.seconds,
            "baseline_prefill_seconds": self.baseline_seconds,
            "measured_speedup": self.measured_speedup,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_once(session: ModelContext, batch: PreparedBatch) -> None:
    """One prefill as ``generate`` runs it: the whole prompt, a KV cache, logits of the last token."""
    with torch.inference_mode():
        session.model(**batch.inputs, use_cache=True, logits_to_keep=1)


def timed_prefill(session: ModelContext, batch: PreparedBatch) -> float:
    """Wall-clock seconds of one prefill (:func:`prefill_once`), the device synchronised before and
    after so that queued GPU work is neither counted nor missed."""
    device = session.adapter.device
    _sync(device)
    start = time.perf_counter()
    prefill_once(session, batch)
    _sync(device)
    return time.perf_counter() - start


def time_prefill(
    session: ModelContext,
    batch: PreparedBatch,
    interventions: Sequence[Intervention] = (),
    *,
    repeats: int = 5,
    warmup: int = 1,
    anchors: Anchors | str | None = None,
) -> tuple[float, InterventionRun]:
    """Median wall-clock seconds of ``repeats`` prefills of ``batch`` under ``interventions``.

    Returns the median and the run (its records tell the tokens per layer of the last prefill).
    """
    if repeats < 1 or warmup < 0:
        raise InputError(f"timing needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    times = []
    with intervene(session, interventions, anchors=anchors) as run:
        for index in range(warmup + repeats):
            elapsed = timed_prefill(session, batch)
            if index >= warmup:
                times.append(elapsed)
    return statistics.median(times), run


def account(
    session: ModelContext,
    batch: PreparedBatch,
    interventions: Sequence[Intervention] = (),
    *,
    measure: bool = False,
    repeats: int = 3,
    anchors: Anchors | str | None = None,
) -> Accounting:
    """FLOPs (and, with ``measure``, prefill latency) of the first sample of ``batch``, with the baseline.

    Without ``measure`` a single prefill runs under the interventions to learn which tokens each layer
    sees; with it, the untouched model and the intervened one are each timed ``repeats`` times
    (medians), the baseline first.
    """
    baseline_seconds = seconds = None
    if measure:
        baseline_seconds, _ = time_prefill(session, batch, (), repeats=repeats, anchors=anchors)
        seconds, run = time_prefill(session, batch, interventions, repeats=repeats, anchors=anchors)
    else:
        with intervene(session, interventions, anchors=anchors) as run:
            prefill_once(session, batch)
    record = run.last.samples[0]
    return Accounting(
        interventions=" ".join(describe(item) for item in interventions) or "none",
        flops=sample_flops(session.adapter, record),
        baseline=sample_flops(session.adapter, record, baseline=True),
        seconds=seconds,
        baseline_seconds=baseline_seconds,
    )
