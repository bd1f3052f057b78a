"""Adapter for ``LlavaNextForConditionalGeneration`` (llava-hf/llava-v1.6-mistral-7b-hf, ...).

Each image is a ``"base"`` view and a ``"tiles"`` view with one newline slot per row (see
:mod:`embedlens.models.anyres`); the modules sit where LLaVA-1.5 keeps them.
"""

from __future__ import annotations

from embedlens.models.anyres import AnyresAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class LlavaNextAdapter(AnyresAdapter):
    """LLaVA-NeXT: every image tiled by the grid pinpoints; several images per sample alike."""

    family = "llava_next"
    model_types = ("llava_next",)
    transformers_class = "LlavaNextForConditionalGeneration"
