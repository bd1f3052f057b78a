"""What every saved result shares: provenance, the config hash, and its two files (``tokens.parquet`` and
``result.json``), written atomically."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from embedlens._version import __version__
from embedlens.files import atomic_path, atomic_write_text

RESULT_JSON = "result.json"
TOKENS_PARQUET = "tokens.parquet"


#: Config keys that say where or when a config was read, not what the model is; left out of its hash.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def _without_volatile(value: Any) -> Any:
    """``value`` with :data:`VOLATILE_CONFIG_KEYS` removed at every depth (nested sub-configs carry them too)."""
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def config_hash(config: Any) -> str:
    """SHA-256 of a ``transformers`` config's canonical JSON (its identity for provenance).

    Where the config was read from (``_name_or_path``, also inside ``text_config`` / ``vision_config``),
    its hub commit and the ``transformers`` version are left out, so one model hashes the same wherever it
    is cached.
    """
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else str(config)
    data = _without_volatile(json.loads(text))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_result_files(directory: str | Path, frame: pd.DataFrame, data: dict[str, Any]) -> dict[str, Path]:
    """Write a result's token table (``tokens.parquet``) and JSON (``result.json``), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": directory / TOKENS_PARQUET, "json": directory / RESULT_JSON}
    with atomic_path(paths["parquet"]) as tmp:
        frame.to_parquet(tmp, index=False)
    atomic_write_text(paths["json"], json.dumps(data, ensure_ascii=False, indent=1))
    return paths


def read_result_json(directory: str | Path) -> dict[str, Any]:
    """The ``result.json`` object of a saved result directory."""
    return json.loads((Path(directory) / RESULT_JSON).read_text(encoding="utf-8"))


class SavedResult:
    """What the one-image results that print as their summary share (:class:`ProbeResult` and
    :class:`~embedlens.taxonomy.result.ClassifiedResult`): ``str()``, JSON text and saving as
    ``tokens.parquet`` + ``result.json``. Subclasses give :meth:`summary`, :meth:`to_pandas` and
    :meth:`to_dict`."""

    def summary(self) -> str:
        """A person's view of the result."""
        raise NotImplementedError

    def to_pandas(self) -> pd.DataFrame:
        """One row per visual token."""
        raise NotImplementedError

    def to_dict(self, provenance: bool = True) -> dict[str, Any]:
        """The JSON object of ``result.json``."""
        raise NotImplementedError

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(**kwargs), ensure_ascii=False)

    def __str__(self) -> str:
        return self.summary()

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write :meth:`to_pandas` as ``tokens.parquet`` and :meth:`to_dict` as ``result.json`` into
        ``directory``, each atomically."""
        return write_result_files(directory, self.to_pandas(), self.to_dict())


@dataclass(frozen=True)
class Provenance:
    """Where a result came from, so it can be trusted and reproduced.

    Attributes:
        model: Model name as given (built-in name, path or hub id).
        revision: Hub commit of the checkpoint when known, else None.
        config_hash: SHA-256 of the model config (see :func:`config_hash`).
        vocab_hash: SHA-256 of the tokenizer vocabulary.
        layer: Layer read (0 = projector output / decoder input).
        lens: ``"embedding"`` or ``"logit"``.
        k: Number of tokens kept per visual token.
        exclude: Token kinds excluded from the lens.
        dtype: The model's dtype.
        embedlens_version, transformers_version, torch_version, python_version: Software versions.
        created: UTC time of the run (ISO 8601).
        profile: The profile the model was fed and read with (see :mod:`embedlens.profiles`).
        vocab_limit: The lens returned only ids below this (a base vocabulary), or None.
        rows_left_out: Embedding-table rows the lens never returned (past the tokenizer or the limit).
    """

    model: str
    revision: str | None
    config_hash: str
    vocab_hash: str
    layer: int
    lens: str
    k: int
    exclude: tuple[str, ...]
    dtype: str
    embedlens_version: str = __version__
    transformers_version: str = ""
    torch_version: str = ""
    python_version: str = field(default_factory=platform.python_version)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    profile: str = "default"
    vocab_limit: int | None = None
    rows_left_out: int = 0
