"""Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct).

Its vision tower attends within windows and runs the merger on the patches in window order, then puts the
merged rows back in row-major order; the language model (and every span) sees them row-major, so the
merger's own output rows follow the grid only when an image fits in one window.
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from embedlens.models.qwen_vl import QwenVLAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: one dynamic grid per image (see :mod:`embedlens.models.qwen_vl`)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        return Qwen2_5_VLForConditionalGeneration
