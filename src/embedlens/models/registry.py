"""Which adapter serves which model, and how a model name becomes a loaded adapter.

A model is named by a built-in name (``tiny-llava``, ``embedlens-mini``), a local directory or a
Hugging Face hub id. Built-in names map to builder functions that create (once) and return a local
directory; everything then loads through the stock ``from_pretrained``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedlens.errors import EmbedLensError, InputError, UnsupportedModelError

if TYPE_CHECKING:
    from embedlens.models.base import ModelAdapter

logger = logging.getLogger(__name__)

_ADAPTERS: list[type[ModelAdapter]] = []
_BUILTINS: dict[str, Callable[[], Path]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter available for its ``model_types``."""
    _ADAPTERS.append(cls)
    return cls


def register_builtin(name: str) -> Callable[[Callable[[], Path]], Callable[[], Path]]:
    """Decorator: ``name`` becomes a model name whose directory the function builds and returns."""

    def wrap(builder: Callable[[], Path]) -> Callable[[], Path]:
        _BUILTINS[name] = builder
        return builder

    return wrap


def supported_families() -> list[str]:
    """Families with an adapter, e.g. ``["llava"]``."""
    return [cls.family for cls in _ADAPTERS]


def adapter_class_for(config: Any) -> type[ModelAdapter]:
    """The adapter class for a ``transformers`` config, or :class:`UnsupportedModelError`."""
    model_type = getattr(config, "model_type", None)
    for cls in _ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported families: {', '.join(supported_families())}"
    )


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to something ``from_pretrained`` accepts.

    Attributes:
        name: What the user asked for (built-in name, path or hub id), recorded in results.
        location: Local directory or hub id passed to ``from_pretrained``.
        revision: Hub revision, if any.
    """

    name: str
    location: str
    revision: str | None = None


def resolve(name: str, revision: str | None = None) -> ResolvedModel:
    """Turn a built-in name, directory or hub id into a :class:`ResolvedModel`.

    Raises:
        InputError: A ``revision`` for a built-in model or a local directory (only hub ids have
            revisions; ``from_pretrained`` would ignore it silently).
        UnsupportedModelError: A path that is not a model directory.
    """
    if name in _BUILTINS:
        _refuse_revision(name, revision, "a built-in model")
        return ResolvedModel(name=name, location=str(_BUILTINS[name]()))
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise UnsupportedModelError(f"{name} is not a model directory")
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{name} is not a supported model directory (it has no config.json)")
        _refuse_revision(name, revision, "a local directory")
        return ResolvedModel(name=name, location=str(path))
    return ResolvedModel(name=name, location=name, revision=revision)


def _refuse_revision(name: str, revision: str | None, what: str) -> None:
    if revision is not None:
        raise InputError(f"a revision only applies to hub models, but {name} is {what} (drop --revision {revision})")


def load_config(model: ResolvedModel, *, trust_remote_code: bool = False) -> Any:
    """Load the model's config only (cheap), with a clear error when it cannot be had."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model.location, revision=model.revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot load model {model.name!r}: {_first_line(exc)}") from exc


def _torch_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    names |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise EmbedLensError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return names[dtype]


def resolve_device(device: str | None) -> str:
    """``"auto"``/``None`` -> ``"cuda"`` when available, else ``"cpu"``; others are checked."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EmbedLensError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EmbedLensError(f"device {device!r} asked for, but CUDA is not available here")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EmbedLensError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def load_processor(model: ResolvedModel, *, trust_remote_code: bool = False) -> Any:
    """Load the model's processor (tokenizer + image processor) with a clear error when it cannot."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            model.location, revision=model.revision, trust_remote_code=trust_remote_code
        )
    except (ImportError, RuntimeError) as exc:
        if "torchvision" not in str(exc).lower():
            raise
        raise UnsupportedModelError(missing_torchvision(model.name)) from exc
    except (OSError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"cannot load the processor of {model.name!r}: {_first_line(exc)}") from exc


def missing_torchvision(name: str) -> str:
    """The one-line error for a processor that needs a (working) torchvision."""
    return (
        f"the processor of {name!r} needs torchvision, which is missing or does not match torch here: "
        "pip install torchvision (the release built for your torch, e.g. torch==2.14.1 torchvision==0.29.1)"
    )


def context_length(config: Any) -> int | None:
    """The longest sequence the model's language part takes (``max_position_embeddings`` of its text
    config, else of the config itself), or None when the config does not say."""
    text_config = getattr(config, "text_config", None) or config
    for source in (text_config, config):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
