"""One image at a time: ``embedlens probe``, ``classify`` and ``generate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from embedlens.cli.app import app
from embedlens.cli.options import (
    POSITIVE_INT,
    AnchorsOpt,
    ImageArg,
    JsonOpt,
    LensName,
    MaxNewTokensOpt,
    ModelArgs,
    PromptArgs,
    RawPromptOpt,
    ReportOpt,
    RuleTopKOpt,
    model_options,
    out_dir_option,
    prompt_options,
    split_list,
    write_run_report,
)
from embedlens.errors import InputError


def _image(image: Path | None) -> Path:
    """The image to use (the bundled example when None), checked readable before any model loads."""
    from embedlens.examples import example_image
    from embedlens.images import load_image

    image = image if image is not None else example_image()
    load_image(image)
    return image


def _check_report(report: bool, out: Path | None) -> None:
    """Refuse ``--report`` without ``--out`` before any model loads."""
    if report and out is None:
        raise InputError("--report writes OUT/report.html: give --out")


def _echo_written(written: list[Path]) -> None:
    if written:
        typer.echo("")
        for path in written:
            typer.echo(f"wrote {path}")


@app.command()
@model_options
@prompt_options
def probe(
    models: ModelArgs,
    image: ImageArg = None,
    *,
    prompts: PromptArgs,
    layer: Annotated[int, typer.Option(help="0 = projector output; l = output of decoder layer l; -1 = last.")] = 0,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Several layers from ONE forward pass instead: all, or e.g. 0,8,16 or 0-32:4 "
            "(one tokens.parquet with lens and layer columns)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", parser=POSITIVE_INT, help="Tokens per visual token.")] = 10,
    lens: Annotated[
        list[LensName], typer.Option(help="embedding (input table, cosine) or logit; with --layers, repeat for both.")
    ] = [LensName.embedding],  # noqa: B006  (typer reads the default; it is never mutated)
    exclude: Annotated[
        list[str], typer.Option(help="Token kinds never returned: special, bytes (repeat or comma-separate).")
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    out: Annotated[Path | None, out_dir_option("Directory for tokens.parquet, result.json and top1.png.")] = None,
    as_json: JsonOpt = False,
    report: ReportOpt = False,
) -> None:
    """Show what every visual token encodes: its nearest vocabulary tokens."""
    from embedlens.lens import check_exclude

    _check_report(report, out)
    lenses = list(dict.fromkeys(name.value for name in lens))
    if layers is None and len(lenses) > 1:
        raise InputError("several --lens values need --layers (e.g. --layers 0)")
    if layers is not None and layer != 0:
        raise InputError("give either --layer or --layers, not both")
    kinds = check_exclude(split_list(exclude))
    image = _image(image)
    session = models.load(raw_prompt=prompts.raw_prompt, layer=layer)
    chosen = lenses if layers is not None else lenses[0]
    options = {"layer": layer, "layers": layers, "top_k": top_k, "lens": chosen, "exclude": kinds}
    result = session.probe(image, prompt=prompts.prompt, raw_prompt=prompts.raw_prompt, **options)
    first = result.results[0] if layers is not None else result
    written = _save_probe(result, out, multi=layers is not None, report=report) if out is not None else []
    if as_json:
        sys.stdout.write(_probe_json(result, layers is not None) + "\n")
        return
    typer.echo(first.summary())
    if layers is not None:
        typer.echo(f"layers   {', '.join(map(str, result.layers))} with the {' and '.join(result.lenses)} lens")
    _echo_written(written)


def _save_probe(result: Any, out: Path, *, multi: bool, report: bool) -> list[Path]:
    """Write a probe's files into ``out`` (a multi-layer probe writes its own picture of the view)."""
    from embedlens.pictures.probe import save_top1_grid

    written = [*result.save(out).values()]
    if not multi:
        written.append(save_top1_grid(result, out / "top1.png"))
    if report:
        written += [*([] if multi else _view(result, out)), write_run_report(out)]
    return written


def _view(result: Any, out: Path) -> list[Path]:
    """``out/view.png``, the picture the model saw (the report draws its grid on it), when there is one;
    with several views also ``out/view-<i>.png`` for the others (see :mod:`embedlens.views`).

    Written only with ``--report``, so a plain run's files stay as documented; without it the report
    draws on the source image cropped to the grid's shape."""
    from embedlens.views import save_pictures

    return save_pictures([result.picture(v) for v in range(len(result.views))], out)


def _probe_json(result: Any, multi: bool) -> str:
    """One JSON object: a probe's (see the README), or ``{"layers", "lenses", "results"}`` for several layers."""
    if not multi:
        return result.to_json(provenance=False)
    results = [one.to_dict(provenance=False) for one in result.results]
    return json.dumps({"layers": list(result.layers), "lenses": list(result.lenses), "results": results})


@app.command()
@model_options
@prompt_options
def classify(
    models: ModelArgs,
    image: ImageArg = None,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    *,
    prompts: PromptArgs,
    out: Annotated[
        Path | None, out_dir_option("Directory for tokens.parquet, result.json and groups.png (the group map).")
    ] = None,
    as_json: JsonOpt = False,
    report: ReportOpt = False,
) -> None:
    """Label every visual token ViT sink, LLM sink, dead or alive (the paper's anchor rule)."""
    from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message

    chosen = Anchors.load(anchors) if anchors is not None else builtin_anchors(models.model)
    if chosen is None:
        raise InputError(no_builtin_message(models.model))
    _check_report(report, out)
    image = _image(image)
    session = models.load(raw_prompt=prompts.raw_prompt)
    result = session.classify(image, prompt=prompts.prompt, raw_prompt=prompts.raw_prompt, anchors=chosen, top_k=top_k)
    written = []
    if out is not None:
        from embedlens.pictures.groups import save_group_map

        written = [*result.save(out).values(), save_group_map(result, out / "groups.png")]
        if report:
            written += [*_view(result.probe, out), write_run_report(out)]
    if as_json:
        sys.stdout.write(result.to_json(provenance=False) + "\n")
        return
    typer.echo(result.summary(session.adapter.tokenizer))
    _echo_written(written)


@app.command()
@model_options
def generate(
    models: ModelArgs,
    image: ImageArg = None,
    prompt: Annotated[str | None, typer.Option(help="Your question, placed by the model's chat template.")] = None,
    raw_prompt: RawPromptOpt = None,
    max_new_tokens: MaxNewTokensOpt = 64,
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
) -> None:
    """Answer a question about an image (greedy decoding), optionally under interventions.

    With --intervene (or --timing) it also prints the tokens entering each decoder layer and the
    prefill FLOPs against the untouched model.
    """
    from embedlens.interventions import parse_all
    from embedlens.interventions.generation import check_context

    if (prompt is None) == (raw_prompt is None):
        raise InputError("give exactly one of --prompt or --raw-prompt")
    items = parse_all(intervene)
    image = _image(image)
    session = models.load(raw_prompt=raw_prompt, interventions=items)
    raw_prompts = None if raw_prompt is None else [raw_prompt]
    batch = session.prepare([image], None if raw_prompts else [prompt], raw_prompts=raw_prompts)
    check_context(session, batch, max_new_tokens)
    answers, run = session.generate_batch(batch, max_new_tokens=max_new_tokens, interventions=items, anchors=anchors)
    typer.echo(answers[0])
    if items or timing:
        from embedlens.bench.printing import accounting_summary

        typer.echo(accounting_summary(session, batch, run, items, anchors, timing=timing))
