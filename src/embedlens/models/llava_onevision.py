"""Adapter for ``LlavaOnevisionForConditionalGeneration`` (llava-hf/llava-onevision-qwen2-7b-ov-hf, ...).

A sample with one image gets it tiled: a ``"base"`` view and a ``"tiles"`` view with one newline slot
per row, the tiles grid downsampled past ``anyres_max_<n>`` (see :mod:`embedlens.models.anyres`). A
sample with several images gets each as its base view only, followed by one newline slot, as
OneVision's processor does when it is given each sample's images as a list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from embedlens.errors import InputError
from embedlens.models.anyres import AnyresAdapter
from embedlens.models.registry import register_adapter

_MAX_PREFIX = "anyres_max_"


@register_adapter
class LlavaOnevisionAdapter(AnyresAdapter):
    """LLaVA-OneVision: single images tiled (capped at ``anyres_max_<n>``), multi-image samples not."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    transformers_class = "LlavaOnevisionForConditionalGeneration"
    images_per_sample = True  # so the processor knows which samples hold several

    def max_tiles(self) -> int | None:
        """``n`` of the config's ``vision_aspect_ratio`` ``"anyres_max_<n>"`` (the model reads the config's)."""
        aspect = str(getattr(self.model.config, "vision_aspect_ratio", None) or f"{_MAX_PREFIX}9")
        count = aspect.removeprefix(_MAX_PREFIX)
        if not aspect.startswith(_MAX_PREFIX) or not count.isdigit() or int(count) < 1:
            raise InputError(f"unsupported vision_aspect_ratio {aspect!r}: expected {_MAX_PREFIX}<n>")
        return int(count)

    def tiled(self, inputs: Mapping[str, Any], count: int) -> list[bool]:
        """Images of samples with exactly one image are tiled (``batch_num_images``; all without it)."""
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return [True] * count
        numbers = per_sample.tolist() if isinstance(per_sample, torch.Tensor) else list(per_sample)
        flags = [int(n) == 1 for n in numbers for _ in range(int(n))]
        if len(flags) != count:
            raise InputError(f"batch_num_images counts {len(flags)} images but {count} were given")
        return flags
