"""Reading hidden states out of a stock model with forward hooks that are always removed.

``capture(adapter, layers)`` registers hooks on the decoder layers (and optionally the projector) for
one forward pass. Layer ``l < L`` is read by a pre-hook on decoder layer ``l`` (its input: for layer 0 the
text embeddings with the projector outputs scattered in at the image positions), layer ``L`` by a hook on
the output of the last decoder layer (the residual stream before the final norm). Reading inputs rather
than outputs matters where the decoder stack adds something between layers (Qwen3-VL's DeepStack features
enter after layers 0, 1 and 2): layer ``l`` is always what the ``l``-th decoder layer (0-based) reads.
When every requested layer has been read, the rest of the forward is skipped, so probing layer 0 costs
only the vision tower, the projector and the embedding lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from embedlens.models.base import ModelAdapter


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once everything needed has been read."""


@dataclass
class Captured:
    """What one forward pass left in the hooks.

    Attributes:
        hidden: Layer index -> residual stream, shape ``[B, T, d]`` (model dtype, detached).
        vision_features: The projector's input, shape ``[N_images, tokens, d_vision]``, if requested.
    """

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_features: torch.Tensor | None = None


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@contextlib.contextmanager
def capture(
    adapter: ModelAdapter,
    layers: Sequence[int],
    *,
    vision_features: bool = False,
    stop_early: bool = True,
) -> Iterator[Captured]:
    """Hook the model for one forward pass; yields the :class:`Captured` store it fills.

    Args:
        adapter: The model's adapter.
        layers: Layers to read, each in ``0 .. L`` (already resolved, see ``resolve_layer``).
        vision_features: Also keep the projector's input (the selected vision-tower features).
        stop_early: Skip the decoder layers after the last one requested. The forward then ends with
            an internal exception that :func:`run_captured` swallows.
    """
    wanted = sorted(set(layers))
    store = Captured()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    last = wanted[-1] if wanted else -1
    total = adapter.num_layers

    def finish_if_done(layer: int) -> None:
        if stop_early and layer == last and last < total:
            raise _StopForward

    def make_input_hook(layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            store.hidden[layer] = hidden.detach()
            finish_if_done(layer)

        return hook

    def make_output_hook(layer: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            store.hidden[layer] = _first_tensor(output).detach()
            finish_if_done(layer)

        return hook

    def projector_pre_hook(_module: nn.Module, args: tuple) -> None:
        store.vision_features = args[0].detach()

    try:
        for layer in wanted:
            if layer < total:
                block = adapter.decoder_layers[layer]
                handles.append(block.register_forward_pre_hook(make_input_hook(layer), with_kwargs=True))
            else:
                block = adapter.decoder_layers[layer - 1]
                handles.append(block.register_forward_hook(make_output_hook(layer)))
        if vision_features:
            handles.append(adapter.projector.register_forward_pre_hook(projector_pre_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_captured(
    adapter: ModelAdapter,
    inputs: dict[str, torch.Tensor],
    layers: Sequence[int],
    *,
    vision_features: bool = False,
) -> Captured:
    """Run one forward pass on ``inputs`` and return the requested hidden states.

    Args:
        adapter: The model's adapter.
        inputs: Model inputs (``PreparedBatch.inputs``).
        layers: Resolved layer indices to read.
        vision_features: Also return the projector's input.
    """
    with (
        capture(adapter, layers, vision_features=vision_features) as store,
        torch.inference_mode(),
        contextlib.suppress(_StopForward),
    ):
        adapter.model(**inputs, use_cache=False, logits_to_keep=1)
    return store
