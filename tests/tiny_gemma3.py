"""A tiny random Gemma 3 (``Gemma3ForConditionalGeneration``) with its real processor classes.

Same code path as ``google/gemma-3-4b-it`` at toy sizes: a SigLIP vision tower, Gemma 3's projector
(average-pools the patch grid to ``mm_tokens_per_image`` tokens, RMS-norms and projects them), and a
Gemma 3 decoder whose layers mix sliding-window and full attention (with their own rotary bases). The
processor is ``Gemma3Processor`` with ``Gemma3ImageProcessorPil`` and a word-level tokenizer that knows
Gemma's image tokens (``<start_of_image>``, ``<image_soft_token>``, ``<end_of_image>``) and, like
Gemma's, adds ``<bos>`` itself; the chat template is Gemma 3's (``<start_of_turn>user`` ...).

Default sizes: images resized to 112 px, 14 px patches -> an 8 x 8 patch grid, pooled 2 x 2 to a 4 x 4
grid of 16 visual tokens per image; an embedding table of 1024 rows over a 1000-token tokenizer (rows
past the tokenizer, as Gemma 3's 262208 rows over its 262145 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from tiny_parts import save_pair, tiny_siglip, word_tokenizer

#: Gemma 3's chat template (google/gemma-3-4b-it), word for word.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_WORDS = [
    "user",
    "model",
    "what",
    "is",
    "this",
    "the",
    "a",
    "there",
    "red",
    "thing",
    "in",
    "picture",
    "image",
    "colour",
    "of",
    "how",
    "many",
    "and",
]


@dataclass(frozen=True)
class TinyGemma3Spec:
    """Sizes of the tiny Gemma 3.

    Attributes:
        image_size: Side of the square images the processor makes, in pixels.
        patch_size: SigLIP patch side; the patch grid is ``image_size // patch_size`` a side.
        tokens_per_image: ``mm_tokens_per_image``, a square; the projector pools the patch grid to it.
        layer_types: Attention kind of each decoder layer (its length is the number of layers).
        sliding_window: Window of the sliding-attention layers, in tokens.
        tokenizer_size: Tokens the tokenizer has (the last three are the image tokens).
        vocab_size: Rows of the embedding table and LM head (at least ``tokenizer_size``).
        do_pan_and_scan: The image processor's pan-and-scan setting (off, as in google/gemma-3-4b-it).
        chat_template: The processor's chat template (None: no template).
        seed: Torch seed of the random weights.
    """

    image_size: int = 112
    patch_size: int = 14
    tokens_per_image: int = 16
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention")
    sliding_window: int = 512
    tokenizer_size: int = 1000
    vocab_size: int = 1024
    do_pan_and_scan: bool = False
    chat_template: str | None = GEMMA3_TEMPLATE
    seed: int = 0


def build_tokenizer(size: int = 1000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens that adds ``<bos>`` like Gemma's and names the image tokens
    (``boi_token``, ``eoi_token``, ``image_token`` and their ids), which ``Gemma3Processor`` reads."""
    pieces = list(_SPECIALS) + list(dict.fromkeys(_WORDS))
    pieces += [f"tok{i}" for i in range(size - len(_IMAGE_TOKENS) - len(pieces))]
    return word_tokenizer(
        pieces,
        ["<start_of_turn>", "<end_of_turn>"],
        size=size,
        bos=("<bos>", 2),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        extra_special_tokens=dict(_IMAGE_TOKENS),
    )


def build_tiny_gemma3(
    spec: TinyGemma3Spec = TinyGemma3Spec(),
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Build the tiny random model and its processor in memory."""
    tokenizer = build_tokenizer(spec.tokenizer_size)
    vision = tiny_siglip(spec.image_size, spec.patch_size)
    text = Gemma3TextConfig(
        vocab_size=spec.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(spec.layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=2048,
        sliding_window=spec.sliding_window,
        layer_types=list(spec.layer_types),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=spec.tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Gemma 3 initialises its projector and norms at zero; random weights make every layer show.
        for name, parameter in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                parameter.normal_(0.0, 0.2 if "norm" in name else 1.0)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        do_pan_and_scan=spec.do_pan_and_scan,
        pan_and_scan_min_crop_size=spec.image_size // 2,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=spec.chat_template,
        image_seq_length=spec.tokens_per_image,
    )
    return model, processor


def build(directory: Path, spec: TinyGemma3Spec = TinyGemma3Spec()) -> Path:
    """Save the tiny model and processor to ``directory`` (loadable by path) and return it."""
    return save_pair(*build_tiny_gemma3(spec), directory)
