"""A tiny random LLaVA model with a real processor, built from configs in a fraction of a second.

It runs the same code path as ``llava-hf/llava-1.5-7b-hf`` (``LlavaForConditionalGeneration``, a CLIP
vision tower, a 2-layer MLP projector, a LLaMA decoder) at toy sizes, so tests and first runs work
without any download. Its weights are random: what its lens shows means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from embedlens.models.llava import extra_image_tokens

#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:").
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "on",
    "with",
    "this",
    "that",
    "what",
    "which",
    "where",
    "how",
    "many",
    "image",
    "picture",
    "photo",
    "describe",
    "color",
    "colour",
    "shape",
    "object",
    "letter",
    "word",
    "text",
    "number",
    "count",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "background",
    "cat",
    "dog",
    "bird",
    "car",
    "tree",
    "house",
    "sun",
    "moon",
    "person",
    "man",
    "woman",
    "child",
    "face",
    "hand",
    "sky",
    "water",
    "grass",
    "road",
    "table",
    "chair",
    "cup",
    "book",
    "ball",
    "box",
    "there",
    "are",
    "see",
    "do",
    "you",
    "can",
    "your",
    "my",
    "his",
    "her",
    "its",
    "their",
    "our",
    "yes",
    "no",
    "not",
    ".",
    ",",
    "?",
    "!",
    ":",
    ";",
    "'",
    '"',
    "(",
    ")",
    "-",
    "USER",
    "ASSISTANT",
    "What",
    "Which",
    "Where",
    "How",
    "Describe",
    "Is",
    "Are",
    "The",
    "A",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. Defaults: 56 px images, 14 px patches -> a 4 x 4 grid (16 tokens).

    Attributes:
        image_size: Side of the square images the processor makes, in pixels.
        patch_size: Side of a vision patch in pixels; the grid is ``image_size // patch_size`` a side.
        vision_hidden: Hidden size of the CLIP vision tower (its MLP is twice as wide).
        vision_layers: Number of vision encoder layers.
        text_hidden: Hidden size ``d`` of the LLaMA language model (its MLP is twice as wide).
        text_layers: Number of decoder layers ``L``.
        vocab_size: Vocabulary size ``V``; id ``V - 1`` is the ``<image>`` placeholder.
        seed: Torch seed the random weights are drawn with.
        strategy: Vision feature selection: ``"default"`` drops the CLS token (16 visual tokens),
            ``"full"`` keeps it in front of the patch tokens (17).
    """

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 4
    vocab_size: int = 1000
    seed: int = 0
    strategy: str = "default"


def build_tiny_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with special tokens, 256 byte-fallback pieces, words and filler pieces.

    Id ``vocab_size - 1`` is the ``<image>`` placeholder.
    """
    pieces = list(_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)] + list(dict.fromkeys(_WORDS))
    pieces += [f"tok{i}" for i in range(vocab_size - 1 - len(pieces))]
    if len(pieces) != vocab_size - 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for the tiny tokenizer")
    backend = Tokenizer(WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.convert_tokens_to_ids("<image>") != vocab_size - 1:
        raise AssertionError("the <image> token did not land on the last id")
    return tok


def build_tiny_llava(
    spec: TinySpec = TinySpec(), chat_template: str | None = LLAVA_15_TEMPLATE
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a tiny random LLaVA model and its processor in memory (about 0.1 s)."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=spec.vocab_size,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    grid = spec.image_size // spec.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=spec.vocab_size - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy=spec.strategy,
        image_seq_length=grid * grid + extra_image_tokens(spec.strategy),
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.strategy,
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    return model, processor


def save_tiny_llava(
    directory: str | Path, spec: TinySpec = TinySpec(), chat_template: str | None = LLAVA_15_TEMPLATE
) -> Path:
    """Build the tiny model and save model + processor to ``directory`` (loadable by path)."""
    directory = Path(directory)
    model, processor = build_tiny_llava(spec, chat_template)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
