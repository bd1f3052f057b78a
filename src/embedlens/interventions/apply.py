"""Applying interventions to a stock ``transformers`` model with hooks that are always removed.

``with intervene(context, [Prune(group="dead")]) as run: context.model.generate(...)`` installs the
hooks of :mod:`embedlens.interventions.engine` for the ``with`` block; they come off when it ends,
also on exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from embedlens.errors import InputError
from embedlens.interventions.engine import Engine
from embedlens.interventions.planning import Plan, plan
from embedlens.interventions.records import InterventionRun, PrefillRecord, SampleRecord
from embedlens.interventions.spec import Intervention

if TYPE_CHECKING:
    from embedlens.context import ModelContext
    from embedlens.taxonomy import Anchors

__all__ = ["InterventionRun", "PrefillRecord", "SampleRecord", "intervene"]


@contextlib.contextmanager
def intervene(
    context: ModelContext,
    interventions: Plan | Iterable[Intervention],
    *,
    anchors: Anchors | str | None = None,
    top_k: int | None = None,
    sample_ids: Sequence[int] | None = None,
    targets: Sequence[Sequence[int]] | None = None,
) -> Iterator[InterventionRun]:
    """Apply ``interventions`` to every forward pass and ``generate`` call inside the ``with`` block.

    Args:
        context: The loaded model.
        interventions: A :class:`~embedlens.interventions.Plan` already checked for this model (used
            as it is), or :class:`~embedlens.interventions.Prune`, ``Skip``, ``Inject``, ``Exit``,
            ``Scale`` objects (checked and composed once by :func:`~embedlens.interventions.plan`).
        anchors: Anchors for group targets (default: the model's built-in anchors).
        top_k: Nearest ids the rule looks at (default: the anchors' ``top_k``).
        sample_ids: One id per batch row, from which ``matched_random`` seeds derive (default: the row).
        targets: Grid cells of each batch row's ``"target"`` group (e.g. the patch-compression
            benchmark's target patches); needed when a target names that group.

    Yields:
        An :class:`InterventionRun` recording, for every prefill, what was removed, the seeds drawn
        and the tokens per layer.

    Raises:
        InputError: Unusable interventions for this model (checked before anything is hooked).
    """
    checked = plan(interventions, context.adapter.num_layers)
    rule = None
    if checked.needs_groups:
        from embedlens.taxonomy.classify import rule_settings

        rule = rule_settings(context, anchors, top_k, None)
    if checked.needs_targets and targets is None:
        raise InputError("the group 'target' needs each sample's target cells (e.g. a benchmark's target_patches)")
    run = InterventionRun(checked)
    engine = Engine(context, checked, run, rule, sample_ids, targets)
    with contextlib.ExitStack() as stack:
        engine.install(stack)
        yield run
