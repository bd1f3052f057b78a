"""One image at a time: ``embedlens probe``, ``classify`` and ``generate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    PromptOpt,
    RawPromptOpt,
    RuleTopKOpt,
    model_options,
    out_dir_option,
    split_list,
)
from embedlens.errors import InputError

if TYPE_CHECKING:
    from embedlens.models.base import PreparedBatch
    from embedlens.session import Session


def _image(image: Path | None) -> Path:
    """The image to use (the bundled example when None), checked readable before any model loads."""
    from embedlens.examples import example_image
    from embedlens.images import load_image

    image = image if image is not None else example_image()
    load_image(image)
    return image


def _echo_written(written: list[Path]) -> None:
    if written:
        typer.echo("")
        for path in written:
            typer.echo(f"wrote {path}")


@app.command()
@model_options
def probe(
    models: ModelArgs,
    image: ImageArg = None,
    prompt: PromptOpt = None,
    raw_prompt: RawPromptOpt = None,
    layer: Annotated[int, typer.Option(help="0 = projector output; l = output of decoder layer l; -1 = last.")] = 0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", parser=POSITIVE_INT, help="Tokens per visual token.")] = 10,
    lens: Annotated[LensName, typer.Option(help="embedding (input table, cosine) or logit.")] = LensName.embedding,
    exclude: Annotated[
        list[str], typer.Option(help="Token kinds never returned: special, bytes (repeat or comma-separate).")
    ] = [],  # noqa: B006  (typer reads the default; it is never mutated)
    out: Annotated[Path | None, out_dir_option("Directory for tokens.parquet, result.json and top1.png.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what every visual token encodes: its nearest vocabulary tokens."""
    from embedlens.lens import check_exclude

    if prompt is not None and raw_prompt is not None:
        raise InputError("give either --prompt or --raw-prompt, not both")
    kinds = check_exclude(split_list(exclude))
    image = _image(image)
    session = models.load(raw_prompt=raw_prompt, layer=layer)
    result = session.probe(
        image, prompt=prompt, raw_prompt=raw_prompt, layer=layer, top_k=top_k, lens=lens.value, exclude=kinds
    )
    written = []
    if out is not None:
        from embedlens.pictures.probe import save_top1_grid

        written = [*result.save(out).values(), save_top1_grid(result, out / "top1.png")]
    if as_json:
        sys.stdout.write(result.to_json(provenance=False) + "\n")
        return
    typer.echo(result.summary())
    _echo_written(written)


@app.command()
@model_options
def classify(
    models: ModelArgs,
    image: ImageArg = None,
    anchors: AnchorsOpt = None,
    top_k: RuleTopKOpt = None,
    prompt: PromptOpt = None,
    raw_prompt: RawPromptOpt = None,
    out: Annotated[
        Path | None, out_dir_option("Directory for tokens.parquet, result.json and groups.png (the group map).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Label every visual token ViT sink, LLM sink, dead or alive (the paper's anchor rule)."""
    from embedlens.taxonomy.anchors import Anchors, builtin_anchors, no_builtin_message

    if prompt is not None and raw_prompt is not None:
        raise InputError("give either --prompt or --raw-prompt, not both")
    chosen = Anchors.load(anchors) if anchors is not None else builtin_anchors(models.model)
    if chosen is None:
        raise InputError(no_builtin_message(models.model))
    image = _image(image)
    session = models.load(raw_prompt=raw_prompt)
    result = session.classify(image, prompt=prompt, raw_prompt=raw_prompt, anchors=chosen, top_k=top_k)
    written = []
    if out is not None:
        from embedlens.pictures.groups import save_group_map

        written = [*result.save(out).values(), save_group_map(result, out / "groups.png")]
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

    if (prompt is None) == (raw_prompt is None):
        raise InputError("give exactly one of --prompt or --raw-prompt")
    items = parse_all(intervene)
    image = _image(image)
    session = models.load(raw_prompt=raw_prompt, interventions=items)
    raw_prompts = None if raw_prompt is None else [raw_prompt]
    batch = session.prepare([image], None if raw_prompts else [prompt], raw_prompts=raw_prompts)
    _check_context(session, batch, max_new_tokens)
    answers, run = session.generate_batch(batch, max_new_tokens=max_new_tokens, interventions=items, anchors=anchors)
    typer.echo(answers[0])
    if items or timing:
        from embedlens.bench.summaries import accounting_summary

        typer.echo(accounting_summary(session, batch, run, items, anchors, timing=timing))


def _check_context(session: Session, batch: PreparedBatch, max_new_tokens: int) -> None:
    """Refuse a prompt (with its visual tokens) that, with the answer, does not fit the model's context."""
    from embedlens.models.registry import context_length

    limit = context_length(session.model.config)
    length = int(batch.inputs["input_ids"].shape[-1])
    if limit is not None and length + max_new_tokens > limit:
        raise InputError(
            f"the prompt takes {length} tokens (image included) and --max-new-tokens {max_new_tokens} more, "
            f"but the model's context holds {limit}"
        )
