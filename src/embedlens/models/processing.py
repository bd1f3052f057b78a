"""What every adapter does with its processor: the chat prompt, the batched processor call, the pictures.

Adapters differ in how they lay visual tokens out, not in how they call a ``transformers`` processor, so
these three steps live here once:

* :func:`chat_prompt`: the user's question in the model's chat template with one image entry per image
  (or the family's placeholder block before the text when the checkpoint has no template);
* :func:`single_bos`: the template's BOS dropped where the tokenizer adds one itself;
* :func:`run_processor`: one left-padded processor call for a batch (so batched generation matches
  single-sample generation), its tensors moved to the model's device and pixel values to its dtype;
* :func:`unnormalise`: the picture the vision tower sees, from normalised pixel values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from embedlens.errors import InputError

if TYPE_CHECKING:
    from embedlens.models.base import ModelAdapter


def chat_template(adapter: ModelAdapter) -> str | None:
    """The checkpoint's chat template (the processor's, else the tokenizer's), or None."""
    processor = adapter.processor
    return getattr(processor, "chat_template", None) or getattr(adapter.tokenizer, "chat_template", None)


def chat_prompt(adapter: ModelAdapter, prompt: str, num_images: int, without_template: str) -> str:
    """``prompt`` in the chat template, one image entry per image before the text, ready for generation.

    Args:
        adapter: The model's adapter (its processor renders the template).
        prompt: The user's question.
        num_images: Images in the sample.
        without_template: The text to use when the checkpoint has no chat template.
    """
    template = chat_template(adapter)
    if template is None:
        return without_template
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return adapter.processor.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )


def single_bos(adapter: ModelAdapter, texts: list[str]) -> list[str]:
    """``texts`` with a leading BOS removed where the tokenizer adds its own, so the model sees one (as
    ``apply_chat_template(tokenize=True)`` gives it) when a chat template writes ``{{ bos_token }}``."""
    tokenizer = adapter.tokenizer
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None or bos_id not in tokenizer("").input_ids:
        return list(texts)
    return [text[len(bos) :] if text.startswith(bos) else text for text in texts]


def run_processor(
    adapter: ModelAdapter, texts: list[str], images: Any, **options: Any
) -> tuple[Mapping[str, Any], dict[str, torch.Tensor]]:
    """One processor call for a batch, padded on the left.

    Args:
        adapter: The model's adapter.
        texts: Each sample's model text (image placeholders included).
        images: What the processor takes as images (a flat list, one list per sample, or None).
        **options: More keyword arguments for the processor (e.g. ``do_pan_and_scan=False``).

    Returns:
        The processor's output (on the CPU, as the processor gave it, less any training ``labels``) and
        the model's forward inputs:
        every tensor on the model's device, ``pixel_values`` in the model's dtype.

    Raises:
        InputError: The processor refused the images (e.g. an aspect ratio it does not take).
    """
    tokenizer = adapter.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = adapter.processor(images=images, text=texts, return_tensors="pt", padding=True, **options)
    except ValueError as exc:
        raise InputError(f"cannot process the images: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        tokenizer.padding_side = old_side
    encoded.pop("labels", None)  # training targets some processors add (PaliGemma); never a forward input here
    inputs = {k: v.to(adapter.device) for k, v in encoded.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(adapter.model.dtype)
    return encoded, inputs


def unnormalise(image_processor: Any, pixel_values: torch.Tensor) -> Image.Image:
    """Undo the image processor's normalisation of one picture ``[3, H, W]``: what the tower sees, as RGB."""
    mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0], dtype=np.float32)
    std = np.asarray(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0], dtype=np.float32)
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    array = pixel_values.float().cpu().numpy().transpose(1, 2, 0)
    array = (array * std + mean) / scale
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))
