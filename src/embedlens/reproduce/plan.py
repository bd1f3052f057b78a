"""The paper's experiment set as a list of planned runs, each with its command line and predicted cost.

Stages (the reference's ``eval_scripts`` define the settings; every group target is built by
:func:`target`, the one place that spells the intervention notation):

* ``stats``: the sink / dead / alive shares on an image folder (``embedlens stats``);
* ``baseline``: the untouched model on every task;
* ``sinks``: prune ViT sinks, LLM sinks, both (table A);
* ``dead``: prune dead tokens, sinks + dead, and the matched random control over seeds (table B);
* ``skip``: zero LLM-sink updates in early sublayers (prefill), and alive tokens' MLP of layer 1;
* ``inject``: insert the visual tokens at layer k, and the 0.01x norm experiment, on CV-centric tasks.

A run covers one setting on one task group (like the reference's scripts), so a failing group does not
take the others with it and a rerun repeats as little as possible.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedlens.bench.lmms_plugin import MODEL_NAME
from embedlens.checks import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Each, check_fields, option
from embedlens.errors import InputError
from embedlens.interventions import parse
from embedlens.reproduce.costs import CostModel, Shares
from embedlens.reproduce.paper import DOCUMENTS, PAPER_SUITE, TaskSuite, documents

STAGES: tuple[str, ...] = ("stats", "baseline", "sinks", "dead", "skip", "inject")
#: Sustained bf16 throughput the GPU-hour estimate assumes (an A100 / H100 at a realistic utilisation).
THROUGHPUT = 200e12
#: Groups the injection sweep and the norm experiment run on.
INJECT_GROUPS: tuple[str, ...] = ("CV-centric",)
#: Placeholder of the injection layer the sweep has not chosen yet.
BEST = "best"


def target(kind: str, group: str, *, at: str | None = None, **options: Any) -> str:
    """One intervention on a token group, in the notation (the only place the notation is spelled).

    Anchored group targets follow the reference's membership semantics (``match=member``: every token
    whose top-3 holds the group's anchor, whatever else it matches); ``alive`` (no anchor matched) reads
    the same under either.

    Args:
        kind: ``"prune"`` or ``"skip"``.
        group: Group expression (``"dead"``, ``"sink+dead"``, ``"alive"``).
        at: Sublayers of a skip (``"1.5"``, ``"0.5,1"``, ``"0.5-1.5"``).
        options: ``key=value`` options (``select="matched_random"``, ``seed=0``).
    """
    text = f"{kind}:{group}" + (f"@{at}" if at is not None else "")
    if group != "alive":
        options = {**options, "match": "member"}
    return ",".join([text, *(f"{key}={value}" for key, value in options.items())])


@dataclass(frozen=True)
class Row:
    """One row of the paper's table: a setting and the groups it runs on.

    Attributes:
        key: The row's key (``"original"``, ``"-sink+dead"``, ``"skip:llm_sink@1.5"``...); the paper's
            figures are keyed the same way.
        label: What the table calls it.
        stage: The stage it belongs to.
        interventions: The setting in the notation (``""`` for the baseline; may hold :data:`BEST`).
        groups: Task groups it runs on (None: all).
        seeded: One run per seed (the random control).
    """

    key: str
    label: str
    stage: str
    interventions: str
    groups: tuple[str, ...] | None = None
    seeded: bool = False

    @property
    def slug(self) -> str:
        """The row's key as a folder name (``-sink+dead`` -> ``prune_sink_plus_dead``)."""
        return "prune_" + slug(self.key[1:]) if self.key.startswith("-") else slug(self.key)


def slug(text: str) -> str:
    """``text`` as a folder name: ``+`` becomes ``plus``, other runs of characters besides letters, digits
    and dots become one ``_``."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("+", " plus ")).strip("_")


def paper_rows(inject_layers: tuple[int, ...] = (0, 2, 4, 8, 12, 16)) -> list[Row]:
    """Every row of the experiment set, in table order (``inject@0`` is the baseline and not repeated)."""
    rows = [
        Row("original", "original", "baseline", ""),
        Row("-llm_sink", "- LLM sinks", "sinks", target("prune", "llm_sink")),
        Row("-vit_sink", "- ViT sinks", "sinks", target("prune", "vit_sink")),
        Row("-sinks", "- all sinks", "sinks", target("prune", "sink")),
        Row("-dead", "- dead", "dead", target("prune", "dead")),
        Row("-sink+dead", "- sink+dead", "dead", target("prune", "sink+dead")),
        Row("random", "- same number of random alive", "dead", "", seeded=True),
        Row("skip:llm_sink@1.5", "skip LLM sinks: MLP 1", "skip", target("skip", "llm_sink", at="1.5")),
        Row("skip:llm_sink@0.5,1", "skip LLM sinks: MLP 0, attn 1", "skip", target("skip", "llm_sink", at="0.5,1")),
        Row(
            "skip:llm_sink@0.5-1.5",
            "skip LLM sinks: MLP 0, attn 1, MLP 1",
            "skip",
            target("skip", "llm_sink", at="0.5-1.5"),
        ),
        Row("skip:alive@1.5", "skip alive: MLP 1", "skip", target("skip", "alive", at="1.5")),
    ]
    for layer in inject_layers:
        if layer > 0:
            rows.append(Row(f"inject@{layer}", f"inject at layer {layer}", "inject", f"inject@{layer}", INJECT_GROUPS))
    rows.append(Row("scale:0.01", "norm x0.01", "inject", "scale:0.01", INJECT_GROUPS))
    best = f"inject@{BEST},scale=0.01"
    rows.append(Row(best, "norm x0.01, inject at best k", "inject", best, INJECT_GROUPS))
    return rows


def random_control(seed: int) -> str:
    """The matched random control: as many random alive tokens as sinks + dead, drawn with ``seed``."""
    return target("prune", "sink+dead", select="matched_random", seed=seed)


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for.

    Attributes:
        model: Built-in name, directory or hub id.
        out: Output folder.
        profile: EmbedLens profile the model runs under (``paper``).
        suite: Tasks and their groups.
        stages: Stages to plan (see :data:`STAGES`).
        seeds: Seeds of the random control.
        inject_layers: Layers of the injection sweep.
        images: Image folder of the stats stage (None: no stats stage).
        anchors: Anchors JSON for group targets (None: the model's built-in anchors).
        limit: lmms-eval's ``--limit`` (documents per task) for a smoke run.
        num_processes: Processes (GPUs) per run; above 1 runs go through ``accelerate launch``.
        batch_size: Questions per forward pass.
        device: Device of a one-process run.
        include_path: Extra lmms-eval task folder.
        throughput: Sustained FLOP/s the GPU-hour estimate assumes.
    """

    model: str
    out: Path
    profile: str = "paper"
    suite: TaskSuite = PAPER_SUITE
    stages: tuple[str, ...] = STAGES
    seeds: tuple[int, ...] = option((0, 1, 2), Each(NON_NEGATIVE_INT))
    inject_layers: tuple[int, ...] = option((0, 2, 4, 8, 12, 16), Each(NON_NEGATIVE_INT))
    images: Path | None = None
    anchors: Path | None = None
    limit: int | None = option(None, POSITIVE_INT)
    num_processes: int = option(1, POSITIVE_INT)
    batch_size: int = option(1, POSITIVE_INT)
    device: str = "auto"
    include_path: Path | None = None
    throughput: float = option(THROUGHPUT, POSITIVE_FLOAT)

    def __post_init__(self) -> None:
        unknown = [stage for stage in self.stages if stage not in STAGES]
        if unknown:
            raise InputError(f"unknown experiment stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        if "dead" in self.stages and not self.seeds:
            raise InputError("the random control needs at least one seed")
        check_fields(self)
        if "stats" in self.stages and self.images is not None and not self.images.is_dir():
            raise InputError(f"--images {self.images} is not a folder")


@dataclass
class PlannedRun:
    """One process to run: a setting on a task group, or the stats stage.

    Attributes:
        name: Folder name under ``runs/`` (unique).
        kind: ``"stats"`` or ``"lmms"``.
        row: The table row it feeds (``""`` for stats).
        group: The task group (``""`` for stats).
        tasks: lmms-eval tasks.
        interventions: The setting in the notation (``""``: the baseline).
        seed: Seed of the random control, else None.
        flops: Predicted prefill FLOPs per sample (None for stats).
        documents: Documents it evaluates (None if unknown).
        command: The exact command line.
        pending: Why it cannot run yet (its injection layer comes from the sweep), else ``""``.
    """

    name: str
    kind: str
    row: str
    group: str
    tasks: tuple[str, ...]
    interventions: str
    seed: int | None
    flops: float | None
    documents: int | None
    command: list[str] = field(default_factory=list)
    pending: str = ""

    def gpu_hours(self, throughput: float) -> float | None:
        """Predicted prefill GPU hours (FLOPs x documents / throughput)."""
        if self.flops is None or self.documents is None:
            return None
        return self.flops * self.documents / throughput / 3600

    def shell(self) -> str:
        """The command, quoted for a POSIX shell."""
        return shlex.join(self.command)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


def embedlens_command() -> list[str]:
    """How to start the ``embedlens`` command line from this interpreter."""
    script = Path(sys.executable).with_name("embedlens")
    if script.is_file():
        return [str(script)]
    found = shutil.which("embedlens")
    return [found] if found else [sys.executable, "-c", "from embedlens.cli import run; run()"]


def _launcher(options: PlanOptions) -> list[str]:
    if options.num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(options.num_processes)]
    return [sys.executable]


def lmms_command(options: PlanOptions, interventions: str, tasks: tuple[str, ...], output: Path) -> list[str]:
    """The lmms-eval command for one run (``--model embedlens``)."""
    args = [f"pretrained={options.model}", f"profile={options.profile}"]
    if options.device != "auto" and options.num_processes == 1:
        args.append(f"device={options.device}")
    if options.anchors is not None:
        args.append(f"anchors={options.anchors}")
    if interventions:
        args.append(f'interventions="{interventions}"')
    command = [*_launcher(options), "-m", "lmms_eval", "eval", "--model", MODEL_NAME, "--model_args", ",".join(args)]
    command += ["--tasks", ",".join(tasks), "--batch_size", str(options.batch_size)]
    command += ["--output_path", str(output), "--log_samples"]
    if options.limit is not None:
        command += ["--limit", str(options.limit)]
    if options.include_path is not None:
        command += ["--include_path", str(options.include_path)]
    return command


def stats_command(options: PlanOptions, output: Path) -> list[str]:
    """The ``embedlens stats`` command of the stats stage, under the plan's profile."""
    start = embedlens_command()
    if options.num_processes > 1:
        start = [*_launcher(options), *(start if len(start) == 1 else ["-m", "embedlens.cli"])]
    command = [*start, "stats", str(options.images), "--out", str(output), "--model", options.model]
    command += ["--profile", options.profile, "--no-progress"]
    if options.anchors is not None:
        command += ["--anchors", str(options.anchors)]
    if options.device != "auto" and options.num_processes == 1:
        command += ["--device", options.device]
    return command


def run_dir(out: Path, name: str) -> Path:
    """The folder of run ``name``."""
    return out / "runs" / name


def build_plan(
    options: PlanOptions, cost: CostModel, shares: Shares, *, best_layer: int | None = None
) -> list[PlannedRun]:
    """Every run of the experiment set, in order, with commands and predicted costs.

    Args:
        options: What to run.
        cost: The model's cost model.
        shares: Group shares for the FLOPs.
        best_layer: The injection layer the sweep chose (None: not known yet; that run is pending).
    """
    runs: list[PlannedRun] = []
    if "stats" in options.stages and options.images is not None:
        output = options.out / "stats"
        runs.append(PlannedRun("stats", "stats", "", "", (), "", None, None, None, stats_command(options, output)))
    for row in paper_rows(options.inject_layers):
        if row.stage not in options.stages:
            continue
        settings = (
            [(random_control(seed), seed) for seed in options.seeds] if row.seeded else [(row.interventions, None)]
        )
        for interventions, seed in settings:
            pending = ""
            if BEST in interventions:
                if best_layer is None:
                    pending = "its injection layer is the sweep's best, known once the sweep has run"
                    interventions = interventions.replace(BEST, str(_nominal_layer(options.inject_layers)))
                else:
                    interventions = interventions.replace(BEST, str(best_layer))
                if best_layer == 0 and not pending:
                    continue  # inject@0 + scale is scale:0.01, already a row
            items = [parse(spec) for spec in interventions.split()]
            flops = cost.sample_flops(items, shares)
            for group, tasks in options.suite.groups.items():
                if not tasks or (row.groups is not None and group not in row.groups):
                    continue
                name = f"{row.slug}{'' if seed is None else f'_seed{seed}'}__{slug(group)}"
                counts = [documents(task, options.limit) for task in tasks]
                docs = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
                output = run_dir(options.out, name) / "lmms"
                command = lmms_command(options, interventions, tasks, output)
                runs.append(
                    PlannedRun(name, "lmms", row.key, group, tasks, interventions, seed, flops, docs, command, pending)
                )
    return runs


def _nominal_layer(layers: tuple[int, ...]) -> int:
    """The layer a pending scale-at-best-k run is costed at: the sweep's median non-zero layer."""
    chosen = sorted(layer for layer in layers if layer > 0) or [0]
    return chosen[len(chosen) // 2]


def assumptions(options: PlanOptions, cost: CostModel, shares: Shares) -> dict[str, Any]:
    """What the cost estimate assumes, JSON-ready (written beside the plan and printed by the dry run)."""
    return {
        "model": options.model,
        "profile": options.profile,
        "flops": "prefill only (vision tower + projector + decoder layers + LM head on the last token), "
        "counted from the model's config on the meta device (no weights); decoding is not counted",
        "cost_model": cost.to_dict(),
        "text_tokens": f"{cost.text_tokens} nominal text tokens per sample, {cost.prefix_tokens} of them before the "
        "image (LLaVA-1.5's vicuna_v1 system sentence); real prompts differ per task",
        "shares": shares.to_dict(),
        "throughput_tflops": options.throughput / 1e12,
        "throughput": "sustained bf16 throughput of one A100/H100-class GPU at a realistic utilisation",
        "documents": {
            task: {
                "count": documents(task, options.limit),
                **({"source": d.source, "verified": d.verified} if d else {}),
            }
            for task in options.suite.tasks
            for d in [DOCUMENTS.get(task)]
        },
        "limit": options.limit,
        "stats_profile": f"the stats stage runs `embedlens stats --profile {options.profile}`",
    }


def render(runs: list[PlannedRun], options: PlanOptions, cost: CostModel, shares: Shares) -> str:
    """The plan as text: assumptions, one block per run (tasks, setting, predicted cost, command), totals."""
    baseline = cost.sample_flops([], shares)
    info = assumptions(options, cost, shares)
    lines = [
        f"embedlens reproduce: plan for {options.model} (profile {options.profile}), {len(runs)} runs",
        "",
        "assumptions",
        f"  FLOPs       {info['flops']}",
        f"  model       {cost.dims.layers} decoder layers, hidden {cost.dims.hidden}, vocabulary {cost.dims.vocab}, "
        f"{cost.visual_tokens} visual tokens and {cost.vision / 1e9:.0f} GFLOPs of vision per image",
        f"  text        {info['text_tokens']}",
        f"  shares      vit_sink {shares.vit_sink:.1%}, llm_sink {shares.llm_sink:.1%}, dead {shares.dead:.1%}, "
        f"alive {shares.alive:.1%}: {shares.source}; group overlaps ignored",
        f"  throughput  {options.throughput / 1e12:.0f} TFLOP/s ({info['throughput']})",
        f"  stats       {info['stats_profile']}",
        "  documents   per task" + (f" (--limit {options.limit})" if options.limit else ""),
    ]
    for task, entry in info["documents"].items():
        note = f"  {entry['source']}{'' if entry.get('verified') else ' (unverified)'}" if "source" in entry else ""
        lines.append(f"    {task:<24} {entry['count'] if entry['count'] is not None else '?':>6}{note}")
    lines += ["", f"runs (baseline: {baseline / 1e12:.2f} TFLOPs per sample)"]
    total = 0.0
    for number, run in enumerate(runs, 1):
        lines.append("")
        if run.kind == "stats":
            lines.append(f"{number:>3}. {run.name}: group shares on {options.images}")
        else:
            hours = run.gpu_hours(options.throughput)
            total += hours or 0.0
            cost_text = f"{run.flops / 1e12:.2f} TFLOPs/sample ({run.flops / baseline:.2f}x)" if run.flops else "?"
            hours_text = f"{hours:.2f} GPU h" if hours is not None else "? GPU h"
            lines.append(
                f"{number:>3}. {run.name}: {run.interventions or 'baseline'} on {','.join(run.tasks)}; {cost_text}, "
                f"{run.documents if run.documents is not None else '?'} documents, {hours_text}"
            )
            if run.pending:
                lines.append(f"     pending: {run.pending} (costed at the layer shown)")
        lines.append(f"     $ {run.shell()}")
    lines += ["", f"total: {total:.1f} GPU hours of prefill at {options.throughput / 1e12:.0f} TFLOP/s"]
    return "\n".join(lines)
