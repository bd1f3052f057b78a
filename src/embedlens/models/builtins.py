"""Built-in model names that EmbedLens can build locally, without any download."""

from __future__ import annotations

from pathlib import Path

from embedlens.cache import cache_dir, staged_dir
from embedlens.models.registry import register_builtin

#: Bump when the tiny model's recipe changes, so stale cached copies are not reused.
TINY_VERSION = 1


@register_builtin("tiny-llava")
def tiny_llava() -> Path:
    """A tiny random LLaVA (4 x 4 grid, 4 decoder layers), built once into the cache (about 1 s)."""
    from embedlens.models.tiny import TinySpec, save_tiny_llava  # its tokenizer and processor imports are slow

    target = cache_dir() / f"tiny-llava-v{TINY_VERSION}"
    if not (target / "config.json").is_file():
        with staged_dir(target) as tmp:
            save_tiny_llava(tmp, TinySpec())
    return target


@register_builtin("embedlens-mini")
def embedlens_mini() -> Path:
    """The embedded mini LLaVA (DINOv2-S/14 + trained projector + SmolLM2-135M), built from PyPI packages."""
    from embedlens.mini.assemble import ensure_mini

    return ensure_mini()
