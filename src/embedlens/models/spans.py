"""Where visual tokens sit: one span per view of each image, and a processed batch that carries them.

:class:`VisualSpan` and :class:`PreparedBatch` are the two records every adapter produces and everything
above the adapters reads (lenses, taxonomy, interventions, benchmarks); they are re-exported by
:mod:`embedlens.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from embedlens.errors import InputError


@dataclass
class VisualSpan:
    """Where one image's (or one image view's) visual tokens sit in one sample's sequence.

    Attributes:
        sample: Row of the batch.
        image: Index of the image within its sample (0-based).
        global_image: Index of the image across the batch (row of ``pixel_values``).
        positions: Sequence positions of the grid tokens, row-major grid order. Shape ``[rows * cols]``.
        grid: ``(rows, cols)`` of the patch grid these tokens cover.
        extra_positions: Visual tokens that are not grid cells (a CLS token, LLaVA-NeXT's row-end
            newline slots, which hold a learned vector rather than projector output). They are image
            tokens (the image token id) that interventions treat as visual but never as grid cells, and
            the rule never labels. Shape ``[n_extra]``; empty for LLaVA-1.5.
        view: Name of the view the span shows: ``"full"`` for a single-view model; multi-view families
            give one span per view of the same image (``"base"`` and ``"tiles"`` for LLaVA-NeXT /
            OneVision, ``"tile-<i>"`` and ``"thumbnail"`` for InternVL).
        markers: Positions of the text tokens that open and close the image (``<|vision_start|>``,
            ``<img>``, ``<start_of_image>``, ...), reported for reference: they are ordinary text
            embeddings, not visual tokens, and no intervention acts on them. Shape ``[n_markers]``; set on
            the first view of an image only.
        picture: Index into :attr:`PreparedBatch.views` of the picture this view shows (-1: none).
    """

    sample: int
    image: int
    global_image: int
    positions: torch.Tensor
    grid: tuple[int, int]
    extra_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    view: str = "full"
    markers: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    picture: int = -1

    def __post_init__(self) -> None:
        if self.picture < 0:
            self.picture = self.global_image

    @property
    def num_tokens(self) -> int:
        """Number of grid tokens (``rows * cols``)."""
        return int(self.positions.numel())

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of every grid token, each of shape ``[rows * cols]``."""
        index = torch.arange(self.num_tokens)
        return index // self.grid[1], index % self.grid[1]


@dataclass
class PreparedBatch:
    """Model inputs for a batch of samples, with the location of every visual token.

    Attributes:
        inputs: Keyword arguments for the model's forward (``input_ids`` ``[B, T]``, ``attention_mask``
            ``[B, T]``, ``pixel_values`` ``[N_images, 3, H, W]``, ...), on the model's device.
        spans: For each sample, the spans of its images in sequence order (one per view of each image).
        texts: The text of each sample after templating (with one placeholder per image).
        views: The pictures the model sees (after resize / crop / tiling), as RGB PIL images, for
            drawing results on; a span's ``picture`` indexes this list.
    """

    inputs: dict[str, torch.Tensor]
    spans: list[list[VisualSpan]]
    texts: list[str]
    views: list[Image.Image]

    @property
    def batch_size(self) -> int:
        """Number of samples."""
        return len(self.spans)


def split_image_tokens(
    input_ids: torch.Tensor, image_token_id: int, counts: list[int]
) -> list[list[tuple[int, torch.Tensor]]]:
    """Cut each sample's image-token positions into one run per image, images in batch order.

    Args:
        input_ids: Token ids, ``[B, T]``.
        image_token_id: The id marking visual-token positions.
        counts: Image-token positions each image of the batch occupies, in order.

    Returns:
        Per sample, ``(global image index, positions [count])`` of each of its images.

    Raises:
        InputError: A sample holds more image tokens than the images given, an image's run is short, or
            an image is not placed in the text.
    """
    out: list[list[tuple[int, torch.Tensor]]] = []
    next_image = 0
    for sample, row in enumerate(input_ids.cpu()):
        positions = torch.nonzero(row == image_token_id).flatten()
        runs: list[tuple[int, torch.Tensor]] = []
        offset = 0
        while offset < positions.numel():
            if next_image >= len(counts):
                raise InputError(
                    f"sample {sample} has more image tokens than the images given ({len(counts)} in the batch)"
                )
            count = counts[next_image]
            chunk = positions[offset : offset + count]
            if chunk.numel() != count:
                raise InputError(
                    f"sample {sample}: expected {count} image tokens for image {len(runs)}, found {chunk.numel()}"
                )
            runs.append((next_image, chunk))
            offset += count
            next_image += 1
        out.append(runs)
    if next_image != len(counts):
        raise InputError(f"{len(counts)} images given but only {next_image} placed in the text")
    return out


def markers_around(row: torch.Tensor, run: torch.Tensor, opening: int | None, closing: int | None) -> torch.Tensor:
    """Where an image's run of visual tokens is framed by marker tokens.

    Args:
        row: One sample's token ids ``[T]``.
        run: The run's positions ``[n]``, in order (contiguous).
        opening: Id of the token expected right before the run, or None when the family has none.
        closing: Id of the token expected right after it, or None.

    Returns:
        The positions (``long``, 0 to 2 of them, in order) of those markers that are present.
    """
    first, last = int(run[0]), int(run[-1])
    found = [
        where
        for where, token in ((first - 1, opening), (last + 1, closing))
        if token is not None and 0 <= where < row.numel() and int(row[where]) == token
    ]
    return torch.tensor(found, dtype=torch.long)
