"""Parts the tiny family checkpoints (``tests/tiny_*.py``) are built from: a word-level tokenizer, a
one-block SigLIP vision tower, saving a model with its processor so it loads by path, and the
``session`` / ``adapter`` fixtures of a family's test module."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, SiglipVisionConfig

import embedlens


def word_tokenizer(
    pieces: Sequence[str],
    specials: Sequence[str] = (),
    *,
    size: int,
    bos: tuple[str, int] | None = None,
    **tokens: Any,
) -> PreTrainedTokenizerFast:
    """A tokenizer that splits on whitespace and maps each of ``pieces`` to its position (``<unk>`` for
    anything else), then adds ``specials`` as special tokens after them.

    Args:
        pieces: The vocabulary, id by id.
        specials: Added special tokens, in id order after ``pieces``.
        size: The tokenizer's length once ``specials`` are added (checked).
        bos: ``(token, id)`` to have the tokenizer itself write ``token`` in front of every text.
        tokens: The named tokens, e.g. ``pad_token="<pad>"`` or ``extra_special_tokens={...}``.

    Raises:
        AssertionError: The tokenizer does not have ``size`` tokens.
    """
    backend = Tokenizer(WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    if bos is not None:
        token = bos[0]
        backend.post_processor = TemplateProcessing(single=f"{token} $A", pair=f"{token} $A $B", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    if len(tokenizer) != size:
        raise AssertionError(f"the tiny tokenizer has {len(tokenizer)} tokens, not {size}")
    return tokenizer


def tiny_siglip(image_size: int, patch_size: int) -> SiglipVisionConfig:
    """A one-block SigLIP vision tower (width 32, two heads) without its pooling head."""
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


def save_pair(model: Any, processor: Any, directory: str | Path) -> Path:
    """Save ``model`` and ``processor`` to ``directory`` (loadable by path) and return it."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def session_fixtures(name: str, build: Callable[[Path], Path], adapter_class: type) -> tuple[Any, Any]:
    """Module-scoped ``session`` and ``adapter`` fixtures: the checkpoint ``build`` saves (once per
    module, under a temporary folder named ``name``), loaded by path on the CPU; ``adapter`` checks the
    family's adapter class. Use as ``session, adapter = session_fixtures("gemma3", build, Gemma3Adapter)``."""

    @pytest.fixture(scope="module")
    def session(tmp_path_factory: pytest.TempPathFactory) -> embedlens.Session:
        return embedlens.load(str(build(tmp_path_factory.mktemp(name) / "model")), device="cpu")

    @pytest.fixture(scope="module")
    def adapter(session: embedlens.Session) -> Any:
        assert isinstance(session.adapter, adapter_class)
        return session.adapter

    return session, adapter
