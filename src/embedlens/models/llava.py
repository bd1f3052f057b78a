"""Adapter for ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf and the embedded mini model)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from embedlens.errors import InputError
from embedlens.models.base import ModelAdapter, VisualSpan
from embedlens.models.processing import chat_prompt
from embedlens.models.registry import register_adapter
from embedlens.models.spans import split_image_tokens
from embedlens.profiles import pad_to_square, vicuna_v1


def extra_image_tokens(strategy: str | None) -> int:
    """Visual tokens per image besides the patch grid under a LLaVA ``vision_feature_select_strategy``:
    1 for ``"full"`` (the CLS token, placed first), 0 for ``"default"``."""
    return 1 if strategy == "full" else 0


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 layout: one image -> one run of ``rows * cols`` image tokens (plus CLS if "full")."""

    family = "llava"
    model_types = ("llava",)
    transformers_class = "LlavaForConditionalGeneration"

    def image_grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of every image in a batch of model inputs (empty when there are none)."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            height, width = pixel_values.shape[-2:]
            return [(height // self.patch_size, width // self.patch_size)] * pixel_values.shape[0]
        # ``generate`` encodes the images before the first forward and passes the projector outputs.
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return []
        extra = extra_image_tokens(getattr(self.model.config, "vision_feature_select_strategy", "default"))
        grids = []
        for features in encoded.pooler_output:
            count = int(features.shape[-2]) - extra
            side = math.isqrt(count)
            if side * side != count:
                raise InputError(f"cannot tell the patch grid of an image with {count} visual tokens")
            grids.append((side, side))
        return grids

    @property
    def patch_size(self) -> int:
        """Side of a vision patch in pixels."""
        return int(self.model.config.vision_config.patch_size)

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        if self.profile.conversation == "vicuna_v1":
            return vicuna_v1(prompt, self.image_placeholder * num_images)
        return chat_prompt(self, prompt, num_images, self.image_placeholder * num_images + "\n" + prompt)

    def processor_images(self, images: Sequence[Sequence[Image.Image]]) -> list[Image.Image] | None:
        """The images as the profile feeds them: RGB, padded to a square in the processor's mean colour
        (truncated to integers, as LLaVA-1.5 does) when the profile asks for it."""
        given = super().processor_images(images)
        if given is None or not self.profile.pad_to_square:
            return given
        mean = getattr(self.processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        return [pad_to_square(image, tuple(int(255 * value) for value in mean[:3])) for image in given]

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        grids = self.image_grids(inputs)
        extra = extra_image_tokens(getattr(self.model.config, "vision_feature_select_strategy", "default"))
        counts = [rows * cols + extra for rows, cols in grids]
        runs = split_image_tokens(inputs["input_ids"], self.image_token_id, counts)
        return [
            [
                VisualSpan(
                    sample=sample,
                    image=image,
                    global_image=global_image,
                    positions=chunk[extra:].clone(),
                    grid=grids[global_image],
                    extra_positions=chunk[:extra].clone(),
                )
                for image, (global_image, chunk) in enumerate(sample_runs)
            ]
            for sample, sample_runs in enumerate(runs)
        ]
