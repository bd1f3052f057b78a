"""Checking interventions against a model once: :func:`plan` composes them into a :class:`Plan`.

A :class:`Plan` is what the hooks run (:func:`embedlens.interventions.intervene` and
:func:`~embedlens.interventions.generation.generate_batch` accept one), so a caller that checks a
setting up front passes the plan down instead of having every layer check the same list again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from embedlens.errors import InputError
from embedlens.interventions.notation import describe
from embedlens.interventions.spec import UNLABELLED, Exit, Inject, Intervention, Prune, Scale, Skip, check_group


@dataclass(frozen=True)
class Plan:
    """A checked, composed set of interventions for a model with ``num_layers`` decoder layers.

    Attributes:
        prunes: The Prunes (their removals are united).
        skips: The Skips.
        inject: Layer where visual tokens enter (0 = from the start).
        exit: Layer where visual tokens leave (``num_layers`` = never).
        scale: Factor applied to the visual embeddings (Scale x Inject's scale).
        positions: Position policy of the Prunes (``"keep"`` when there are none).
        num_layers: Decoder layers of the model the plan was checked for.
        items: The interventions as given, in order (what records and results name).
    """

    prunes: tuple[Prune, ...]
    skips: tuple[Skip, ...]
    inject: int
    exit: int
    scale: float
    positions: str
    num_layers: int
    items: tuple[Intervention, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the plan changes nothing."""
        return (
            not self.prunes and not self.skips and self.inject == 0 and self.exit == self.num_layers and self.scale == 1
        )

    def visual_present(self, layer: int) -> bool:
        """Whether (kept) visual tokens are in the residual stream entering decoder layer ``layer``."""
        return self.inject <= layer < self.exit

    @property
    def needs_groups(self) -> bool:
        """Whether any target is a group of the rule (the classifier must run)."""
        names = {name for item in (*self.prunes, *self.skips) if item.group for name in check_group(item.group)}
        return bool(names - UNLABELLED)

    @property
    def needs_targets(self) -> bool:
        """Whether any target is the per-sample ``"target"`` group."""
        return any(
            "target" in check_group(item.group) for item in (*self.prunes, *self.skips) if item.group is not None
        )

    def describe(self) -> str:
        """The interventions in the text notation, space-separated (``"none"`` when there are none)."""
        return " ".join(describe(item) for item in self.items) or "none"

    def extended(self, *more: Intervention) -> Plan:
        """The plan of these interventions followed by ``more``, checked for the same model."""
        return plan((*self.items, *more), self.num_layers)


def plan(items: Iterable[Intervention] | Plan, num_layers: int) -> Plan:
    """Check that ``items`` fit a model with ``num_layers`` decoder layers and compose them.

    This is the one check of a set of interventions. A :class:`Plan` is returned as it is (it was
    checked when it was made) once its model depth is confirmed.

    Raises:
        InputError: A layer out of range, two Injects / Exits / Scales, Prunes with different position
            policies, an Exit at or below the Inject, a Skip where the visual tokens are absent, or a
            plan checked for a model of another depth.
    """
    if isinstance(items, Plan):
        if items.num_layers != num_layers:
            raise InputError(
                f"these interventions were checked for a model with {items.num_layers} decoder layers, not {num_layers}"
            )
        return items
    items = tuple(items)
    for item in items:
        if not isinstance(item, (Prune, Skip, Inject, Exit, Scale)):
            raise InputError(f"not an intervention: {item!r}")
    prunes = tuple(i for i in items if isinstance(i, Prune))
    skips = tuple(i for i in items if isinstance(i, Skip))
    injects = [i for i in items if isinstance(i, Inject)]
    exits = [i for i in items if isinstance(i, Exit)]
    scales = [i for i in items if isinstance(i, Scale)]
    for name, found in (("inject", injects), ("exit", exits), ("scale", scales)):
        if len(found) > 1:
            raise InputError(f"conflicting interventions: {len(found)} {name}s ({', '.join(map(describe, found))})")
    policies = sorted({p.positions for p in prunes})
    if len(policies) > 1:
        raise InputError(f"conflicting interventions: prunes with different position policies ({', '.join(policies)})")
    inject = injects[0].layer if injects else 0
    exit_ = exits[0].layer if exits else num_layers
    last = num_layers - 1
    if injects and not 0 <= inject <= last:
        raise InputError(f"inject layer {inject} is out of range for this model: use 0..{last}")
    if exits and not 0 <= exit_ <= last:
        raise InputError(f"exit layer {exit_} is out of range for this model: use 0..{last}")
    if injects and exits and exit_ <= inject:
        raise InputError(f"conflicting interventions: exit@{exit_} is not above inject@{inject}")
    for skip in skips:
        for layer, part in skip.sublayers:
            where = f"{layer}{'.5' if part == 'mlp' else ''}"
            if not 0 <= layer <= last:
                raise InputError(f"skip sublayer {where} is out of range for this model: use 0..{last}.5")
            if not inject <= layer < exit_:
                raise InputError(
                    f"conflicting interventions: skip at {where} acts where the visual tokens are absent "
                    f"(they are present in layers {inject}..{exit_ - 1})"
                )
    scale = scales[0].factor if scales else 1.0
    if injects:
        scale *= injects[0].scale
    return Plan(
        prunes=prunes,
        skips=skips,
        inject=inject,
        exit=exit_,
        scale=scale,
        positions=policies[0] if policies else "keep",
        num_layers=num_layers,
        items=items,
    )
