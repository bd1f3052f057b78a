"""Evaluation with interventions side by side: baseline and every setting through one code path.

``run_eval(session, questions, settings, out)`` answers every question under every setting (the
baseline first), greedily, in left-padded batches whose samples do not influence each other, and
commits each batch to ``out/parts`` as it goes, so an interrupted run resumes where it stopped. The
merge writes:

* ``items.parquet``: one row per (setting, question): prediction, score, relaxed score, tokens kept,
  FLOPs, seeds;
* ``table.json`` / ``table.md``: per setting and category the score with a bootstrap confidence
  interval (questions resampled), its difference from the baseline with a paired bootstrap interval,
  the relaxed score (the answer appears in the reply, see :func:`embedlens.bench.vqa.relaxed_score`),
  yes/no accuracy and F1 where there are yes/no questions, and tokens kept and FLOPs per setting.
  Settings that differ only by seed (the matched random controls) are also summarised together: the
  mean over seeds and the spread (standard deviation) between them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedlens.bench.eval_table import EVAL_FORMAT, render_markdown, summarise
from embedlens.bench.flops import sample_flops
from embedlens.bench.vqa import Question, QuestionSet, relaxed_score, score, yes_no
from embedlens.checks import CONFIDENCE, POSITIVE_INT, check_fields, option
from embedlens.errors import InputError
from embedlens.files import atomic_path, atomic_write_text
from embedlens.interventions import Intervention, Plan, Prune, describe, parse, plan
from embedlens.interventions.generation import generate_batch
from embedlens.runs import (
    Commit,
    RunDir,
    contiguous_batches,
    execute,
    items_hash,
    load_readable,
    path_label,
    placeholder_problem,
    rank,
    refuse_placeholder,
    resolved,
    shard,
    world_size,
)
from embedlens.taxonomy.classify import resolve_anchors

if TYPE_CHECKING:
    from embedlens.context import ModelContext

ITEMS_FILE = "items.parquet"
TABLE_JSON = "table.json"
TABLE_MD = "table.md"
BASELINE = "baseline"
#: The committed parts of an evaluation (``s<setting>-b<first question>``).
_PARTS = "s*-b*.json"


@dataclass(frozen=True)
class Setting:
    """One column of an evaluation: a name and the interventions applied.

    Attributes:
        name: Shown in tables (the interventions in the text notation, or a preset's label).
        interventions: Applied together; empty for the baseline.
        family: Settings sharing a family (a random control over several seeds) are also summarised
            together; None for a setting of its own.
    """

    name: str
    interventions: tuple[Intervention, ...] = ()
    family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``run.json`` and the table)."""
        return {"name": self.name, "interventions": [describe(i) for i in self.interventions], "family": self.family}


def parse_setting(text: str) -> Setting:
    """A setting from interventions in the text notation, separated by spaces or ``;``."""
    specs = [part for part in re.split(r"[;\s]+", text.strip()) if part]
    if not specs:
        raise InputError("an --intervention setting needs at least one intervention")
    items = tuple(parse(spec) for spec in specs)
    return Setting(name=" ".join(describe(item) for item in items), interventions=items)


def _seed_family(group: str, seeds: Sequence[int], match: str = "label") -> list[Setting]:
    family = f"random control for {group}"
    return [
        Setting(
            name=f"random({group}) seed {seed}",
            interventions=(Prune(group=group, select="matched_random", seed=seed, match=match),),
            family=family,
        )
        for seed in seeds
    ]


def preset(name: str, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> list[Setting]:
    """The settings of a named preset (the baseline is added by :func:`with_baseline`).

    ``paper-pruning`` (REFERENCE §4): remove ViT sinks, LLM sinks, both, dead tokens, sinks and dead
    tokens; and, as the control, as many random alive tokens as sinks + dead tokens, over ``seeds``.
    Targets follow the reference's membership rule (``match=member``: every token whose top-k holds the
    group's anchor, whatever else it matches).
    """
    if name != "paper-pruning":
        raise InputError(f"unknown preset {name!r}; presets: paper-pruning")
    if not seeds:
        raise InputError("the paper-pruning preset needs at least one seed for its random control")
    groups = {"-vit_sink": "vit_sink", "-llm_sink": "llm_sink", "-sinks": "sink", "-dead": "dead"}
    chosen = [Setting(label, (Prune(group=group, match="member"),)) for label, group in groups.items()]
    chosen.append(Setting("-sink+dead", (Prune(group="sink+dead", match="member"),)))
    return chosen + _seed_family("sink+dead", seeds, match="member")


@dataclass(frozen=True)
class CheckedSetting:
    """A setting whose interventions were checked against the model once, for a whole evaluation.

    Attributes:
        setting: The setting.
        plan: Its interventions checked and composed by :func:`~embedlens.interventions.plan`.
        control: The same plus pruning the ``"target"`` group under the setting's position policy, as
            the patch-compression control rows apply it; None when the evaluation has no such rows.
    """

    setting: Setting
    plan: Plan
    control: Plan | None = None

    @property
    def name(self) -> str:
        return self.setting.name


def checked_settings(settings: Sequence[Setting], num_layers: int, *, controls: bool = False) -> list[CheckedSetting]:
    """The baseline followed by ``settings``, each checked against a model of ``num_layers`` layers once
    (with its control-row plan too when ``controls``); names must differ.

    Raises:
        InputError: A setting does not fit the model, or two settings share a name.
    """
    chosen = []
    for setting in [Setting(BASELINE), *settings]:
        items = list(setting.interventions)
        checked = plan(items, num_layers)
        control = plan([*items, Prune(group="target", positions=checked.positions)], num_layers) if controls else None
        chosen.append(CheckedSetting(setting, checked, control))
    names = [c.name for c in chosen]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"settings given twice: {', '.join(duplicates)}")
    return chosen


def with_baseline(settings: Sequence[Setting], num_layers: int) -> list[Setting]:
    """The baseline followed by ``settings``; each is checked against the model, names must differ."""
    return [checked.setting for checked in checked_settings(settings, num_layers)]


@dataclass(frozen=True)
class EvalOptions:
    """How questions are asked and results summarised.

    Attributes:
        batch_size: Questions per forward pass (left-padded; samples do not influence each other).
        max_new_tokens: Longest answer.
        suffix: Text appended to every question (e.g. LLaVA-1.5's
            ``"\\nAnswer the question using a single word or phrase."``).
        anchors: Anchors JSON for group targets (None: the model's built-in anchors).
        bootstrap: Bootstrap resamples for confidence intervals.
        confidence: Confidence level of the intervals.
    """

    batch_size: int = option(8, POSITIVE_INT)
    max_new_tokens: int = option(16, POSITIVE_INT)
    suffix: str = ""
    anchors: str | None = None
    bootstrap: int = option(1000, POSITIVE_INT)
    confidence: float = option(0.95, CONFIDENCE)

    def __post_init__(self) -> None:
        check_fields(self)


def run_identity(
    session: ModelContext, questions: QuestionSet, settings: Sequence[Setting], options: EvalOptions
) -> dict[str, Any]:
    """Everything that decides the answers and the layout of the parts; a resumed run must match it."""
    rows = (
        (q.id, path_label(q.image, questions.source), q.question, q.answers, q.type, q.prune_target)
        for q in questions.items
    )
    return {
        "format": EVAL_FORMAT + "-run",
        **session.model_identity,
        "settings": [s.to_dict() for s in settings],
        "questions": str(resolved(questions.source)),
        "items": len(questions.items),
        "items_hash": items_hash(rows),
        "max_new_tokens": options.max_new_tokens,
        "suffix": options.suffix,
        "anchors": options.anchors,
        "batch_size": options.batch_size,
    }


def _check_targets(questions: QuestionSet, settings: Sequence[CheckedSetting]) -> None:
    """Refuse, before any answer, a setting that prunes ``target`` on questions without target patches
    (it would silently prune nothing)."""
    lacking = [q.id for q in questions.items if q.target_patches is None]
    for setting in settings:
        if lacking and setting.plan.needs_targets:
            raise InputError(
                f"setting {setting.name!r} prunes 'target' but question {lacking[0]} has no target_patches"
            )


def _same_split(a: Question, b: Question) -> bool:
    """Control rows (``prune_target``) are never batched with plain ones."""
    return a.prune_target == b.prune_target


def without_placeholder(questions: QuestionSet, placeholder: str) -> QuestionSet:
    """``questions`` without the rows whose question holds the model's image placeholder (each listed in
    ``skipped``), the others numbered again; ``questions`` itself when none does."""
    refused = {q.index: placeholder_problem(q.question, placeholder) for q in questions.items}
    if not any(refused.values()):
        return questions
    kept = [q for q in questions.items if refused[q.index] is None]
    skipped = [*questions.skipped, *(f"{q.id}: {refused[q.index]}" for q in questions.items if refused[q.index])]
    return QuestionSet(questions.source, [replace(q, index=i) for i, q in enumerate(kept)], skipped)


def _answer_batch(
    session: ModelContext, setting: CheckedSetting, batch: Sequence[Question], options: EvalOptions
) -> list[dict[str, Any]]:
    """Answer one batch under one setting (its plan checked once per evaluation); one record per question."""
    readable, skipped = load_readable(batch)
    records: list[dict[str, Any]] = [{"index": q.index, "status": "unreadable", "reason": why} for q, why in skipped]
    if readable:
        checked = setting.control if readable[0][0].prune_target else setting.plan
        assert checked is not None, "control rows need the settings checked with controls=True"
        prepared = session.prepare([image for _, image in readable], [q.question + options.suffix for q, _ in readable])
        answers, run = generate_batch(
            session,
            prepared,
            max_new_tokens=options.max_new_tokens,
            interventions=checked,
            anchors=options.anchors,
            sample_ids=[q.index for q, _ in readable],
            targets=[q.target_patches or () for q, _ in readable],
        )
        for (q, _), answer, sample in zip(readable, answers, run.last.samples, strict=True):
            records.append(
                {
                    "index": q.index,
                    "status": "ok",
                    "prediction": answer,
                    "score": score(q, answer),
                    "yesno": yes_no(answer) if q.type == "yesno" else None,
                    "pruned": len(sample.pruned),
                    "visual": sample.visual,
                    "tokens_layer0": sample.tokens_per_layer[0],
                    "tokens_mean": float(np.mean(sample.tokens_per_layer)),
                    "gflops": sample_flops(session.adapter, sample).total / 1e9,
                    "seeds": sample.seeds,
                }
            )
    return sorted(records, key=lambda r: r["index"])


def collect(
    session: ModelContext,
    questions: QuestionSet,
    settings: Sequence[CheckedSetting],
    out: Path,
    options: EvalOptions,
    *,
    progress: bool = True,
) -> int:
    """Answer every (setting, question) of this rank's share not yet committed under ``out/parts``;
    returns how many ran. ``settings`` come from :func:`checked_settings` (with ``controls`` when
    ``questions`` hold control rows)."""
    run = eval_run(out)
    done = set(run.records(_answer_key, _PARTS))
    share = shard(questions.items, rank(), world_size())
    batches = [
        (number, batch)
        for number in range(len(settings))
        for batch in contiguous_batches(
            [q for q in share if (number, q.index) not in done], options.batch_size, together=_same_split
        )
    ]

    def compute(job: tuple[int, list[Question]]) -> Commit:
        number, batch = job
        records = [{**r, "setting": number} for r in _answer_batch(session, settings[number], batch, options)]
        return Commit(f"s{number:03d}-b{batch[0].index:07d}", records, size=len(batch))

    total = len(settings) * len(share)
    mine = sum((number, q.index) in done for number in range(len(settings)) for q in share)
    return execute(run, batches, compute, total=total, done=mine, desc="eval", unit="answer", progress=progress)


def _answer_key(record: dict[str, Any]) -> tuple[int, int]:
    return int(record["setting"]), int(record["index"])


def eval_run(out: str | Path) -> RunDir:
    """The run directory of an evaluation in ``out``."""
    return RunDir(out, "eval", (ITEMS_FILE, TABLE_JSON, TABLE_MD))


# --------------------------------------------------------------------------- merging
def merge(
    out: Path, questions: QuestionSet, settings: Sequence[Setting], options: EvalOptions, *, seed: int = 0
) -> dict[str, Any]:
    """Write ``items.parquet``, ``table.json`` and ``table.md`` from the committed parts."""
    records = eval_run(out).records(_answer_key, _PARTS)
    missing = len(settings) * len(questions.items) - len(records)
    if missing:
        raise InputError(f"{missing} answers are not committed yet; run the evaluation again to finish it")
    rows = []
    for number, setting in enumerate(settings):
        for q in questions.items:
            r = records[(number, q.index)]
            rows.append(
                {
                    "setting": setting.name,
                    "setting_index": number,
                    "index": q.index,
                    "id": q.id,
                    "category": q.category,
                    "type": q.type,
                    "question": q.question,
                    "answers": list(q.answers),
                    "status": r["status"],
                    "prediction": r.get("prediction"),
                    "score": r.get("score"),
                    "relaxed": relaxed_score(q, r["prediction"]) if r["status"] == "ok" else None,
                    "yesno": r.get("yesno"),
                    "pruned": r.get("pruned"),
                    "tokens_layer0": r.get("tokens_layer0"),
                    "tokens_mean": r.get("tokens_mean"),
                    "gflops": r.get("gflops"),
                    "seeds": json.dumps(r.get("seeds") or {}),
                }
            )
    failed = [r for r in rows if r["status"] != "ok"]
    if not {r["index"] for r in rows} - {r["index"] for r in failed}:
        reason = records[(failed[0]["setting_index"], failed[0]["index"])].get("reason", failed[0]["status"])
        raise InputError(
            f"none of the {len(questions.items)} questions was answered in every setting; first problem: {reason}"
        )
    with atomic_path(out / ITEMS_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    identity = eval_run(out).identity()
    model = {key: identity[key] for key in ("model", "config_hash", "profile") if key in identity}
    table = {**model, **summarise(rows, questions, settings, options, seed=seed)}
    atomic_write_text(out / TABLE_JSON, json.dumps(table, indent=1))
    atomic_write_text(out / TABLE_MD, render_markdown(table))
    return table


def run_eval(
    session: ModelContext,
    questions: QuestionSet,
    settings: Sequence[Setting],
    out: str | Path,
    *,
    options: EvalOptions | None = None,
    restart: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate the baseline and ``settings`` on ``questions``; resumable; returns the summary (under
    several processes each answers its share and rank 0 merges and returns it, the others None).

    Rows whose question holds the model's image placeholder are skipped and listed (``skipped_rows``),
    and settings are checked against the questions, before the output directory is touched.

    Args:
        session: The loaded model.
        questions: From :func:`embedlens.bench.vqa.read_questions`.
        settings: The settings besides the baseline (it is always evaluated first).
        out: Output directory.
        options: Batching, decoding and summary options.
        restart: Discard an earlier run in ``out`` instead of resuming it.
        progress: Show a progress bar.
    """
    options = options or EvalOptions()
    run = eval_run(out)
    run.check_target()
    if options.anchors is not None:  # a bad anchors file is refused before anything is written
        resolve_anchors(session, options.anchors)
    refuse_placeholder(options.suffix, session.adapter.image_placeholder, "--suffix")
    questions = without_placeholder(questions, session.adapter.image_placeholder)
    controls = any(q.prune_target for q in questions.items)
    checked = checked_settings(settings, session.num_layers, controls=controls)  # the one check
    chosen = [c.setting for c in checked]
    _check_targets(questions, checked)
    identity = run_identity(session, questions, chosen, options)
    with run.session(identity, restart=restart, device=session.adapter.device):
        collect(session, questions, checked, run.out, options, progress=progress)
        return run.finish(lambda: merge(run.out, questions, chosen, options))
