"""Loading a model by built-in name, local directory or hub id into its family's adapter.

Importing this module registers every adapter family and built-in model (it imports them), so
:mod:`embedlens.models.registry` itself never has to import back into the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError

from embedlens.errors import InputError, UnsupportedModelError
from embedlens.models import (  # noqa: F401  (registration side effects)
    builtins,
    gemma3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)
from embedlens.models.base import ModelAdapter, resolve_layer
from embedlens.models.registry import (
    _first_line,
    _torch_dtype,
    adapter_class_for,
    load_config,
    load_processor,
    resolve,
    resolve_device,
)
from embedlens.profiles import Profile, get_profile

logger = logging.getLogger(__name__)


def load_adapter(
    name: str,
    *,
    device: str | None = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    config: Any = None,
    processor: Any = None,
    layer: int | None = None,
    raw_prompt: str | None = None,
    check_layers: Callable[[int], object] | None = None,
    profile: str | Profile | None = None,
) -> ModelAdapter:
    """Load a model and its processor by built-in name, local directory or hub id.

    Args:
        name: ``tiny-llava``, ``embedlens-mini``, a directory or a hub id such as
            ``llava-hf/llava-1.5-7b-hf``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``, ... Ignored with ``device_map``.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: Passed to ``from_pretrained``; off by default.
        device_map: For models split over several devices (e.g. ``"auto"``), passed to ``from_pretrained``.
        config, processor: Already loaded config / processor of the same model (skips loading them).
        layer: A layer the caller will read; checked against the config before the weights load.
        raw_prompt: A raw prompt the caller will use; must hold the processor's image placeholder.
        check_layers: Called with the number of decoder layers (from the config) before the weights
            load, e.g. to check interventions; raise :class:`~embedlens.errors.InputError` to stop.
        profile: How the model is fed and read (``"default"``, ``"paper"`` or a
            :class:`~embedlens.profiles.Profile`); its attention implementation, if it names one, is
            used to load the model.

    Everything cheap is checked before the weights are read: the dtype and device names, the
    revision, the config and its family, ``layer``, ``check_layers`` and the placeholder.

    Raises:
        EmbedLensError: Any of those checks fails, or the model cannot be loaded.
    """
    chosen = get_profile(profile)
    torch_dtype = _torch_dtype(dtype)
    target_device = resolve_device(device) if device_map is None else None
    resolved = resolve(name, revision)
    config = config if config is not None else load_config(resolved, trust_remote_code=trust_remote_code)
    adapter_cls = adapter_class_for(config)
    if layer is not None:
        resolve_layer(layer, adapter_cls.num_layers_from_config(config))
    if check_layers is not None:
        check_layers(adapter_cls.num_layers_from_config(config))
    if processor is None:
        processor = load_processor(resolved, trust_remote_code=trust_remote_code)
    placeholder = getattr(processor, "image_token", "<image>")
    if raw_prompt is not None and placeholder not in raw_prompt:
        raise InputError(f"the raw prompt must contain the image placeholder {placeholder!r}")
    kwargs: dict[str, Any] = {
        "revision": resolved.revision,
        "trust_remote_code": trust_remote_code,
        "dtype": torch_dtype,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if chosen.attn_implementation is not None:
        kwargs["attn_implementation"] = chosen.attn_implementation
    try:
        model = adapter_cls.model_class().from_pretrained(resolved.location, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UnsupportedModelError(f"cannot load model {resolved.name!r}: {_first_line(exc)}") from exc
    if target_device is not None:
        model = model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s (%s) as %s", resolved.name, resolved.location, adapter_cls.family)
    return adapter_cls(model, processor, source=resolved.name, profile=chosen)
