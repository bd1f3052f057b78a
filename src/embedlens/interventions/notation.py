"""The text notation of interventions: ``KIND[:TARGET][@WHERE][,key=value...]`` (see :mod:`.spec`).

:func:`parse` reads one intervention, :func:`describe` writes one back (the two round-trip), and
:func:`parse_sublayers` reads the ``@WHERE`` part of a Skip. Every malformed spec raises one
:class:`~embedlens.errors.InputError` line naming the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from embedlens.errors import InputError
from embedlens.interventions.spec import KINDS, Exit, Inject, Intervention, Prune, Scale, Skip, as_sublayer

_SPEC = re.compile(
    r"(?P<kind>[a-z_]+)"
    r"(?::(?P<target>\[[^\]]*\]|[a-z_+]+|[-+0-9.e]+))?"
    r"(?:@(?P<where>[0-9.,\- ]+?))?"
    r"(?P<options>(?:,[a-z_]+=[^,=]+)*)"
)

#: Longest sublayer range the notation accepts (far above any real model's depth).
_MAX_LAYERS = 1024


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{text!r} is not a number in intervention {spec!r}") from None


def _whole(text: str, spec: str, what: str) -> int:
    """``text`` as an integer; ``what`` names the value in the error (``"layer"``, ``"prune seed"``)."""
    value = _number(text, spec)
    if not math.isfinite(value) or value != int(value):
        raise InputError(f"{what} {text!r} must be a whole number (an integer) in intervention {spec!r}")
    return int(value)


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
            as_sublayer(start), as_sublayer(stop)  # both ends must be valid sublayers
            if start > stop:
                raise InputError(f"sublayer range {chunk!r} runs backwards in intervention {spec!r}")
            steps = round((stop - start) * 2)
            if steps > 2 * _MAX_LAYERS:
                raise InputError(f"sublayer range {chunk!r} is longer than any model's {_MAX_LAYERS} layers")
            pairs.extend(as_sublayer(start + step / 2) for step in range(steps + 1))
        else:
            pairs.append(as_sublayer(_number(chunk, spec)))
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
    """Parse one intervention in the text notation (see :mod:`.spec`); one clear error if bad."""
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
        fields = {**_target(target), **take("select", str), **take("positions", str), **take("match", str)}
        fields.update(take("seed", lambda v: _whole(v, spec, "prune seed")))
        if fields.get("select") in ("random", "matched"):
            fields["select"] = "matched_random"
        item: Intervention = Prune(**fields)
    elif kind == "skip":
        if where is None:
            raise InputError(f"skip needs @sublayers in {spec!r}, e.g. skip:dead@1.5 or skip:visual@0-3.5")
        item = Skip(**_target(target), sublayers=parse_sublayers(where, spec), **take("match", str))
    elif kind in ("inject", "exit"):
        if target is not None or where is None or "," in where or "-" in where:
            raise InputError(f"{kind} needs exactly one @layer, e.g. {kind}@8, in {spec!r}")
        layer = _whole(where, spec, "layer")
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
    """The intervention in the text notation (round-trips through :func:`parse`).

    Options at their defaults are left out, so existing settings keep their names.
    """
    if isinstance(item, (Prune, Skip)):
        target = item.group if item.group is not None else "[" + ",".join(map(str, item.indices or ())) + "]"
        matching = [f"match={item.match}"] if item.match != "label" else []
        if isinstance(item, Skip):
            return ",".join([f"skip:{target}@{_sublayer_text(item.sublayers)}", *matching])
        options = [f"select={item.select}"] if item.select != "group" else []
        options += [f"seed={item.seed}"] if item.select == "matched_random" else []
        options += [f"positions={item.positions}"] if item.positions != "keep" else []
        return ",".join([f"prune:{target}", *options, *matching])
    if isinstance(item, Inject):
        return f"inject@{item.layer}" + (f",scale={_float_text(item.scale)}" if item.scale != 1.0 else "")
    if isinstance(item, Exit):
        return f"exit@{item.layer}"
    return f"scale:{_float_text(item.factor)}"
