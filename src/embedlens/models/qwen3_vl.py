"""Adapter for ``Qwen3VLForConditionalGeneration`` (Qwen/Qwen3-VL-2B/4B/8B/32B-Instruct).

Besides the Qwen grid (see :mod:`embedlens.models.qwen_vl`), Qwen3-VL has DeepStack: the vision tower's
intermediate layers go through their own mergers, and level ``i`` is added to the output of decoder layer
``i`` at the visual positions. The model passes them to its language model as ``visual_pos_masks``
``[B, L]`` and ``deepstack_visual_embeds`` (one ``[N_visual, d]`` per level, the visual tokens in sequence
order); :meth:`Qwen3VLAdapter.pop_layer_additions` hands them to the intervention engine as dense tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from embedlens.errors import InputError
from embedlens.models.qwen_vl import QwenVLAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: one dynamic grid per image plus DeepStack additions after the first decoder layers."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    transformers_class = "Qwen3VLForConditionalGeneration"
    flat_positions_reach_layers = True

    def pop_layer_additions(self, llm_kwargs: dict[str, Any], length: int) -> dict[int, torch.Tensor]:
        """Pop ``visual_pos_masks`` and ``deepstack_visual_embeds`` and return decoder layer ``i`` -> the
        ``[B, L, d]`` tensor that holds level ``i``'s rows at the visual positions (row-major over the
        batch, as the model scatters them) and zeros elsewhere, in the language model's input dtype.
        Empty when the language model gets no DeepStack features (text only, or a decoding step)."""
        masks = llm_kwargs.pop("visual_pos_masks", None)
        levels = llm_kwargs.pop("deepstack_visual_embeds", None)
        if masks is None or not levels:
            return {}
        if masks.dim() != 2 or masks.shape[1] != length:
            raise InputError(f"DeepStack positions {tuple(masks.shape)} do not match a prefill of length {length}")
        embeds = llm_kwargs.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else levels[0].dtype
        device = embeds.device if embeds is not None else levels[0].device
        masks = masks.to(device=device, dtype=torch.bool)
        additions = {}
        for layer, level in enumerate(levels):
            if level.shape[0] != int(masks.sum()):
                raise InputError(f"DeepStack level {layer} has {level.shape[0]} rows for {int(masks.sum())} positions")
            dense = torch.zeros(*masks.shape, level.shape[-1], dtype=dtype, device=device)
            dense[masks] = level.to(device=device, dtype=dtype)
            additions[layer] = dense
        return additions
