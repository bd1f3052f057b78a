"""Model adapters: one per family, plus the registry and the built-in models."""

from embedlens.models.base import ModelAdapter, ModulePaths, PreparedBatch, VisualSpan, resolve_layer
from embedlens.models.loading import load_adapter
from embedlens.models.registry import register_adapter, register_builtin, supported_families

__all__ = [
    "ModelAdapter",
    "ModulePaths",
    "PreparedBatch",
    "VisualSpan",
    "load_adapter",
    "register_adapter",
    "register_builtin",
    "resolve_layer",
    "supported_families",
]
