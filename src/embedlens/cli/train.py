"""``embedlens train-mini``: train the embedded mini model's projector (and optionally LoRA adapters)."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from embedlens.cli.app import app
from embedlens.cli.options import bundle_options, field_options, out_dir_option, quiet_transformers
from embedlens.mini.config import LLM_DTYPES, LOSS_WEIGHTINGS, TrainConfig
from embedlens.mini.train import LORA, PROJECTOR, run_training

LossPer = Enum("LossPer", {name: name for name in LOSS_WEIGHTINGS}, type=str)  # type: ignore[misc]
LlmDtype = Enum("LlmDtype", {name: name for name in LLM_DTYPES}, type=str)  # type: ignore[misc]
DEFAULT_LOSS_PER = LossPer(TrainConfig.loss_weighting)
DEFAULT_LLM_DTYPE = LlmDtype(TrainConfig.llm_dtype)


#: The options of ``train-mini`` that set a :class:`TrainConfig` field as it is (its default and check
#: come from the field), with their help.
CONFIG_HELP = {
    "seed": "Seed of data, order and initialisation.",
    "images": "Generated training images (plus the packaged photos).",
    "steps": "Optimiser steps (batch of 4 sequences each).",
    "minutes": "Time budget for the optimisation; stops early if reached.",
    "lr": "Peak learning rate.",
    "lora_rank": "Also train low-rank adapters of this rank on the LLM (0: projector only).",
    "lora_lr": "Peak learning rate of the LLM adapters.",
}


@app.command("train-mini")
@bundle_options("config", TrainConfig, field_options(TrainConfig, CONFIG_HELP))
def train_mini(
    out: Annotated[Path, out_dir_option("Run directory: projector, log, checkpoint (resumes if present).")],
    config: TrainConfig,
    cls_token: Annotated[
        bool,
        typer.Option(
            "--cls-token/--no-cls-token",
            help="Feed the vision tower's CLS token to the LLM before the patch tokens ('full' feature selection).",
        ),
    ] = False,
    loss_per: Annotated[
        LossPer,
        typer.Option(help="Average the loss per answer token ('token') or weigh every answer once ('answer')."),
    ] = DEFAULT_LOSS_PER,
    llm_dtype: Annotated[
        LlmDtype,
        typer.Option(
            help="Type of the frozen LLM while training: auto (bfloat16 where the CPU/GPU computes it fast, "
            "else float32), float32 or bfloat16."
        ),
    ] = DEFAULT_LLM_DTYPE,
) -> None:
    """Train the embedded mini model's projector on generated images (frozen vision tower and LLM).

    With --lora-rank the LLM also gets trainable low-rank adapters; they are saved beside the projector
    as lora.safetensors and merged into the LLM's weights when a model is built from them.
    """
    quiet_transformers()
    config = dataclasses.replace(
        config,
        strategy="full" if cls_token else "default",
        loss_weighting=loss_per.value,
        llm_dtype=llm_dtype.value,
    )
    log = run_training(out, config)
    state = "finished" if log["finished"] else f"stopped by the time budget at step {log['steps_done']}"
    typer.echo(f"{state}: loss {log['loss_first_50']} -> {log['loss_last_50']}")
    written = [out / PROJECTOR] + ([out / LORA] if config.lora_rank else [])
    typer.echo(f"wrote {' and '.join(map(str, written))} and {out / 'train_log.json'}")
