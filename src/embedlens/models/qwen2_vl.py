"""Adapter for ``Qwen2VLForConditionalGeneration`` (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct)."""

from __future__ import annotations

from embedlens.models.qwen_vl import QwenVLAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: one dynamic grid per image (see :mod:`embedlens.models.qwen_vl`)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    transformers_class = "Qwen2VLForConditionalGeneration"
