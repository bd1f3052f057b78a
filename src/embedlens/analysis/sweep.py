"""The injection sweep: accuracy, FLOPs and prefill time as visual tokens enter the LLM later.

For every injection layer ``k`` (``Inject(k)``: layers below ``k`` run on text only, the projector
outputs join at ``k``) the sweep evaluates every dataset (the patch-compression benchmark, any VQA
JSONL) with the baseline in the same run and code path (:func:`embedlens.bench.runner.run_eval`), plus
a comparison row that keeps the visual tokens from layer 0 but skips their attention and MLP updates
in the early layers (``skip:visual@0-(m-1).5``, the paper's sublayer skipping). Prefill time is
measured on a few questions, every setting timed in interleaved rounds against the baseline.

Then the **norm-scaling experiment** (REFERENCE §4): the visual embeddings times each scale (0.01,
0.1, 1 by default) entering at layer 0, and entering at the best injection layer (the one with the
highest mean score over the datasets, ties to the later layer), again with the baseline in the same
run.

Everything resumes: each evaluation commits its batches under its own folder of ``out``.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from embedlens.bench.accounting import timed_prefill
from embedlens.bench.runner import BASELINE, EvalOptions, Setting, run_eval, without_placeholder
from embedlens.bench.vqa import Question, QuestionSet
from embedlens.checks import NON_NEGATIVE_INT, POSITIVE_FLOAT, Each, check_fields, option
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.interventions import Inject, Scale, Skip, describe, intervene
from embedlens.runs import load_readable, on_main

if TYPE_CHECKING:
    from embedlens.context import ModelContext

SWEEP_FILE = "sweep.parquet"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SCALING_MD = "scaling.md"


@dataclass(frozen=True)
class SweepOptions:
    """What the sweep runs.

    Attributes:
        layers: Injection layers (None: every layer ``0 .. L-1``).
        skip_until: The comparison row skips the visual tokens' attention and MLP in layers
            ``0 .. skip_until-1`` (None: half the layers; 0: no comparison row).
        scales: Scales of the norm-scaling experiment (empty: no experiment).
        best_layer: Injection layer of the scaling experiment (None: the sweep's best).
        timing_items: Questions whose prefill is timed per setting (0: no timing).
        timing_repeats: Timed rounds (the median is kept).
        eval: Batching, decoding and interval options of the evaluations.
    """

    layers: tuple[int, ...] | None = option(None, Each(NON_NEGATIVE_INT))
    skip_until: int | None = option(None, NON_NEGATIVE_INT)
    scales: tuple[float, ...] = option((0.01, 0.1, 1.0), Each(POSITIVE_FLOAT))
    best_layer: int | None = option(None, NON_NEGATIVE_INT)
    timing_items: int = option(4, NON_NEGATIVE_INT)
    timing_repeats: int = option(3, NON_NEGATIVE_INT)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.timing_repeats == 0 and self.timing_items:
            raise InputError("timing-repeats must be positive when questions are timed")


@dataclass(frozen=True)
class SweepSetting:
    """A setting of the sweep with what it is: ``kind`` is ``"inject"``, ``"skip"`` or ``"scale"``."""

    setting: Setting
    kind: str
    layer: int | None = None
    scale: float = 1.0


def sweep_settings(num_layers: int, options: SweepOptions) -> list[SweepSetting]:
    """The injection settings (one per layer) and the early-skip comparison row."""
    layers = sorted(set(options.layers)) if options.layers is not None else list(range(num_layers))
    bad = [k for k in layers if not 0 <= k < num_layers]
    if bad or not layers:
        raise InputError(f"injection layers must be in 0..{num_layers - 1}, got {bad or 'none'}")
    chosen = [SweepSetting(Setting(f"inject@{k}", (Inject(k),)), "inject", k) for k in layers]
    until = num_layers // 2 if options.skip_until is None else options.skip_until
    if not 0 <= until <= num_layers:
        raise InputError(f"skip-until must be in 0..{num_layers}, got {until}")
    if until:
        skip = Skip(
            group="visual", sublayers=tuple((layer, part) for layer in range(until) for part in ("attn", "mlp"))
        )
        chosen.append(SweepSetting(Setting(describe(skip), (skip,)), "skip", until))
    return chosen


def scaling_settings(best: int, scales: Sequence[float]) -> list[SweepSetting]:
    """Scaled visual embeddings entering at layer 0 and at ``best`` (scale 1 at layer 0 is the baseline)."""
    chosen = [SweepSetting(Setting(describe(Scale(s)), (Scale(s),)), "scale", 0, s) for s in scales if s != 1.0]
    for s in scales:
        item = Inject(best, scale=s)
        chosen.append(SweepSetting(Setting(describe(item), (item,)), "scale", best, s))
    return chosen


def dataset_name(questions: QuestionSet, number: int) -> str:
    """A short, unique, file-safe name for a dataset: its folder or file stem, numbered."""
    source = questions.source
    stem = source.parent.name if source.name == "items.jsonl" else source.stem
    return f"{number}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem) or 'data'}"


# --------------------------------------------------------------------------- timing
def time_settings(
    session: ModelContext,
    questions: QuestionSet,
    settings: Sequence[Setting],
    options: SweepOptions,
) -> dict[str, float]:
    """Median prefill seconds per setting (baseline included), summed over the first timed questions.

    Rounds are interleaved (every setting once per question per round, after one warm-up round), so a
    slow spell of the machine touches all settings alike.
    """
    if not options.timing_items:
        return {}
    usable: list[tuple[Question, Image.Image]] = []
    for q in questions.items:  # one at a time: only as many images are opened as are timed
        usable += load_readable([q])[0]
        if len(usable) == options.timing_items:
            break
    batches = [session.prepare([image], [q.question + options.eval.suffix]) for q, image in usable]
    everything = [Setting(BASELINE), *settings]
    times: dict[str, list[list[float]]] = {s.name: [[] for _ in batches] for s in everything}
    anchors = options.eval.anchors
    for round_ in range(options.timing_repeats + 1):
        for index, batch in enumerate(batches):
            for setting in everything:
                with intervene(session, setting.interventions, anchors=anchors, sample_ids=[index]):
                    elapsed = timed_prefill(session, batch)
                if round_:  # round 0 warms up
                    times[setting.name][index].append(elapsed)
    return {name: sum(statistics.median(per) for per in rows) for name, rows in times.items()}


# --------------------------------------------------------------------------- tables
def sweep_rows(
    chosen: Sequence[SweepSetting],
    tables: dict[str, dict[str, Any]],
    seconds: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per setting (baseline first): scores per dataset, deltas, FLOPs and time ratios."""
    first = next(iter(tables.values()))
    entries = {name: {e["name"]: e for e in table["settings"]} for name, table in tables.items()}
    base_seconds = seconds.get(BASELINE)
    rows = []
    for item in [SweepSetting(Setting(BASELINE), "baseline", 0), *chosen]:
        name = item.setting.name
        mine = {e["name"]: e for e in first["settings"]}[name]
        scores = {d: entries[d][name]["overall"] for d in tables}
        deltas = {d: entries[d][name]["overall"] - entries[d][BASELINE]["overall"] for d in tables}
        relaxed = {d: entries[d][name]["overall_relaxed"] for d in tables}
        rows.append(
            {
                "setting": name,
                "kind": item.kind,
                "layer": item.layer,
                "scale": item.scale,
                "scores": scores,
                "deltas": deltas,
                "relaxed": relaxed,
                "mean_score": sum(scores.values()) / len(scores),
                "gflops": mine["gflops"],
                "flops_ratio": mine["flops_ratio"],
                "tokens_mean": mine["tokens_mean"],
                "prefill_ms": seconds[name] * 1000 if name in seconds else None,
                "time_ratio": seconds[name] / base_seconds if name in seconds and base_seconds else None,
            }
        )
    return rows


def best_layer(rows: Sequence[dict[str, Any]]) -> int | None:
    """The injection layer above 0 with the highest mean score (ties: the later layer), or None."""
    inject = [r for r in rows if r["kind"] == "inject" and r["layer"]]
    if not inject:
        return None
    return max(inject, key=lambda r: (round(r["mean_score"], 12), r["layer"]))["layer"]


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value * 100:.1f}"


def render_sweep(rows: Sequence[dict[str, Any]], names: Sequence[str], best: int | None, title: str) -> str:
    """The sweep table as markdown."""
    lines = [
        title,
        "",
        "Scores in % (the runner's overall score per dataset); Δ = setting - baseline; relaxed: the answer "
        "appears in the reply. FLOPs: theoretical prefill FLOPs / baseline's; time: measured prefill / "
        "baseline's (median of interleaved rounds).",
        "",
        "| setting | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} relaxed" for n in names)
        + " | mean | mean tokens per layer | FLOPs | prefill ms | time |",
        "|---" * (2 * len(names) + 6) + "|",
    ]
    for r in rows:
        cells = [f"{_pct(r['scores'][n])} (Δ {r['deltas'][n] * 100:+.1f})" for n in names]
        cells += [_pct(r["relaxed"][n]) for n in names]
        ms = "–" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"
        ratio = "–" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x"
        label = r["setting"] + (" (best)" if r["kind"] == "inject" and r["layer"] == best else "")
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_pct(r['mean_score'])} | {r['tokens_mean']:.1f} | "
            f"{r['flops_ratio']:.2f}x | {ms} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def render_scaling(rows: Sequence[dict[str, Any]], names: Sequence[str], best: int, scales: Sequence[float]) -> str:
    """The norm-scaling table: one row per scale, at layer 0 and at the best injection layer."""
    by = {(r["layer"], r["scale"]): r for r in rows if r["kind"] in ("scale", "baseline")}
    by[(0, 1.0)] = next(r for r in rows if r["kind"] == "baseline")
    lines = [
        f"Visual embeddings times a scale, entering at layer 0 and injected at layer {best}; scores in %, "
        "Δ against the baseline of the same run.",
        "",
        "| scale | "
        + " | ".join(f"layer 0 · {n}" for n in names)
        + " | "
        + " | ".join(f"inject@{best} · {n}" for n in names)
        + " |",
        "|---" * (2 * len(names) + 1) + "|",
    ]
    for s in scales:
        cells = []
        for layer in (0, best):
            r = by.get((layer, s))
            cells += [
                f"{_pct(r['scores'][n])} (Δ {r['deltas'][n] * 100:+.1f}; relaxed {_pct(r['relaxed'][n])})" if r else "–"
                for n in names
            ]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run
@dataclass
class SweepResult:
    """What :func:`run_inject_sweep` found.

    Attributes:
        rows: The sweep table (baseline, injection layers, skip row).
        best_layer: The injection layer used for the scaling experiment.
        scaling_rows: The scaling table (baseline first), empty without the experiment.
        out: The output directory.
    """

    rows: list[dict[str, Any]]
    best_layer: int | None
    scaling_rows: list[dict[str, Any]]
    out: Path


def _evaluate(
    session: ModelContext,
    datasets: Sequence[QuestionSet],
    chosen: Sequence[SweepSetting],
    out: Path,
    prefix: str,
    options: SweepOptions,
    *,
    restart: bool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    tables: dict[str, Any] = {}  # each evaluation's table (None on ranks other than 0)
    for number, questions in enumerate(datasets):
        name = dataset_name(questions, number)
        tables[name] = run_eval(
            session,
            questions,
            [c.setting for c in chosen],
            out / f"{prefix}-{name}",
            options=options.eval,
            restart=restart,
            progress=progress,
        )
    return tables


def _write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    flat = [
        {
            **{k: v for k, v in r.items() if k not in ("scores", "deltas", "relaxed")},
            **{f"score[{d}]": s for d, s in r["scores"].items()},
            **{f"delta[{d}]": s for d, s in r["deltas"].items()},
            **{f"relaxed[{d}]": s for d, s in r["relaxed"].items()},
        }
        for r in rows
    ]
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(flat), tmp)


def run_inject_sweep(
    session: ModelContext,
    datasets: Sequence[QuestionSet],
    out: str | Path,
    *,
    options: SweepOptions | None = None,
    restart: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Run the injection sweep and the norm-scaling experiment; write tables and a plot to ``out``.

    Args:
        session: The loaded model.
        datasets: Question sets (:func:`embedlens.bench.vqa.read_questions`), each evaluated in full.
        out: Output directory (one resumable evaluation folder per dataset and stage).
        options: See :class:`SweepOptions`.
        restart: Discard earlier evaluations in ``out``.
        progress: Show progress bars.

    Under several processes each evaluation is split between them; rank 0 times prefill and writes the
    tables, and every rank returns the same result.
    """
    if not datasets:
        raise InputError("the sweep needs at least one dataset")
    options = options or SweepOptions()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    chosen = sweep_settings(session.num_layers, options)
    if options.best_layer is not None and not 0 <= options.best_layer < session.num_layers:
        raise InputError(f"best-layer must be in 0..{session.num_layers - 1}, got {options.best_layer}")
    tables = _evaluate(session, datasets, chosen, out, "sweep", options, restart=restart, progress=progress)
    names = [dataset_name(q, number) for number, q in enumerate(datasets)]
    title = f"Injection sweep on {session.adapter.source}: {', '.join(names)}"

    def first_stage() -> tuple[list[dict[str, Any]], int | None]:
        timed = without_placeholder(datasets[0], session.adapter.image_placeholder)
        seconds = time_settings(session, timed, [c.setting for c in chosen], options)
        rows = sweep_rows(chosen, tables, seconds)
        best = options.best_layer if options.best_layer is not None else best_layer(rows)
        out.mkdir(parents=True, exist_ok=True)
        _write_rows(rows, out / SWEEP_FILE)
        atomic_write_text(out / SWEEP_MD, render_sweep(rows, names, best, title))
        from embedlens.pictures.plots import plot_sweep

        plot_sweep(rows, out, title=title)
        return rows, best

    rows, best = on_main(first_stage, share=True)  # type: ignore[misc]  (rank 0 times and writes)
    scaling_rows: list[dict[str, Any]] = []
    if options.scales and best is not None:
        scaled = scaling_settings(best, options.scales)
        scaling_tables = _evaluate(
            session, datasets, scaled, out, "scaling", options, restart=restart, progress=progress
        )

        def second_stage() -> list[dict[str, Any]]:
            found = sweep_rows(scaled, scaling_tables, {})
            _write_rows(found, out / "scaling.parquet")
            atomic_write_text(out / SCALING_MD, render_scaling(found, names, best, options.scales))
            return found

        scaling_rows = on_main(second_stage, share=True) or []
    summary = {
        **session.model_identity,
        "datasets": {name: str(q.source) for name, q in zip(names, datasets, strict=True)},
        "best_layer": best,
        "rows": rows,
        "scaling_rows": scaling_rows,
        "timing": {"items": options.timing_items, "repeats": options.timing_repeats},
    }
    on_main(lambda: atomic_write_text(out / SWEEP_JSON, json.dumps(summary, indent=1)))
    return SweepResult(rows=rows, best_layer=best, scaling_rows=scaling_rows, out=out)
