"""Tiny random LLaVA-NeXT and LLaVA-OneVision checkpoints with their real processor classes.

Both have 4 decoder layers (the conformance suite's combined intervention needs an exit above layer 1)
and tile an image by the grid pinpoints: a 56 px base image on a 14 px patch grid (4 x 4 tokens) and,
for a wide image, a 1 x 2 layout of 56 px tiles (4 x 8 tokens before unpadding). LLaVA-NeXT pairs a
CLIP tower ("default" selection: the CLS token dropped) with a LLaMA decoder and its ``[INST]``
template; OneVision pairs a SigLIP tower ("full": SigLIP has no CLS) with a Qwen2 decoder and ChatML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from embedlens.models.tiny import build_tiny_tokenizer
from helpers import CHATML_TEMPLATE
from tiny_parts import save_pair

#: llava-hf/llava-v1.6-mistral-7b-hf's conversation format, images before the text of a turn.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " [/INST]"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s> {% endif %}"
    "{% endfor %}"
)

#: Tile layouts (height, width) in pixels: multiples of the 56 px tile.
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


@dataclass(frozen=True)
class TinyAnyres:
    """Sizes of a tiny anyres model (both families).

    Attributes:
        tile: Side of the base image and of each tile, in pixels.
        patch: Side of a vision patch; base and tiles are ``tile // patch`` tokens a side.
        pinpoints: Tile layouts the processor and model choose from, ``[height, width]`` in pixels.
        max_tiles: OneVision's ``anyres_max_<n>``: tile grids over about ``n`` tiles' worth of tokens
            are downsampled.
        vocab_size: Vocabulary ``V``; id ``V - 1`` is ``<image>`` (OneVision: ``<video>``, and
            ``<image>`` is ``V - 2``).
        seed: Torch seed of the random weights.
    """

    tile: int = 56
    patch: int = 14
    pinpoints: tuple[tuple[int, int], ...] = tuple(tuple(p) for p in PINPOINTS)
    max_tiles: int = 9
    vocab_size: int = 1000
    seed: int = 0


def _text(spec: TinyAnyres, config_class: type) -> object:
    return config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=spec.vocab_size,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def _vision(spec: TinyAnyres, config_class: type, **extra: object) -> object:
    return config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=spec.tile,
        patch_size=spec.patch,
        **extra,
    )


def build_llava_next(
    spec: TinyAnyres = TinyAnyres(),
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A tiny random LLaVA-NeXT (CLIP + LLaMA, Mistral-style template) and its processor, in memory."""
    pinpoints = [list(p) for p in spec.pinpoints]
    config = LlavaNextConfig(
        vision_config=_vision(spec, CLIPVisionConfig, projection_dim=32),
        text_config=_text(spec, LlamaConfig),
        image_token_id=spec.vocab_size - 1,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": spec.tile},
        crop_size={"height": spec.tile, "width": spec.tile},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(spec.vocab_size),
        patch_size=spec.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_TEMPLATE,
    )
    return model, processor


def tokenizer_with_video(vocab_size: int) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with ``<image>`` at id ``V - 2`` and ``<video>`` at ``V - 1``."""
    tokenizer = build_tiny_tokenizer(vocab_size - 1)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def build_llava_onevision(
    spec: TinyAnyres = TinyAnyres(),
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A tiny random LLaVA-OneVision (SigLIP + Qwen2, ChatML template) and its processor, in memory."""
    pinpoints = [list(p) for p in spec.pinpoints]
    aspect = f"anyres_max_{spec.max_tiles}"
    config = LlavaOnevisionConfig(
        vision_config=_vision(spec, SiglipVisionConfig, vision_use_head=False),
        text_config=_text(spec, Qwen2Config),
        image_token_index=spec.vocab_size - 2,
        video_token_index=spec.vocab_size - 1,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": spec.tile, "width": spec.tile},
        image_grid_pinpoints=pinpoints,
    )
    side = spec.tile // spec.patch
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer_with_video(spec.vocab_size),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": spec.tile, "width": spec.tile}),
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=CHATML_TEMPLATE,
    )
    return model, processor


def save_llava_next(directory: Path, spec: TinyAnyres = TinyAnyres()) -> Path:
    """Build the tiny LLaVA-NeXT and save it to ``directory`` (loadable by path)."""
    return save_pair(*build_llava_next(spec), directory)


def save_llava_onevision(directory: Path, spec: TinyAnyres = TinyAnyres()) -> Path:
    """Build the tiny LLaVA-OneVision and save it to ``directory`` (loadable by path)."""
    return save_pair(*build_llava_onevision(spec), directory)
