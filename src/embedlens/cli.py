"""The ``embedlens`` command line.

User errors (bad paths, unreadable images, unsupported models, out-of-range layers, ...) end with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from embedlens.errors import EmbedLensError, InputError

DEFAULT_MODEL = "embedlens-mini"

app = typer.Typer(
    name="embedlens",
    help="What do visual tokens really encode? Probe multimodal LLMs with the embedding lens.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# Options shared by several commands.
ImageArg = Annotated[Path | None, typer.Argument(help="Image file (default: the bundled example photo).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, directory or hub id.")]
RawPromptOpt = Annotated[
    str | None, typer.Option("--raw-prompt", help="Full model text used verbatim; must hold the image placeholder.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision of the model.")]
AnchorsOpt = Annotated[
    Path | None, typer.Option(help="Anchors JSON file (default: the model's built-in anchors, if any).")
]
RuleTopKOpt = Annotated[
    int | None, typer.Option("--top-k", "-k", help="Nearest ids the rule looks at (default: the anchors', 3).")
]
RestartOpt = Annotated[bool, typer.Option(help="Discard what --out holds and start over.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar on stderr.")]
QuestionBatchOpt = Annotated[int, typer.Option("--batch-size", help="Questions per forward pass (left-padded).")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
SuffixOpt = Annotated[
    str, typer.Option("--suffix", help="Text appended to every question (e.g. an answer-format hint).")
]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples of questions for the intervals.")]
DatasetArg = Annotated[Path, typer.Argument(help='Folder of images, or JSONL of {"image": PATH, "prompt": TEXT}.')]


@app.callback()
def _root() -> None:
    """What do visual tokens really encode? Probe multimodal LLMs with the embedding lens."""


class LensName(str, Enum):
    """Lens choices on the command line."""

    embedding = "embedding"
    logit = "logit"


def _quiet_transformers() -> None:
    """Keep library chatter (warnings, loading bars) off stderr, which is reserved for our messages."""
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _parse_exclude(values: list[str]) -> tuple[str, ...]:
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return tuple(items)


@app.command()
def probe(
    image: ImageArg = None,
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[
        str | None, typer.Option(help="Your question; the image is placed by the model's chat template.")
    ] = None,
    raw_prompt: RawPromptOpt = None,
    layer: Annotated[int, typer.Option(help="0 = projector output; l = output of decoder layer l; -1 = last.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Tokens per visual token.")] = 10,
    lens: Annotated[LensName, typer.Option(help="embedding (input table, cosine) or logit.")] = LensName.embedding,
    exclude: Annotated[
        list[str], typer.Option(help="Token kinds never returned: special, bytes (repeat or comma-separate).")
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    out: Annotated[Path | None, typer.Option(help="Directory for tokens.parquet, result.json and top1.png.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Show what every visual token encodes: its nearest vocabulary tokens."""
    from embedlens.lens import check_exclude

    if top_k <= 0:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")
    if prompt is not None and raw_prompt is not None:
        raise InputError("give either --prompt or --raw-prompt, not both")
    kinds = check_exclude(_parse_exclude(exclude))
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    session, image = _open_session(image, model, device, dtype, revision, raw_prompt=raw_prompt, layer=layer)
    result = session.probe(
        image, prompt=prompt, raw_prompt=raw_prompt, layer=layer, top_k=top_k, lens=lens.value, exclude=kinds
    )
    written = _save(result, out) if out is not None else []
    if as_json:
        sys.stdout.write(result.to_json(provenance=False) + "\n")
        return
    _print_summary(result, written)


@app.command()
def generate(
    image: ImageArg = None,
    prompt: Annotated[str | None, typer.Option(help="Your question, placed by the model's chat template.")] = None,
    raw_prompt: RawPromptOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    intervene: Annotated[
        list[str],
        typer.Option(
            help="Intervention, repeatable: prune:dead, prune:sink+dead,positions=reindex, "
            "prune:dead,select=matched_random,seed=1, prune:[0,5,7], skip:llm_sink@1.5, skip:visual@0-3.5, "
            "inject@8, exit@12, scale:0.01."
        ),
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    anchors: AnchorsOpt = None,
    timing: Annotated[
        bool, typer.Option("--timing", help="Also time the prefill, untouched and with the interventions.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Answer a question about an image (greedy decoding), optionally under interventions.

    With --intervene (or --timing) it also prints the tokens entering each decoder layer and the
    prefill FLOPs against the untouched model.
    """
    from embedlens.interventions import parse_all

    if max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    if (prompt is None) == (raw_prompt is None):
        raise InputError("give exactly one of --prompt or --raw-prompt")
    items = parse_all(intervene)
    session, image = _open_session(image, model, device, dtype, revision, raw_prompt=raw_prompt, interventions=items)
    raw_prompts = None if raw_prompt is None else [raw_prompt]
    batch = session.prepare([image], None if raw_prompts else [prompt], raw_prompts=raw_prompts)
    answers, run = session.generate_batch(batch, max_new_tokens=max_new_tokens, interventions=items, anchors=anchors)
    typer.echo(answers[0])
    if items or timing:
        _print_accounting(session, batch, run, items, anchors, timing)


def _print_accounting(session, batch, run, items, anchors, timing: bool) -> None:
    """Tokens per layer, what was removed, FLOPs (and latency) against the untouched model."""
    from embedlens.bench.accounting import account
    from embedlens.bench.flops import sample_flops

    record = run.last.samples[0]
    typer.echo(f"interventions: {run.describe()}")
    typer.echo(f"tokens per layer: {_runs(record.tokens_per_layer)} (untouched: {record.length})")
    if run.plan.prunes:
        typer.echo(f"pruned: {len(record.pruned)} of {record.visual} visual tokens")
    for name, seed in record.seeds.items():
        typer.echo(f"seed of {name}: {seed}")
    if record.skipped:
        skipped = ", ".join(
            f"{rows} token{'' if rows == 1 else 's'} at {where}" for where, rows in record.skipped.items()
        )
        typer.echo(f"skipped updates: {skipped}")
    if timing:
        found = account(session, batch, items, measure=True, anchors=anchors)
        flops, baseline = found.flops, found.baseline
    else:
        flops, baseline = sample_flops(session.adapter, record), sample_flops(session.adapter, record, baseline=True)
    typer.echo(
        f"prefill FLOPs: {flops.total / 1e9:.2f} G (untouched {baseline.total / 1e9:.2f} G, "
        f"predicted speedup {baseline.total / flops.total:.2f}x; vision {flops.vision / 1e9:.2f} G)"
    )
    if run.plan.skips:
        typer.echo("note: skipped updates are computed and then zeroed, so their FLOP saving is not realised")
    if timing:
        typer.echo(
            f"prefill time: {found.seconds:.3f} s (untouched {found.baseline_seconds:.3f} s, "
            f"measured speedup {found.measured_speedup:.2f}x)"
        )


def _runs(values: list[int]) -> str:
    """``[7, 7, 23, 23]`` -> ``"7 (layers 0-1), 23 (layers 2-3)"``."""
    parts, start = [], 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            where = f"layer {start}" if index - 1 == start else f"layers {start}-{index - 1}"
            parts.append(f"{values[start]} ({where})")
            start = index
    return ", ".join(parts)


@app.command()
def classify(
    image: ImageArg = None,
    model: ModelOpt = DEFAULT_MODEL,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    prompt: Annotated[
        str | None, typer.Option(help="Your question; the image is placed by the model's chat template.")
    ] = None,
    raw_prompt: RawPromptOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Directory for tokens.parquet, result.json and groups.png (the group map).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Label every visual token ViT sink, LLM sink, dead or alive (the paper's anchor rule)."""
    from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message

    if top_k is not None and top_k <= 0:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")
    if prompt is not None and raw_prompt is not None:
        raise InputError("give either --prompt or --raw-prompt, not both")
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    chosen = Anchors.load(anchors) if anchors is not None else builtin_anchors(model)
    if chosen is None:
        raise InputError(no_builtin_message(model))
    session, image = _open_session(image, model, device, dtype, revision, raw_prompt=raw_prompt)
    result = session.classify(image, prompt=prompt, raw_prompt=raw_prompt, anchors=chosen, top_k=top_k)
    written = []
    if out is not None:
        from embedlens.pictures.groups import save_group_map

        written = [*result.save(out).values(), save_group_map(result, out / "groups.png")]
    if as_json:
        sys.stdout.write(result.to_json(provenance=False) + "\n")
        return
    _print_classification(result, session.adapter.tokenizer, written)


@app.command()
def stats(
    dataset: DatasetArg,
    out: Annotated[Path, typer.Option(help="Result directory (resumes the run it holds, if the settings match).")],
    model: ModelOpt = DEFAULT_MODEL,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    prompt: Annotated[str | None, typer.Option(help="Question for images without one in the dataset.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass and per committed batch.")] = 4,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of images for the intervals.")] = 1000,
    restart: RestartOpt = False,
    progress: ProgressOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Group fractions (with intervals), per-token Parquet and heatmaps over a dataset; resumable.

    Under `accelerate launch` or `torchrun` each process takes a contiguous share of the dataset and
    rank 0 merges the result.
    """
    from embedlens.datasets import describe_problems, open_dataset
    from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message
    from embedlens.taxonomy.stats import StatsOptions, run_stats, run_stats_distributed

    options = StatsOptions(top_k=top_k, prompt=prompt, batch_size=batch_size, bootstrap=bootstrap)
    if top_k is not None and top_k <= 0:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    data = open_dataset(dataset)
    chosen = Anchors.load(anchors) if anchors is not None else builtin_anchors(model)
    if chosen is None:
        raise InputError(no_builtin_message(model))
    with _process_group(device) as (rank, world, device):
        if data.malformed and rank == 0:
            typer.echo(f"embedlens: warning: {dataset}: {describe_problems(data.malformed)}", err=True)
        session = _load_session(model, device, dtype, revision)
        kwargs = {"anchors": chosen, "options": options, "restart": restart, "progress": progress}
        if world > 1:
            summary = run_stats_distributed(session, data, out, **kwargs)
        else:
            summary = run_stats(session, data, out, **kwargs)
    if summary is not None:
        _print_stats(summary)


@app.command(name="make-patchbench")
def make_patchbench(
    out: Annotated[Path, typer.Option(help="Directory for images/, items.jsonl, control.jsonl and meta.json.")],
    model: ModelOpt = DEFAULT_MODEL,
    per_category: Annotated[int, typer.Option(help="Items per category.")] = 200,
    categories: Annotated[
        str, typer.Option(help="Comma-separated: object, colour, count, ocr.")
    ] = "object,colour,count,ocr",
    seed: Annotated[int, typer.Option(help="Everything depends only on (seed, category, index).")] = 0,
    progress: ProgressOpt = True,
    revision: RevisionOpt = None,
) -> None:
    """Generate the patch-compression benchmark for a model: each target inside exactly one visual patch.

    Only the model's processor and config are read (no weights). Every placement is verified by running
    the processor with and without the target.
    """
    from embedlens.bench.patchbench import generate_benchmark
    from embedlens.models.registry import load_config, load_processor, resolve

    chosen = tuple(part.strip() for part in categories.split(",") if part.strip())
    if per_category <= 0:
        raise InputError(f"--per-category must be a positive integer, got {per_category}")
    _quiet_transformers()
    resolved = resolve(model, revision)
    config = load_config(resolved)
    patch = getattr(getattr(config, "vision_config", None), "patch_size", None)
    if not patch:
        raise InputError(f"cannot read the vision patch size from {model}'s config")
    processor = load_processor(resolved)
    meta = generate_benchmark(
        out,
        processor.image_processor,
        int(patch),
        per_category=per_category,
        categories=chosen,
        seed=seed,
        model=model,
        progress=progress,
    )
    geometry = meta["geometry"]
    typer.echo(
        f"wrote {meta['items']} items ({', '.join(f'{k} {v}' for k, v in meta['counts'].items())}) for a "
        f"{geometry['rows']}x{geometry['cols']} grid of {geometry['patch']} px patches to {out}"
    )
    typer.echo(f"evaluate: embedlens eval {out} --out RESULTS --model {model} [--preset paper-pruning]")


def _eval_options(batch_size: int, max_new_tokens: int, suffix: str, anchors: Path | None, bootstrap: int):
    """The evaluation options of ``eval`` and ``inject-sweep`` (a literal ``\\n`` in the suffix is a newline)."""
    from embedlens.bench.runner import EvalOptions

    return EvalOptions(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        suffix=suffix.replace("\\n", "\n"),
        anchors=str(anchors) if anchors is not None else None,
        bootstrap=bootstrap,
    )


@app.command(name="eval")
def eval_(
    dataset: Annotated[
        Path, typer.Argument(help="JSONL of {image, question, answers, type, category}, or a make-patchbench folder.")
    ],
    out: Annotated[Path, typer.Option(help="Result directory (resumes the run it holds, if the settings match).")],
    model: ModelOpt = DEFAULT_MODEL,
    intervention: Annotated[
        list[str],
        typer.Option(
            help="A setting to compare with the baseline, repeatable: interventions separated by spaces "
            "or ';', e.g. 'prune:dead' or 'prune:sink inject@8'."
        ),
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    preset: Annotated[str | None, typer.Option(help="Named settings: paper-pruning.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds of the preset's random control, comma-separated.")] = "0,1,2,3,4",
    anchors: AnchorsOpt = None,
    batch_size: QuestionBatchOpt = 8,
    max_new_tokens: MaxNewTokensOpt = 16,
    suffix: SuffixOpt = "",
    bootstrap: BootstrapOpt = 1000,
    restart: RestartOpt = False,
    progress: ProgressOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Evaluate the baseline and intervention settings side by side, in one run and code path; resumable."""
    from embedlens.bench.runner import parse_setting, run_eval
    from embedlens.bench.runner import preset as preset_settings
    from embedlens.bench.vqa import read_questions
    from embedlens.datasets import describe_problems
    from embedlens.interventions import plan

    settings = [parse_setting(text) for text in intervention]
    if preset is not None:
        try:
            seed_list = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise InputError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        settings = preset_settings(preset, seed_list) + settings
    options = _eval_options(batch_size, max_new_tokens, suffix, anchors, bootstrap)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    questions = read_questions(dataset)
    if questions.skipped:
        typer.echo(f"embedlens: warning: {questions.source}: {describe_problems(questions.skipped)}", err=True)
    session = _load_session(model, device, dtype, revision, interventions=None)
    for setting in settings:
        plan(setting.interventions, session.num_layers)
    table = run_eval(session, questions, settings, out, options=options, restart=restart, progress=progress)
    from embedlens.bench.runner import render_markdown

    typer.echo(render_markdown(table), nl=False)
    typer.echo(f"wrote {out / 'items.parquet'}, {out / 'table.md'} and {out / 'table.json'}")


@contextlib.contextmanager
def _process_group(device: str):
    """Join the ``torch.distributed`` group that ``accelerate launch`` / ``torchrun`` describe in the
    environment (``WORLD_SIZE`` > 1), and leave it afterwards; yields ``(rank, world, device)``, the
    device being this process's GPU under ``device="auto"`` when there are GPUs."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield 0, 1, device
        return
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if started:
            dist.destroy_process_group()


def _print_stats(summary) -> None:
    data = summary.data
    images = data["images"]
    typer.echo(f"model    {data['model']}")
    typer.echo(f"dataset  {data['dataset']['source']}: {images['used']} images used of {images['total']}")
    rule = data["rule"]
    typer.echo(f"rule     top-{rule['top_k']}, anchors {rule['anchors']} (precedence {' > '.join(rule['precedence'])})")
    level = data["intervals"]["confidence"]
    typer.echo("")
    typer.echo(f"  {'group':<9} {'tokens':>9}  {'share':>6}  {f'{level:.0%} interval (images resampled)':<30}")
    for name, entry in data["groups"].items():
        low, high = entry["ci"]
        typer.echo(f"  {name:<9} {entry['tokens']:>9}  {entry['fraction']:>6.1%}  {low:.1%} .. {high:.1%}")
    typer.echo(f"  {'total':<9} {data['tokens']:>9}")
    if images["skipped"]:
        typer.echo("")
        typer.echo(f"skipped {images['skipped']} unreadable image(s):")
        for entry in images["skipped_list"][:10]:
            typer.echo(f"  {entry['key']}: {entry['reason']}")
        if images["skipped"] > 10:
            typer.echo(f"  ... and {images['skipped'] - 10} more (see images.parquet)")
    typer.echo("")
    for path in summary.files.values():
        typer.echo(f"wrote {path}")


@app.command("discover-anchors")
def discover_anchors(
    dataset: DatasetArg,
    out: Annotated[Path, typer.Option(help="Anchors JSON file to write (read back by --anchors).")],
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Nearest ids looked at per token.")] = 3,
    min_fraction: Annotated[
        float, typer.Option(help="An id must recur in at least this share of the images to be a candidate.")
    ] = 0.5,
    prompt: Annotated[str | None, typer.Option(help="Question for images without one in the dataset.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    progress: ProgressOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Find a model's sink and dead anchor ids over a dataset, with the evidence for each."""
    from embedlens.context import DEFAULT_PROMPT
    from embedlens.datasets import describe_problems, open_dataset
    from embedlens.taxonomy.discover import DiscoveryConfig
    from embedlens.taxonomy.discover import discover_anchors as discover

    if out.is_dir():
        raise InputError(f"--out must be a file path, but {out} is a directory")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}")
    config = DiscoveryConfig(top_k=top_k, min_image_fraction=min_fraction)
    data = open_dataset(dataset)
    if data.malformed:
        typer.echo(f"embedlens: warning: {dataset}: {describe_problems(data.malformed)}", err=True)
    session = _load_session(model, device, dtype, revision)
    prompts = [item.prompt or prompt or DEFAULT_PROMPT for item in data.items]
    found = discover(
        session, [item.image for item in data.items], prompts, config=config, batch_size=batch_size, progress=progress
    )
    found.anchors.save(out)
    _print_discovery(found, out)


def _print_discovery(found, out: Path) -> None:
    typer.echo(f"model    {found.anchors.model}")
    typer.echo(f"images   {found.num_images} used, {len(found.skipped)} skipped; {found.num_tokens} visual tokens")
    typer.echo(
        f"layers   LLM-sink evidence at layer {found.sink_layer}, dead-token stability at layer {found.cross_layer}"
    )
    typer.echo("")
    typer.echo(
        f"  {'id':>7}  {'piece':<14} {'images':>6} {'indep':>6} {'norm x':>7} {'bos cos':>7} "
        f"{'massive':>7} {'stable':>6}  verdict"
    )
    for c in found.candidates:
        verdict = c.group or "-"
        typer.echo(
            f"  {c.id:>7}  {c.piece!r:<14} {c.image_fraction:>6.0%} {c.independence:>6.2f} {c.norm_ratio:>7.2f} "
            f"{c.bos_cosine:>7.2f} {c.massive_ratio:>7.1f} {c.cross_layer_cosine:>6.2f}  {verdict}: {c.reason}"
        )
    if not found.candidates:
        typer.echo("  (no id recurs in enough images to be a candidate)")
    for entry in found.skipped[:10]:
        typer.echo(f"skipped  {entry.image}: {entry.reason}")
    typer.echo("")
    typer.echo("anchors  " + " | ".join(f"{name} {list(ids)}" for name, ids in found.anchors.groups.items()))
    typer.echo(f"wrote {out}")


def parse_layer_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"0,4,8"`` or ``"0-8"`` or ``"0-8:2"`` (every 2nd) -> layer numbers; None for None or ``"all"``."""
    if text is None or text.strip() == "all":
        return None
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            span, _, step = part.partition(":")
            low, dash, high = span.partition("-")
            first, last = int(low), int(high) if dash else int(low)
            stride = int(step) if step else 1
        except ValueError:
            raise InputError(f"{option} takes layers like 0,4,8 or 0-8 or 0-30:2, got {text!r}") from None
        if stride <= 0 or last < first or first < 0:
            raise InputError(f"{option}: bad layer range {part!r}")
        layers += range(first, last + 1, stride)
    if not layers:
        raise InputError(f"{option} names no layers")
    return tuple(sorted(set(layers)))


@app.command()
def align(
    dataset: DatasetArg,
    out: Annotated[Path, typer.Option(help="Result directory (resumes the run it holds, if the settings match).")],
    model: ModelOpt = DEFAULT_MODEL,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    lens_top_k: Annotated[int, typer.Option(help="Lens neighbours read for readability.")] = 5,
    lens_layers: Annotated[
        str, typer.Option(help="Layers whose readability is measured: all, or e.g. 0,8,16 or 0-30:2.")
    ] = "all",
    text: Annotated[
        Path | None, typer.Option(help="Reference passages, one per line (default: the packaged sentences).")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Question for images without one in the dataset.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass and per committed batch.")] = 4,
    restart: RestartOpt = False,
    progress: ProgressOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Where visual tokens belong in the LLM: norms, alignment to text states and readability per layer."""
    from embedlens.analysis.alignment import AlignOptions, run_align
    from embedlens.datasets import describe_problems, open_dataset

    if top_k is not None and top_k <= 0:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")
    options = AlignOptions(
        prompt=prompt,
        anchors=str(anchors) if anchors is not None else None,
        rule_top_k=top_k,
        lens_top_k=lens_top_k,
        lens_layers=parse_layer_list(lens_layers, "--lens-layers"),
        text=str(text) if text is not None else None,
        batch_size=batch_size,
    )
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    data = open_dataset(dataset)
    if data.malformed:
        typer.echo(f"embedlens: warning: {dataset}: {describe_problems(data.malformed)}", err=True)
    session = _load_session(model, device, dtype, revision)
    result = run_align(session, data, out, options=options, restart=restart, progress=progress)
    typer.echo((out / "table.md").read_text(encoding="utf-8"), nl=False)
    if result.unreadable:
        typer.echo(f"skipped {len(result.unreadable)} unreadable image(s), first: {result.unreadable[0]}")
    typer.echo(f"wrote {out}/layers.parquet, summary.json, table.md, norms.png, alignment.png, readability.png")


@app.command("inject-sweep")
def inject_sweep(
    datasets: Annotated[
        list[Path],
        typer.Argument(help="One or more JSONL question files or make-patchbench folders, each evaluated in full."),
    ],
    out: Annotated[Path, typer.Option(help="Result directory (resumes the evaluations it holds).")],
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str, typer.Option(help="Injection layers: all, or e.g. 0,4,8 or 0-28:4.")] = "all",
    skip_until: Annotated[
        int | None,
        typer.Option(help="Comparison row: skip visual attention+MLP in layers below this (default: half; 0: none)."),
    ] = None,
    scales: Annotated[str, typer.Option(help="Norm-scaling experiment: comma-separated scales ('' for none).")] = (
        "0.01,0.1,1"
    ),
    best_layer: Annotated[
        int | None, typer.Option(help="Injection layer of the scaling experiment (default: the sweep's best).")
    ] = None,
    timing_items: Annotated[int, typer.Option(help="Questions whose prefill is timed per setting (0: none).")] = 4,
    timing_repeats: Annotated[int, typer.Option(help="Timed rounds per question and setting (median).")] = 3,
    anchors: AnchorsOpt = None,
    batch_size: QuestionBatchOpt = 8,
    max_new_tokens: MaxNewTokensOpt = 16,
    suffix: SuffixOpt = "",
    bootstrap: BootstrapOpt = 1000,
    restart: RestartOpt = False,
    progress: ProgressOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
) -> None:
    """Accuracy, FLOPs and prefill time for every injection layer, with the baseline; then norm scaling."""
    from embedlens.analysis.sweep import SweepOptions, run_inject_sweep
    from embedlens.bench.vqa import read_questions
    from embedlens.datasets import describe_problems

    try:
        scale_list = tuple(float(part) for part in scales.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--scales must be comma-separated numbers, got {scales!r}") from None
    options = SweepOptions(
        layers=parse_layer_list(layers, "--layers"),
        skip_until=skip_until,
        scales=scale_list,
        best_layer=best_layer,
        timing_items=timing_items,
        timing_repeats=timing_repeats,
        eval=_eval_options(batch_size, max_new_tokens, suffix, anchors, bootstrap),
    )
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    question_sets = [read_questions(path) for path in datasets]
    for questions in question_sets:
        if questions.skipped:
            typer.echo(f"embedlens: warning: {questions.source}: {describe_problems(questions.skipped)}", err=True)
    session = _load_session(model, device, dtype, revision)
    result = run_inject_sweep(session, question_sets, out, options=options, restart=restart, progress=progress)
    typer.echo((out / "sweep.md").read_text(encoding="utf-8"), nl=False)
    if result.scaling_rows:
        typer.echo("")
        typer.echo((out / "scaling.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(
        f"wrote {out}/sweep.parquet, sweep.md, sweep.json, sweep.png" + (", scaling.md" if result.scaling_rows else "")
    )


@app.command("train-mini")
def train_mini(
    out: Annotated[Path, typer.Option(help="Run directory: projector, log, checkpoint (resumes if present).")],
    seed: Annotated[int, typer.Option(help="Seed of data, order and initialisation.")] = 0,
    images: Annotated[int, typer.Option(help="Generated training images (plus the packaged photos).")] = 3000,
    steps: Annotated[int, typer.Option(help="Optimiser steps (batch of 4 sequences each).")] = 1600,
    minutes: Annotated[float, typer.Option(help="Time budget for the optimisation; stops early if reached.")] = 55.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    lora_rank: Annotated[
        int, typer.Option(help="Also train low-rank adapters of this rank on the LLM (0: projector only).")
    ] = 0,
    lora_lr: Annotated[float, typer.Option(help="Peak learning rate of the LLM adapters.")] = 2e-4,
    cls_token: Annotated[
        bool,
        typer.Option(
            "--cls-token/--no-cls-token",
            help="Feed the vision tower's CLS token to the LLM before the patch tokens ('full' feature selection).",
        ),
    ] = False,
    loss_per: Annotated[
        str, typer.Option(help="Average the loss per answer token ('token') or weigh every answer once ('answer').")
    ] = "token",
    llm_dtype: Annotated[
        str,
        typer.Option(
            help="Type of the frozen LLM while training: auto (bfloat16 where the CPU/GPU computes it fast, "
            "else float32), float32 or bfloat16."
        ),
    ] = "auto",
) -> None:
    """Train the embedded mini model's projector on generated images (frozen vision tower and LLM).

    With --lora-rank the LLM also gets trainable low-rank adapters; they are saved beside the projector
    as lora.safetensors and merged into the LLM's weights when a model is built from them.
    """
    from embedlens.mini.train import LLM_DTYPES, LORA, LOSS_WEIGHTINGS, PROJECTOR, TrainConfig, run_training

    checks = (("--images", images), ("--steps", steps), ("--minutes", minutes), ("--lr", lr), ("--lora-lr", lora_lr))
    for name, value in checks:
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    if lora_rank < 0:
        raise InputError(f"--lora-rank must be 0 (off) or positive, got {lora_rank}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a directory, but {out} is a file")
    if loss_per not in LOSS_WEIGHTINGS:
        raise InputError(f"--loss-per must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_per!r}")
    if llm_dtype not in LLM_DTYPES:
        raise InputError(f"--llm-dtype must be one of {', '.join(LLM_DTYPES)}, got {llm_dtype!r}")
    _quiet_transformers()
    config = TrainConfig(
        seed=seed,
        images=images,
        steps=steps,
        minutes=minutes,
        lr=lr,
        lora_rank=lora_rank,
        lora_lr=lora_lr,
        strategy="full" if cls_token else "default",
        loss_weighting=loss_per,
        llm_dtype=llm_dtype,
    )
    log = run_training(out, config)
    state = "finished" if log["finished"] else f"stopped by the time budget at step {log['steps_done']}"
    typer.echo(f"{state}: loss {log['loss_first_50']} -> {log['loss_last_50']}")
    written = [out / PROJECTOR] + ([out / LORA] if lora_rank else [])
    typer.echo(f"wrote {' and '.join(map(str, written))} and {out / 'train_log.json'}")


def _open_session(
    image: Path | None,
    model: str,
    device: str,
    dtype: str,
    revision: str | None,
    *,
    raw_prompt: str | None = None,
    layer: int | None = None,
    interventions: list | None = None,
):
    """Check the cheap things first (image, device, layer, placeholder), then load the model quietly.

    Returns the session and the image path (the bundled example when ``image`` is None).
    """
    from embedlens.examples import example_image
    from embedlens.images import load_image

    image = image if image is not None else example_image()
    load_image(image)  # fail fast on a missing or unreadable image
    session = _load_session(
        model, device, dtype, revision, raw_prompt=raw_prompt, layer=layer, interventions=interventions
    )
    return session, image


def _load_session(
    model: str,
    device: str,
    dtype: str,
    revision: str | None,
    *,
    raw_prompt: str | None = None,
    layer: int | None = None,
    interventions: list | None = None,
):
    """Check the device, layer, interventions and placeholder against the config, then load the model."""
    from embedlens.models.base import resolve_layer
    from embedlens.models.registry import (
        adapter_class_for,
        load_adapter,
        load_config,
        load_processor,
        resolve,
        resolve_device,
    )
    from embedlens.session import Session

    resolve_device(device)
    _quiet_transformers()
    resolved = resolve(model, revision)
    config = load_config(resolved)
    adapter_cls = adapter_class_for(config)
    if layer is not None:
        resolve_layer(layer, adapter_cls.num_layers_from_config(config))
    if interventions:
        from embedlens.interventions import plan

        plan(interventions, adapter_cls.num_layers_from_config(config))
    processor = load_processor(resolved)
    placeholder = getattr(processor, "image_token", "<image>")
    if raw_prompt is not None and placeholder not in raw_prompt:
        raise InputError(f"the raw prompt must contain the image placeholder {placeholder!r}")
    adapter = load_adapter(model, device=device, dtype=dtype, revision=revision, config=config, processor=processor)
    return Session(adapter)


def _save(result, out: Path) -> list[Path]:
    from embedlens.pictures.probe import save_top1_grid

    paths = list(result.save(out).values())
    paths.append(save_top1_grid(result, out / "top1.png"))
    return paths


def _print_summary(result, written: list[Path]) -> None:
    rows, cols = result.grid
    typer.echo(f"model   {result.provenance.model}")
    typer.echo(f"image   {result.image}")
    typer.echo(f"prompt  {result.prompt!r}")
    typer.echo(f"lens    {result.lens} lens at layer {result.layer}, top-{result.provenance.k}")
    typer.echo(
        f"grid    {rows} x {cols} = {len(result)} visual tokens at positions "
        f"{int(result.position.min())}..{int(result.position.max())}"
    )
    norms = result.norm
    typer.echo(
        f"norm    min {norms.min():.3g}  median {float(sorted(norms)[len(norms) // 2]):.3g}  max {norms.max():.3g}"
    )
    top1 = collections.Counter(
        (int(ids[0]), toks[0]) for ids, toks in zip(result.top_ids, result.top_tokens, strict=True)
    )
    typer.echo("")
    typer.echo(f"most common top-1 tokens ({len(top1)} distinct):")
    typer.echo(f"  {'id':>7}  {'token':<16} {'patches':>7}  {'share':>6}")
    for (token_id, piece), count in top1.most_common(12):
        typer.echo(f"  {token_id:>7}  {piece!r:<16} {count:>7}  {count / len(result):>6.1%}")
    typer.echo("")
    show = min(8, len(result))
    typer.echo(f"first {show} visual tokens (row, col): top-{result.provenance.k} tokens with scores")
    for i in range(show):
        pairs = ", ".join(f"{t!r} {s:.3f}" for t, s in zip(result.top_tokens[i], result.top_sims[i], strict=True))
        typer.echo(f"  ({result.row[i]:>2}, {result.col[i]:>2})  {pairs}")
    if written:
        typer.echo("")
        for path in written:
            typer.echo(f"wrote {path}")


def _print_classification(result, tokenizer, written: list[Path]) -> None:
    probe, classification, anchors = result.probe, result.classification, result.anchors
    rows, cols = probe.grid
    total = len(result)
    typer.echo(f"model    {probe.provenance.model}")
    typer.echo(f"image    {probe.image}")
    typer.echo(f"prompt   {probe.prompt!r}")
    typer.echo(
        f"rule     any of the top-{classification.top_k} nearest input-embedding ids (layer {probe.layer}) "
        f"is an anchor; precedence {' > '.join(classification.precedence)}"
    )
    size = len(tokenizer)
    described = []
    for name, ids in anchors.groups.items():
        pieces = [repr(tokenizer.convert_ids_to_tokens(i)) if i < size else f"<row {i}>" for i in ids]
        described.append(f"{name} " + (", ".join(f"{i} {p}" for i, p in zip(ids, pieces, strict=True)) or "-"))
    typer.echo(f"anchors  {' | '.join(described)}  (for {anchors.model}, vocabulary {anchors.vocab_hash[:8]})")
    typer.echo(f"grid     {rows} x {cols} = {total} visual tokens")
    typer.echo("")
    typer.echo(f"  {'group':<9} {'tokens':>7}  {'share':>6}")
    for name, count in classification.counts.items():
        typer.echo(f"  {name:<9} {count:>7}  {(count / total if total else 0.0):>6.1%}")
    pairs = ", ".join(f"{pair} {count}" for pair, count in classification.overlaps.items())
    typer.echo(f"overlaps {pairs} ({classification.n_overlapping} tokens match 2+ groups)")
    typer.echo("")
    typer.echo("map (S = ViT sink, L = LLM sink, D = dead, . = alive)")
    from embedlens.taxonomy.groups import LETTERS

    letters = [LETTERS[str(g)] for g in classification.group]
    for r in range(rows):
        typer.echo("  " + " ".join(letters[r * cols : (r + 1) * cols]))
    if written:
        typer.echo("")
        for path in written:
            typer.echo(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    try:
        app(args=args, standalone_mode=False, prog_name="embedlens")
    except EmbedLensError as exc:
        sys.stderr.write(f"embedlens: error: {exc}\n")
        return 2
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except typer.Abort:
        sys.stderr.write("embedlens: interrupted\n")
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        command = f"embedlens {ctx.info_name}" if ctx is not None and ctx.info_name != "embedlens" else "embedlens"
        sys.stderr.write(f"embedlens: error: {message} (see '{command} --help')\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("embedlens: interrupted\n")
        return 130
    return 0


def run() -> None:
    """Console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
