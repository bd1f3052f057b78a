"""Helpers for the intervention tests: batches, captured layer inputs, hand-built reference runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import embedlens
from embedlens.capture import run_captured
from embedlens.models.base import PreparedBatch
from helpers import random_image


def batch_of(session: embedlens.Session, seeds: list[int], prompts: list[str] | None = None) -> PreparedBatch:
    """A prepared batch of noise images (left-padded when the prompts differ in length)."""
    prompts = prompts or ["what is this"] * len(seeds)
    return session.prepare([random_image(seed) for seed in seeds], prompts)


def layer0_inputs(session: embedlens.Session, batch: PreparedBatch) -> torch.Tensor:
    """What decoder layer 0 receives untouched: text embeddings with the projector outputs, ``[B, L, d]``."""
    return run_captured(session.adapter, batch.inputs, [0]).hidden[0]


@contextlib.contextmanager
def record_layer_calls(session: embedlens.Session, layer: int) -> Iterator[list[dict]]:
    """Record, for every call of decoder layer ``layer``, its input hidden states and position ids."""
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append({"hidden": hidden.detach().clone(), "position_ids": kwargs.get("position_ids")})

    handle = session.adapter.decoder_layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def cache_lengths(output) -> list[int]:
    """Entries held by each layer of a forward's KV cache."""
    return [int(layer.get_seq_length()) for layer in output.cache.layers]


def new_tokens(output: torch.Tensor, batch: PreparedBatch) -> torch.Tensor:
    """The generated part of ``generate``'s output."""
    return output[:, batch.inputs["input_ids"].shape[1] :]


def greedy(model, **inputs) -> torch.Tensor:
    """Greedy generation of 6 tokens."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)


def hook_count(session: embedlens.Session) -> int:
    """Forward hooks and pre-hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in session.model.modules())
