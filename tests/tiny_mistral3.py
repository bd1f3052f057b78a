"""A tiny random Mistral 3 (``Mistral3ForConditionalGeneration``) with its real processor classes.

Same code path as ``mistralai/Mistral-Small-3.1-24B-Instruct-2503`` at toy sizes: a Pixtral vision
tower (2-D rotary positions, images at their own size, all images of a batch in one sequence), Mistral 3's
projector (RMS norm, a patch merger joining each ``2 x 2`` block of patches, two linears) and a Mistral
decoder. The processor is ``PixtralProcessor`` with ``PixtralImageProcessorPil`` and a word-level
tokenizer that knows Mistral's image tokens (``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``); the chat
template is a shortened Mistral Small 3.1 template (``<s>``, an optional ``[SYSTEM_PROMPT]``, then
``[INST]`` ... ``[/INST]`` with ``[IMG]`` per image; the released one also writes a long default
system prompt, left out here).

Default sizes: 14 px patches merged 2 x 2, so each image is resized (longest edge at most 112 px) to
multiples of 28 px and gets one token per 28 x 28 px: a 112 x 84 (wide) image -> 3 rows of 4 tokens.
An embedding table of 1024 rows over a 1000-token tokenizer (rows past the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from tiny_parts import save_pair, word_tokenizer

#: Mistral Small 3.1's chat template, shortened: no default system prompt (the released one writes a
#: long one with today's date), otherwise the same text per message.
MISTRAL3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "    {%- else %}\n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "    {%- endif %}\n"
    "    {{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- '[INST]' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST]' }}\n"
    "            {%- for block in message['content'] %}\n"
    "                {%- if block['type'] == 'text' %}\n"
    "                    {{- block['text'] }}\n"
    "                {%- elif block['type'] in ['image', 'image_url'] %}\n"
    "                    {{- '[IMG]' }}\n"
    "                {%- else %}\n"
    "                    {{- raise_exception('Only text and image blocks are supported in message content!') }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_CONTROL = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
_IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
_WORDS = ["what", "is", "this", "the", "a", "there", "red", "thing", "in", "picture", "image", "colour", "of"]


@dataclass(frozen=True)
class TinyMistral3Spec:
    """Sizes of the tiny Mistral 3.

    Attributes:
        longest_edge: The image processor's largest image side, in pixels.
        patch_size: Pixtral's patch side; the processor resizes to multiples of ``patch_size * merge``.
        merge: ``spatial_merge_size``: the side of the block of patches the projector joins into a token.
        layers: Decoder layers (three: the conformance suite injects at 1 and exits above it).
        tokenizer_size: Tokens the tokenizer has.
        vocab_size: Rows of the embedding table and LM head (at least ``tokenizer_size``).
        chat_template: The processor's chat template (None: no template).
        adds_bos: Whether the tokenizer adds ``<s>`` itself (as some converted Mistral tokenizers do).
        seed: Torch seed of the random weights.
    """

    longest_edge: int = 112
    patch_size: int = 14
    merge: int = 2
    layers: int = 3
    tokenizer_size: int = 1000
    vocab_size: int = 1024
    chat_template: str | None = MISTRAL3_TEMPLATE
    adds_bos: bool = False
    seed: int = 0


def build_tokenizer(size: int = 1000, adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens with Mistral's special, control and image tokens; by
    default it adds no ``<s>`` itself (the chat template writes it)."""
    pieces = list(_SPECIALS) + _WORDS
    pieces += [f"tok{i}" for i in range(size - len(_CONTROL) - len(_IMAGE_TOKENS) - len(pieces))]
    return word_tokenizer(
        pieces,
        _CONTROL + _IMAGE_TOKENS,
        size=size,
        bos=("<s>", 1) if adds_bos else None,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
    )


def build_tiny_mistral3(
    spec: TinyMistral3Spec = TinyMistral3Spec(),
) -> tuple[Mistral3ForConditionalGeneration, PixtralProcessor]:
    """Build the tiny random model and its processor in memory."""
    tokenizer = build_tokenizer(spec.tokenizer_size, spec.adds_bos)
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=spec.longest_edge,
        patch_size=spec.patch_size,
    )
    text = MistralConfig(
        vocab_size=spec.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=spec.merge,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": spec.longest_edge}, patch_size={"height": spec.patch_size, "width": spec.patch_size}
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge,
        chat_template=spec.chat_template,
    )
    return model, processor


def build(directory: Path, spec: TinyMistral3Spec = TinyMistral3Spec()) -> Path:
    """Save the tiny model and processor to ``directory`` (loadable by path) and return it."""
    return save_pair(*build_tiny_mistral3(spec), directory)
