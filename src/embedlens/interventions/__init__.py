"""Interventions on stock models: prune, skip, inject, exit and scale visual tokens through hooks.

>>> from embedlens.interventions import Prune, Skip, intervene
>>> with intervene(session, [Prune(group="dead"), Skip(group="llm_sink", sublayers=(1.5,))]) as run:  # doctest: +SKIP
...     session.model.generate(**batch.inputs, max_new_tokens=8)
>>> run.last.samples[0].tokens_per_layer  # doctest: +SKIP

Modules: :mod:`.spec` (the configs and their notation's meaning), :mod:`.notation` (parse / describe),
:mod:`.planning` (the one check against a model: :func:`plan` -> :class:`Plan`), :mod:`.select`
(which tokens), :mod:`.layout` (slots, masks, positions), :mod:`.engine` (the hooks), :mod:`.apply`
(:func:`intervene`), :mod:`.records` (what happened), :mod:`.generation` (greedy answers).
"""

from embedlens.interventions.apply import intervene
from embedlens.interventions.notation import describe, parse, parse_all
from embedlens.interventions.planning import Plan, plan
from embedlens.interventions.records import InterventionRun, PrefillRecord, SampleRecord
from embedlens.interventions.spec import Exit, Inject, Intervention, Prune, Scale, Skip, from_dict, to_dict

__all__ = [
    "Exit",
    "Inject",
    "Intervention",
    "InterventionRun",
    "Plan",
    "PrefillRecord",
    "Prune",
    "SampleRecord",
    "Scale",
    "Skip",
    "describe",
    "from_dict",
    "intervene",
    "parse",
    "parse_all",
    "plan",
    "to_dict",
]
