"""Shared machinery of the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): one dynamic grid per image,
M-RoPE position planes.

Layout, as the processor and the model lay it out:

* Each image is resized to a multiple of ``patch_size * merge_size`` pixels a side and cut into an
  ``(h, w)`` grid of patches (``image_grid_thw`` holds ``(t, h, w)`` per image, ``t = 1`` for images).
  The merger joins each ``merge x merge`` block of patches into one LLM token, so the language model sees
  ``(h / merge) x (w / merge)`` visual tokens per image, in row-major order of that merged grid (the
  processor orders the patches block by block). One view, ``"full"``, per image.
* In the text, ``<|vision_start|>`` + that many ``<|image_pad|>`` (the image token) + ``<|vision_end|>``.
  The two markers are ordinary text tokens, reported as a span's ``markers``.
* Positions are M-RoPE: three planes (temporal, height, width); visual tokens get their grid cell's row and
  column. The language model receives ``position_ids`` ``[3, B, T]`` (a plain forward) or ``[4, B, T]``
  (``generate``: a text plane in front); its rotary embedding takes the three M-RoPE planes, its decoder
  layers the text plane (or None).
* Inside ``generate`` the first forward gets ``mm_encoder_outputs`` instead of ``pixel_values`` and no
  ``image_grid_thw``; the grid of each image is then read from the height and width planes of the
  ``position_ids`` it gets (rows and columns of the grid cells).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.base import ModelAdapter, ModulePaths, PreparedBatch, VisualSpan
from embedlens.models.cells import square_side
from embedlens.models.processing import chat_prompt
from embedlens.models.spans import markers_around, split_image_tokens


def rope_planes(position_ids: torch.Tensor) -> torch.Tensor:
    """The three M-RoPE planes (temporal, height, width) ``[3, B, T]`` of position ids given as ``[B, T]``
    (text positions, copied to every plane), ``[3, B, T]`` or ``[4, B, T]`` (text plane first, dropped)."""
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, *position_ids.shape)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return position_ids
    raise InputError(f"M-RoPE position ids must be [B, T], [3, B, T] or [4, B, T]; got {tuple(position_ids.shape)}")


@dataclass
class MergedSpan(VisualSpan):
    """A Qwen image's span, which also says where the image's patches sit in the merger's input.

    Attributes:
        first_patch: Row of the merger's input (every image's patches of the batch, ``[sum_i t_i * h_i * w_i,
            d_vision]``) where this image's patches start.
    """

    first_patch: int = 0


class QwenVLAdapter(ModelAdapter):
    """What the Qwen-VL families share; each family's file subclasses it and registers."""

    modules = ModulePaths(
        vision_tower="model.visual",
        # The merger is what the language model's visual tokens come from (Qwen2.5-VL reorders its output
        # rows out of window order afterwards; Qwen3-VL's DeepStack mergers are separate modules).
        projector="model.visual.merger",
    )

    #: Whether ``[B, T]`` position ids given to the language model reach its decoder layers as the text
    #: plane (Qwen3-VL expands them to four planes) or not at all (Qwen2/2.5-VL expand them to three).
    flat_positions_reach_layers: ClassVar[bool] = False

    # ----------------------------------------------------------------- geometry
    @property
    def patches_per_token(self) -> int:  # type: ignore[override]
        """Patches the merger folds into one token (``merge_size ** 2``)."""
        return self.merge_size**2

    @property
    def merge_size(self) -> int:
        """Side of the block of patches the merger joins into one visual token."""
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        """Side of a vision patch in pixels."""
        return int(self.model.config.vision_config.patch_size)

    @property
    def marker_ids(self) -> tuple[int | None, int | None]:
        """Token ids of ``<|vision_start|>`` and ``<|vision_end|>`` (None where the config lacks one)."""
        config = self.model.config
        start = getattr(config, "vision_start_token_id", None)
        end = getattr(config, "vision_end_token_id", None)
        return (None if start is None else int(start), None if end is None else int(end))

    # ----------------------------------------------------------------- position hooks
    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> Any:
        """The rotary ``(cos, sin)`` for the three M-RoPE planes of ``position_ids`` (``[B, T]``,
        ``[3, B, T]`` or ``[4, B, T]``, see :func:`rope_planes`); the same for every layer."""
        return self.language_model.rotary_emb(hidden, rope_planes(position_ids))

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The text plane when the language model gets four planes; ``[B, T]`` ids where the family passes
        them on (:attr:`flat_positions_reach_layers`); otherwise None, as the language model does."""
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[0]
        if position_ids.dim() == 2 and self.flat_positions_reach_layers:
            return position_ids
        return None

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        return chat_prompt(self, prompt, num_images, self._image_block() * num_images + "\n" + prompt)

    def _image_block(self) -> str:
        """One image as the Qwen chat templates write it: the placeholder between the vision markers."""
        start = getattr(self.processor, "vision_start_token", None) or "<|vision_start|>"
        end = getattr(self.processor, "vision_end_token", None) or "<|vision_end|>"
        return start + self.image_placeholder + end

    def view_pictures(self, encoded: Mapping[str, Any]) -> list[Image.Image]:
        """Undo the image processor's patch layout and normalisation: the picture of each image the vision
        tower sees, as RGB.

        ``encoded["pixel_values"]`` is ``[sum_i t_i * h_i * w_i, C * T * p * p]``: each image's patches block
        by block (``merge x merge`` blocks in row-major order, row-major inside a block), each patch
        ``(C, T, p, p)`` flattened (``T`` = the temporal patch size; images repeat one frame);
        ``encoded["image_grid_thw"]`` is ``[N_images, 3]``.
        """
        pixel_values, grid_thw = encoded.get("pixel_values"), encoded.get("image_grid_thw")
        if pixel_values is None or grid_thw is None:
            return []
        ip = self.processor.image_processor
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        frames = int(getattr(ip, "temporal_patch_size", 1) or 1)
        pictures = []
        start = 0
        for t, h, w in torch.as_tensor(grid_thw).tolist():
            count = t * h * w
            rows = pixel_values[start : start + count].float().cpu()
            start += count
            blocks = rows[: h * w].reshape(h // merge, w // merge, merge, merge, -1, frames, patch, patch)
            # [h/m, w/m, m, m, C, p, p] -> [C, h/m, m, p, w/m, m, p] -> [C, h * p, w * p]
            picture = blocks[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, h * patch, w * patch)
            pictures.append(self.picture(picture))
        return pictures

    # ----------------------------------------------------------------- vision features
    def merger_order(self, rows: int, cols: int) -> torch.Tensor | None:
        """The order in which the merger receives one image's grid cells (row-major indices), or None when
        it is row-major (Qwen2-VL, Qwen3-VL; Qwen2.5-VL's windows override this)."""
        return None

    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """The patch features the merger joins into each grid token of ``span``: the token's ``merge ** 2``
        patches (vision-tower output) side by side, ``[rows * cols, merge ** 2 * d_vision]``, row-major.

        Args:
            features: The merger's input for the whole batch, ``[sum_i t_i * h_i * w_i, d_vision]``.
            span: One image's span as :meth:`find_spans` gives it (a :class:`MergedSpan`).

        Raises:
            EmbedLensError: The features were not captured or do not hold the span's patches.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        unit = self.merge_size**2
        first = getattr(span, "first_patch", None)
        if first is None or features.dim() != 2 or features.shape[0] < first + unit * span.num_tokens:
            raise EmbedLensError(
                f"the merger received {tuple(features.shape)}, which does not hold the "
                f"{unit * span.num_tokens} patches of image {span.global_image}"
            )
        tokens = features[first : first + unit * span.num_tokens].reshape(span.num_tokens, -1)
        order = self.merger_order(*span.grid)
        if order is not None:
            tokens = tokens[torch.argsort(order.to(tokens.device))]
        return tokens

    # ----------------------------------------------------------------- benchmark geometry
    def benchmark_size(self) -> tuple[int, int]:
        """A square whose side is a multiple of ``patch_size * merge_size`` inside the image processor's pixel
        budget (the largest up to 448 px), so the processor keeps it as it is."""
        ip = self.processor.image_processor
        budget = dict(getattr(ip, "size", None) or {})
        low = budget.get("shortest_edge") or getattr(ip, "min_pixels", None) or 0
        high = budget.get("longest_edge") or getattr(ip, "max_pixels", None) or 448 * 448
        side = square_side(int(ip.patch_size) * int(ip.merge_size), int(low), int(high))
        return side, side

    def cell_pixels(self, batch: PreparedBatch) -> list[list[torch.Tensor]]:
        """The processed pixels of each grid token's ``merge ** 2`` patches, ``[rows * cols, merge ** 2 * k]``:
        ``pixel_values`` ``[sum_i h_i * w_i, k]`` holds each image's patches from its ``first_patch`` on, block
        by block in row-major order of the merged grid (the processor's order, whatever the merger's)."""
        pixels = batch.inputs.get("pixel_values")
        unit = self.merge_size**2
        out = []
        for row in batch.spans:
            cells = []
            for span in row:
                first, count = int(getattr(span, "first_patch", -1)), unit * span.num_tokens
                if pixels is None or pixels.ndim != 2 or first < 0 or first + count > pixels.shape[0]:
                    shape = None if pixels is None else tuple(pixels.shape)
                    raise InputError(f"the pixel values {shape} do not hold image {span.global_image}'s patches")
                cells.append(pixels[first : first + count].reshape(span.num_tokens, -1))
            out.append(cells)
        return out

    # ----------------------------------------------------------------- spans
    def _image_counts(self, inputs: Mapping[str, Any]) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Visual tokens per image in batch order, and each image's merged grid ``(rows, cols)`` where the
        inputs tell it without the positions (None: read it from the position ids)."""
        grid_thw = inputs.get("image_grid_thw")
        merge = self.merge_size
        if grid_thw is not None:
            grids = []
            for t, h, w in torch.as_tensor(grid_thw).tolist():
                if t != 1 or h % merge or w % merge:
                    raise InputError(f"an image grid of {t} x {h} x {w} patches is not an image's (merge {merge})")
                grids.append((h // merge, w // merge))
            return [rows * cols for rows, cols in grids], grids
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return [], []
        return [int(features.shape[0]) for features in encoded.pooler_output], None

    @staticmethod
    def _grid_from_positions(planes: torch.Tensor, sample: int, chunk: torch.Tensor) -> tuple[int, int]:
        """An image's ``(rows, cols)`` read from the height and width planes ``[3, B, T]`` at its tokens."""
        heights, widths = planes[1, sample, chunk], planes[2, sample, chunk]
        rows = int(heights.max() - heights.min()) + 1
        cols = int(widths.max() - widths.min()) + 1
        if rows * cols != chunk.numel():
            raise InputError(f"cannot tell the grid of an image with {chunk.numel()} visual tokens from its positions")
        return rows, cols

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        input_ids: torch.Tensor = inputs["input_ids"].cpu()
        counts, grids = self._image_counts(inputs)
        planes = None
        if grids is None:
            position_ids = inputs.get("position_ids")
            if position_ids is None or position_ids.dim() != 3:
                raise InputError(
                    "the image grids need image_grid_thw, or M-RoPE position ids beside the encoded images"
                )
            planes = rope_planes(position_ids).cpu()
        start_id, end_id = self.marker_ids
        spans: list[list[VisualSpan]] = []
        for sample, runs in enumerate(split_image_tokens(input_ids, self.image_token_id, counts)):
            row = input_ids[sample]
            sample_spans: list[VisualSpan] = []
            for image, (global_image, chunk) in enumerate(runs):
                grid = grids[global_image] if grids is not None else self._grid_from_positions(planes, sample, chunk)
                sample_spans.append(
                    MergedSpan(
                        sample=sample,
                        image=image,
                        global_image=global_image,
                        positions=chunk.clone(),
                        grid=grid,
                        markers=markers_around(row, chunk, start_id, end_id),
                        first_patch=self.merge_size**2 * sum(counts[:global_image]),
                    )
                )
            spans.append(sample_spans)
        return spans
