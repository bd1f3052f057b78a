"""Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct).

Its vision tower attends within windows and runs the merger on the patches in window order, then puts the
merged rows back in row-major order; the language model (and every span) sees them row-major, so the
merger's own output rows follow the grid only when an image fits in one window.
"""

from __future__ import annotations

import torch

from embedlens.models.qwen_vl import QwenVLAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: one dynamic grid per image (see :mod:`embedlens.models.qwen_vl`)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    transformers_class = "Qwen2_5_VLForConditionalGeneration"

    def merger_order(self, rows: int, cols: int) -> torch.Tensor:
        """Row-major indices of an image's grid cells in the merger's (window) order: windows of
        ``window_size / (patch * merge)`` cells a side, row-major, and the cells row-major inside each."""
        vision = self.model.config.vision_config
        side = max(1, int(vision.window_size) // self.merge_size // self.patch_size)
        index = torch.arange(rows * cols).reshape(rows, cols)
        windows = [
            index[top : top + side, left : left + side].flatten()
            for top in range(0, rows, side)
            for left in range(0, cols, side)
        ]
        return torch.cat(windows)
