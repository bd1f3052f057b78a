"""Interventions on stock models: prune, skip, inject, exit and scale visual tokens through hooks.

>>> from embedlens.interventions import Prune, Skip, intervene
>>> with intervene(session, [Prune(group="dead"), Skip(group="llm_sink", sublayers=(1.5,))]) as run:  # doctest: +SKIP
...     session.model.generate(**batch.inputs, max_new_tokens=8)
>>> run.last.samples[0].tokens_per_layer  # doctest: +SKIP
"""

from embedlens.interventions.apply import InterventionRun, PrefillRecord, SampleRecord, intervene
from embedlens.interventions.spec import (
    Exit,
    Inject,
    Intervention,
    Plan,
    Prune,
    Scale,
    Skip,
    describe,
    dumps,
    from_dict,
    parse,
    parse_all,
    plan,
    to_dict,
)

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
    "dumps",
    "from_dict",
    "intervene",
    "parse",
    "parse_all",
    "plan",
    "to_dict",
]
