"""Registration of EmbedLens as an lmms-eval model (the ``lmms_eval.models`` entry point).

With ``pip install "embedlens[lmms]"``, stock lmms-eval finds the model ``embedlens`` through the
entry point declared in EmbedLens' ``pyproject.toml``, which names :func:`manifest`::

    lmms-eval --model embedlens \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,interventions="prune:sink+dead" \\
        --tasks pope,mme --batch_size 1 --output_path logs/

This module imports nothing from lmms-eval at import time, so installing EmbedLens without the extra
never breaks; the model class lives in :mod:`embedlens.bench.lmms_model`.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "embedlens"
MODEL_CLASS_PATH = "embedlens.bench.lmms_model.EmbedLensLMM"


def manifest() -> Any:
    """The lmms-eval model manifest: the name ``embedlens`` and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
