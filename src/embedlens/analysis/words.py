"""Which vocabulary pieces read as whole words: the filter behind the readability measures.

A lens shows a vector as its nearest vocabulary pieces. A piece is a **whole word** when

1. it starts a word: it carries the vocabulary's word-boundary marker (``Ġ`` in byte-level BPE such as
   GPT-2, LLaMA-3 or SmolLM; ``▁`` in SentencePiece such as LLaMA-2). Vocabularies without such markers
   (whitespace-split word lists) count every piece as word-initial;
2. after the marker, it is at least :data:`MIN_LETTERS` letters and nothing else (``str.isalpha``,
   so accented and non-Latin letters count, digits and punctuation do not);
3. it is neither a special token (``<s>``, ``<image>``...) nor a byte-fallback piece (``<0x0A>``).

Everything else is a **fragment**: word continuations without the marker (``igh``), bytes, digits,
punctuation, single letters, combining marks (``्``). The filter has no dictionary, so a word-initial
fragment such as ``▁jav`` (the start of "java...") still counts as a word: the measure tells apart
readable-looking from clearly fragmentary neighbours, it does not prove that a piece is an English word.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

#: Word-boundary markers of byte-level BPE and SentencePiece vocabularies.
MARKERS = ("Ġ", "▁")
#: Letters a whole word needs after its marker.
MIN_LETTERS = 2
#: Share of pieces that must carry a marker for a vocabulary to count as marked.
_MARKED_SHARE = 0.1
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def uses_markers(pieces: list[str]) -> bool:
    """Whether a vocabulary marks word starts (at least 10% of its pieces start with a marker)."""
    if not pieces:
        return False
    marked = sum(piece.startswith(MARKERS) for piece in pieces)
    return marked >= _MARKED_SHARE * len(pieces)


def is_whole_word(piece: str, *, marked: bool = True, special: bool = False) -> bool:
    """Whether one vocabulary piece reads as a whole word (see the module docs).

    Args:
        piece: The raw vocabulary piece (``tokenizer.convert_ids_to_tokens``), e.g. ``"Ġyoung"``.
        marked: Whether the vocabulary marks word starts; if not, every piece counts as word-initial.
        special: Whether the piece is a special token.
    """
    if special or _BYTE_PIECE.match(piece):
        return False
    if marked:
        if not piece.startswith(MARKERS):
            return False
        piece = piece[1:]
    return len(piece) >= MIN_LETTERS and piece.isalpha()


def word_table(tokenizer: Any, rows: int) -> np.ndarray:
    """``table[i]`` = whether vocabulary id ``i`` is a whole word, for ids ``0 .. rows - 1``.

    Args:
        tokenizer: The model's tokenizer.
        rows: Rows of the embedding table (ids past the tokenizer's vocabulary are padding: not words).
    """
    vocab = tokenizer.get_vocab()
    by_id = {index: piece for piece, index in vocab.items() if 0 <= index < rows}
    marked = uses_markers(list(by_id.values()))
    specials = {i for i in tokenizer.all_special_ids if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {i for i, token in added.items() if getattr(token, "special", False)}
    table = np.zeros(rows, dtype=bool)
    for index, piece in by_id.items():
        table[index] = is_whole_word(piece, marked=marked, special=index in specials)
    return table
