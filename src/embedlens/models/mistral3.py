"""Adapter for ``Mistral3ForConditionalGeneration`` (mistralai/Mistral-Small-3.1-24B-Instruct-2503, Mistral
Small 3.2 and other ``mistral3`` checkpoints).

Layout, as ``PixtralProcessor`` and the model lay it out:

* Each image is resized (aspect kept, longest edge at most the image processor's ``longest_edge``) to
  multiples of ``patch_size * spatial_merge_size`` pixels a side; ``image_sizes`` holds each image's
  ``(height, width)`` after the resize (``pixel_values`` are zero-padded to the largest in the batch).
  The Pixtral tower encodes each image at its own size (all images in one sequence, patches row-major
  per image); Mistral 3's projector RMS-norms the patches, its patch merger joins each
  ``merge x merge`` block into one token (row-major over the merged grid), and two linears project them.
  So an image gets a ``(height / (patch * merge)) x (width / (patch * merge))`` grid of visual tokens,
  one view, ``"full"``.
* In the text, each image is its rows of ``[IMG]`` (the image token), each row followed by
  ``[IMG_BREAK]``, except the last, followed by ``[IMG_END]``. The break and end tokens are their own
  token ids: the model scatters projector rows into the ``[IMG]`` positions only, and the breaks keep
  their text embeddings. They are therefore reported as the span's ``markers`` (every break, then the
  end), never as visual tokens. The grid is read from that structure (rows = runs of ``[IMG]``), and
  checked against ``image_sizes`` or, inside ``generate`` (where the first forward gets
  ``mm_encoder_outputs`` instead of ``pixel_values`` and ``image_sizes``), the encoded images' token
  counts.
* Positions are 1-D and the mask is the Mistral decoder's causal one (a sliding window where the config
  sets one): the engine's defaults serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.base import ModelAdapter, PreparedBatch, VisualSpan
from embedlens.models.cells import grid_cells
from embedlens.models.processing import chat_prompt, single_bos
from embedlens.models.qwen_vl import MergedSpan
from embedlens.models.registry import register_adapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    """Mistral 3 layout: one image -> rows of ``[IMG]`` tokens separated by ``[IMG_BREAK]``, closed by
    ``[IMG_END]``, one merged grid per image."""

    family = "mistral3"
    model_types = ("mistral3",)
    transformers_class = "Mistral3ForConditionalGeneration"

    # ----------------------------------------------------------------- structure
    # norm + patch merger + two linears: its input is the Pixtral tower's patches, its output the tokens

    @property
    def merge_size(self) -> int:
        """Side of the block of patches the patch merger joins into one visual token."""
        return int(self.model.config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        """Side of a Pixtral patch in pixels."""
        return int(self.model.config.vision_config.patch_size)

    @property
    def patches_per_token(self) -> int:  # type: ignore[override]
        """Patches the merger joins into one token (``merge ** 2``)."""
        return self.merge_size**2

    def _token_id(self, attribute: str, token: str) -> int:
        value = getattr(self.processor, f"{attribute}_id", None)
        if value is None:
            value = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, attribute, None) or token)
        if value is None or value == self.tokenizer.unk_token_id:
            raise InputError(f"the tokenizer has no {token} token")
        return int(value)

    @property
    def marker_ids(self) -> tuple[int, int]:
        """Token ids of ``[IMG_BREAK]`` (after each row but the last) and ``[IMG_END]`` (after the last)."""
        return self._token_id("image_break_token", "[IMG_BREAK]"), self._token_id("image_end_token", "[IMG_END]")

    # ----------------------------------------------------------------- vision features
    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """The Pixtral patches the merger joins into each grid token of ``span``: its ``merge x merge``
        block of patches side by side, ``[rows * cols, merge ** 2 * d_vision]``, row-major.

        Args:
            features: The projector's input, every image's patches of the batch in one sequence
                (row-major per image), ``[sum_i h_i * w_i, d_vision]`` (or with a leading 1), or None.
            span: One image's span as :meth:`find_spans` gives it.

        Raises:
            EmbedLensError: The features were not captured or do not hold the span's patches.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        if features.dim() == 3 and features.shape[0] == 1:
            features = features[0]
        merge = self.merge_size
        rows, cols = span.grid
        count = merge * merge * span.num_tokens
        first = getattr(span, "first_patch", None)
        if first is None or features.dim() != 2 or features.shape[0] < first + count:
            raise EmbedLensError(
                f"the projector received {tuple(features.shape)}, which does not hold the "
                f"{count} patches of image {span.global_image}"
            )
        patches = features[first : first + count].reshape(rows, merge, cols, merge, -1)
        return patches.permute(0, 2, 1, 3, 4).reshape(rows * cols, -1)

    # ----------------------------------------------------------------- benchmark geometry
    @property
    def token_side(self) -> int:
        """Side in pixels of the square one visual token covers (``patch_size * merge``)."""
        return self.patch_size * self.merge_size

    def benchmark_size(self) -> tuple[int, int]:
        """A square the processor keeps as it is: the largest multiple of :attr:`token_side` up to 448 px
        and the image processor's ``longest_edge``."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        longest = size.get("longest_edge") if isinstance(size, Mapping) else getattr(size, "longest_edge", None)
        side = min(448, int(longest or 448)) // self.token_side * self.token_side
        if side == 0:
            raise InputError(f"the image processor's longest edge {longest} is below one {self.token_side} px token")
        return side, side

    def cell_pixels(self, batch: PreparedBatch) -> list[list[torch.Tensor]]:
        """The processed pixels behind each grid token, ``[rows * cols, 3 * side * side]``: each image's
        ``pixel_values`` row cropped to its ``image_sizes`` (the batch pads to the largest) and cut into
        :attr:`token_side` squares."""
        pixels, sizes = batch.inputs.get("pixel_values"), batch.inputs.get("image_sizes")
        if pixels is None or sizes is None or pixels.ndim != 4:
            raise InputError("mistral3's cell pixels need pixel_values [N, 3, H, W] and image_sizes")
        sizes = torch.as_tensor(sizes).tolist()
        return [
            [grid_cells(pixels[s.picture, :, : sizes[s.picture][0], : sizes[s.picture][1]], s.grid) for s in row]
            for row in batch.spans
        ]

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        """The chat template with one image entry per image before the text (``<s>[INST][IMG]...[/INST]``);
        without a template the placeholders, a newline and the text."""
        return chat_prompt(self, prompt, num_images, self.image_placeholder * num_images + "\n" + prompt)

    def model_texts(self, texts: list[str]) -> list[str]:
        """A text that starts with ``<s>`` (as the chat template writes it) loses it when the tokenizer adds
        its own, so the model sees one."""
        return single_bos(self, texts)

    def view_pictures(self, encoded: Mapping[str, Any]) -> list[Image.Image]:
        """The resized images: each ``pixel_values`` entry cropped to its ``image_sizes`` (the batch pads
        smaller images)."""
        pixel_values, sizes = encoded.get("pixel_values"), encoded.get("image_sizes")
        if pixel_values is None or sizes is None:
            return []
        pairs = zip(pixel_values, torch.as_tensor(sizes).tolist(), strict=True)
        return [self.picture(image[:, :height, :width]) for image, (height, width) in pairs]

    # ----------------------------------------------------------------- spans
    def _expected_grids(self, inputs: Mapping[str, Any]) -> tuple[list[tuple[int, int]] | None, list[int]]:
        """Each image's grid from ``image_sizes`` (None when absent), and each image's token count (from the
        grids, or inside ``generate`` from the encoded images, ``pooler_output`` ``[tokens, d]`` each)."""
        sizes = inputs.get("image_sizes")
        if sizes is not None and (inputs.get("pixel_values") is not None or inputs.get("mm_encoder_outputs") is None):
            side = self.patch_size * self.merge_size
            grids = []
            for height, width in torch.as_tensor(sizes).tolist():
                if height % side or width % side:
                    raise InputError(f"an image of {height} x {width} px is not cut into {side} px tokens")
                grids.append((int(height) // side, int(width) // side))
            return grids, [rows * cols for rows, cols in grids]
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return [], []
        return None, [int(features.shape[0]) for features in encoded.pooler_output]

    def _images_in_row(self, row: torch.Tensor, sample: int) -> list[tuple[torch.Tensor, list[int], tuple[int, int]]]:
        """One sample's images read from its token ids: per image, its ``[IMG]`` positions (row-major), its
        marker positions (the breaks, then the end) and its grid ``(rows, cols)``."""
        brk, end = self.marker_ids
        positions = torch.nonzero(row == self.image_token_id).flatten()
        if positions.numel() == 0:
            return []
        # runs of consecutive [IMG] positions, each closed by the token after it
        starts = [0, *(torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1).tolist()]
        bounds = list(zip(starts, [*starts[1:], positions.numel()], strict=True))
        images, runs, markers = [], [], []
        for first, stop in bounds:
            run = positions[first:stop]
            after = int(run[-1]) + 1
            closer = int(row[after]) if after < row.numel() else None
            if closer not in (brk, end):
                raise InputError(
                    f"sample {sample}: a row of image tokens is not closed by [IMG_BREAK] or [IMG_END]; "
                    "the text does not hold the processor's image layout"
                )
            runs.append(run)
            markers.append(after)
            if closer == end:
                widths = {int(r.numel()) for r in runs}
                if len(widths) != 1:
                    raise InputError(f"sample {sample}: image {len(images)} has rows of {sorted(widths)} tokens")
                images.append((torch.cat(runs), markers, (len(runs), widths.pop())))
                runs, markers = [], []
        if runs:
            raise InputError(f"sample {sample}: the last image's tokens are not closed by [IMG_END]")
        return images

    def find_spans(self, inputs: Mapping[str, Any]) -> list[list[VisualSpan]]:
        input_ids: torch.Tensor = inputs["input_ids"].cpu()
        grids, counts = self._expected_grids(inputs)
        merge = self.merge_size
        spans: list[list[VisualSpan]] = []
        next_image = 0
        for sample, row in enumerate(input_ids):
            sample_spans: list[VisualSpan] = []
            for positions, markers, grid in self._images_in_row(row, sample):
                if next_image >= len(counts):
                    raise InputError(
                        f"sample {sample} has more images in its text than the {len(counts)} images given to the batch"
                    )
                expected = grids[next_image] if grids is not None else None
                if (expected is not None and grid != expected) or grid[0] * grid[1] != counts[next_image]:
                    wanted = f"{expected[0]} x {expected[1]}" if expected else f"{counts[next_image]} tokens"
                    raise InputError(
                        f"sample {sample}: image {len(sample_spans)} has a {grid[0]} x {grid[1]} grid of image "
                        f"tokens in the text, but the image gives {wanted}"
                    )
                sample_spans.append(
                    MergedSpan(
                        sample=sample,
                        image=len(sample_spans),
                        global_image=next_image,
                        positions=positions.clone(),
                        grid=grid,
                        markers=torch.tensor(markers, dtype=torch.long),
                        first_patch=merge * merge * sum(counts[:next_image]),
                    )
                )
                next_image += 1
            spans.append(sample_spans)
        if next_image != len(counts):
            raise InputError(f"{len(counts)} images given but only {next_image} placed in the text")
        return spans
