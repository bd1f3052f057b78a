"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints with their real processors, built from configs.

Each is the family's real model class at toy sizes (vision hidden 32, LLM hidden 64 with 4 decoder layers
and M-RoPE sections ``[2, 3, 3]`` for a head size of 16) with its real processor class, the torchvision
``Qwen2VLImageProcessor`` and the family's video processor. The image processor's patch and merge sizes
are the vision config's, and its pixel budget (``MIN_PIXELS`` .. ``MAX_PIXELS``) keeps small images at
their own size rounded to a multiple of ``patch * merge``: an image of ``W x H`` pixels becomes a grid of
``round(H / 28) x round(W / 28)`` visual tokens (patch 14) or ``round(H / 32) x round(W / 32)`` (patch 16).

The tokenizer is word level with the Qwen special tokens at the end; the model's embedding table and LM
head have 24 rows more than the tokenizer (as real Qwen checkpoints have), so a lens that searched them
would return ids the tokenizer does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from tiny_parts import save_pair, word_tokenizer

#: Qwen2-VL-7B-Instruct's chat template (Qwen2.5-VL uses the same one).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: A minimal faithful Qwen3-VL chat template (the real one adds tool calls and thinking; no system default).
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen's special tokens, in the tokenizer's last ids.
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_WORDS = (
    "<unk>",
    "system",
    "user",
    "assistant",
    "You",
    "are",
    "a",
    "helpful",
    ".",
    "what",
    "is",
    "this",
    "there",
    "red",
    "green",
    "thing",
    "in",
    "the",
    "picture",
    "image",
    "describe",
    "colour",
    "?",
)
#: Tokens the tokenizer has (the tables have :data:`PADDED_ROWS` more).
TOKENIZER_SIZE = 1000
PADDED_ROWS = 24
#: The image processor's pixel budget: an image keeps its size, rounded to a multiple of patch * merge.
MIN_PIXELS = 28 * 28
MAX_PIXELS = 160 * 160


@dataclass(frozen=True)
class QwenSpec:
    """Sizes of a tiny Qwen-VL checkpoint.

    Attributes:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        text_layers: Decoder layers ``L``.
        vision_layers: Vision blocks (Qwen3-VL: DeepStack takes one level from each, up to ``L - 1``).
        window_size: Qwen2.5-VL's attention window in pixels (56 with patch 14: 2 x 2 visual tokens a window).
        seed: Torch seed of the random weights.
    """

    family: str = "qwen2_vl"
    text_layers: int = 4
    vision_layers: int = 2
    window_size: int = 56
    seed: int = 0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of :data:`TOKENIZER_SIZE` tokens ending in the Qwen special tokens."""
    pieces = list(_WORDS) + [f"tok{i}" for i in range(TOKENIZER_SIZE - len(SPECIALS) - len(_WORDS))]
    return word_tokenizer(
        pieces, list(SPECIALS), size=TOKENIZER_SIZE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _text_config(spec: QwenSpec, ids: dict[str, int]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "vocab_size": TOKENIZER_SIZE + PADDED_ROWS,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    if spec.family == "qwen3_vl":
        config["head_dim"] = 16
        config["rope_parameters"]["mrope_interleaved"] = True
    else:
        config["bos_token_id"] = None
    return config


def _vision_config(spec: QwenSpec, patch: int) -> dict[str, Any]:
    common = {"depth": spec.vision_layers, "num_heads": 2, "patch_size": patch, "spatial_merge_size": 2}
    if spec.family == "qwen2_vl":
        return {**common, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    if spec.family == "qwen2_5_vl":
        return {
            **common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "window_size": spec.window_size,
            "fullatt_block_indexes": [spec.vision_layers - 1],
        }
    levels = list(range(min(spec.vision_layers, spec.text_layers - 1)))
    return {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": levels,
    }


_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor, 14),
    "qwen2_5_vl": (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
        14,
    ),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor, 16),
}


def build_qwen(spec: QwenSpec = QwenSpec()) -> tuple[torch.nn.Module, Any]:
    """Build a tiny random Qwen-VL model of ``spec.family`` and its processor in memory."""
    config_class, model_class, processor_class, video_class, patch = _CLASSES[spec.family]
    tokenizer = build_tokenizer()
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(list(SPECIALS)), strict=True))
    config = config_class(
        vision_config=_vision_config(spec, patch),
        text_config=_text_config(spec, ids),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    sizes = {"patch_size": patch, "merge_size": 2, "temporal_patch_size": 2}
    budget = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    template = QWEN3_VL_TEMPLATE if spec.family == "qwen3_vl" else QWEN2_VL_TEMPLATE
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(size=budget, **sizes),
        tokenizer=tokenizer,
        video_processor=video_class(size=budget, **sizes),
        chat_template=template,
    )
    return model, processor


def save_qwen(directory: Path, spec: QwenSpec = QwenSpec()) -> Path:
    """Build a tiny checkpoint and save model + processor to ``directory`` (loadable by path)."""
    return save_pair(*build_qwen(spec), directory)


def build_qwen2_vl(directory: Path) -> Path:
    """A tiny Qwen2-VL (patch 14, merge 2, one vision block) saved to ``directory``."""
    return save_qwen(directory, QwenSpec("qwen2_vl", vision_layers=1))


def build_qwen2_5_vl(directory: Path) -> Path:
    """A tiny Qwen2.5-VL (patch 14, merge 2, windows of 2 x 2 visual tokens, the last block global)."""
    return save_qwen(directory, QwenSpec("qwen2_5_vl"))


def build_qwen3_vl(directory: Path) -> Path:
    """A tiny Qwen3-VL (patch 16, merge 2, three vision blocks each feeding a DeepStack level)."""
    return save_qwen(directory, QwenSpec("qwen3_vl", vision_layers=3))
