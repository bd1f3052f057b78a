"""Adapter for ``Gemma3ForConditionalGeneration`` (google/gemma-3-4b-it, -12b-it, -27b-it).

Layout: each image is one view, ``"full"``. SigLIP encodes the image (896 px, 14 px patches -> a 64 x 64
patch grid for the released models); Gemma 3's projector average-pools that grid to
``mm_tokens_per_image`` tokens (256 = 16 x 16), RMS-norms and projects them. The processor writes each
image as ``<start_of_image>``, ``mm_tokens_per_image`` image tokens (``<image_soft_token>``), then
``<end_of_image>``; the pooled grid, row-major, is the span's grid, and the two markers are its
``markers``. A prompt places an image with ``<start_of_image>`` (the processor's ``image_token``), which
the processor expands.

Pan-and-scan: ``Gemma3Processor`` can add crops of a wide or tall image as further images (each its own
marked run of image tokens), but only when its call asks for ``do_pan_and_scan=True`` (the image
processor's own setting is not consulted; the released models leave it off). :meth:`encode` always
asks for one view per image (``do_pan_and_scan=False``). Forward inputs built elsewhere with crops
reach :meth:`find_spans` as one image per run: nothing in the model's inputs says which runs are crops
of which image, so each crop is reported as an image of its own.

Attention: ``Gemma3Model`` gives its language model a dict of 4-D masks, ``{"full_attention",
"sliding_attention"}``, in which each image's tokens see each other both ways (from ``token_type_ids``,
which :meth:`encode` keeps; ``generate`` passes them at prefill only), and decoder layer ``i`` uses the
mask and the rotary embedding (local base 10k, global base 1M) of ``config.layer_types[i]``: see
:meth:`mask_key` and :meth:`position_embeddings`.

Text embeddings: ``embed_tokens`` multiplies its rows by ``sqrt(d)`` in its forward; its ``weight`` (the
table both lenses read, tied to the LM head) is unscaled. Visual tokens (projector outputs) are not
scaled. The embedding lens is a cosine and does not see the factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from embedlens.errors import EmbedLensError, InputError
from embedlens.models.base import VisualSpan
from embedlens.models.fixed_grid import FixedGridAdapter
from embedlens.models.processing import chat_prompt, single_bos
from embedlens.models.registry import register_adapter


@register_adapter
class Gemma3Adapter(FixedGridAdapter):
    """Gemma 3 layout: one image -> ``<start_of_image>``, a pooled ``n x n`` grid of image tokens,
    ``<end_of_image>``."""

    family = "gemma3"
    model_types = ("gemma3",)
    transformers_class = "Gemma3ForConditionalGeneration"

    def layer_type(self, layer: int) -> str:
        """Attention kind of decoder layer ``layer`` (0-based): ``"sliding_attention"`` or ``"full_attention"``."""
        return str(self.language_model.config.layer_types[layer])

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> Any:
        """The ``(cos, sin)`` decoder layer ``layer`` receives: the rotary embedding of its layer type
        (sliding and full attention layers use different bases), each ``[B, T, head_dim]``."""
        return self.language_model.rotary_emb(hidden, position_ids, self.layer_type(layer))

    def mask_key(self, layer: int) -> str:
        """The entry of ``Gemma3Model``'s mask dict decoder layer ``layer`` uses: its layer type."""
        return self.layer_type(layer)

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the pooled grid every image gets (``mm_tokens_per_image`` = rows * cols)."""
        count = int(self.model.config.mm_tokens_per_image)
        side = math.isqrt(count)
        if side * side != count:
            raise InputError(f"cannot tell the grid of {count} image tokens per image (not a square)")
        return side, side

    @property
    def patches_per_token(self) -> int:  # type: ignore[override]
        """SigLIP patches the projector averages into one token (``(patches per side / grid side) ** 2``)."""
        vision = self.model.config.vision_config
        per_side = int(vision.image_size) // int(vision.patch_size)
        return (per_side // self.grid[0]) ** 2

    @property
    def marker_ids(self) -> tuple[int, int]:
        """Token ids of ``<start_of_image>`` and ``<end_of_image>`` (the config's boi / eoi ids)."""
        config = self.model.config
        return int(config.boi_token_id), int(config.eoi_token_id)

    @property
    def image_placeholder(self) -> str:
        """``<start_of_image>``: what a prompt writes per image (the processor expands it to the run)."""
        return str(getattr(self.processor, "image_token", None) or self.tokenizer.boi_token)

    def vision_token_features(self, features: torch.Tensor | None, span: VisualSpan) -> torch.Tensor:
        """The pooled SigLIP features behind each grid token: the mean of the ``k x k`` patches the
        projector averages into it (what its norm and projection then receive), ``[rows * cols, d_vision]``.

        Args:
            features: The projector's input, ``[N_images, patches * patches, d_vision]`` (SigLIP's last
                hidden state), or None.
            span: One image's span.

        Raises:
            EmbedLensError: The features were not captured, or their patch grid does not pool to the span's.
        """
        if features is None:
            raise EmbedLensError("the projector's input was not captured")
        image = features[span.global_image]
        rows, cols = span.grid
        patches = math.isqrt(int(image.shape[0]))
        if image.ndim != 2 or patches * patches != image.shape[0] or patches % rows or patches % cols:
            raise EmbedLensError(f"cannot pool vision features of shape {tuple(image.shape)} to a {rows} x {cols} grid")
        kernel_rows, kernel_cols = patches // rows, patches // cols
        blocks = image.reshape(rows, kernel_rows, cols, kernel_cols, image.shape[-1])
        return blocks.mean(dim=(1, 3)).reshape(rows * cols, image.shape[-1])

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        """Gemma 3's chat template with one image entry per image, before the text (the text starts
        with the template's ``<bos>``; :meth:`encode` keeps the model to one)."""
        return chat_prompt(self, prompt, num_images, self.image_placeholder * num_images + "\n" + prompt)

    #: One view per image: pan-and-scan crops stay off.
    processor_options: ClassVar[Mapping[str, Any]] = MappingProxyType({"do_pan_and_scan": False})

    def model_texts(self, texts: list[str]) -> list[str]:
        """A text that starts with ``<bos>`` (as the chat template writes it) loses it when the tokenizer
        adds its own, so the model sees one, as ``apply_chat_template(tokenize=True)`` gives it."""
        return single_bos(self, texts)
