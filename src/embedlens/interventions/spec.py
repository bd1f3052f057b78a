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

The text notation, used by the CLI (``--intervene``) and by evaluation presets, is
``KIND[:TARGET][@WHERE][,key=value...]``::

    prune:dead                      prune:sink+dead,positions=reindex
    prune:dead,select=matched_random,seed=3
    prune:[0,5,7]                   (grid indices)
    skip:llm_sink@1.5               (the MLP of layer 1; n = attention of layer n, n.5 = its MLP)
    skip:visual@0-3.5               (every sublayer of layers 0..3)
    inject@8   inject@8,scale=0.5   exit@12   scale:0.01
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from embedlens.errors import InputError
from embedlens.taxonomy.groups import ALIASES, ALIVE, GROUPS

#: Names a target may use: the rule's groups, "sink" (either sink), "visual" (every visual token) and
#: "target" (cells given per sample, e.g. the patch-compression benchmark's target patches).
TARGET_GROUPS: tuple[str, ...] = (*GROUPS, ALIVE, *ALIASES, "visual", "target")
#: Groups that need no classification.
_UNLABELLED = frozenset({"visual", "target"})
SELECTS = ("group", "complement", "matched_random")
POSITIONS = ("keep", "reindex")
PARTS = ("attn", "mlp")


def check_group(group: str) -> tuple[str, ...]:
    """Split a group expression (``"sink+dead"``) into known names, or raise one clear error."""
    names = tuple(part.strip() for part in str(group).split("+"))
    for name in names:
        if name not in TARGET_GROUPS:
            raise InputError(f"unknown group {name!r} in {group!r}; groups are {', '.join(TARGET_GROUPS)}")
    return names


def _check_target(kind: str, group: str | None, indices: Sequence[int] | None) -> tuple[int, ...] | None:
    if (group is None) == (indices is None):
        raise InputError(f"{kind} needs exactly one of a group or explicit token indices")
    if group is not None:
        check_group(group)
        return None
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
            ``"reindex"`` (kept tokens renumbered consecutively).
    """

    group: str | None = None
    indices: tuple[int, ...] | None = None
    select: Literal["group", "complement", "matched_random"] = "group"
    seed: int = 0
    positions: Literal["keep", "reindex"] = "keep"
    kind: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _check_target("prune", self.group, self.indices))
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
    """

    group: str | None = None
    indices: tuple[int, ...] | None = None
    sublayers: tuple[tuple[int, str], ...] = field(default_factory=tuple)
    kind: ClassVar[str] = "skip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _check_target("skip", self.group, self.indices))
        pairs = tuple(_as_sublayer(item) for item in self.sublayers)
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
    return float(value)


def _as_sublayer(item: Any) -> tuple[int, str]:
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
    """A JSON-ready dict with a ``"kind"`` key (the inverse of :func:`from_dict`)."""
    data = {"kind": item.kind, **asdict(item)}
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


def dumps(items: Iterable[Intervention]) -> str:
    """The interventions as a JSON list."""
    return json.dumps([to_dict(item) for item in items])


# --------------------------------------------------------------------------- text notation
_SPEC = re.compile(
    r"(?P<kind>[a-z_]+)"
    r"(?::(?P<target>\[[^\]]*\]|[a-z_+]+|[-+0-9.e]+))?"
    r"(?:@(?P<where>[0-9.,\- ]+?))?"
    r"(?P<options>(?:,[a-z_]+=[^,=]+)*)"
)


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{text!r} is not a number in intervention {spec!r}") from None


def _layer(text: str, spec: str) -> int:
    value = _number(text, spec)
    if not math.isfinite(value) or value != int(value):
        raise InputError(f"layer {text!r} must be a whole number in intervention {spec!r}")
    return int(value)


#: Longest sublayer range the notation accepts (far above any real model's depth).
_MAX_LAYERS = 1024


def parse_sublayers(text: str, spec: str | None = None) -> tuple[tuple[int, str], ...]:
    """``"1.5,2"`` or ``"0-3.5"`` (every sublayer from 0 to 3.5) -> ``(layer, part)`` pairs."""
    spec = spec or text
    pairs: list[tuple[int, str]] = []
    for chunk in filter(None, (c.strip() for c in text.split(","))):
        if "-" in chunk:
            start_text, _, stop_text = chunk.partition("-")
            if not start_text.strip() or not stop_text.strip():
                raise InputError(f"malformed sublayer {chunk!r} in intervention {spec!r}: use n, n.5 or a range a-b")
            start, stop = _number(start_text, spec), _number(stop_text, spec)
            _as_sublayer(start), _as_sublayer(stop)  # both ends must be valid sublayers
            if start > stop:
                raise InputError(f"sublayer range {chunk!r} runs backwards in intervention {spec!r}")
            steps = round((stop - start) * 2)
            if steps > 2 * _MAX_LAYERS:
                raise InputError(f"sublayer range {chunk!r} is longer than any model's {_MAX_LAYERS} layers")
            pairs.extend(_as_sublayer(start + step / 2) for step in range(steps + 1))
        else:
            pairs.append(_as_sublayer(_number(chunk, spec)))
    if not pairs:
        raise InputError(f"no sublayers in intervention {spec!r}")
    return tuple(pairs)


def _target(target: str | None) -> dict[str, Any]:
    if target is None:
        return {}
    if target.startswith("["):
        body = target[1:-1].strip()
        try:
            return {"indices": tuple(int(v) for v in body.split(",") if v.strip())}
        except ValueError:
            raise InputError(f"token indices {target!r} must be integers") from None
    return {"group": target}


def parse(spec: str) -> Intervention:
    """Parse one intervention in the text notation (see the module docstring); one clear error if bad."""
    text = spec.strip()
    match = _SPEC.fullmatch(text)
    if match is None:
        raise InputError(
            f"malformed intervention {spec!r}: use KIND[:TARGET][@WHERE][,key=value], e.g. prune:dead, "
            "skip:llm_sink@1.5, inject@8, exit@12, scale:0.01"
        )
    kind, target, where = match["kind"], match["target"], match["where"]
    options = dict(opt.split("=", 1) for opt in filter(None, match["options"].split(",")))
    if kind not in KINDS:
        raise InputError(f"unknown intervention {kind!r} in {spec!r}; kinds are {', '.join(KINDS)}")

    def no_where() -> None:
        if where is not None:
            raise InputError(f"{kind} takes no @layer in {spec!r}")

    def take(name: str, convert) -> dict[str, Any]:
        return {name: convert(options.pop(name))} if name in options else {}

    if kind == "prune":
        no_where()
        fields = {**_target(target), **take("select", str), **take("positions", str)}
        fields.update(take("seed", lambda v: _layer(v, spec)))
        if fields.get("select") in ("random", "matched"):
            fields["select"] = "matched_random"
        item: Intervention = Prune(**fields)
    elif kind == "skip":
        if where is None:
            raise InputError(f"skip needs @sublayers in {spec!r}, e.g. skip:dead@1.5 or skip:visual@0-3.5")
        item = Skip(**_target(target), sublayers=parse_sublayers(where, spec))
    elif kind in ("inject", "exit"):
        if target is not None or where is None or "," in where or "-" in where:
            raise InputError(f"{kind} needs exactly one @layer, e.g. {kind}@8, in {spec!r}")
        layer = _layer(where, spec)
        item = Inject(layer, **take("scale", lambda v: _number(v, spec))) if kind == "inject" else Exit(layer)
    else:
        no_where()
        factor = options.pop("factor", target)
        if factor is None:
            raise InputError(f"scale needs a factor, e.g. scale:0.01, in {spec!r}")
        item = Scale(_number(factor, spec))
    if options:
        raise InputError(f"unknown option(s) {', '.join(sorted(options))} for {kind} in {spec!r}")
    return item


def parse_all(specs: Iterable[str]) -> list[Intervention]:
    """Parse several specs (e.g. repeated ``--intervene`` options)."""
    return [parse(spec) for spec in specs]


def _float_text(value: float) -> str:
    """Short text for ``value`` (``0.01``, ``2``) that still parses back to exactly ``value``."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def _sublayer_text(pairs: Sequence[tuple[int, str]]) -> str:
    """Sublayers in the notation, runs of three or more consecutive sublayers as ranges (``0-3.5``)."""
    steps = sorted({2 * layer + (part == "mlp") for layer, part in pairs})
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])

    def name(step: int) -> str:
        return f"{step // 2}{'.5' if step % 2 else ''}"

    parts = []
    for run in runs:
        parts += [f"{name(run[0])}-{name(run[-1])}"] if len(run) >= 3 else [name(step) for step in run]
    return ",".join(parts)


def describe(item: Intervention) -> str:
    """The intervention in the text notation (round-trips through :func:`parse`)."""
    if isinstance(item, (Prune, Skip)):
        target = item.group if item.group is not None else "[" + ",".join(map(str, item.indices or ())) + "]"
        if isinstance(item, Skip):
            return f"skip:{target}@{_sublayer_text(item.sublayers)}"
        options = [f"select={item.select}"] if item.select != "group" else []
        options += [f"seed={item.seed}"] if item.select == "matched_random" else []
        options += [f"positions={item.positions}"] if item.positions != "keep" else []
        return ",".join([f"prune:{target}", *options])
    if isinstance(item, Inject):
        return f"inject@{item.layer}" + (f",scale={_float_text(item.scale)}" if item.scale != 1.0 else "")
    if isinstance(item, Exit):
        return f"exit@{item.layer}"
    return f"scale:{_float_text(item.factor)}"


# --------------------------------------------------------------------------- checks against a model
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
    """

    prunes: tuple[Prune, ...]
    skips: tuple[Skip, ...]
    inject: int
    exit: int
    scale: float
    positions: str
    num_layers: int

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
        return bool(names - _UNLABELLED)

    @property
    def needs_targets(self) -> bool:
        """Whether any target is the per-sample ``"target"`` group."""
        return any(
            "target" in check_group(item.group) for item in (*self.prunes, *self.skips) if item.group is not None
        )


def plan(items: Iterable[Intervention], num_layers: int) -> Plan:
    """Check that ``items`` fit a model with ``num_layers`` decoder layers and compose them.

    Raises:
        InputError: A layer out of range, two Injects / Exits / Scales, Prunes with different position
            policies, an Exit at or below the Inject, or a Skip where the visual tokens are absent.
    """
    items = list(items)
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
    )
