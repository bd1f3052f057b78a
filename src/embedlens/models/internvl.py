"""Adapter for ``InternVLForConditionalGeneration`` (the ``-hf`` checkpoints, e.g. OpenGVLab/InternVL3-8B-hf).

How InternVL lays out an image (``InternVLProcessor`` with the GOT-OCR2 image processor):

* The image is cut into dynamic tiles: the processor picks the ``cols x rows`` canvas of tiles
  (between ``min_patches`` and ``max_patches`` tiles) whose aspect ratio is closest to the image's,
  resizes the image onto it and crops the tiles row by row (tile ``i`` sits at row ``i // cols``,
  column ``i % cols``). When that gives more than one tile, a thumbnail (the whole image resized to one
  tile) follows them. Every tile and the thumbnail is one row of ``pixel_values``
  ``[N_views, 3, S, S]``, in that order.
* Each view goes through the vision tower on its own; its ``S / patch`` a side patch grid (CLS dropped)
  is pixel-shuffled by ``downsample_ratio`` (0.5: every 2 x 2 patches become one token), so a 448 px tile
  with 14 px patches becomes 16 x 16 = 256 tokens, row-major, which the projector maps to the LLM.
* In the text an image is ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per view x views) + ``</img>``: the
  views' runs follow each other with nothing between them.

The processor does not hand back the number of views per image (it drops ``num_patches``), so
:meth:`InternVLAdapter.find_spans` reads it from the token ids: each run of image tokens between the
markers is one image, its length over the tokens per view is its number of views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.base import ModelAdapter, VisualSpan
from embedlens.models.processing import chat_prompt
from embedlens.models.registry import register_adapter
from embedlens.models.spans import markers_around


def view_names(count: int) -> list[str]:
    """Names of an image's ``count`` views in sequence order: ``["tile-0"]`` for a single view,
    otherwise ``count - 1`` tiles ``"tile-<i>"`` then the ``"thumbnail"`` the processor appends."""
    if count <= 1:
        return ["tile-0"] * count
    return [f"tile-{index}" for index in range(count - 1)] + ["thumbnail"]


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Split sorted positions ``[n]`` into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


@register_adapter
class InternVLAdapter(ModelAdapter):
    """InternVL layout: per image, its tiles then (when there are several) a thumbnail, each view one
    run of ``side x side`` image tokens after pixel shuffle, the whole image between ``<img>`` and ``</img>``."""

    family = "internvl"
    model_types = ("internvl",)
    transformers_class = "InternVLForConditionalGeneration"

    @property
    def marker_ids(self) -> tuple[int, int]:
        """Token ids of ``<img>`` and ``</img>``, the text tokens around each image."""
        processor = self.processor
        start = getattr(processor, "start_image_token_id", None)
        end = getattr(processor, "end_image_token_id", None)
        if start is None or end is None:
            start, end = self.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
        return int(start), int(end)

    def view_side(self, inputs: Mapping[str, Any] | None = None) -> int:
        """Tokens a side of one view's grid after pixel shuffle (16 for 448 px tiles, 14 px patches).

        Read from ``pixel_values`` ``[N, 3, S, S]`` or, inside ``generate``, from the projector outputs
        ``[N, side * side, d]`` in ``mm_encoder_outputs``; from the vision config when neither is there.
        """
        config = self.model.config
        inputs = inputs or {}
        pixel_values = inputs.get("pixel_values")
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is None and encoded is not None:
            count = int(encoded.pooler_output.shape[-2])
            side = math.isqrt(count)
            if side * side != count:
                raise InputError(f"cannot tell the grid of a view with {count} visual tokens")
            return side
        if pixel_values is not None:
            pixels = int(pixel_values.shape[-1])
        else:
            size = config.vision_config.image_size
            pixels = int(size[-1] if isinstance(size, (list, tuple)) else size)
        patch = config.vision_config.patch_size
        patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)
        return int((pixels // patch) * config.downsample_ratio)

    @property
    def patches_per_token(self) -> int:  # type: ignore[override]
        """Patches pixel shuffle folds into one token (``1 / downsample_ratio ** 2``: 4 at 0.5)."""
        return round(1 / float(self.model.config.downsample_ratio) ** 2)

    def _views_given(self, inputs: Mapping[str, Any]) -> int | None:
        """Views (rows of ``pixel_values`` or of the encoded images) in the batch, None when neither is given."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            return int(pixel_values.shape[0])
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        return None if encoded is None else int(encoded.pooler_output.shape[0])

    def tile_layout(self, image: Image.Image) -> tuple[int, int]:
        """``(rows, cols)`` of the tiles the processor cuts ``image`` into (``(1, 1)``: one view, no
        thumbnail). Tile ``i`` of :meth:`find_spans` sits at row ``i // cols``, column ``i % cols``."""
        ip = self.processor.image_processor
        size = ip.size
        height = int(size["height"] if isinstance(size, Mapping) else size.height)
        width = int(size["width"] if isinstance(size, Mapping) else size.width)
        max_patches = int(getattr(ip, "max_patches", 12))
        if max_patches <= 1:
            return 1, 1
        # Imported here: the image-processing modules pull in torchvision, seconds of `import embedlens`.
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        cols, rows = get_optimal_tiled_canvas(
            (image.height, image.width), (height, width), int(getattr(ip, "min_patches", 1)), max_patches
        )
        return int(rows), int(cols)

    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """What InternVL's projector received for each grid token of ``span``: after pixel shuffle, the
        vision-tower features of the token's 2 x 2 patches side by side.

        Args:
            features: The projector's input, one row per view (the views of every image, in
                ``pixel_values`` order, which is the order of the span's ``picture``):
                ``[N_views, side * side, 4 * d_vision]``.
            span: One view of one image.

        Returns:
            ``[side * side, 4 * d_vision]``, row-major over the view's grid.

        Raises:
            EmbedLensError: The features were not captured or do not match the span.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        if features.ndim != 3 or not 0 <= span.picture < features.shape[0] or features.shape[1] != span.num_tokens:
            raise EmbedLensError(
                f"the projector received {tuple(features.shape)}, which does not hold view {span.picture} "
                f"with {span.num_tokens} tokens"
            )
        return features[span.picture]

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        return chat_prompt(self, prompt, num_images, (self.image_placeholder + "\n") * num_images + prompt)

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        input_ids: torch.Tensor = inputs["input_ids"]
        given = self._views_given(inputs)
        side = self.view_side(inputs)
        per_view = side * side
        start_id, end_id = self.marker_ids
        spans: list[list[VisualSpan]] = []
        next_image = next_view = 0
        for sample, row in enumerate(input_ids.cpu()):
            sample_spans: list[VisualSpan] = []
            for image, run in enumerate(_runs(torch.nonzero(row == self.image_token_id).flatten())):
                if run.numel() % per_view:
                    raise InputError(
                        f"sample {sample}, image {image}: {run.numel()} image tokens is not a whole number "
                        f"of {side} x {side} views"
                    )
                markers = markers_around(row, run, start_id, end_id)
                names = view_names(run.numel() // per_view)
                for index, name in enumerate(names):
                    sample_spans.append(
                        VisualSpan(
                            sample=sample,
                            image=image,
                            global_image=next_image,
                            positions=run[index * per_view : (index + 1) * per_view].clone(),
                            grid=(side, side),
                            view=name,
                            markers=markers if index == 0 else markers[:0],
                            picture=next_view + index,
                        )
                    )
                next_image += 1
                next_view += len(names)
            spans.append(sample_spans)
        if given is None and next_view:
            raise InputError(f"the text holds {next_image} image(s) but no images were given")
        if given is not None and given != next_view:
            raise InputError(f"{given} image views given but the text has image tokens for {next_view}")
        return spans
