"""Lenses: read a hidden vector as vocabulary tokens.

* :class:`EmbeddingLens` (the paper's "EmbedLens") ranks the rows of the LLM's *input* embedding table
  by cosine similarity to the vector. It shows what the vector itself carries, before the LLM has
  transformed it.
* :class:`LogitLens` applies the model's final norm and LM head (what the model would predict if the
  residual stream stopped here); scores are logits.

Both return exact top-k results (see :mod:`embedlens.nearest`): the same ids, in the same order, as a
float64 brute force with ties broken by lower id, whatever the model's dtype.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from embedlens.errors import InputError
from embedlens.models.base import ModelAdapter
from embedlens.nearest import ExactSearch

#: Byte-fallback pieces of SentencePiece vocabularies, e.g. ``<0x0A>``.
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
#: Names accepted by ``exclude``.
EXCLUDABLE = ("special", "bytes")


@dataclass(frozen=True)
class LensOutput:
    """Top-k tokens for a set of vectors.

    Attributes:
        ids: Vocabulary ids, shape ``[n, k]``, best first.
        scores: Cosine similarity (embedding lens) or logit (logit lens), float64, shape ``[n, k]``.
        tokens: The vocabulary pieces of ``ids`` (e.g. ``"▁jav"``), ``n`` lists of ``k`` strings.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    tokens: list[list[str]]


def vocabulary_hash(tokenizer, limit: int | None = None) -> str:
    """SHA-256 of the tokenizer's (piece, id) pairs: identifies a vocabulary across models.

    Args:
        tokenizer: Anything with ``get_vocab() -> dict[str, int]``.
        limit: Keep only ids below this (the base vocabulary of an extended tokenizer), or None for all.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256()
    for piece, index in vocab:
        if limit is None or index < limit:
            digest.update(f"{index}\t{piece}\n".encode())
    return digest.hexdigest()


def check_exclude(exclude: Iterable[str]) -> tuple[str, ...]:
    """Validate token-kind names for ``exclude``; return them sorted and unique."""
    kinds = set(exclude)
    unknown = kinds - set(EXCLUDABLE)
    if unknown:
        raise InputError(f"cannot exclude {sorted(unknown)}; choose from {list(EXCLUDABLE)}")
    return tuple(sorted(kinds))


def excluded_ids(tokenizer, exclude: Iterable[str], vocab_rows: int) -> set[int]:
    """Ids to leave out: ``"special"`` (special and added special tokens) and/or ``"bytes"`` (``<0xNN>``)."""
    exclude = check_exclude(exclude)
    out: set[int] = set()
    if "special" in exclude:
        out |= {i for i in tokenizer.all_special_ids if i is not None}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        out |= {i for i, token in added.items() if getattr(token, "special", False)}
    if "bytes" in exclude:
        out |= {i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.match(piece)}
    return {i for i in out if 0 <= i < vocab_rows}


def pieces(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    """Vocabulary pieces for a ``[n, k]`` id tensor; rows beyond the tokenizer (padding) show as ``<row N>``."""
    size = len(tokenizer)
    out = []
    for row in ids.tolist():
        known = tokenizer.convert_ids_to_tokens([i for i in row if i < size])
        lookup = dict(zip([i for i in row if i < size], known, strict=True))
        out.append([lookup.get(i, f"<row {i}>") for i in row])
    return out


def searchable_rows(table_rows: int, tokenizer_size: int, vocab_limit: int | None = None) -> int:
    """How many leading table rows a lens may return.

    Embedding tables are often larger than the tokenizer (llava-hf: 32064 rows for 32002 tokens; Qwen2-VL:
    151936 rows for about 151665 tokens): the extra rows are padding, never a token, and are left out.
    ``vocab_limit`` restricts the search further to a base vocabulary (LLaVA-1.5's reference searches only
    LLaMA's 32000 rows, leaving out ``<image>`` and ``<pad>``).
    """
    limit = min(table_rows, tokenizer_size)
    return limit if vocab_limit is None else min(limit, vocab_limit)


class Lens(ABC):
    """A way of reading vectors as vocabulary tokens, exact top-k.

    Args:
        adapter: The model's adapter.
        exclude: Token kinds never returned: ``"special"`` and/or ``"bytes"``.
        vocab_limit: Return only ids below this (a base vocabulary), or None for every row the tokenizer
            has. Rows beyond the tokenizer are never returned; :attr:`rows_left_out` counts both.
    """

    #: Name used in results and on the command line.
    name: ClassVar[str]
    #: Whether scores are cosine similarities (True) or inner products (False).
    normalize: ClassVar[bool]

    def __init__(self, adapter: ModelAdapter, exclude: Iterable[str] = (), vocab_limit: int | None = None) -> None:
        self.adapter = adapter
        self.exclude = check_exclude(exclude)
        if vocab_limit is not None and (isinstance(vocab_limit, bool) or int(vocab_limit) <= 0):
            raise InputError(f"vocab_limit must be a positive integer, got {vocab_limit!r}")
        self.vocab_limit = None if vocab_limit is None else int(vocab_limit)
        table = self.table()
        rows = int(table.shape[0])
        #: Rows that may be returned: ``0 .. searchable_rows - 1`` (minus excluded kinds).
        self.searchable_rows = searchable_rows(rows, len(adapter.tokenizer), self.vocab_limit)
        #: Table rows never returned because they lie beyond the tokenizer or the base vocabulary.
        self.rows_left_out = rows - self.searchable_rows
        removed = excluded_ids(adapter.tokenizer, self.exclude, self.searchable_rows)
        allowed = None
        if removed or self.rows_left_out:
            keep = torch.zeros(rows, dtype=torch.bool)
            keep[: self.searchable_rows] = True
            keep[list(removed)] = False
            allowed = torch.nonzero(keep).flatten()
        self._search = ExactSearch(table, normalize=self.normalize, bias=self.bias(), allowed=allowed)

    @abstractmethod
    def table(self) -> torch.Tensor:
        """The table whose rows are ranked, shape ``[V, d]``."""

    def bias(self) -> torch.Tensor | None:
        """Per-row bias added to scores, shape ``[V]``, or None."""
        return None

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map residual-stream vectors ``[n, d]`` to the space of the table (identity by default)."""
        return hidden

    def top_k(self, hidden: torch.Tensor, k: int) -> LensOutput:
        """Exact top-``k`` vocabulary tokens for each vector.

        Args:
            hidden: Vectors, shape ``[n, d]`` (any dtype; the lens computes in float64).
            k: Number of tokens per vector.
        """
        if k <= 0:
            raise InputError(f"top-k must be a positive integer, got {k}")
        if k > self._search.size:
            raise InputError(f"top-k {k} is larger than the {self._search.size} searchable tokens")
        with torch.inference_mode():
            queries = self.transform(hidden.to(self._search.device))
        found = self._search.search(queries, k)
        return LensOutput(found.ids, found.scores, pieces(self.adapter.tokenizer, found.ids))


class EmbeddingLens(Lens):
    """Cosine similarity to the rows of the LLM's input embedding table (the paper's probe)."""

    name = "embedding"
    normalize = True

    def table(self) -> torch.Tensor:
        return self.adapter.input_embeddings.weight


class LogitLens(Lens):
    """Final norm + LM head: the logits the model would produce from this residual stream."""

    name = "logit"
    normalize = False

    def table(self) -> torch.Tensor:
        return self.adapter.lm_head.weight

    def bias(self) -> torch.Tensor | None:
        return getattr(self.adapter.lm_head, "bias", None)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.final_norm(hidden)


LENSES: dict[str, type[Lens]] = {cls.name: cls for cls in (EmbeddingLens, LogitLens)}


def lens_class(name: str) -> type[Lens]:
    """The lens class called ``name`` (``"embedding"`` or ``"logit"``)."""
    if name not in LENSES:
        raise InputError(f"unknown lens {name!r}; choose from {sorted(LENSES)}")
    return LENSES[name]
