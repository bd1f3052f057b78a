"""Anchors: the vocabulary ids that mark sink and dead visual tokens, tied to one vocabulary.

The paper's rule (see :mod:`embedlens.taxonomy.rule`) puts a visual token in a group when one of its
nearest input-embedding ids is that group's *anchor* id. Ids only mean something within one vocabulary,
so an :class:`Anchors` object carries the SHA-256 of the vocabulary it was made for (the same hash as
:func:`embedlens.lens.vocabulary_hash`) and refuses to be used with another one.

Base vocabularies. Some checkpoints extend a shared vocabulary with tokens of their own: llava-hf's
LLaVA-1.5 adds ``<image>`` (id 32000) and ``<pad>`` (id 32001) to LLaMA-2's 32000 pieces (and pads the
embedding table to 32064 rows). Anchors with ``base_vocab_size = N`` therefore compare the hash of the
tokenizer's vocabulary *restricted to ids < N*: the anchors stay valid for any tokenizer that keeps
those N (piece, id) pairs, whatever it appends. ``base_vocab_size = None`` compares the whole vocabulary.

The built-in anchors for LLaVA-1.5-7B (:func:`builtin_anchors`) store the hash of LLaMA-2's 32000-piece
vocabulary, computed from the tokenizer-only GGUF in ``tests/fixtures/llama-spm`` (a test recomputes
it), with ``base_vocab_size = 32000``.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedlens.errors import InputError
from embedlens.files import atomic_write_text
from embedlens.lens import vocabulary_hash
from embedlens.taxonomy.groups import GROUPS

#: ``"format"`` value of an anchors JSON file.
ANCHORS_FORMAT = "embedlens-anchors"
#: Version of the anchors JSON layout.
ANCHORS_VERSION = 1

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: SHA-256 (:func:`vocabulary_hash`) of LLaMA-2's 32000-piece SentencePiece vocabulary, the base of
#: LLaVA-1.5's tokenizer. Recomputed from the fixture GGUF by ``tests/test_taxonomy_rule.py``.
LLAMA2_VOCAB_HASH = "fe56f82cb0368a695de548846e10be3ba13a71bebd2f1a5f65a3dcbc51f73eab"
LLAMA2_VOCAB_SIZE = 32000


#: Hashes already computed, per tokenizer object: ``(limit, len(tokenizer)) -> hash``. Checking anchors
#: on every call would otherwise rehash a 32000-piece vocabulary each time; the length in the key makes
#: a tokenizer that gained tokens since be hashed again.
_HASHES: weakref.WeakKeyDictionary[Any, dict[tuple[int | None, int], str]] = weakref.WeakKeyDictionary()


def _cached_hash(tokenizer: Any, limit: int | None) -> str:
    try:
        known = _HASHES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: hash every time
        return vocabulary_hash(tokenizer, limit)
    key = (limit, len(tokenizer))
    if key not in known:
        known[key] = vocabulary_hash(tokenizer, limit)
    return known[key]


@dataclass(frozen=True)
class Anchors:
    """Anchor ids per group, for one vocabulary.

    Attributes:
        groups: Group name (``"vit_sink"``, ``"llm_sink"``, ``"dead"``) -> anchor ids. Missing groups
            have no anchors; an id may belong to one group only.
        vocab_hash: SHA-256 of the vocabulary the ids refer to (restricted to ids below
            ``base_vocab_size`` when that is set).
        model: The model the anchors were made for (a name, for messages and provenance).
        top_k: How many nearest ids the rule looks at (the paper: 3).
        base_vocab_size: Compare only the vocabulary's ids below this (see the module docs), or None
            to compare the whole vocabulary.
        evidence: Free-form, JSON-ready figures that justify the anchors (e.g. from discovery).
    """

    groups: dict[str, tuple[int, ...]]
    vocab_hash: str
    model: str
    top_k: int = 3
    base_vocab_size: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise InputError(f"unknown anchor group(s) {sorted(unknown)}; groups are {list(GROUPS)}")
        groups: dict[str, tuple[int, ...]] = {}
        owner: dict[int, str] = {}
        for name in GROUPS:
            ids = tuple(_as_id(x, name) for x in self.groups.get(name, ()))
            for token_id in ids:
                if token_id in owner and owner[token_id] != name:
                    raise InputError(f"anchor id {token_id} is in both {owner[token_id]} and {name}")
                owner[token_id] = name
            groups[name] = tuple(dict.fromkeys(ids))
        object.__setattr__(self, "groups", groups)
        if not isinstance(self.vocab_hash, str) or not _HEX64.match(self.vocab_hash):
            raise InputError(f"vocab_hash must be 64 lowercase hex digits, got {self.vocab_hash!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0:
            raise InputError(f"top-k must be a positive integer, got {self.top_k!r}")
        base = self.base_vocab_size
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base <= 0):
            raise InputError(f"base_vocab_size must be a positive integer or null, got {base!r}")
        if base is not None and owner and max(owner) >= base:
            raise InputError(f"anchor id {max(owner)} is outside the base vocabulary of {base} ids")
        object.__setattr__(self, "evidence", dict(self.evidence))

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_tokenizer(
        cls,
        groups: Mapping[str, Iterable[int]],
        tokenizer: Any,
        model: str,
        *,
        top_k: int = 3,
        base_vocab_size: int | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Anchors:
        """Anchors for ``tokenizer``'s vocabulary (its hash is computed here)."""
        return cls(
            groups={name: tuple(ids) for name, ids in groups.items()},
            vocab_hash=vocabulary_hash(tokenizer, base_vocab_size),
            model=model,
            top_k=top_k,
            base_vocab_size=base_vocab_size,
            evidence=dict(evidence or {}),
        )

    # ----------------------------------------------------------------- queries
    @property
    def ids(self) -> dict[int, str]:
        """Every anchor id -> its group."""
        return {token_id: name for name, ids in self.groups.items() for token_id in ids}

    def tokenizer_hash(self, tokenizer: Any) -> str:
        """The hash of ``tokenizer``'s vocabulary as these anchors compare it (cached per tokenizer and size)."""
        return _cached_hash(tokenizer, self.base_vocab_size)

    def check_vocabulary(self, tokenizer: Any, table_rows: int | None = None) -> None:
        """Refuse a tokenizer whose vocabulary is not the one the anchors were made for.

        Args:
            tokenizer: The model's tokenizer.
            table_rows: Rows of the model's input embedding table; every anchor id must be below it.

        Raises:
            InputError: The vocabulary hash differs, or an anchor id lies outside the table.
        """
        actual = self.tokenizer_hash(tokenizer)
        if actual != self.vocab_hash:
            scope = "" if self.base_vocab_size is None else f" (ids below {self.base_vocab_size})"
            raise InputError(
                f"anchors were made for vocabulary {self.vocab_hash[:8]} (model {self.model}) but this "
                f"model's vocabulary{scope} is {actual[:8]}"
            )
        ids = self.ids
        if table_rows is not None and ids and max(ids) >= table_rows:
            raise InputError(
                f"anchor id {max(ids)} ({ids[max(ids)]}) is outside this model's embedding table of {table_rows} rows"
            )

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the anchors file's content)."""
        return {
            "format": ANCHORS_FORMAT,
            "version": ANCHORS_VERSION,
            "model": self.model,
            "vocab_hash": self.vocab_hash,
            "base_vocab_size": self.base_vocab_size,
            "top_k": self.top_k,
            "groups": {name: list(ids) for name, ids in self.groups.items()},
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Anchors:
        """Read :meth:`to_dict`'s layout; raise :class:`InputError` on anything malformed."""
        if not isinstance(data, dict):
            raise InputError("anchors must be a JSON object")
        if data.get("format", ANCHORS_FORMAT) != ANCHORS_FORMAT:
            raise InputError(f"not an anchors file (format {data.get('format')!r})")
        if data.get("version", ANCHORS_VERSION) != ANCHORS_VERSION:
            raise InputError(f"anchors version {data.get('version')!r} is not supported (expected {ANCHORS_VERSION})")
        missing = [key for key in ("groups", "vocab_hash", "model") if key not in data]
        if missing:
            raise InputError(f"anchors lack {', '.join(missing)}")
        groups = data["groups"]
        if not isinstance(groups, dict) or not all(isinstance(ids, list) for ids in groups.values()):
            raise InputError('anchors "groups" must map group names to lists of ids')
        evidence = data.get("evidence") or {}
        if not isinstance(evidence, dict):
            raise InputError('anchors "evidence" must be an object')
        return cls(
            groups={str(name): tuple(ids) for name, ids in groups.items()},
            vocab_hash=data["vocab_hash"],
            model=str(data["model"]),
            top_k=data.get("top_k", 3),
            base_vocab_size=data.get("base_vocab_size"),
            evidence=evidence,
        )

    def save(self, path: str | Path) -> Path:
        """Write the anchors JSON to ``path`` atomically and return the path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Anchors:
        """Read an anchors JSON file; every problem is one :class:`InputError` line naming the file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"anchors file {path} not found" if not path.exists() else f"{path} is not a file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"anchors file {path} is not UTF-8 text") from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"anchors file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        except OSError as exc:
            raise InputError(f"cannot read anchors file {path}: {exc.strerror}") from exc
        try:
            return cls.from_dict(data)
        except InputError as exc:
            raise InputError(f"anchors file {path}: {exc}") from exc


def _as_id(value: Any, group: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"anchor ids must be non-negative integers; {group} has {value!r}")
    return int(value)


#: The paper's anchors for LLaVA-1.5-7B (REFERENCE §2): "igh" -> ViT sinks, "▁jav" -> LLM sinks,
#: "्" (Devanagari virama) -> dead. llava-hf pads the table to 32064 rows; the ids are unchanged.
LLAVA15_7B_ANCHORS = Anchors(
    groups={"vit_sink": (1141,), "llm_sink": (26673,), "dead": (30296,)},
    vocab_hash=LLAMA2_VOCAB_HASH,
    model="llava-hf/llava-1.5-7b-hf",
    top_k=3,
    base_vocab_size=LLAMA2_VOCAB_SIZE,
    evidence={
        "source": "Fan et al., arXiv 2603.00510 (reference code, LLaVA-1.5-7B)",
        "pieces": {"vit_sink": ["igh"], "llm_sink": ["▁jav"], "dead": ["्"]},
    },
)

#: Names of models with built-in anchors: LLaVA-1.5-7B in its usual spellings (llava-hf/llava-1.5-7b-hf,
#: liuhaotian/llava-v1.5-7b, local copies). Other sizes (13B) share the vocabulary but not the projector,
#: so the paper's ids are not assumed for them.
_LLAVA15_7B_NAME = re.compile(r"llava-?v?1\.5-7b", re.IGNORECASE)


def _model_name(model_name_or_config: Any) -> str:
    if isinstance(model_name_or_config, (str, Path)):
        return str(model_name_or_config)
    for attribute in ("_name_or_path", "name_or_path"):
        name = getattr(model_name_or_config, attribute, None)
        if name:
            return str(name)
    return ""


#: The embedded mini model (by name or its cache directory ``embedlens-mini-v<N>``).
_MINI_NAME = re.compile(r"(^|[/\\])embedlens-mini(-v\d+)?[/\\]?$")


def mini_anchors() -> Anchors:
    """The embedded mini model's anchors, found by ``embedlens discover-anchors`` (docs/results)."""
    from importlib.resources import files

    return Anchors.load(Path(str(files("embedlens") / "assets" / "anchors" / "embedlens-mini.json")))


def builtin_anchors(model_name_or_config: Any) -> Anchors | None:
    """The built-in anchors for a model (by name, path or ``transformers`` config), or None.

    LLaVA-1.5-7B has the paper's ids 1141 / 26673 / 30296; the embedded mini model has the anchors
    EmbedLens discovered for it (one LLM-sink id, no ViT-sink or dead ids).
    """
    name = _model_name(model_name_or_config)
    if _LLAVA15_7B_NAME.search(name):
        return LLAVA15_7B_ANCHORS
    return mini_anchors() if _MINI_NAME.search(name) else None


def no_builtin_message(model: str) -> str:
    """The one-line error for a model without built-in anchors: built-in anchors exist for LLaVA-1.5-7B
    (and the embedded mini model) only; every other model's are found with ``discover-anchors``."""
    return (
        f"no built-in anchors for model {model} (built in: LLaVA-1.5-7B and embedlens-mini only); find its "
        f"anchors with `embedlens discover-anchors --model {model} IMAGES --out anchors.json`, then pass "
        "--anchors anchors.json"
    )
