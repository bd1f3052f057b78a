"""Families that give every image the same grid of visual tokens in one run (Gemma 3, PaliGemma).

Their spans follow from the grid alone: a sample's image tokens split into runs of ``rows * cols``, one
per image in placeholder order, each run contiguous and optionally between two marker tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from embedlens.errors import InputError
from embedlens.models.base import ModelAdapter
from embedlens.models.spans import VisualSpan, markers_around, split_image_tokens


class FixedGridAdapter(ModelAdapter):
    """An adapter whose every image is one ``"full"`` view on :attr:`grid` (subclasses say which grid)."""

    images_per_sample = True  # as these processors take them

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of every image's grid."""
        raise NotImplementedError

    @property
    def marker_ids(self) -> tuple[int | None, int | None]:
        """Token ids that open and close each image's run (None where the family has none)."""
        return None, None

    def image_count(self, inputs: Mapping[str, Any]) -> int:
        """Images in a batch of forward inputs: rows of ``pixel_values``, or inside ``generate`` of the
        encoded images (``mm_encoder_outputs["image"].pooler_output``, ``[N, tokens, d]``)."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            return int(pixel_values.shape[0])
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return 0
        features = encoded.pooler_output
        rows, cols = self.grid
        if int(features.shape[-2]) != rows * cols:
            raise InputError(f"encoded images have {int(features.shape[-2])} tokens each, expected {rows * cols}")
        return int(features.shape[0])

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        input_ids: torch.Tensor = inputs["input_ids"].cpu()
        rows, cols = self.grid
        count = rows * cols
        for sample, row in enumerate(input_ids):
            found = int((row == self.image_token_id).sum())
            if found % count:
                raise InputError(f"sample {sample} has {found} image tokens, not a multiple of the {count} per image")
        opening, closing = self.marker_ids
        spans: list[list[VisualSpan]] = []
        for sample, runs in enumerate(
            split_image_tokens(input_ids, self.image_token_id, [count] * self.image_count(inputs))
        ):
            row = input_ids[sample]
            sample_spans = []
            for image, (global_image, chunk) in enumerate(runs):
                first, last = int(chunk[0]), int(chunk[-1])
                if last - first + 1 != count:
                    raise InputError(f"sample {sample}: the image tokens of image {image} are not one run")
                markers = markers_around(row, chunk, opening, closing)
                sample_spans.append(
                    VisualSpan(sample, image, global_image, chunk.clone(), (rows, cols), markers=markers)
                )
            spans.append(sample_spans)
        return spans
