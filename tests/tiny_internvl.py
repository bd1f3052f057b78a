"""A tiny random InternVL (``InternVLForConditionalGeneration``) with its real processor, for the tests.

Same code path as OpenGVLab/InternVL3-*-hf: the InternVL vision tower, pixel shuffle (downsample ratio
0.5) and the 2-layer projector, a Qwen2 decoder, ``InternVLProcessor`` with the GOT-OCR2 image processor
(dynamic tiles + thumbnail) and InternVL's chat template, at toy sizes: 56 px tiles of 14 px patches ->
4 x 4 patches -> 2 x 2 = 4 tokens per view after pixel shuffle; up to 4 tiles per image, so a 112 x 56
(wide) image gives 2 tiles side by side and a thumbnail (12 image tokens), a 56 x 56 one a single tile.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from embedlens.models.tiny import build_tiny_tokenizer
from tiny_parts import save_pair, word_tokenizer

#: InternVL-hf's chat template (ChatML; an image entry becomes ``<IMG_CONTEXT>`` and a newline).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

#: Side of a tile in pixels, and of a vision patch.
TILE = 56
PATCH = 14
#: Vocabulary rows: the word pieces, then the 6 special tokens below on the last ids.
VOCAB = 1000
_NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_CHAT = ["<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like :func:`embedlens.models.tiny.build_tiny_tokenizer`'s whose last six ids
    are ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>`` (named the way InternVL-hf's tokenizer names
    them: ``start_image_token``, ...), ``<|im_start|>`` and ``<|im_end|>``."""
    base = build_tiny_tokenizer(vocab_size - len(_NAMED) - len(_CHAT) + 1).get_vocab()
    pieces = [piece for piece in sorted(base, key=base.__getitem__) if piece != "<image>"]
    tokenizer = word_tokenizer(
        pieces,
        _CHAT,
        size=vocab_size,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=dict(_NAMED),
    )
    if tokenizer.convert_tokens_to_ids(_CHAT[-1]) != vocab_size - 1:
        raise AssertionError("the special tokens did not land on the last ids")
    return tokenizer


def build_model_and_processor(
    max_patches: int = 4, seed: int = 0
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """The tiny model (random weights drawn with ``seed``) and its processor (tiles of 56 px, at most
    ``max_patches`` of them per image), in memory."""
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )
    text = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    tokenizer = build_tokenizer()
    per_view = (TILE // PATCH // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=per_view,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    size = {"height": TILE, "width": TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=per_view,
        chat_template=INTERNVL_TEMPLATE,
    )
    return model, processor


def build(directory: Path, max_patches: int = 4) -> Path:
    """Save the tiny model and its processor to ``directory`` (loadable by path) and return it."""
    return save_pair(*build_model_and_processor(max_patches), directory)
