"""What an intervention is: small JSON-serialisable configs, their text notation and their checks.

Five kinds, each a frozen dataclass:

* :class:`Prune` removes chosen visual tokens before layer 0 (``positions="keep"`` keeps the original
  RoPE positions, the paper's default; ``"reindex"`` renumbers what is left);
* :class:`Skip` zeroes the attention and/or MLP update of chosen tokens in chosen layers;
* :class:`Inject` runs layers below ``k`` on text only and inserts the visual tokens at layer ``k``;
* :class:`Exit` drops every visual token at layer ``k``;
* :class:`Scale` multiplies the visual embeddings (the paper's 0.01x norm experiment).

Tokens are chosen by ``group`` (a group of the sink / dead / alive rule, see :data:`TARGET_GROUPS`;
``"sink+dead"`` is a union) or by explicit grid ``indices`` (row-major cell numbers of each image).

A token can match several anchored groups (its top-k holds several anchor ids). ``match`` says how
a group target reads the rule:

* ``match="label"`` (the default): the token's single label after precedence (vit_sink > llm_sink >
  dead), so ``prune:dead`` leaves a token that matches both ``llm_sink`` and ``dead`` alone;
* ``match="member"``: every token whose top-k holds one of the group's anchor ids, whatever else it
  matches -- the paper's reference code (``prune:dead,match=member`` removes that token too).

The two differ only for a group that is not first in the precedence (``llm_sink``, ``dead``); a
``matched_random`` control draws as many tokens as the chosen target set has, under either.

The text notation, used by the CLI (``--intervene``), by evaluation presets and by the lmms-eval
plugin, is ``KIND[:TARGET][@WHERE][,key=value...]`` (parsed and written by
:mod:`embedlens.interventions.notation`)::

    prune:dead                      prune:sink+dead,positions=reindex
    prune:dead,select=matched_random,seed=3
    prune:dead,match=member         (every token matching the dead anchor, the reference's rule)
    prune:[0,5,7]                   (grid indices)
    skip:llm_sink@1.5               (the MLP of layer 1; n = attention of layer n, n.5 = its MLP)
    skip:llm_sink@1.5,match=member
    skip:visual@0-3.5               (every sublayer of layers 0..3)
    inject@8   inject@8,scale=0.5   exit@12   scale:0.01

How interventions combine and fit a model is checked once by :func:`embedlens.interventions.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from embedlens.errors import InputError
from embedlens.taxonomy.groups import ALIASES, ALIVE, GROUPS

#: Names a target may use: the rule's groups, "sink" (either sink), "visual" (every visual token) and
#: "target" (cells given per sample, e.g. the patch-compression benchmark's target patches).
TARGET_GROUPS: tuple[str, ...] = (*GROUPS, ALIVE, *ALIASES, "visual", "target")
#: Groups that need no classification.
UNLABELLED = frozenset({"visual", "target"})
SELECTS = ("group", "complement", "matched_random")
POSITIONS = ("keep", "reindex")
PARTS = ("attn", "mlp")
#: How a group target reads the rule: the label after precedence, or membership (overlaps kept).
MATCHES = ("label", "member")


def check_group(group: str) -> tuple[str, ...]:
    """Split a group expression (``"sink+dead"``) into known names, or raise one clear error."""
    names = tuple(part.strip() for part in str(group).split("+"))
    for name in names:
        if name not in TARGET_GROUPS:
            raise InputError(f"unknown group {name!r} in {group!r}; groups are {', '.join(TARGET_GROUPS)}")
    return names


def _check_target(kind: str, group: str | None, indices: Sequence[int] | None, match: str) -> tuple[int, ...] | None:
    if (group is None) == (indices is None):
        raise InputError(f"{kind} needs exactly one of a group or explicit token indices")
    if match not in MATCHES:
        raise InputError(f"{kind} match must be one of {', '.join(MATCHES)}, got {match!r}")
    if group is not None:
        check_group(group)
        return None
    if match != "label":
        raise InputError(f"{kind} match={match} needs a group target, not explicit token indices")
    values = tuple(indices)  # type: ignore[arg-type]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{kind} token indices must be non-negative integers, got {value!r}")
    return values


@dataclass(frozen=True)
class Prune:
    """Remove chosen visual tokens before the first decoder layer.

    Attributes:
        group: Group expression (see :data:`TARGET_GROUPS`), or None when ``indices`` are given.
        indices: Grid cells (row-major, per image) to prune, or None.
        select: ``"group"`` prunes the target; ``"complement"`` prunes every other visual token;
            ``"matched_random"`` prunes as many random tokens from the complement as the target has
            (``min(m, |complement|)``), drawn with a per-sample seed derived from ``seed``.
        seed: Base seed of ``matched_random``.
        positions: ``"keep"`` (original positions; decoding continues the unpruned numbering) or
            ``"reindex"`` (kept tokens renumbered 0, 1, ... per sample; decoding continues from the
            number kept).
        match: ``"label"`` (a group target is read after precedence) or ``"member"`` (every token
            matching one of the group's anchors); see the module docstring.
    """

    group: str | None = None
    indices: tuple[int, ...] | None = None
    select: Literal["group", "complement", "matched_random"] = "group"
    seed: int = 0
    positions: Literal["keep", "reindex"] = "keep"
    match: Literal["label", "member"] = "label"
    kind: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _check_target("prune", self.group, self.indices, self.match))
        if self.select not in SELECTS:
            raise InputError(f"prune select must be one of {', '.join(SELECTS)}, got {self.select!r}")
        if self.positions not in POSITIONS:
            raise InputError(f"prune positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"prune seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class Skip:
    """Zero the attention and/or MLP update of chosen tokens in chosen layers (before the residual add).

    Other tokens still attend to the chosen ones; only the chosen rows' updates are dropped.

    Attributes:
        group: Group expression, or None when ``indices`` are given.
        indices: Grid cells (row-major, per image), or None.
        sublayers: ``(layer, "attn" | "mlp")`` pairs, layers zero-based.
        match: ``"label"`` or ``"member"``, as for :class:`Prune`.
    """

    group: str | None = None
    indices: tuple[int, ...] | None = None
    sublayers: tuple[tuple[int, str], ...] = field(default_factory=tuple)
    match: Literal["label", "member"] = "label"
    kind: ClassVar[str] = "skip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _check_target("skip", self.group, self.indices, self.match))
        pairs = tuple(as_sublayer(item) for item in self.sublayers)
        if not pairs:
            raise InputError("skip needs at least one sublayer (e.g. 1.5 = the MLP of layer 1)")
        object.__setattr__(self, "sublayers", tuple(sorted(set(pairs))))


@dataclass(frozen=True)
class Inject:
    """Run layers below ``layer`` on text only; insert the visual tokens (times ``scale``) at ``layer``.

    ``layer`` uses EmbedLens' numbering: the input of decoder layer ``layer`` (0-based), so
    ``Inject(0)`` is the untouched model.
    """

    layer: int
    scale: float = 1.0
    kind: ClassVar[str] = "inject"

    def __post_init__(self) -> None:
        _check_int("inject layer", self.layer)
        object.__setattr__(self, "scale", _check_float("inject scale", self.scale))


@dataclass(frozen=True)
class Exit:
    """Drop every visual token at ``layer`` (before decoder layer ``layer``); later caches hold none."""

    layer: int
    kind: ClassVar[str] = "exit"

    def __post_init__(self) -> None:
        _check_int("exit layer", self.layer)


@dataclass(frozen=True)
class Scale:
    """Multiply the visual embeddings (the projector outputs) by ``factor``."""

    factor: float
    kind: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_float("scale factor", self.factor))


Intervention = Prune | Skip | Inject | Exit | Scale
KINDS: dict[str, type] = {cls.kind: cls for cls in (Prune, Skip, Inject, Exit, Scale)}


def _check_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {value!r}")


def _check_float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def as_sublayer(item: Any) -> tuple[int, str]:
    """``1.5`` -> ``(1, "mlp")``, ``2`` -> ``(2, "attn")``, ``(3, "attn")`` kept; anything else raises."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        layer, part = item
        if isinstance(layer, bool) or not isinstance(layer, int) or part not in PARTS:
            raise InputError(f"malformed sublayer {item!r}: use (layer, 'attn' | 'mlp')")
        return int(layer), str(part)
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        raise InputError(f"malformed sublayer {item!r}: use n (attention of layer n) or n.5 (its MLP)")
    doubled = float(item) * 2
    if not math.isfinite(doubled) or doubled != int(doubled) or item < 0:
        raise InputError(f"malformed sublayer {item!r}: use n (attention of layer n) or n.5 (its MLP)")
    return int(item), ("mlp" if int(doubled) % 2 else "attn")


# --------------------------------------------------------------------------- JSON
def to_dict(item: Intervention) -> dict[str, Any]:
    """A JSON-ready dict with a ``"kind"`` key (the inverse of :func:`from_dict`).

    ``match`` is written only when it is not the default ``"label"``, so configs written before it
    existed read and compare the same.
    """
    data = {"kind": item.kind, **asdict(item)}
    if data.get("match") == "label":
        del data["match"]
    for key in ("indices", "sublayers"):
        if data.get(key) is not None:
            data[key] = [list(v) if isinstance(v, tuple) else v for v in data[key]]
    return data


def from_dict(data: Any) -> Intervention:
    """Build an intervention from :func:`to_dict`'s output; unknown kinds or keys raise."""
    if not isinstance(data, dict) or "kind" not in data:
        raise InputError(f"an intervention must be an object with a 'kind', got {data!r}")
    fields = dict(data)
    kind = fields.pop("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InputError(f"unknown intervention kind {kind!r}; kinds are {', '.join(KINDS)}")
    try:
        for key in ("indices", "sublayers"):
            if fields.get(key) is not None:
                fields[key] = tuple(tuple(v) if isinstance(v, list) else v for v in fields[key])
        return cls(**fields)
    except TypeError as exc:
        raise InputError(f"bad fields for a {kind} intervention: {sorted(fields)}") from exc
