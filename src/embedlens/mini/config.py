"""The settings of a training run of the mini model (:func:`embedlens.mini.train.run_training`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedlens.checks import (
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    Choice,
    check_fields,
    option,
)
from embedlens.dtypes import fast_dtype
from embedlens.mini.assemble import STRATEGIES

#: Values of :attr:`TrainConfig.loss_weighting`.
LOSS_WEIGHTINGS = ("token", "answer")

#: Values of :attr:`TrainConfig.llm_dtype`.
LLM_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train-mini`` (all recorded in the output).

    Attributes:
        seed: Seed of data generation, sampling order and initialisation.
        images: Generated training images (plus the packaged photos).
        scenes: Scene types drawn uniformly from this list (repeats weight them).
        steps: Optimiser steps.
        batch_size: Sequences per step.
        lr: Peak learning rate (AdamW).
        warmup: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        max_turns: Question/answer turns per sequence (a random subset of the image's questions).
        caption_prob: Probability that a sequence also asks for the caption.
        minutes: Time budget for the optimisation; training stops early (and says so) when reached.
        checkpoint_every: Steps between checkpoints.
        lora_rank: Rank of low-rank adapters on the LLM's attention and MLP layers, trained beside the
            projector (:mod:`embedlens.mini.lora`); 0 trains the projector alone (the shipped recipe).
        lora_lr: Peak learning rate of the adapters (same schedule as the projector's).
        strategy: Vision features the projector sees: ``"default"`` (the patch tokens only, as LLaVA-1.5
            and the shipped v1 weights) or ``"full"`` (the CLS token, then the 256 patch tokens). Recorded in
            the projector file, so a model built from it uses the same.
        loss_weighting: ``"token"`` averages the loss over all answer tokens of a batch (long captions
            weigh most); ``"answer"`` weighs every answer equally (:func:`~embedlens.mini.sequences.answer_weights`).
        llm_dtype: Type of the frozen LLM's copy during training: ``"auto"`` (bfloat16 where the machine
            computes it fast, else float32; :func:`~embedlens.dtypes.fast_dtype`), ``"float32"`` or
            ``"bfloat16"``. The shipped v1 weights were trained with a bfloat16 LLM (an AMX machine).
    """

    seed: int = option(0, NON_NEGATIVE_INT)
    images: int = option(3000, POSITIVE_INT)
    scenes: tuple[str, ...] = ("shape", "count", "letter", "word")
    steps: int = option(1600, POSITIVE_INT)
    batch_size: int = option(4, POSITIVE_INT)
    lr: float = option(1e-3, POSITIVE_FLOAT)
    warmup: int = option(50, NON_NEGATIVE_INT)
    weight_decay: float = option(0.0, NON_NEGATIVE_FLOAT)
    max_turns: int = option(6, POSITIVE_INT)
    caption_prob: float = option(0.5, PROBABILITY)
    minutes: float = option(55.0, POSITIVE_FLOAT)
    checkpoint_every: int = option(100, POSITIVE_INT)
    lora_rank: int = option(0, NON_NEGATIVE_INT)
    lora_lr: float = option(2e-4, POSITIVE_FLOAT)
    strategy: str = option("default", Choice(STRATEGIES))
    loss_weighting: str = option("token", Choice(LOSS_WEIGHTINGS))
    llm_dtype: str = option("auto", Choice(LLM_DTYPES))

    def __post_init__(self) -> None:
        check_fields(self)


def llm_compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen LLM's type during training: ``config.llm_dtype``, with ``"auto"`` resolved for ``device``."""
    if config.llm_dtype == "auto":
        return fast_dtype(device)
    return getattr(torch, config.llm_dtype)  # a name of LLM_DTYPES, checked by TrainConfig
