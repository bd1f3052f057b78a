"""Low-rank adapters (LoRA) on the mini model's LLM: trained beside the projector, merged for shipping.

During ``train-mini --lora-rank R`` every targeted linear layer ``W`` of the decoder is wrapped so that
it computes ``W x + s * B (A x)`` with trainable ``A`` (``[R, in]``, random) and ``B`` (``[out, R]``,
zeros, so training starts from the unchanged LLM) and ``s = alpha / R``. The wrappers live only inside
:func:`lora_attached`; leaving it puts the original modules back. What ships is ``A`` and ``B`` per
layer (``lora.safetensors``); :func:`merge_lora` folds them into the weights when the model is built,
``W <- W + s * B @ A``, so the built model is a stock ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embedlens.files import atomic_path

#: Linear layers of each decoder layer that get adapters (LLaMA-style attention and MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ``alpha`` of the adapters: the low-rank update is scaled by ``alpha / rank``.
LORA_ALPHA = 16.0


class LoRALinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: The wrapped layer (kept as is; its weight is ``[out, in]``).
        rank: Rank ``R`` of the update.
        alpha: The update is scaled by ``alpha / rank``.
        generator: Source of ``A``'s random initialisation (``N(0, 1/in)``).
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        fan_in, fan_out = base.in_features, base.out_features
        self.lora_a = torch.nn.Parameter(torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in))
        self.lora_b = torch.nn.Parameter(torch.zeros(fan_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` -> ``[..., out]``; the update runs in ``x``'s dtype (float32 master weights)."""
        low = (x @ self.lora_a.to(x.dtype).T) @ self.lora_b.to(x.dtype).T
        return self.base(x) + low * self.scale


def _targets(llm: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Linear]]:
    """``(name, parent, attribute, layer)`` of every targeted linear layer, names relative to ``llm``."""
    for name, module in llm.named_modules():
        for attribute in LORA_TARGETS:
            child = getattr(module, attribute, None)
            if isinstance(child, torch.nn.Linear):
                yield (f"{name}.{attribute}" if name else attribute), module, attribute, child


@contextmanager
def lora_attached(llm: torch.nn.Module, rank: int, *, seed: int, alpha: float = LORA_ALPHA) -> Iterator[dict]:
    """Wrap every targeted layer of ``llm`` in a :class:`LoRALinear` for the duration of the block.

    Yields ``{name: LoRALinear}``. On exit (also on an error) the original layers are put back.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
    adapters: dict[str, LoRALinear] = {}
    try:
        for name, parent, attribute, layer in list(_targets(llm)):
            adapter = LoRALinear(layer, rank, alpha, generator)
            setattr(parent, attribute, adapter)
            swapped.append((parent, attribute, layer))
            adapters[name] = adapter
        if not adapters:
            raise ValueError(f"the model has none of the LoRA target layers {LORA_TARGETS}")
        yield adapters
    finally:
        for parent, attribute, layer in reversed(swapped):
            setattr(parent, attribute, layer)


def lora_tensors(adapters: Mapping[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """``{name.lora_a, name.lora_b}`` float32 tensors of every adapter (what is saved and resumed)."""
    tensors = {}
    for name, adapter in adapters.items():
        tensors[f"{name}.lora_a"] = adapter.lora_a.detach().float().contiguous()
        tensors[f"{name}.lora_b"] = adapter.lora_b.detach().float().contiguous()
    return tensors


def load_lora_tensors(adapters: Mapping[str, LoRALinear], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy saved tensors (from :func:`lora_tensors`) into ``adapters``; every adapter must be present."""
    with torch.no_grad():
        for name, adapter in adapters.items():
            adapter.lora_a.copy_(tensors[f"{name}.lora_a"])
            adapter.lora_b.copy_(tensors[f"{name}.lora_b"])


def save_lora(adapters: Mapping[str, LoRALinear], path: Path) -> None:
    """Write the adapters (float32 safetensors, with rank and scale in the metadata) atomically."""
    first = next(iter(adapters.values()))
    metadata = {"format": "pt", "rank": str(first.lora_a.shape[0]), "scale": json.dumps(first.scale)}
    with atomic_path(path) as tmp:
        save_file(lora_tensors(adapters), str(tmp), metadata=metadata)


def merge_lora(llm: torch.nn.Module, path: Path) -> int:
    """Fold the adapters saved at ``path`` into ``llm``'s weights (``W += s * B @ A``); returns how many.

    The sum is formed in float32 and cast to the weight's dtype. Every saved adapter must name a
    targeted layer of ``llm`` and match its shape, or a ``ValueError`` says which does not.
    """
    layers = {name: layer for name, _, _, layer in _targets(llm)}
    with safe_open(str(path), framework="pt") as handle:
        scale = float(json.loads(handle.metadata()["scale"]))
        names = sorted({key.rsplit(".", 1)[0] for key in handle.keys()})  # noqa: SIM118 (not iterable)
        with torch.no_grad():
            for name in names:
                layer = layers.get(name)
                if layer is None:
                    raise ValueError(f"{path}: adapter {name!r} names no LoRA target layer of this model")
                delta = (handle.get_tensor(f"{name}.lora_b") @ handle.get_tensor(f"{name}.lora_a")) * scale
                if delta.shape != layer.weight.shape:
                    raise ValueError(
                        f"{path}: adapter {name!r} is {tuple(delta.shape)}, the layer is {tuple(layer.weight.shape)}"
                    )
                layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
    return len(names)
