"""A tiny random PaliGemma 2 (``PaliGemmaForConditionalGeneration``) with its real processor classes.

Same code path as ``google/paligemma2-3b-pt-224`` at toy sizes: a SigLIP vision tower (no head), PaliGemma's
projector (one linear per patch, one visual token per patch) and a Gemma 2 decoder (sliding and full
attention layers, logit soft-capping). The processor is ``PaliGemmaProcessor`` with
``SiglipImageProcessorPil`` and a word-level tokenizer holding ``<image>`` and PaliGemma's 1024
``<locXXXX>`` and 128 ``<segXXX>`` tokens (the processor adds them to a tokenizer that lacks them); like
PaliGemma's, the processor writes ``<image>`` x 16 + ``<bos>`` + prompt + ``\\n`` and marks the whole
prompt as prefix (``token_type_ids`` 0), which the model attends to both ways. No chat template (the
``pt`` checkpoints have none).

Default sizes: images resized to 56 x 56, 14 px patches -> a 4 x 4 grid of 16 visual tokens per image;
an embedding table of 1344 rows over a 1300-token tokenizer (rows past the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tiny_parts import save_pair, tiny_siglip, word_tokenizer

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
_EXTRA = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
_WORDS = ["what", "is", "this", "the", "a", "there", "red", "thing", "in", "picture", "caption", "en", "answer"]


@dataclass(frozen=True)
class TinyPaliGemmaSpec:
    """Sizes of the tiny PaliGemma.

    Attributes:
        image_size: Side of the square images the processor makes, in pixels.
        patch_size: SigLIP patch side; the grid is ``image_size // patch_size`` a side.
        layer_types: Attention kind of each decoder layer (its length is the number of layers).
        sliding_window: Window of the sliding-attention layers, in tokens.
        gemma1: A Gemma (PaliGemma 1) decoder instead of Gemma 2: no sliding window, no soft-capping.
        logit_softcapping: Gemma 2's ``final_logit_softcapping`` (30 as released; None: off), which the
            model applies to its logits after the LM head.
        tokenizer_size: Tokens the tokenizer has (with PaliGemma's 1152 location and segmentation tokens).
        vocab_size: Rows of the embedding table and LM head (at least ``tokenizer_size``).
        seed: Torch seed of the random weights.
    """

    image_size: int = 56
    patch_size: int = 14
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention")
    sliding_window: int = 512
    logit_softcapping: float | None = 30.0
    gemma1: bool = False
    tokenizer_size: int = 1300
    vocab_size: int = 1344
    seed: int = 0


def build_tokenizer(size: int = 1300) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens with ``<image>`` and PaliGemma's location and segmentation
    tokens; it adds no ``<bos>`` itself (the processor writes it after the images)."""
    pieces = _SPECIALS + _EXTRA + _WORDS
    pieces += [f"tok{i}" for i in range(size - len(pieces))]
    return word_tokenizer(pieces, ["<image>"], size=size, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_tiny_paligemma(
    spec: TinyPaliGemmaSpec = TinyPaliGemmaSpec(),
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Build the tiny random model and its processor in memory."""
    tokenizer = build_tokenizer(spec.tokenizer_size)
    tokens = (spec.image_size // spec.patch_size) ** 2
    vision = tiny_siglip(spec.image_size, spec.patch_size)
    sizes = {
        "vocab_size": spec.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": len(spec.layer_types),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if spec.gemma1:
        text: GemmaConfig | Gemma2Config = GemmaConfig(**sizes)
    else:
        text = Gemma2Config(
            **sizes,
            query_pre_attn_scalar=16,
            sliding_window=spec.sliding_window,
            final_logit_softcapping=spec.logit_softcapping,
            layer_types=list(spec.layer_types),
        )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=spec.vocab_size,
        projection_dim=64,
        hidden_size=64,
    )
    torch.manual_seed(spec.seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Gemma initialises its RMS norm weights at zero (scale 1 + w); random ones make every layer show.
        for name, parameter in model.named_parameters():
            if "norm" in name and "language_model" in name:
                parameter.normal_(0.0, 0.2)
    image_processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    image_processor.image_seq_length = tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if len(processor.tokenizer) != spec.tokenizer_size:
        raise AssertionError("the PaliGemma processor added tokens to the tiny tokenizer")
    return model, processor


def build(directory: Path, spec: TinyPaliGemmaSpec = TinyPaliGemmaSpec()) -> Path:
    """Save the tiny model and processor to ``directory`` (loadable by path) and return it."""
    return save_pair(*build_tiny_paligemma(spec), directory)


def build_uncapped(directory: Path) -> Path:
    """:func:`build` without the final logit soft-capping: the conformance suite's hand-built reference
    decoder ends at the LM head, so it cannot follow the capping PaliGemma applies after it
    (``tests/test_family_paligemma.py`` checks prune against a reference that caps)."""
    return build(directory, TinyPaliGemmaSpec(logit_softcapping=None))
