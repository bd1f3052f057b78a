"""Adapter for ``PaliGemmaForConditionalGeneration`` (google/paligemma2-3b-pt-224, -448, -896, the ``mix``
checkpoints and PaliGemma 1, google/paligemma-3b-pt-224).

Layout, as ``PaliGemmaProcessor`` and the model lay it out:

* Each image is resized to the SigLIP tower's square input (224 px for ``-224``) and cut into 14 px
  patches; the projector is one linear per patch, so each image is a ``(side / 14) x (side / 14)`` grid of
  visual tokens (16 x 16 = 256 for ``-224``), row-major, one view, ``"full"``. No CLS token, no markers.
* The text is the images' runs of ``<image>`` tokens first, then ``<bos>``, the prompt and ``\\n`` (the
  processor adds the ``<bos>`` and the newline; a prompt places an image with ``<image>``, which the
  processor expands).
* Attention is prefix-LM: every prompt token (``token_type_ids`` 0: images, ``<bos>``, prompt) sees every
  other prompt token both ways, generated tokens (type 1) see causally. :meth:`encode` keeps the
  processor's ``token_type_ids`` (and drops its ``labels``); ``generate`` passes them at prefill only.
  ``PaliGemmaModel`` hands its language model ready 4-D masks: for PaliGemma 2 (Gemma 2, with sliding
  window layers) a dict ``{"full_attention", "sliding_attention"}`` from which decoder layer ``i`` takes
  ``config.text_config.layer_types[i]`` (:meth:`mask_key`); for PaliGemma 1 (Gemma) one mask.
* Positions are 1-D and start at 1 (the model numbers them itself when none are given); one rotary
  embedding serves every layer.
* Text embeddings: ``embed_tokens`` multiplies its rows by ``sqrt(d)`` in its forward; its ``weight`` (the
  table both lenses read, tied to the LM head) is unscaled, and projector outputs are not scaled.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from embedlens.errors import InputError
from embedlens.models.fixed_grid import FixedGridAdapter
from embedlens.models.registry import register_adapter


@register_adapter
class PaliGemmaAdapter(FixedGridAdapter):
    """PaliGemma layout: one image -> one run of ``n x n`` image tokens, before ``<bos>`` and the prompt."""

    family = "paligemma"
    model_types = ("paligemma",)
    transformers_class = "PaliGemmaForConditionalGeneration"

    def mask_key(self, layer: int) -> str | None:
        """The entry of the mask dict decoder layer ``layer`` uses: its layer type where the decoder has
        sliding-window layers (PaliGemma 2), else None (PaliGemma 1 passes one mask)."""
        config = self.model.config.text_config
        if getattr(config, "sliding_window", None) is None:
            return None
        return str(config.layer_types[layer])

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of every image's grid (the SigLIP patch grid)."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        count = getattr(self.processor, "image_seq_length", None)
        if count is not None and int(count) != side * side:
            raise InputError(f"the processor writes {count} image tokens per image, the tower makes {side * side}")
        return side, side

    # ----------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, num_images: int = 1) -> str:
        """The placeholders, then the prompt (the processor adds ``<bos>`` after the images and a closing
        newline, as PaliGemma's prompts are written: ``caption en``, ``answer en <question>``, ...)."""
        return self.image_placeholder * num_images + prompt

    def processor_images(self, images: Sequence[Sequence[Image.Image]]) -> list[list[Image.Image]]:
        """One list of images per sample; PaliGemma's processor refuses a batch without images."""
        nested = super().processor_images(images)
        if nested is None:
            raise InputError("PaliGemma needs an image in every batch (its processor refuses text alone)")
        return nested

    # ----------------------------------------------------------------- spans
